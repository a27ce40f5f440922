"""The EM-INF ops: `em_inf_adjust` and `adaptive_temperature`, registered with torch.library.

    em_kernels::em_inf_adjust(logits[N, V], steps, lr, kl_weight, threshold, adam, batch_exit,
                              backend) -> adjusted logits [N, V]
    em_kernels::adaptive_temperature(logits[N, V], alpha, delta, max_iters, tol, backend)
                              -> logits / tau [N, V]

Both return float32 (float64 for float64 logits, which only backend="torch" accepts). They are
decode-time transforms with no gradient (the optimiser steps are closed-form inside), so no
autograd is registered; the fake kernels let torch.compile(fullgraph=True) trace through them.
Logits are 2-D with a contiguous last dim and any row stride; the public functions in
em_kernels/em_inf.py validate and reshape. ``backend`` is already resolved (never "auto").

The ops' bodies are also plain functions (`*_impl`): in eager mode the public functions call
them directly, skipping the custom-op dispatch (tens of microseconds of Python per call, which
EM-INF pays once per generated token); under torch.compile, torch.vmap, or on fake/meta
tensors, they go through the ops. Under torch.vmap a row-wise call (adaptive_temperature,
em_inf_adjust with per-row exit) is one call on the flattened rows; em_inf_adjust with the
batch-wide exit keeps each vmapped sample its own batch (one call per sample).
"""

from __future__ import annotations

import torch

from .. import reference
from . import batch_first


def _result_dtype(logits: torch.Tensor) -> torch.dtype:
    return reference.compute_dtype(logits.dtype)


def em_inf_adjust_impl(
    logits: torch.Tensor, steps: int, lr: float, kl_weight: float, threshold: float,
    adam: bool, batch_exit: bool, backend: str,
) -> torch.Tensor:
    """The op's body; eager callers on real tensors may call it directly (see em_kernels/em_inf.py)."""
    if backend == "triton":
        from ..triton import em_inf as triton_em_inf

        return triton_em_inf.em_inf_adjust_fwd(
            logits, steps, lr, kl_weight, threshold, adam, batch_exit)
    if backend in ("cpu", "cuda"):
        return torch.ops.em_C.em_inf_adjust(
            logits, steps, lr, kl_weight, threshold, adam, batch_exit)
    return reference.em_inf_adjust_ref(
        logits, steps, lr, kl_weight, threshold, "adam" if adam else "sgd",
        "batch" if batch_exit else "row").contiguous()


def adaptive_temperature_impl(
    logits: torch.Tensor, alpha: float, delta: float, max_iters: int, tol: float, backend: str,
) -> torch.Tensor:
    """The op's body; eager callers on real tensors may call it directly."""
    if backend == "triton":
        from ..triton import em_inf as triton_em_inf

        return triton_em_inf.adaptive_temperature_fwd(logits, alpha, delta, max_iters, tol)
    if backend in ("cpu", "cuda"):
        return torch.ops.em_C.adaptive_temperature(logits, alpha, delta, max_iters, tol)
    return reference.adaptive_temperature_ref(logits, alpha, delta, max_iters, tol).contiguous()


@torch.library.custom_op("em_kernels::em_inf_adjust", mutates_args=())
def em_inf_adjust_op(
    logits: torch.Tensor, steps: int, lr: float, kl_weight: float, threshold: float,
    adam: bool, batch_exit: bool, backend: str,
) -> torch.Tensor:
    return em_inf_adjust_impl(logits, steps, lr, kl_weight, threshold, adam, batch_exit, backend)


@em_inf_adjust_op.register_fake
def _(logits, steps, lr, kl_weight, threshold, adam, batch_exit, backend):
    return logits.new_empty(logits.shape, dtype=_result_dtype(logits))


@torch.library.custom_op("em_kernels::adaptive_temperature", mutates_args=())
def adaptive_temperature_op(
    logits: torch.Tensor, alpha: float, delta: float, max_iters: int, tol: float, backend: str,
) -> torch.Tensor:
    return adaptive_temperature_impl(logits, alpha, delta, max_iters, tol, backend)


@adaptive_temperature_op.register_fake
def _(logits, alpha, delta, max_iters, tol, backend):
    return logits.new_empty(logits.shape, dtype=_result_dtype(logits))


def _em_inf_adjust_vmap(info, in_dims, logits, steps, lr, kl_weight, threshold, adam,
                        batch_exit, backend):
    logits = batch_first(logits, in_dims[0], info.batch_size)
    if batch_exit and logits.shape[0] > 0:  # each sample's rows decide together, apart
        return torch.stack([em_inf_adjust_op(sample, steps, lr, kl_weight, threshold, adam,
                                             batch_exit, backend) for sample in logits]), 0
    flat = em_inf_adjust_op(logits.reshape(-1, logits.shape[-1]), steps, lr, kl_weight,
                            threshold, adam, batch_exit, backend)
    return flat.reshape(logits.shape), 0


def _adaptive_temperature_vmap(info, in_dims, logits, alpha, delta, max_iters, tol, backend):
    logits = batch_first(logits, in_dims[0], info.batch_size)
    flat = adaptive_temperature_op(logits.reshape(-1, logits.shape[-1]), alpha, delta,
                                   max_iters, tol, backend)
    return flat.reshape(logits.shape), 0


torch.library.register_vmap("em_kernels::em_inf_adjust", _em_inf_adjust_vmap)
torch.library.register_vmap("em_kernels::adaptive_temperature", _adaptive_temperature_vmap)
