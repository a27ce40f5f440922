"""Dispatcher ops (torch.library): schemas, fake kernels and autograd, one module per op family."""

from __future__ import annotations

import torch


def double_backward_error(public: str) -> NotImplementedError:
    """The error of a second differentiation through ``public``."""
    return NotImplementedError(
        f"{public} is differentiable once: its gradient has no backward of its own (double "
        "backward, Hessian-vector products); differentiate the plain PyTorch functions of "
        "em_kernels.reference, which hold the same math in autograd, instead")


def refuse_double_backward(backward_op: str, public: str) -> None:
    """Give a backward op an autograd formula that raises a clear error: without one, a second
    differentiation (create_graph=True, Hessian-vector products) fails with torch's advice to
    call register_autograd, or silently skips the op."""

    def backward(ctx, *grads):
        raise double_backward_error(public)

    torch.library.register_autograd(backward_op, backward,
                                    setup_context=lambda ctx, inputs, output: None)


def batch_first(x: torch.Tensor | None, in_dim: int | None, size: int) -> torch.Tensor | None:
    """A vmap rule's argument with its batch dim first (expanded to ``size`` if it has none)."""
    if x is None:
        return None
    return x.movedim(in_dim, 0) if in_dim is not None else x.expand(size, *x.shape)
