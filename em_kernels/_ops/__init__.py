"""Dispatcher ops (torch.library): schemas, fake kernels and autograd, one module per op family."""

from __future__ import annotations

import contextlib

import torch

# cuBLAS hands out a 16-bit GEMM's float32 accumulator in float32 through torch's out_dtype
# forms on CUDA: torch.mm's since torch 2.8; torch.addmm's takes a float32 matrix to add to since
# 2.10 (pytorch#167931; before, it had to have the operands' dtype).
_TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__)
MM_HAS_OUT_DTYPE = _TORCH_VERSION >= (2, 8)
ADDMM_HAS_FLOAT32_OUT_DTYPE = _TORCH_VERSION >= (2, 10)
# Dynamo traces torch._C._functorch.is_batchedtensor from torch 2.8 (2.6 and 2.7 cannot).
DYNAMO_TRACES_IS_BATCHEDTENSOR = _TORCH_VERSION >= (2, 8)


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available, as a constant to torch.compile: dynamo cannot trace
    the C function behind it before torch 2.14 (2.6 to 2.11 checked), and fullgraph tracing
    failed on it."""
    return torch.amp.is_autocast_available(device_type)


def autocast_off(device_type: str):
    """A context with torch.autocast off on ``device_type``: our ops choose the precision of
    their own matmuls and reductions, which autocast would recast (when a backward runs inside
    an autocast region, for one)."""
    if autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def mm_to_float32(mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """mat1 @ mat2 of 16-bit CUDA matrices, in float32: unrounded on torch >= 2.8; before, the
    product is rounded to the 16-bit dtype first (an extra rounding, as a model's own head)."""
    if MM_HAS_OUT_DTYPE:
        return torch.mm(mat1, mat2, out_dtype=torch.float32)
    return torch.mm(mat1, mat2).float()


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
