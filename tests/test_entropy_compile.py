"""torch.compile(fullgraph=True) traces entropy and logprobs_and_entropy, forward and backward,
on every backend: the fake kernels give the shapes, backend resolution is a traced constant and
nothing on the path syncs with the host (fullgraph=True fails on any graph break)."""

from __future__ import annotations

import pytest
import torch

import em_kernels

# The interpreter evaluates masked lanes too (0 * -inf, log2(0)) and numpy warns about them;
# the kernels discard those values.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test's closures share one code object: start each from an empty compile cache so
    that the tests do not add up to Dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss(op: str, backend: str):
    def loss(logits, tokens, grad_entropy, grad_logprobs):
        if op == "entropy":
            result = em_kernels.entropy(logits, temperature=0.8, backend=backend)
            return (result * grad_entropy).sum(), result
        logprobs, result = em_kernels.logprobs_and_entropy(
            logits, tokens, temperature=0.8, backend=backend)
        return (result * grad_entropy).sum() + (logprobs * grad_logprobs).sum(), result

    return loss


# aot_eager traces exactly what inductor would be given (Dynamo, fake kernels, AOT autograd);
# one inductor case checks the generated code around the opaque ops (its first compile on CPU
# costs ~20 s, so only one).
@pytest.mark.parametrize(("op", "compiler"), [
    ("entropy", "aot_eager"), ("logprobs_and_entropy", "aot_eager"),
    ("logprobs_and_entropy", "inductor")])
def test_compile_fullgraph_forward_backward(backend_device, op, compiler):
    backend, device = backend_device
    if compiler == "inductor" and backend != "triton":
        pytest.skip("inductor runs on the triton backend only (time)")
    loss = _loss(op, backend)
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    generator = torch.Generator().manual_seed(0)
    # Two batch sizes: the second call may recompile with a dynamic batch dim, still without
    # breaks. The strided view (every other row) checks the layout handling under tracing.
    for rows in (3, 5):
        base = (torch.randn(2 * rows, 4, 9001, generator=generator) * 3).to(device)
        tokens = torch.randint(0, 9001, (rows, 4), generator=generator).to(device)
        grad_entropy = torch.randn(rows, 4, generator=generator).to(device)
        grad_logprobs = torch.randn(rows, 4, generator=generator).to(device)
        results = []
        for fn in (compiled, loss):
            leaf = base.clone().requires_grad_()
            value, result = fn(leaf[::2], tokens, grad_entropy, grad_logprobs)
            value.backward()
            results.append((value.detach(), result.detach(), leaf.grad))
        for compiled_out, eager_out in zip(*results):
            torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_dynamic(backend_device):
    """dynamic=True (verl compiles its entropy function so) makes the float arguments symbolic:
    the argument checks must trace them without a graph break."""
    backend, device = backend_device
    loss = _loss("logprobs_and_entropy", backend)
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 700, generator=generator).to(device)
    tokens = torch.randint(0, 700, (3,), generator=generator).to(device)
    weights = torch.randn(3, generator=generator).to(device), torch.ones(3).to(device)
    results = []
    for fn in (compiled, loss):
        leaf = logits.clone().requires_grad_()
        value, _ = fn(leaf, tokens, *weights)
        value.backward()
        results.append((value.detach(), leaf.grad))
    for compiled_out, eager_out in zip(*results):
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature, message", [(1e-40, "temperature must be >= 4.24e-39"),
                                                  (1e39, "temperature must be <= 8.50e\\+37")])
def test_out_of_range_temperature_fails_clearly_under_dynamic_compile(temperature, message):
    """With dynamic=True the temperature is symbolic from its second value on: a temperature
    out of the kernels' range must get eager mode's message, not an internal Dynamo error
    about formatting it."""
    compiled = torch.compile(lambda z, t: em_kernels.entropy(z, temperature=t, backend="torch"),
                             fullgraph=True, dynamic=True, backend="aot_eager")
    logits = torch.randn(2, 9)
    compiled(logits, 0.5)
    compiled(logits, 0.7)  # the second value makes the temperature symbolic
    with pytest.raises(Exception, match=message):
        compiled(logits, temperature)


def test_auto_backend_resolves_while_tracing():
    """backend="auto" is resolved once during tracing to the same choice as in eager mode."""
    logits = torch.randn(4, 33)
    compiled = torch.compile(
        lambda z: em_kernels.entropy(z, backend="auto"), fullgraph=True, backend="aot_eager")
    expected = "cpu" if em_kernels.available_backends()["cpu"] == "available" else "torch"
    assert torch.equal(compiled(logits), em_kernels.entropy(logits, backend=expected))


def test_bad_input_still_fails_under_compile():
    """Errors raised while tracing reach the caller (Dynamo wraps them, with the message)."""
    compiled = torch.compile(
        lambda z: em_kernels.entropy(z, backend="nonexistent"), fullgraph=True,
        backend="aot_eager")
    with pytest.raises(Exception, match="unknown backend"):
        compiled(torch.randn(2, 3))
