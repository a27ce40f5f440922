"""linear_policy_loss (PPO's clipped surrogate with a k3 KL, its gradients computed in the
forward) against the same loss written in PyTorch on linear_entropy's log-probs, and on bad
input."""

from __future__ import annotations

import math

import pytest
import torch

import em_kernels
from em_kernels._ops import linear_entropy_loss as loss_ops

from conftest import runnable
from test_linear_entropy import assert_compiles_like_eager, leaves
from test_linear_entropy_loss import _problem, chunks_of

# Settings of the cases: on-policy, off-policy with asymmetric clipping, a KL and an entropy
# bonus, and old log-probs far from the new ones (most rows clipped one way or the other).
CASES = {
    "on_policy": dict(),
    "clipped": dict(old=0.4, clip_range=(0.1, 0.3)),
    "kl_and_entropy": dict(old=0.2, ref=0.5, kl_weight=0.1, entropy_weight=-0.02),
    "far": dict(old=3.0, ref=3.0, kl_weight=0.05),
    # reference log-probs 25 nats off either way: k3's clamped log ratio, no gradient there
    "kl_clamped": dict(old=0.2, ref=0.2, ref_shift=25.0, kl_weight=0.01),
}


def _constants(problem, spread_old=None, spread_ref=None, ref_shift=0.0, seed=5):
    """Advantages, and old / reference log-probs near the problem's own (float64 log-probs of
    its tokens, shifted by noise of the given spread; the reference's also by +-ref_shift on
    alternate rows)."""
    generator = torch.Generator().manual_seed(seed)
    rows = problem["hidden"].shape[0]
    out = em_kernels.linear_entropy(
        *(x.detach().double().cpu() for x in (problem["hidden"], problem["weight"])),
        bias=problem["bias"].detach().double().cpu(), tokens=problem["tokens"].cpu(),
        temperature=problem["temperature"], backend="torch")
    device = problem["hidden"].device

    def near(spread):
        if spread is None:
            return None
        noise = torch.randn(rows, generator=generator, dtype=torch.float64) * spread
        return (out.logprobs + noise).float().to(device)

    advantages = torch.randn(rows, generator=generator).to(device)
    ref = near(spread_ref)
    if ref is not None and ref_shift:
        signs = torch.ones(rows, device=device)
        signs[1::2] = -1.0
        ref = ref + ref_shift * signs
    return advantages, near(spread_old), ref


def _pytorch_policy_loss(logprobs, entropy, advantages, old, ref, clip_range, kl_weight,
                         token_weight, entropy_weight):
    """The loss as an RL trainer writes it (em_algos.EMRLTrainer's form)."""
    low, high = clip_range if isinstance(clip_range, tuple) else (clip_range, clip_range)
    ratio = torch.exp(logprobs - (old if old is not None else logprobs.detach()))
    clipped = ratio.clamp(1 - low, 1 + high)
    per_row = -torch.minimum(ratio * advantages, clipped * advantages)
    if ref is not None:
        log_ratio = (ref - logprobs).clamp(-20.0, 20.0)
        per_row = per_row + kl_weight * (log_ratio.exp() - log_ratio - 1)
    loss = (token_weight * per_row).sum()
    if entropy_weight is not None:
        loss = loss + (entropy_weight * entropy).sum()
    return loss


