"""pytest-benchmark micro-benchmarks of the CPU paths, beside eager PyTorch.

Skipped in the default test run (pyproject's addopts has --benchmark-skip); run them with

    python -m pytest --benchmark-only tests/test_cpu_benchmarks.py

(--benchmark-only overrides --benchmark-skip). Each benchmark also checks its result against
eager fp32 PyTorch, so a fast wrong path fails. The [256, 151936] shape is the CPU goal of the
compiled-extension issue (>= 10x eager forward, >= 8x forward+backward).
"""

from __future__ import annotations

import pytest
import torch

import em_kernels
from bench.ops.em_inf import KL_WEIGHT, LR, STEPS, THRESHOLD, released_em_inf
from bench.ops.entropy import eager_entropy, eager_logprobs_and_entropy, random_logits
from bench.ops.linear_entropy import eager_linear_entropy

SHAPES = [(256, 151936), (1, 151936)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The CPU paths: the C++ kernels and the float32 reference; eager is the yardstick.
PROVIDERS = ("eager", "cpu", "torch")


def _needs(provider: str) -> None:
    if provider != "eager":
        status = em_kernels.available_backends()[provider]
        if status != "available":
            pytest.skip(f"backend {provider}: {status}")


def _logits(shape, dtype, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return random_logits(*shape, dtype, "cpu", gen).requires_grad_(requires_grad)


def _close_to_eager(value: torch.Tensor, eager: torch.Tensor) -> None:
    torch.testing.assert_close(value.float(), eager.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_entropy_fwd(benchmark, provider, dtype, shape):
    _needs(provider)
    logits = _logits(shape, DTYPES[dtype])
    benchmark.group = f"entropy fwd N{shape[0]}-V{shape[1]} {dtype}"
    if provider == "eager":
        result = benchmark(lambda: eager_entropy(logits)[0])
    else:
        result = benchmark(em_kernels.entropy, logits, backend=provider)
    _close_to_eager(result, eager_entropy(logits)[0])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_fwd_bwd(benchmark, provider, dtype):
    _needs(provider)
    shape = SHAPES[0]
    logits = _logits(shape, DTYPES[dtype], requires_grad=True)
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(1))
    forward = (lambda: eager_entropy(logits)[0]) if provider == "eager" else (
        lambda: em_kernels.entropy(logits, backend=provider))

    def step():
        logits.grad = None
        forward().backward(upstream)
        return logits.grad

    benchmark.group = f"entropy fwd+bwd N{shape[0]}-V{shape[1]} {dtype}"
    grad = benchmark(step).clone()
    logits.grad = None
    eager_entropy(logits)[0].backward(upstream)
    _close_to_eager(grad, logits.grad)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_logprobs_and_entropy_fwd(benchmark, provider):
    _needs(provider)
    shape = SHAPES[0]
    logits = _logits(shape, torch.float32)
    tokens = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(2))
    benchmark.group = f"logprobs_and_entropy fwd N{shape[0]}-V{shape[1]} fp32"
    if provider == "eager":
        result = benchmark(eager_logprobs_and_entropy, logits, tokens)
    else:
        result = benchmark(em_kernels.logprobs_and_entropy, logits, tokens, backend=provider)
    for value, expected in zip(result, eager_logprobs_and_entropy(logits, tokens)):
        _close_to_eager(value, expected)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_entropy_fwd(benchmark, provider):
    _needs(provider)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(128, 512, generator=gen)
    weight = torch.randn(32000, 512, generator=gen) / 512**0.5
    benchmark.group = "linear_entropy fwd M128-H512-V32000 fp32"
    if provider == "eager":
        result = benchmark(lambda: eager_linear_entropy(hidden, weight)[0])
    else:
        result = benchmark(lambda: em_kernels.linear_entropy(hidden, weight, backend=provider)
                           .entropy)
    _close_to_eager(result, eager_linear_entropy(hidden, weight)[0])


@pytest.mark.parametrize("provider", ("eager", "linear_entropy", "linear_entropy_loss"))
def test_linear_entropy_mean_fwd_bwd(benchmark, provider):
    """EM-FT's mean entropy, forward+backward on the cpu backend: linear_entropy recomputes the
    logits in its backward, linear_entropy_loss computes the gradients in its forward."""
    _needs("cpu")
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(128, 512, generator=gen).requires_grad_()
    weight = (torch.randn(32000, 512, generator=gen) / 512**0.5).requires_grad_()

    def loss():
        if provider == "eager":
            return eager_linear_entropy(hidden, weight)[0].mean()
        if provider == "linear_entropy":
            return em_kernels.linear_entropy(hidden, weight, backend="cpu").entropy.mean()
        return em_kernels.linear_entropy_loss(hidden, weight, entropy_weight=1 / 128,
                                              backend="cpu").loss

    def step():
        hidden.grad = weight.grad = None
        loss().backward()
        return hidden.grad, weight.grad

    benchmark.group = "linear_entropy mean fwd+bwd M128-H512-V32000 fp32"
    grads = [g.clone() for g in benchmark(step)]
    hidden.grad = weight.grad = None
    eager_linear_entropy(hidden, weight)[0].mean().backward()
    for got, want in zip(grads, (hidden.grad, weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 16])
def test_em_inf_adjust(benchmark, provider, batch):
    _needs(provider)
    logits = _logits((batch, 151936), torch.float32)
    benchmark.group = f"em_inf_adjust B{batch}-V151936 fp32, {STEPS} steps"
    if provider == "eager":
        result = benchmark(lambda: released_em_inf(logits)[0])
    else:
        result = benchmark(
            em_kernels.em_inf_adjust, logits, steps=STEPS, lr=LR, kl_weight=KL_WEIGHT,
            threshold=THRESHOLD, early_exit="row", backend=provider)
    # Adam's first steps move every logit by about +-lr whatever the size of its gradient, so
    # tiny gradients of opposite sign in fp32 round-off can differ by up to 2 lr per step.
    expected = released_em_inf(logits)[0]
    assert result.shape == expected.shape and bool(torch.isfinite(result).all())
    assert float((result - expected).abs().mean()) < 1e-2
