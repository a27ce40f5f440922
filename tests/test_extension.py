"""The compiled extension em_kernels._C: that it is built and found, what available_backends()
says about it, the registered em_C ops (opcheck, errors on misuse), the exactness of its dtype
conversions and the agreement of its CPU ISA variants. The numerical tests of the ops through the
public API live in tests/test_entropy.py (the "cpu" and "cuda" backends)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import em_kernels
from em_kernels import _extension, reference

OPS = ("softmax_stats_fwd", "softmax_stats_bwd")
HALF_DTYPES = (torch.bfloat16, torch.float16)
HAS_CUDA = torch.cuda.is_available()


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"em_C::{op}", key)


def _built_with_cuda() -> bool:
    return bool(importlib.import_module("em_kernels._C").with_cuda)


@pytest.fixture(scope="module", autouse=True)
def extension():
    failure = _extension.load()
    assert failure is None, (
        f"em_kernels._C did not load ({failure}); build it with "
        "`python3 -m pip install --no-build-isolation -e .`")
    return importlib.import_module("em_kernels._C")


def _devices():
    devices = ["cpu"]
    if HAS_CUDA and _extension.load() is None and _built_with_cuda():
        devices.append("cuda")
    return devices


# ----------------------------------------------------------------------------------------------
# Build, packaging and backend status


def test_extension_lives_in_the_package(extension):
    """Editable and regular installs alike put _C*.so next to em_kernels/__init__.py."""
    package_dir = os.path.dirname(os.path.abspath(em_kernels.__file__))
    assert os.path.dirname(os.path.abspath(extension.__file__)) == package_dir


def test_ops_are_registered_for_the_parts_that_were_built(extension):
    for op in OPS:
        assert _has_kernel(op, "CPU"), f"em_C::{op} has no CPU kernel"
        assert _has_kernel(op, "CUDA") == bool(extension.with_cuda), (
            f"em_C::{op}: CUDA kernel registered = {_has_kernel(op, 'CUDA')}, but the extension "
            f"says with_cuda = {extension.with_cuda}")


def test_available_backends_reports_the_extension(extension):
    status = em_kernels.available_backends()
    assert status["cpu"] == "available"
    if not extension.with_cuda:
        assert "built without its CUDA part" in status["cuda"]
    elif not HAS_CUDA:
        assert status["cuda"] == "no CUDA device"
    else:
        assert status["cuda"] == "available"


def test_a_triton_older_than_the_kernels_need_is_unavailable(monkeypatch):
    """Beside Triton < 3.4 (torch < 2.8) the Triton backend is unavailable, with the reason, and
    "auto" runs the other backends (the kernels fail there: no tensor descriptors in 3.3, an
    interpreter without int1 in 3.2)."""
    triton = pytest.importorskip("triton")
    from em_kernels import _backend

    def forget():  # the statuses and resolutions cached from either version
        _backend._triton_status.cache_clear()
        _backend._resolve_cached.cache_clear()

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    forget()
    try:
        status = em_kernels.available_backends()["triton"]
        assert status == ("triton 3.3.1 is older than 3.4, the oldest the kernels run on "
                          "(torch >= 2.8 comes with a new enough one)")
        with pytest.raises(em_kernels.BackendUnavailableError, match="older than 3.4"):
            em_kernels.entropy(torch.zeros(2, 3), backend="triton")
        monkeypatch.setattr(_backend, "_extension_status", lambda: ("available", "available"))
        _backend._resolve_cached.cache_clear()
        assert _backend._resolve_cached("auto", "cuda", 0) == "cuda"
    finally:
        monkeypatch.undo()
        forget()


def test_auto_uses_the_cpu_kernels_for_cpu_tensors():
    from em_kernels._backend import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_auto_on_cuda_prefers_the_measured_faster_then_the_other_then_torch(monkeypatch):
    """With backend="auto" a CUDA tensor gets AUTO_CUDA_BACKEND (the faster as measured), else the
    other compiled-or-Triton backend, else torch."""
    from em_kernels import _backend

    preferred = _backend.AUTO_CUDA_BACKEND
    other = "triton" if preferred == "cuda" else "cuda"
    status = dict.fromkeys(_backend.BACKENDS, "available")
    monkeypatch.setattr(_backend, "available_backends", lambda: dict(status))
    try:
        for unavailable, expected in ((None, preferred), (preferred, other), (other, "torch")):
            if unavailable is not None:
                status[unavailable] = "not here"
            _backend._resolve_cached.cache_clear()
            assert _backend._resolve_cached("auto", "cuda", 0) == expected
    finally:
        _backend._resolve_cached.cache_clear()  # no answer from the patched statuses survives


# ----------------------------------------------------------------------------------------------
# The dispatcher ops


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_tokens", [False, True])
def test_opcheck(device, dtype, with_tokens):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 37, generator=generator) * 3).to(dtype).to(device)
    tokens = torch.randint(0, 37, (5,), generator=generator).to(device) if with_tokens else None
    torch.library.opcheck(torch.ops.em_C.softmax_stats_fwd.default, (logits, tokens, 0.7))
    entropy, lse, _ = torch.ops.em_C.softmax_stats_fwd(logits, tokens, 0.7)
    grad_entropy = torch.randn(5, generator=generator).to(device)
    grad_logprobs = torch.randn(5, generator=generator).to(device) if with_tokens else None
    torch.library.opcheck(
        torch.ops.em_C.softmax_stats_bwd.default,
        (logits, tokens, entropy, lse, grad_entropy, grad_logprobs, 0.7))


def _fwd(logits, tokens=None, temperature=1.0):
    return torch.ops.em_C.softmax_stats_fwd(logits, tokens, temperature)


def _bwd(logits, tokens=None, entropy=None, lse=None, grad_entropy=None, grad_logprobs=None,
         temperature=1.0):
    rows = logits.shape[0] if logits.dim() else 1
    zeros = torch.zeros(rows, device=logits.device)
    return torch.ops.em_C.softmax_stats_bwd(
        logits, tokens, zeros if entropy is None else entropy,
        zeros.double() if lse is None else lse,
        zeros if grad_entropy is None else grad_entropy, grad_logprobs, temperature)


LOGITS = torch.zeros(4, 10)
MISUSE = [
    ("float64 logits", lambda: _fwd(LOGITS.double()), "float32, bfloat16 or float16"),
    ("integer logits", lambda: _fwd(LOGITS.long()), "float32, bfloat16 or float16"),
    ("1-D logits", lambda: _fwd(LOGITS[0]), r"2-D \[N, V\], got 1-D"),
    ("3-D logits", lambda: _fwd(LOGITS[None]), r"2-D \[N, V\]"),
    ("V = 0", lambda: _fwd(LOGITS[:, :0]), "V = 0"),
    ("strided last dim", lambda: _fwd(LOGITS[:, ::2]), "contiguous"),
    ("zero temperature", lambda: _fwd(LOGITS, None, 0.0), "finite positive"),
    ("negative temperature", lambda: _fwd(LOGITS, None, -1.0), "finite positive number, got -1"),
    ("nan temperature", lambda: _fwd(LOGITS, None, float("nan")), "finite positive"),
    ("inf temperature", lambda: _fwd(LOGITS, None, float("inf")), "finite positive"),
    ("int32 tokens", lambda: _fwd(LOGITS, torch.zeros(4, dtype=torch.int32)), "tokens must be Long"),
    ("tokens of the wrong length", lambda: _fwd(LOGITS, torch.zeros(3, dtype=torch.long)),
     r"tokens must have shape \[N\] = \[4\]"),
    ("2-D tokens", lambda: _fwd(LOGITS, torch.zeros(4, 1, dtype=torch.long)),
     r"tokens must have shape"),
    ("float64 entropy", lambda: _bwd(LOGITS, entropy=torch.zeros(4, dtype=torch.float64)),
     "entropy must be Float"),
    ("short lse", lambda: _bwd(LOGITS, lse=torch.zeros(3, dtype=torch.float64)),
     r"lse must have shape \[N\]"),
    ("float32 lse", lambda: _bwd(LOGITS, lse=torch.zeros(4)), "lse must be Double"),
    ("bf16 grad_entropy", lambda: _bwd(LOGITS, grad_entropy=torch.zeros(4, dtype=torch.bfloat16)),
     "grad_entropy must be Float"),
    ("grad_logprobs without tokens", lambda: _bwd(LOGITS, grad_logprobs=torch.zeros(4)),
     "grad_logprobs needs tokens"),
    ("short grad_logprobs", lambda: _bwd(LOGITS, tokens=torch.zeros(4, dtype=torch.long),
                                         grad_logprobs=torch.zeros(2)), "grad_logprobs must have"),
    ("bwd: strided last dim", lambda: _bwd(LOGITS[:, ::2]), "contiguous"),
]


@pytest.mark.parametrize("call, message", [m[1:] for m in MISUSE], ids=[m[0] for m in MISUSE])
def test_misuse_raises_runtime_error(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_extension_shares_torchs_cpp_runtime(extension):
    """The extension holds no C++ runtime of its own: its libstdc++ symbols resolve to the one
    torch's libc10 uses. A toolchain that links libstdc++ statically gave it a second copy (the
    H200 machine's g++, 2026-11-28), whose stream facets the first never set up: every C++ check
    message with a number in it crashed the process there, and lost the number here (built with
    -static-libstdc++). setup.py links torch's libstdc++.so to prevent it (_torchs_libstdcxx)."""
    import ctypes

    ours = ctypes.CDLL(extension.__file__)  # already loaded: this is its handle
    c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    for symbol in ("__cxa_throw", "_ZNSo9_M_insertIlEERSoT_"):  # std::ostream << long
        assert (ctypes.cast(getattr(ours, symbol), ctypes.c_void_p).value
                == ctypes.cast(getattr(c10, symbol), ctypes.c_void_p).value), (
            f"em_kernels._C defines its own {symbol}: it was linked with a static libstdc++")