def _run_both(problem, backend, case, token_weight=None, rows_per_chunk=4):
    settings = CASES[case]
    advantages, old, ref = _constants(problem, settings.get("old"), settings.get("ref"),
                                      settings.get("ref_shift", 0.0))
    clip_range = settings.get("clip_range", 0.2)
    kl_weight = settings.get("kl_weight", 0.0)
    entropy_weight = settings.get("entropy_weight")
    hidden, weight, bias = leaves(problem)
    with chunks_of(rows_per_chunk, problem):
        out = em_kernels.linear_policy_loss(
            hidden, weight, bias=bias, tokens=problem["tokens"], advantages=advantages,
            old_logprobs=old, ref_logprobs=ref, clip_range=clip_range, kl_weight=kl_weight,
            token_weight=token_weight, entropy_weight=entropy_weight,
            temperature=problem["temperature"], backend=backend)
    # One backward per call: d token_weight with the others when it requires grad.
    extra = (token_weight,) if isinstance(token_weight, torch.Tensor) else ()
    grads = torch.autograd.grad(out.loss, (hidden, weight, bias, *extra))
    hidden_ref, weight_ref, bias_ref = leaves(problem)
    stats = em_kernels.linear_entropy(hidden_ref, weight_ref, bias=bias_ref,
                                      tokens=problem["tokens"],
                                      temperature=problem["temperature"], backend="torch")
    rows = hidden.shape[0]
    expected = _pytorch_policy_loss(
        stats.logprobs, stats.entropy, advantages, old, ref, clip_range, kl_weight,
        1.0 / rows if token_weight is None else token_weight, entropy_weight)
    expected_grads = torch.autograd.grad(expected, (hidden_ref, weight_ref, bias_ref, *extra))
    return (out, grads), (expected, stats, expected_grads)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_pytorch_loss_on_linear_entropy(backend_device, dtype, case):
    """Loss, log-probs and every gradient as autograd gives them for the PyTorch loss on
    linear_entropy's log-probs, across row chunks, with masked entries and a temperature."""
    backend, device = backend_device
    problem = _problem(23, 35, 53, device, dtype)
    (out, grads), (expected, stats, expected_grads) = _run_both(problem, backend, case)
    # bf16: this loss rounds its logits to bf16, linear_entropy keeps them in fp32.
    tolerance = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=0.05,
                                                                               atol=0.05)
    torch.testing.assert_close(out.loss, expected, **tolerance)
    torch.testing.assert_close(out.logprobs, stats.logprobs, **tolerance)
    for got, want in zip(grads, expected_grads):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tolerance)


def test_clipping_really_happens():
    """The cases exercise both sides of the clip (else the tests above could not fail on its
    gradient): some rows clipped, some not, in "clipped" and "far"."""
    problem = _problem(23, 35, 53, "cpu", torch.float32)
    for case in ("clipped", "far"):
        settings = CASES[case]
        _, old, _ = _constants(problem, settings.get("old"), settings.get("ref"))
        (out, _), _ = _run_both(problem, "torch", case)
        low, high = settings.get("clip_range", (0.2, 0.2))
        ratio = torch.exp(out.logprobs - old)
        outside = (ratio < 1 - low) | (ratio > 1 + high)
        assert 0 < int(outside.sum()) < ratio.numel(), case


def test_float64_is_exact():
    problem = _problem(17, 12, 30, "cpu", torch.float64)
    for case in CASES:
        (out, grads), (expected, _, expected_grads) = _run_both(problem, "torch", case)
        assert out.loss.dtype == torch.float64
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_token_weights_differentiate():
    """A token_weight tensor that requires grad gets each row's policy term as its gradient."""
    problem = _problem(11, 16, 20, "cpu", torch.float32)
    token_weight = torch.rand(11, generator=torch.Generator().manual_seed(2)).requires_grad_()
    (_, grads), (_, _, expected_grads) = _run_both(problem, "torch", "kl_and_entropy",
                                                   token_weight)
    torch.testing.assert_close(grads[-1], expected_grads[-1], rtol=1e-5, atol=1e-6)


# (token_weight, advantage scale, bound on the relative error): dz carries token_weight x A and
# is scaled by their largest product (|A| + kl_weight) before its rounding to fp16, so small
# weights or small advantages (rewards that barely differ) keep 1e-4 x p clear of fp16's
# subnormals. Scaled by token_weight alone, advantages of 1e-4 leave d_hidden ~1% off, where the
# scaled dz keeps it within fp16's own ~0.1%.
@pytest.mark.parametrize("token_weight, advantage_scale, bound",
                         [(1e-4, 1.0, 1e-2), (1.0, 1e-4, 3e-3)])
