"""Triton kernels, one module per op family: @triton.jit kernels and their launchers.

The launchers size their grids with the two helpers below, not with triton.cdiv and
triton.next_power_of_2: from Triton 3.6 those are constexpr functions that cost about 2 us a
host call (measured on the 2-core CPU machine), several calls an op, and EM-INF's decoding loop
is bound by the host."""


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator), for positive integers."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 that is >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()