# setup.py run as if torch had been built with CUDA sys.argv[1]; setup() only prints whether
# the extension it was given has the CUDA part.
_SETUP_WITH_TORCH_CUDA = r"""
import runpy, sys
import setuptools, torch
torch.version.cuda = sys.argv[1]
setuptools.setup = lambda **kwargs: print("CUDA part:", [
    any(source.endswith(".cu") for source in extension.sources)
    for extension in kwargs["ext_modules"]])
runpy.run_path(SETUP, run_name="__main__")
"""


def test_setup_leaves_out_the_cuda_part_without_a_matching_nvcc(tmp_path):
    """torch refuses to build a CUDA extension with an nvcc of another major CUDA version than
    its own (torch 2.8's CUDA 12.8 beside this machine's CUDA 13 toolkit failed the whole
    install), and fails on a CUDA_HOME without nvcc: setup.py then builds the CPU part and says
    why, or with EM_KERNELS_REQUIRE_CUDA=1 stops with that reason. An nvcc of the same major
    version keeps the CUDA part. The toolkit is a fake: a CUDA_HOME whose bin/nvcc prints a
    release."""
    toolkit = tmp_path / "cuda-12.8"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    nvcc.chmod(0o755)
    setup_py = os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py")
    script = _SETUP_WITH_TORCH_CUDA.replace("SETUP", repr(setup_py))
    env = {k: v for k, v in os.environ.items()
           if k not in ("EM_KERNELS_NO_CUDA", "EM_KERNELS_REQUIRE_CUDA", "CUDA_PATH")}

    def run(torch_cuda, cuda_home=toolkit, **extra):
        return subprocess.run([sys.executable, "-c", script, torch_cuda],
                              env={**env, "CUDA_HOME": str(cuda_home), **extra},
                              capture_output=True, text=True, timeout=300)

    same = run("12.4")  # a minor difference torch builds with
    assert same.returncode == 0 and "CUDA part: [True]" in same.stdout, same
    mismatch = f"the nvcc at {toolkit} is CUDA 12.8 and torch was built with CUDA 13.0"
    other = run("13.0")
    assert other.returncode == 0, other.stderr
    assert "CUDA part: [False]" in other.stdout and mismatch in other.stdout, other.stdout
    assert "building the CPU part only" in other.stdout
    required = run("13.0", EM_KERNELS_REQUIRE_CUDA="1")
    assert required.returncode != 0 and mismatch in required.stderr
    empty = tmp_path / "not-a-toolkit"
    empty.mkdir()
    missing = run("12.4", cuda_home=empty)
    assert "CUDA part: [False]" in missing.stdout, missing
    assert f"there is no nvcc at {empty}/bin" in missing.stdout


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_kernel_rejects_tensors_on_other_devices():
    if not _built_with_cuda():
        pytest.skip("the extension was built without its CUDA part")
    logits = torch.zeros(4, 10, device="cuda")
    with pytest.raises(RuntimeError, match="tokens is on cpu"):
        _fwd(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="logits are on cpu"):
        _fwd(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long, device="cuda"))


