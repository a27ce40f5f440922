"""Triton kernels, one module per op family: @triton.jit kernels and their launchers.

Every launcher is decorated with `launches_on_tensor_device`: Triton launches on the current
CUDA device and its current stream, not on the device of the tensors it is given, so without the
guard a tensor on cuda:1 with cuda:0 current (a trainer that never calls set_device, a model
spread with device_map="auto") would be read by a kernel on the wrong GPU: an illegal address,
or, with peer access, a race against the stream that wrote it.

The launchers size their grids with the two helpers below, not with triton.cdiv and
triton.next_power_of_2: from Triton 3.6 those are constexpr functions that cost about 2 us a
host call (measured on the 2-core CPU machine), several calls an op, and EM-INF's decoding loop
is bound by the host."""

import functools

import torch


def launches_on_tensor_device(launcher):
    """Decorator of a launcher whose first argument is a tensor: run it with that tensor's CUDA
    device current (so its kernels and allocations land there, on that device's current stream);
    CPU tensors (the interpreter) run it as is."""

    @functools.wraps(launcher)
    def on_tensor_device(tensor: torch.Tensor, *args, **kwargs):
        if tensor.device.type != "cuda":
            return launcher(tensor, *args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(tensor, *args, **kwargs)

    return on_tensor_device


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator), for positive integers."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 that is >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()