def test_small_loss_weights_survive_fp16(token_weight, advantage_scale, bound):
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(16, 32, generator=generator).half()
    weight = (torch.randn(2000, 32, generator=generator) / math.sqrt(32)).half()
    tokens = torch.randint(0, 2000, (16,), generator=generator)
    advantages = torch.randn(16, generator=generator) * advantage_scale
    exact = [x.float().requires_grad_() for x in (hidden, weight)]
    logprobs = em_kernels.linear_entropy(*exact, tokens=tokens, backend="torch").logprobs
    (-(advantages * logprobs).sum() * token_weight).backward()
    for backend in ("torch", "cpu", "triton"):
        if not runnable(backend, "cpu"):
            continue
        # A huge clip_high (the upper clip switched off) must not scale dz into underflow.
        for clip_range in (0.2, (0.2, 1e9)):
            ours = [x.clone().requires_grad_() for x in (hidden, weight)]
            em_kernels.linear_policy_loss(*ours, tokens=tokens, advantages=advantages,
                                          token_weight=token_weight, clip_range=clip_range,
                                          backend=backend).loss.backward()
            for got, want in zip(ours, exact):
                error = float((got.grad.float() - want.grad).abs().max() / want.grad.abs().max())
                assert error < bound, (backend, clip_range, error)


def test_all_zero_row_weights_give_zero_gradients():
    """A GRPO group whose rewards are all equal has zero advantages: with no KL and no entropy
    term every row weight is 0, and so is the largest one that sets grad_scale; the loss and
    every gradient are exactly 0, not 0 / 0 = NaN. The same for linear_entropy_loss with zero
    row weights."""
    problem = _problem(6, 8, 10, "cpu", torch.float32)
    for backend in ("torch", "cpu", "triton"):
        if not runnable(backend, "cpu"):
            continue
        for loss_fn, kwargs in ((em_kernels.linear_policy_loss,
                                 dict(advantages=torch.zeros(6),
                                      old_logprobs=torch.full((6,), -2.0))),
                                (em_kernels.linear_entropy_loss,
                                 dict(entropy_weight=0.0, logprob_weight=torch.zeros(6)))):
            hidden, weight, bias = leaves(problem)
            out = loss_fn(hidden, weight, bias=bias, tokens=problem["tokens"], backend=backend,
                          **kwargs)
            grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
            assert float(out.loss) == 0.0, (backend, loss_fn.__name__)
            for grad in grads:
                assert bool((grad == 0).all()), (backend, loss_fn.__name__, grad)


def test_zero_advantages_with_a_far_larger_token_weight():
    """With advantages 0 and no KL the policy term's gradient is 0, so its token_weight is left
    out of grad_scale, which the entropy weight sets alone. A token_weight over float32's
    maximum times that scale must still give the entropy term's gradients, not inf * 0 = NaN
    in every row's dz."""
    problem = _problem(4, 8, 16, "cpu", torch.float32)
    for backend in ("torch", "cpu", "triton"):
        if not runnable(backend, "cpu"):
            continue
        for token_weight, entropy_weight in ((1e9, 1e-30), (10.0, 2e-38)):
            hidden, weight, bias = leaves(problem)
            out = em_kernels.linear_policy_loss(
                hidden, weight, bias=bias, tokens=problem["tokens"], advantages=0.0,
                token_weight=token_weight, entropy_weight=entropy_weight, backend=backend)
            grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
            exact = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
            entropy = em_kernels.linear_entropy(*exact[:2], bias=exact[2], backend="torch").entropy
            wanted = torch.autograd.grad(entropy_weight * entropy.sum(), exact)
            for got, want in zip(grads, wanted):
                torch.testing.assert_close(got.double(), want, rtol=1e-4,
                                           atol=1e-5 * float(want.abs().max()))


def test_nan_logprob_rows_stay_out_of_the_gradients():
    """An id outside the vocabulary (unchecked on CUDA; the op is called directly here) makes
    the loss NaN, but its row adds nothing to the shared d_weight: the other rows' gradients
    are those of the loss without it."""
    problem = _problem(9, 16, 20, "cpu", torch.float32)
    hidden, weight, bias = (x.detach() for x in leaves(problem))
    advantages, old, ref = _constants(problem, 0.3, 0.3)
    tokens = problem["tokens"].clone()
    tokens[4] = 20
    rows = torch.ones(9)
    keep = torch.arange(9) != 4

    def op(tokens, rows, old=old):
        return loss_ops.loss_and_grads(
            hidden, weight, bias, tokens, torch.zeros(9), rows, advantages, old, ref, 0.2, 0.2,
            0.1, 0.8, True, True, True, "torch")

    loss, _, logprobs, grad_hidden, grad_weight, grad_bias, _ = op(tokens, rows)
    assert math.isnan(float(loss)) and math.isnan(float(logprobs[4]))
    assert all(bool(torch.isfinite(g).all()) for g in (grad_hidden, grad_weight, grad_bias))
    clean = op(problem["tokens"], rows * keep)
    torch.testing.assert_close(grad_weight, clean[4])
    torch.testing.assert_close(grad_hidden[keep], clean[3][keep])
    # On-policy too: the ratio exp(lp - lp) of a NaN log-prob is NaN, not 1.
    assert math.isnan(float(op(tokens, rows, old=None)[0]))


