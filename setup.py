"""Builds the compiled extension em_kernels._C with torch's cpp_extension and ninja.

- The CPU part (csrc/ops.cpp, csrc/cpu/*.cpp) is always built.
- The CUDA part (csrc/cuda/*.cu) is built wherever a CUDA build of torch and an nvcc of the
  same major CUDA version exist, for sm_80 and sm_90a unless TORCH_CUDA_ARCH_LIST says
  otherwise. It only has to compile and link here: it runs where there is a GPU.
- EM_KERNELS_NO_CUDA=1 skips the CUDA part on purpose. EM_KERNELS_REQUIRE_CUDA=1 makes a
  missing nvcc, a CPU-only torch or an nvcc of another major CUDA version than torch's (which
  torch refuses to build with: torch 2.8's CUDA 12.8 beside a CUDA 13 toolkit) an error instead
  of a CPU-only build, which prints the reason (`pip install -v` shows it). Without the CUDA
  part, GPUs run the Triton kernels.
- A compiler error fails the install: it never installs silently without the extension.

nvcc on some machines is a wrapper script in a bin folder of its own, from which torch guesses
CUDA_HOME wrong; when CUDA_HOME is unset we ask nvcc itself (`nvcc --dryrun` prints TOP).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# A100-class (+ its PTX, which newer GPUs JIT-compile) and Hopper; TORCH_CUDA_ARCH_LIST overrides.
DEFAULT_ARCHS = "8.0+PTX;9.0a"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _real_cuda_home() -> str | None:
    """The toolkit folder that nvcc really runs from, or None without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    if match is None:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return os.path.normpath(match.group(1).strip())


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    found = _real_cuda_home()
    if found is not None:
        os.environ["CUDA_HOME"] = found

import torch  # noqa: E402  (after CUDA_HOME: cpp_extension reads it at import)
from torch.utils import cpp_extension  # noqa: E402


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _nvcc_version(cuda_home: str) -> str | None:
    """The CUDA release of CUDA_HOME's nvcc ("13.0"), or None if it cannot tell."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return None if match is None else f"{match.group(1)}.{match.group(2)}"


def _want_cuda() -> bool:
    if _env_flag("EM_KERNELS_NO_CUDA"):
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc was not found (set CUDA_HOME)")
    elif not any(os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "bin", name))
                 for name in ("nvcc", "nvcc.exe")):
        problems.append(f"there is no nvcc at {cpp_extension.CUDA_HOME}/bin (point CUDA_HOME at "
                        "a CUDA toolkit)")
    elif torch.version.cuda is not None:
        nvcc = _nvcc_version(cpp_extension.CUDA_HOME)
        if nvcc is not None and nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
            problems.append(f"the nvcc at {cpp_extension.CUDA_HOME} is CUDA {nvcc} and torch was "
                            f"built with CUDA {torch.version.cuda} (torch builds extensions only "
                            "with the same major version: point CUDA_HOME at such a toolkit)")
    if problems:
        if _env_flag("EM_KERNELS_REQUIRE_CUDA"):
            raise RuntimeError("EM_KERNELS_REQUIRE_CUDA=1 but " + " and ".join(problems))
        print("em-kernels: building the CPU part only: " + " and ".join(problems))
        return False
    return True


def _torchs_libstdcxx() -> list[str]:
    """The libstdc++ shared library this process (torch) loaded, as a link input, or [] if none.

    Some toolchains link libstdc++ statically into a shared object: the H200 machine's g++
    (a wrapper that points -B at its own gcc folder, 2026-11-28) did. The extension then carries
    a second copy of the C++ runtime beside the one torch uses, and c10::str's ostringstream
    formats numbers with facets the two copies do not share: a TORCH_CHECK message with a number
    in it crashed the process there (and here, with -static-libstdc++, lost the number). Naming
    torch's own libstdc++.so ahead of the compiler's implicit -lstdc++ makes the linker resolve
    every C++ runtime symbol to it, dynamically, whatever the toolchain's default.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(path for path in paths if os.path.isfile(path))[:1]


def extensions():
    cpu_sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # No -march: the CPU kernels compile their hot loops for baseline x86-64, AVX2 and AVX-512 and
    # pick one at run time, so one build runs on any x86-64. No -ffast-math: the kernels test for
    # NaN. -ffp-contract=fast turns a * b + c into FMA inside the AVX2/AVX-512 variants.
    # -Wno-psabi: the always-inlined vector helpers never cross an ABI boundary.
    # -fno-math-errno: no kernel reads errno, and it lets sqrt compile to one vector instruction.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]
    extra_link = ["-fopenmp"] + _torchs_libstdcxx()
    if cuda_sources and _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        # No --use_fast_math: it implies -ftz=true, which flushes subnormal inputs, products and
        # gradients to zero (bf16 logits and gradients have subnormals torch keeps). IEEE division
        # and sqrt (per row only, so free); the per-entry exp2 is the ex2.approx instruction,
        # written out in the kernels; -fmad=true keeps a * b + c fused.
        nvcc_flags = ["-O3", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true",
                      "-lineinfo", "--expt-relaxed-constexpr"]
        return [cpp_extension.CUDAExtension(
            "em_kernels._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[("EM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link)]
    return [cpp_extension.CppExtension(
        "em_kernels._C", cpu_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
