"""Providers and helpers shared by the op modules: the em-kernels backends, peers, chunking."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..harness import Context, Provider, Skip

EM_BACKENDS = ("triton", "cuda", "cpu")
# Row chunks of the memory-saving torch providers: at most 1024 rows (verl uses 2048, TRL goes
# row by row) and at least 4 chunks, so that chunking also shows at the small CPU shapes.
CHUNK_MAX_ROWS = 1024
CHUNK_MIN_COUNT = 4


def em_backend_unavailable(backend: str) -> Callable[[Context], str | None]:
    """Why em-kernels' `backend` cannot be benchmarked on this run's device, or None."""

    def unavailable(ctx: Context) -> str | None:
        import em_kernels

        if backend == "cpu" and ctx.is_cuda:
            return "the cpu backend runs CPU tensors; this run is on CUDA"
        if backend == "cuda" and not ctx.is_cuda:
            return "the cuda backend runs CUDA tensors; this run is on CPU"
        if backend == "triton" and not ctx.is_cuda:
            return ("Triton runs CPU tensors only in its interpreter, a correctness tool, "
                    "not a benchmark")
        status = em_kernels.available_backends()[backend]
        return None if status == "available" else status

    return unavailable


def compile_unavailable(ctx: Context) -> str | None:
    if not ctx.is_cuda and not ctx.explicitly_requested("compile"):
        return ("torch.compile on CPU compiles for tens of seconds per shape; "
                "include it with --providers compile")
    return None


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with a fresh dynamo cache: each cell compiles for its own static shape
    (and no cell hits the recompile limit and silently falls back to eager)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def chunk_rows(rows: int) -> int:
    return max(1, min(CHUNK_MAX_ROWS, math.ceil(rows / CHUNK_MIN_COUNT)))


def chunked(fn: Callable[..., tuple[torch.Tensor, ...]], rows_args: tuple[torch.Tensor, ...],
            shared_args: tuple = ()) -> tuple[torch.Tensor, ...]:
    """fn over row chunks of rows_args, each chunk checkpointed (its temporaries are recomputed
    in the backward instead of kept), outputs concatenated: the verl / TRL memory-saving form."""
    size = chunk_rows(rows_args[0].shape[0])
    pieces = []
    for start in range(0, rows_args[0].shape[0], size):
        chunk = tuple(arg[start:start + size] for arg in rows_args)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(fn, *chunk, *shared_args, use_reentrant=False))
        else:
            pieces.append(fn(*chunk, *shared_args))
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def package_unavailable(module: str, what: str, *, since: str | None = None,
                        cpu_since: str | None = None) -> Callable[[Context], str | None]:
    """Why a peer from package ``what`` (imported as ``module``) cannot run here, or None: not
    installed, older than ``since`` (the release that brought the function benchmarked), or, on a
    CPU run, CUDA-only: always without ``cpu_since``, else before that release."""

    def unavailable(ctx: Context) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed (pip install {what})"
        on_cpu = not ctx.is_cuda
        if on_cpu and cpu_since is None:
            return f"{what} runs CUDA tensors only"
        if since is None and not on_cpu:  # no release to compare with
            return None
        try:
            installed = torch.torch_version.TorchVersion(importlib.metadata.version(what))
        except importlib.metadata.PackageNotFoundError:
            return f"{what} is importable but has no package metadata, so its version is unknown"
        if since is not None and installed < since:
            return f"{what} {installed} predates the op ({what} >= {since})"
        if on_cpu and installed < cpu_since:
            return f"{what} {installed} runs CUDA tensors only (CPU ones from {what} {cpu_since})"
        return None

    return unavailable


def not_offered(reason: str) -> Callable[[Context], str | None]:
    return lambda ctx: reason


def never_built(case) -> Callable:
    raise Skip("this provider does not offer the op")


def em_providers(call: Callable[[object, str], Callable], suffix: str = "",
                 **provider_fields) -> list[Provider]:
    """One provider per em-kernels backend, named backend + suffix: call(case, backend) builds
    the forward callable; provider_fields go to each Provider."""
    return [Provider(backend + suffix, (lambda case, b=backend: call(case, b)),
                     unavailable=em_backend_unavailable(backend), **provider_fields)
            for backend in EM_BACKENDS]