def test_a_non_finite_advantage_poisons_only_what_it_touches():
    """An inf advantage makes its own row's gradient (and, through it, d_weight) non-finite,
    but the scaling of dz ignores it: the other rows' d_hidden stay right."""
    problem = _problem(9, 16, 20, "cpu", torch.float32)
    hidden, weight, bias = (x.detach() for x in leaves(problem))
    advantages, old, _ = _constants(problem, 0.1)
    poisoned = advantages.clone()
    poisoned[3] = math.inf
    results = []
    for row_advantages in (advantages, poisoned):
        results.append(loss_ops.loss_and_grads(
            hidden, weight, bias, problem["tokens"], torch.zeros(9), torch.full((9,), 0.1),
            row_advantages, old, None, 0.2, 0.2, 0.0, 0.8, True, False, False, "torch"))
    keep = torch.arange(9) != 3
    scale = results[0][6] / results[1][6]  # the returned gradients are divided by grad_scale
    torch.testing.assert_close(results[1][3][keep] / scale, results[0][3][keep])


def test_torch_compile_fullgraph():
    problem = _problem(11, 16, 20, "cpu", torch.float32)
    advantages, old, ref = _constants(problem, 0.3, 0.3)

    def step(hidden, weight, bias, tokens):
        out = em_kernels.linear_policy_loss(
            hidden, weight, bias=bias, tokens=tokens, advantages=advantages, old_logprobs=old,
            ref_logprobs=ref, kl_weight=0.1, temperature=0.8, backend="torch")
        return out.loss * 2.0

    assert_compiles_like_eager(step, tuple(x.detach() for x in leaves(problem)),
                               problem["tokens"])


def _bad_inputs():
    rows = 4
    return [
        (dict(tokens=None), ValueError, "tokens are required"),
        (dict(advantages=None), TypeError, "advantages are required"),
        (dict(kl_weight=0.1), ValueError, "needs ref_logprobs"),
        (dict(kl_weight=-0.1, ref_logprobs=torch.zeros(rows)), ValueError, "kl_weight"),
        (dict(clip_range=-0.1), ValueError, "clip_range"),
        (dict(clip_range=(0.1, 0.2, 0.3)), ValueError, "3 entries"),
        (dict(clip_range="0.2"), TypeError, "clip_range"),
        # beyond float32 (the clip bounds, kl_weight and row weights meet float32 tensors)
        (dict(clip_range=1e39), ValueError, "clip_range"),
        (dict(advantages=1e39), ValueError, "advantages"),
        (dict(advantages=torch.ones(3)), ValueError, r"advantages must have shape \(N,\)"),
        (dict(advantages=torch.ones(rows, requires_grad=True)), ValueError, "pass it detached"),
        (dict(old_logprobs=torch.ones(rows, dtype=torch.long)), TypeError, "floating-point"),
        (dict(advantages=torch.ones(rows).to_sparse()), TypeError, "advantages must be a dense"),
        (dict(token_weight=torch.ones(rows).to_sparse()), TypeError, "token_weight must be a"),
        (dict(token_weight=float("nan")), ValueError, "token_weight"),
        (dict(temperature=0.0), ValueError, "finite positive"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input(index):
    override, error, message = _bad_inputs()[index]
    problem = _problem(4, 8, 10, "cpu", torch.float32)
    kwargs = dict(bias=problem["bias"], tokens=problem["tokens"], advantages=torch.ones(4))
    kwargs.update(override)
    with pytest.raises(error, match=message):
        em_kernels.linear_policy_loss(problem["hidden"], problem["weight"], **kwargs)
