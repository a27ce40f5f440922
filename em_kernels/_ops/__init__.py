"""Dispatcher ops (torch.library): schemas, fake kernels and autograd, one module per op family."""