def test_token_ids_out_of_range_give_nan_logprobs_and_no_one_hot():
    """Through torch.ops.em_C directly (the public functions reject them earlier on CPU): an id
    outside [0, V) has a NaN log-prob, and its logit is taken to lie outside the row (a
    vocabulary shard's rule): log-prob gradient -p, no one-hot."""
    logits = torch.randn(4, 10)
    tokens = torch.tensor([-1, 3, 10, 9])
    entropy, lse, logprobs = _fwd(logits, tokens)
    assert torch.isnan(logprobs[[0, 2]]).all() and torch.isfinite(logprobs[[1, 3]]).all()
    grad_logprobs = torch.ones(4)
    grad = _bwd(logits, tokens, entropy, lse, torch.zeros(4), grad_logprobs)
    expected = -torch.softmax(logits, -1)
    expected[[1, 3], [3, 9]] += 1.0
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Exact dtype conversions


_PATTERNS_PER_ROW = 4


def _all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern of ``dtype``, as 16384 rows of 16 entries: 4 consecutive patterns,
    then 12 masked (-inf) entries.

    The CUDA kernel gives each thread one 16-byte vector (4 fp32 or 8 bf16/fp16 entries), so a
    row's summation order depends on the dtype; with every finite entry in the first 4, one thread
    sums them in the same order for every dtype (the masked entries add exact zeros), and any
    difference in the results is a difference in the values read."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    rows = patterns.view(-1, _PATTERNS_PER_ROW)
    masked = torch.full((rows.shape[0], 16 - _PATTERNS_PER_ROW), float("-inf"), dtype=dtype)
    return torch.cat([rows, masked], dim=1)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_are_read_exactly(device, dtype):
    """bf16/fp16 logits give bitwise the fp32 results of the same values: the in-register
    conversion is exact for every bit pattern (normals, subnormals, zeros, inf, NaN)."""
    logits = _all_bit_patterns(dtype).to(device)
    tokens = torch.arange(logits.shape[0], device=device) % _PATTERNS_PER_ROW
    half = _fwd(logits, tokens, 0.9)
    full = _fwd(logits.float(), tokens, 0.9)
    for name, a, b in zip(("entropy", "lse", "logprobs"), half, full):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)]), name


