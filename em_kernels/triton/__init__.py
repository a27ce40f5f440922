"""Triton kernels, one module per op family: @triton.jit kernels and their launchers."""
