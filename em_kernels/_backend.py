"""Which backend runs an op: "triton", "cuda", "cpu", "torch", or "auto" (the only one that chooses).

- "triton": the Triton kernels in em_kernels/triton; CUDA tensors, and CPU tensors when the
  environment variable TRITON_INTERPRET=1 was set before em_kernels was imported.
- "cuda": the CUDA kernels of the compiled extension (em_kernels._C), CUDA tensors.
- "cpu": the C++ kernels of the compiled extension, CPU tensors.
- "torch": em_kernels.reference, any device.
- "auto": CUDA tensors get AUTO_CUDA_BACKEND (the faster of triton and cuda as measured in
  bench/RESULTS.md); CPU tensors get "cpu" when the extension is built, else "torch".

An explicitly requested backend that cannot run raises BackendUnavailableError saying why.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")

# On CUDA tensors "auto" prefers this backend when it is available, else the other of triton and
# cuda. Measured on an H200 (bf16, 2026-11-27, commit b62cc35, bench/RESULTS.md run E): at
# [8192, 151936] triton takes 0.645 ms forward and 1.86 ms forward + backward, cuda 0.715 and
# 1.94 ms (it keeps half as many bytes in flight per thread). At decode-size batches the CUDA
# kernel has less fixed cost ([1, 151936] 0.023 vs 0.134 ms): pass backend="cuda" there.
# em_inf_adjust and adaptive_temperature choose for themselves (em_kernels/em_inf.py);
# linear_entropy is Triton only.
AUTO_CUDA_BACKEND = "triton"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, no GPU, wrong device)."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The oldest Triton the kernels run on: 3.4 brought triton.tools.tensor_descriptor (the linear
# kernels' TMA operands). Checked 2026-11-28: 3.4.0, 3.5.1, 3.6.0 and 3.8.0 pass the Triton
# tests under the interpreter and lower every kernel for sm_90 (3.6.0 also ran them on an H200
# before); 3.3.1 cannot import the linear kernels and 3.2.0's interpreter cannot run the EM-INF
# ones. torch 2.8 is the first to bring 3.4; with older, "auto" takes the CUDA kernels.
MIN_TRITON_VERSION = (3, 4)


@functools.cache
def _triton_status() -> str:
    try:
        import triton

        version = triton.__version__
        too_old = torch.torch_version.TorchVersion(version) < MIN_TRITON_VERSION
    except Exception as exc:  # ImportError, a broken install or a version that does not parse
        return f"triton is not importable ({exc})"
    if too_old:
        oldest = ".".join(map(str, MIN_TRITON_VERSION))
        return (f"triton {version} is older than {oldest}, the oldest the kernels run on "
                f"(torch >= 2.8 comes with a new enough one)")
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
    return "available"


@functools.cache
def _extension_status() -> tuple[str, str]:
    """(cpu status, cuda status) of the compiled extension em_kernels._C."""
    from . import _extension

    failure = _extension.load()
    if failure is not None:
        reason = (
            f"the compiled extension em_kernels._C is not built or failed to load ({failure}); "
            "reinstall with `pip install --no-build-isolation -e .`"
        )
        return reason, reason
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    cpu = "available" if has_kernel("em_C::softmax_stats_fwd", "CPU") else (
        "the compiled extension has no CPU kernels")
    if not has_kernel("em_C::softmax_stats_fwd", "CUDA"):
        cuda = ("the compiled extension was built without its CUDA part (at build time no "
                "nvcc, one of another major CUDA version than torch's, a CPU build of torch, or "
                "EM_KERNELS_NO_CUDA=1; `pip install -v` prints which)")
    elif not torch.cuda.is_available():
        cuda = "no CUDA device"
    else:
        cuda = "available"
    return cpu, cuda


def available_backends() -> dict[str, str]:
    """Map each backend name to "available" or the reason it cannot run here."""
    cpu, cuda = _extension_status()
    return {"triton": _triton_status(), "cuda": cuda, "cpu": cpu, "torch": "available"}


def _check(backend: str, device: torch.device) -> None:
    status = available_backends()[backend]
    if status != "available":
        raise BackendUnavailableError(f'backend="{backend}" is unavailable: {status}')
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(
            f'backend="cuda" runs CUDA tensors only; this tensor is on {device}')
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(
            f'backend="cpu" runs CPU tensors only; this tensor is on {device}')
    if backend == "triton" and device.type == "cpu" and not triton_interpret():
        raise BackendUnavailableError(
            'backend="triton" runs CPU tensors only under TRITON_INTERPRET=1 (set before import)')
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f'backend="triton" cannot run tensors on {device}')


@functools.lru_cache(maxsize=64)
def _resolve_cached(backend: str, device_type: str, device_index: int | None) -> str:
    device = torch.device(device_type, device_index)
    if backend == "auto":
        status = available_backends()
        if device_type == "cuda":
            for choice in (AUTO_CUDA_BACKEND, "triton", "cuda"):
                if status[choice] == "available":
                    return choice
            return "torch"
        if device_type == "cpu" and status["cpu"] == "available":
            return "cpu"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(
            f'unknown backend "{backend}"; choose one of "auto", ' + ", ".join(
                f'"{b}"' for b in BACKENDS))
    _check(backend, device)
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that runs a tensor on ``device``; raises if ``backend`` cannot."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return _resolve_constant(backend, device.type, device.index)


# torch.compile calls this once while tracing and bakes the answer into the graph: resolution
# reads the environment and the dispatcher, which Dynamo cannot trace (no graph break this way).
@torch.compiler.assume_constant_result
def _resolve_constant(backend: str, device_type: str, device_index: int | None) -> str:
    return _resolve_cached(backend, device_type, device_index)
