"""Lowering Triton kernels for sm_90 (H100/H200) without a GPU, for the tests that check what the
compiler makes of them (wgmma, TMA, spills, registers): the interpreter never compiles a kernel.

`run_lowering_script` runs a script in a fresh process without TRITON_INTERPRET (under it,
triton.jit gives interpreted functions that the compiler cannot lower); the script imports this
module and calls `compile_for_sm90`, and prints its findings as JSON on its last line.

The lent GPU machines run an older Triton (3.6) than this one may. To lower with that version
before a lease: `python -m venv --system-site-packages V && V/bin/pip install --no-deps
triton==3.6.0`, then `V/bin/python -m pytest tests -k lower_for_hopper` (the script runs in
sys.executable). On 2026-11-28 they passed there; the linear forward's pointer-operand tiles
spilled 24 bytes a thread (0 bf16 / 8 fp32 under 3.8), its default TMA tiles nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile


def compile_for_sm90(kernel, constants: dict, types: dict, divisible=(), scalar="i32",
                     **options):
    """triton.compile of ``kernel`` for sm_90. Every argument in ``constants`` is a constexpr;
    the others take their type from ``types``, else "*fp32" for a name ending in _ptr and
    ``scalar`` otherwise (scalar=None: every scalar must be in ``types``, KeyError if not). The
    arguments named in ``divisible`` are specialised as multiples of 16, as a real launch does
    for aligned pointers and strides. ``options``: num_warps, num_stages."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in types or scalar is None and not name.endswith("_ptr"):
            signature[name] = types[name]
        else:
            signature[name] = "*fp32" if name.endswith("_ptr") else scalar
    source = ASTSource(
        fn=kernel, signature=signature,
        constexprs={(names.index(name),): value for name, value in constants.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in divisible})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(compiled) -> tuple[int, int]:
    """(registers a thread, spill bytes a thread) of the compiled kernel, from cuobjdump
    -res-usage of its cubin (the cuobjdump that Triton's package carries). Spills show as the
    stack frame (our kernels call no functions; ptxas spills never appear in the PTX)."""
    import triton

    with tempfile.TemporaryDirectory() as folder:
        cubin_path = os.path.join(folder, "kernel.cubin")
        with open(cubin_path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                 "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin_path], capture_output=True,
                               text=True, check=True).stdout
    return (int(re.search(r"REG:(\d+)", usage).group(1)),
            int(re.search(r"STACK:(\d+)", usage).group(1)))


def run_lowering_script(script: str, **environment: str):
    """Run ``script`` in a fresh Python without TRITON_INTERPRET (this folder importable, plus
    ``environment``), and return the JSON of its last printed line. Skips the calling test
    beside a Triton older than the kernels need."""
    import pytest

    from conftest import triton_older_than
    from em_kernels._backend import MIN_TRITON_VERSION

    if triton_older_than(MIN_TRITON_VERSION):
        pytest.skip(f"the kernels need triton >= {'.'.join(map(str, MIN_TRITON_VERSION))}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    env.update(environment)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
