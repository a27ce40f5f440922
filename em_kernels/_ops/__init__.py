"""Dispatcher ops (torch.library): schemas, fake kernels and autograd, one module per op family."""

from __future__ import annotations

import torch


def refuse_double_backward(backward_op: str, public: str) -> None:
    """Give a backward op an autograd formula that raises a clear error: without one, a second
    differentiation (create_graph=True, Hessian-vector products) fails with torch's advice to
    call register_autograd, or silently skips the op."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{public} is differentiable once: its gradient has no backward of its own (double "
            "backward, Hessian-vector products); differentiate the reference implementation "
            "(backend=\"torch\" materialises the same math with autograd) instead")

    torch.library.register_autograd(backward_op, backward,
                                    setup_context=lambda ctx, inputs, output: None)
