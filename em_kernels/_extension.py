"""Loads the compiled extension em_kernels._C and gives its ops (namespace em_C) fake kernels,
so that torch.compile traces through them. The autograd formulas live in em_kernels/_ops/."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def load() -> str | None:
    """Import em_kernels._C once. Returns None on success, else why it could not be loaded."""
    try:
        importlib.import_module("em_kernels._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        return f"{type(exc).__name__}: {exc}"
    _register_fakes()
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("em_C::softmax_stats_fwd")
    def _(logits, tokens, temperature):
        rows = logits.shape[0]
        return (
            logits.new_empty((rows,), dtype=torch.float32),
            logits.new_empty((rows,), dtype=torch.float64),  # lse
            logits.new_empty((rows,) if tokens is not None else (0,), dtype=torch.float32),
        )

    @torch.library.register_fake("em_C::softmax_stats_bwd")
    def _(logits, tokens, entropy, lse, grad_entropy, grad_logprobs, temperature):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("em_C::em_inf_adjust")
    def _(logits, steps, lr, kl_weight, threshold, adam, batch_exit):
        return torch.empty_like(logits, dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.library.register_fake("em_C::adaptive_temperature")
    def _(logits, alpha, delta, max_iters, tol):
        return torch.empty_like(logits, dtype=torch.float32, memory_format=torch.contiguous_format)