def _float_samples() -> torch.Tensor:
    """Random float32 bit patterns plus the edge cases of rounding to 16 bits: zeros, subnormals,
    the smallest and largest normals, overflow thresholds, ties, infinities and NaN."""
    generator = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 16,), generator=generator, dtype=torch.int64)
    special = torch.tensor([
        0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 65536.0, 1e30, -1e30, 2.0**-14,
        2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 2.0**-149, 2.0**-126, 1.0 + 2.0**-11,
        1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895313892515355e38,
        float("inf"), float("-inf"), float("nan")], dtype=torch.float32)
    # Values on the 16-bit grids and exactly halfway between neighbours (ties to even).
    grid = torch.arange(0, 2**15, 7, dtype=torch.int32).to(torch.int16)
    ties = torch.cat([
        grid.view(torch.bfloat16).float() * (1 + 2.0**-8),
        grid.view(torch.float16).float() * (1 + 2.0**-11),
        grid.view(torch.float16).float() + 2.0**-25])
    return torch.cat([random_bits.to(torch.int32).view(torch.float32), special, ties, -ties])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gradients_round_like_torch(device, dtype):
    """The gradient is rounded to bf16/fp16 exactly as torch's .to(dtype) rounds (nearest even,
    overflow to inf, subnormals, NaN). With lse = 0 and zero logits every p_j is exactly 1, so a
    row with gH = 0 and gL = -w has gradient exactly w away from its token: any float32 w can be
    sent through the kernel's output conversion."""
    values = _float_samples().to(device)
    rows, vocab = values.numel(), 33  # 2 x 16 lanes / vectors and a scalar tail
    logits = torch.zeros(rows, vocab, dtype=dtype, device=device)
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    zeros = torch.zeros(rows, device=device)
    grad = torch.ops.em_C.softmax_stats_bwd(logits, tokens, zeros, zeros.double(), zeros, -values,
                                            1.0)
    expected = values.to(dtype)[:, None].expand(rows, vocab - 1)
    got = grad[:, 1:]
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    mismatch = (got != expected) & ~torch.isnan(expected)
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} entries differ, e.g. {values[mismatch.any(1)][:5].tolist()}")


# ----------------------------------------------------------------------------------------------
# CPU ISA variants

