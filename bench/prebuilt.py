"""The id of a compiled extension built on another machine for the GPU machine
(bench/prebuild_for_gpu.sh), which gpu_check.sh compares with its own before it uses that build
instead of compiling one there (a minute or more of a 15-minute lease).

The id names what a build for another machine can get wrong: the extension's sources (every file
under csrc/, and setup.py, by content), the interpreter's extension suffix (CPython version and
platform), torch's version, commit and CUDA release (the C++ ABI and runtime the extension
links against) and the CUDA architectures. It does not name the compilers or the C library:
gpu_check.sh's probe that the copied extension loads with its CUDA ops catches what those
break. Computing the id imports nothing heavy (torch's versions come from its version.py), so
the check takes well under a second.

    python -m bench.prebuilt          prints the id for this interpreter and these sources
    python -m bench.prebuilt --archs  prints the CUDA architectures both scripts build for
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What gpu_check.sh and prebuild_for_gpu.sh build for (TORCH_CUDA_ARCH_LIST): Hopper (H100 /
# H200) alone, the fastest build.
CUDA_ARCHS = "9.0a"


def sources_digest() -> str:
    """sha256 (16 hex digits) of setup.py and every file under csrc/, names included."""
    files = sorted(path for path in (REPO / "csrc").rglob("*") if path.is_file())
    digest = hashlib.sha256()
    for path in [REPO / "setup.py", *files]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def torch_build() -> str:
    """"VERSION@COMMIT cuda CUDA" of the torch this interpreter would import, or "none"."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "none"
    version_py = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_py.read_text()
    except OSError:
        return "unknown"
    fields = dict(re.findall(r"^(__version__|git_version|cuda)\b[^=\n]*=\s*['\"]([^'\"]*)['\"]",
                             text, re.MULTILINE))
    return (f"{fields.get('__version__', '?')}@{fields.get('git_version', '?')[:12]} "
            f"cuda {fields.get('cuda', 'none')}")


def build_id() -> str:
    return (f"sources {sources_digest()} python {sysconfig.get_config_var('EXT_SUFFIX')} "
            f"torch {torch_build()} archs {CUDA_ARCHS}")


if __name__ == "__main__":
    print(CUDA_ARCHS if sys.argv[1:] == ["--archs"] else build_id())