_VARIANT_SCRIPT = r"""
import json, sys, torch
import em_kernels._C
logits = torch.load(sys.argv[1])
tokens = torch.arange(logits.shape[0]) % logits.shape[1]
# torch 2.6 names the baseline "NO AVX"
out = {"capability": torch.backends.cpu.get_cpu_capability().replace("NO AVX", "DEFAULT")}
for dtype in ("float32", "bfloat16", "float16"):
    z = logits.to(getattr(torch, dtype))
    entropy, lse, logprobs = torch.ops.em_C.softmax_stats_fwd(z, tokens, 0.8)
    grad = torch.ops.em_C.softmax_stats_bwd(
        z, tokens, entropy, lse, torch.ones_like(entropy), torch.ones_like(entropy), 0.8)
    out[dtype] = [t.double().tolist() for t in (entropy, logprobs, grad.reshape(-1))]
print(json.dumps(out))
"""

_CAPABILITY_ORDER = ["DEFAULT", "AVX2", "AVX512"]


def _supported_capabilities() -> list[str]:
    here = torch.backends.cpu.get_cpu_capability().replace("NO AVX", "DEFAULT")
    if here not in _CAPABILITY_ORDER:  # not x86-64: one variant only
        return []
    return _CAPABILITY_ORDER[: _CAPABILITY_ORDER.index(here) + 1]


@pytest.mark.skipif(not _supported_capabilities(), reason="CPU ISA variants exist on x86-64 only")
def test_every_cpu_isa_variant_matches_the_oracle(tmp_path):
    """The CPU kernels are compiled for baseline x86-64, AVX2 and AVX-512 and pick one from
    torch's CPU capability (ATEN_CPU_CAPABILITY): run each variant this CPU supports in a fresh
    process, on rows with masked entries, a NaN, a long row and an all -inf row."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 4133, generator=generator) * 4
    logits[1, ::3] = float("-inf")
    logits[2, 17] = float("nan")
    logits[3] = float("-inf")
    logits[4, :4100] = float("-inf")
    path = tmp_path / "logits.pt"
    torch.save(logits, path)
    for capability in _supported_capabilities():
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
        done = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, str(path)], env=env,
                              capture_output=True, text=True, timeout=300, check=True)
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["capability"] == capability
        for dtype in ("float32", "bfloat16", "float16"):
            z = logits.to(getattr(torch, dtype)).double()
            tokens = torch.arange(z.shape[0]) % z.shape[1]
            z_ref = z.clone().requires_grad_()
            logprobs_ref, entropy_ref = reference.logprobs_and_entropy_ref(z_ref, tokens, 0.8)
            (entropy_ref + logprobs_ref).sum().backward()
            entropy, logprobs, grad = (torch.tensor(v, dtype=torch.float64) for v in result[dtype])
            grad_ref = z_ref.grad.reshape(-1)
            if dtype != "float32":  # the gradient is returned in the logits' dtype
                grad_ref = grad_ref.to(getattr(torch, dtype)).double()
            tolerance = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-3}[dtype]
            for name, got, want in (("entropy", entropy, entropy_ref.detach()),
                                    ("logprobs", logprobs, logprobs_ref.detach()),
                                    ("grad", grad, grad_ref)):
                torch.testing.assert_close(got, want, rtol=tolerance, atol=1e-5, equal_nan=True,
                                           msg=f"{capability} {dtype} {name}")


_REALIGN_CHECK = r"""
#include <cstdio>
#include <cstring>
#include "em/realign.h"

int main() {
  unsigned char bytes[32];
  for (int i = 0; i < 32; ++i) bytes[i] = static_cast<unsigned char>(37 * i + 11);
  uint32_t words[8];
  std::memcpy(words, bytes, sizeof(words));
  int wrong = 0;
  for (int shift = 0; shift < 16; shift += 2) {
    uint32_t out[4];
    em::realign_words(words, shift, out);
    if (std::memcmp(out, bytes + shift, 16) != 0) {
      std::printf("shift %d: wrong bytes\n", shift);
      ++wrong;
    }
  }
  return wrong;
}
"""


def test_realign_cuts_every_two_byte_offset(tmp_path):
    """The CUDA forward reads a misaligned chunk's vectors through em::realign_words (the GPU
    runs it through __funnelshift_r; this host build, the same word selection with plain
    shifts): for every 2-byte offset it must give the 16 bytes that start there."""
    compiler = os.environ.get("CXX", "c++")
    source = tmp_path / "realign_check.cpp"
    source.write_text(_REALIGN_CHECK)
    include = os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc", "include")
    binary = tmp_path / "realign_check"
    try:
        subprocess.run([compiler, "-std=c++17", "-O2", f"-I{include}", str(source), "-o",
                        str(binary)], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip(f"no C++ compiler ({compiler})")
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
