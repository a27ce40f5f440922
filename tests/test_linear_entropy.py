"""linear_entropy (the LM head fused with the softmax statistics) against the float64 oracle:
values and every gradient, properties, gradient filtering, memory, bad input, tracing."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import em_kernels
from em_kernels import reference
from em_kernels._ops import linear_entropy as ops
from em_kernels._ops.entropy import split_lse

from conftest import (HAS_CUDA, assert_cuda_graph_replays_eager, runnable,
                      skip_unless_runnable, triton_older_than)
from oracle import assert_matches_oracle, assert_row_relative, written_out
from sm90 import run_lowering_script

# "cpu" and "cuda" map onto these two implementations (test_backend_names checks the mapping).
LINEAR_BACKEND_DEVICES = [("torch", "cpu"), ("triton", "cpu"), ("triton", "cuda"),
                          ("torch", "cuda")]


@pytest.fixture(params=LINEAR_BACKEND_DEVICES, ids=lambda bd: f"{bd[0]}-{bd[1]}")
def backend_device(request):
    return skip_unless_runnable(*request.param)


def small_chunks():
    """The chunked torch forward with blocks of 5 rows x 7 vocab entries, and the backward with
    vocab chunks and dz tiles of 16 columns (tl.dot's smallest width; filtering segments of 16),
    so that small shapes cross several chunks, tiles and segments."""
    return mock.patch.multiple(ops, TORCH_ROW_CHUNK=5, TORCH_CHUNK_ELEMENTS=35,
                               BWD_CHUNK_BYTES=1, DZ_TILE_COLS=16)


def shape_limits(backend, device):
    """(max N, max H, max V): the interpreter is slow, the GPU and chunked torch are not."""
    if backend == "triton" and device == "cpu":
        return 24, 36, 50
    if device == "cuda":
        return 300, 300, 1100
    return 40, 48, 90


@st.composite
def problems(draw, backend, device):
    max_n, max_h, max_v = shape_limits(backend, device)
    rows = draw(st.integers(0, max_n))
    features = draw(st.integers(1, max_h))
    vocab = draw(st.one_of(st.integers(1, max_v), st.sampled_from([1, 2, 16, 17, 31, 32, 33])))
    vocab = min(vocab, max_v)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    scale = draw(st.sampled_from([0.05, 0.5, 3.0]))
    masked = draw(st.sampled_from([0.0, 0.0, 0.3])) if vocab > 1 else 0.0
    use_bias = draw(st.booleans()) or masked > 0
    with_tokens = draw(st.booleans())
    temperature = draw(st.sampled_from([1.0, 0.7, 2.5]))
    grads = draw(st.sampled_from(["entropy", "logprobs", "both"])) if with_tokens else "entropy"
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    hidden = randn(rows, features) * scale
    weight = randn(vocab, features) / math.sqrt(features)
    bias = None
    if use_bias:
        bias = randn(vocab)
        mask = torch.rand(vocab, generator=generator) < masked
        mask[torch.randint(0, vocab, (1,), generator=generator)] = False  # keep one finite
        bias[mask] = float("-inf")
    # A token may fall on a -inf column: log p = -inf and no gradient there (no one-hot term).
    tokens = torch.randint(0, vocab, (rows,), generator=generator) if with_tokens else None
    upstream_entropy = randn(rows).float() if grads in ("entropy", "both") else None
    upstream_logprobs = randn(rows).float() if grads in ("logprobs", "both") else None
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype),
                bias=None if bias is None else bias.to(dtype), tokens=tokens,
                temperature=temperature, upstream_entropy=upstream_entropy,
                upstream_logprobs=upstream_logprobs)


def to_device(problem, device):
    moved = {}
    for key, value in problem.items():
        moved[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    return moved


def loss_of(entropy, logprobs, problem):
    loss = entropy.sum() * 0
    if problem["upstream_entropy"] is not None:
        loss = loss + (entropy * problem["upstream_entropy"].to(entropy)).sum()
    if problem["upstream_logprobs"] is not None:
        loss = loss + (logprobs * problem["upstream_logprobs"].to(logprobs)).sum()
    return loss


def leaves(problem, dtype=None):
    """Fresh leaf copies of hidden, weight, bias (in ``dtype`` if given) requiring grad."""
    out = []
    for key in ("hidden", "weight", "bias"):
        value = problem[key]
        if value is None:
            out.append(None)
            continue
        value = value.detach().clone() if dtype is None else value.detach().to(dtype)
        out.append(value.requires_grad_())
    return out


def values_and_grads(fn, problem, dtype=None):
    hidden, weight, bias = leaves(problem, dtype)
    entropy, logprobs = fn(hidden, weight, bias)
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    loss = loss_of(entropy, logprobs, problem)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else (
        [None] * len(inputs))
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return entropy, logprobs, grads


def oracle_fn(problem):
    def run(hidden, weight, bias):
        return reference.linear_entropy_ref(
            hidden, weight, bias, problem["tokens"], problem["temperature"])
    return run


def eager_fn(problem, fused_bias=False):
    """Plain PyTorch in the input dtype: the logits in the input dtype, the statistics in fp32
    (what trainers write today): the yardstick of the tolerance rule. fused_bias: the logits as
    nn.Linear makes them (one addmm, the bias added before the one rounding), not matmul + bias
    (two roundings)."""
    def run(hidden, weight, bias):
        if fused_bias:
            logits = torch.nn.functional.linear(hidden, weight, bias)
        else:
            logits = hidden @ weight.T
            if bias is not None:
                logits = logits + bias
        if problem["tokens"] is None:
            return reference.entropy_ref(logits, problem["temperature"]), None
        logprobs, entropy = reference.logprobs_and_entropy_ref(
            logits, problem["tokens"], problem["temperature"])
        return entropy, logprobs
    return run


def kernel_fn(problem, backend, **kwargs):
    def run(hidden, weight, bias):
        out = em_kernels.linear_entropy(
            hidden, weight, bias=bias, tokens=problem["tokens"],
            temperature=problem["temperature"], backend=backend, **kwargs)
        return out.entropy, out.logprobs
    return run


def grad_floor(oracle_grad, dtype):
    """Rounding the gradient to its dtype (bf16 for bf16 weights) costs any implementation up
    to half an ulp, which the eager yardstick can dodge by luck on tiny shapes: allow one ulp of
    the largest entry, plus 1e-6."""
    largest = float(oracle_grad.abs().max()) if oracle_grad.numel() else 0.0
    return torch.finfo(dtype).eps * largest + 1e-6


def recompute_floors(problem):
    """The backward recomputes the logits with other roundings than the forward (cuBLAS vs the
    Triton tiles, or BLAS calls of other shapes), so p = exp(z - lse) carries a relative error
    up to delta ~ 4 eps_fp32 |z|max, which the eager yardstick (one set of logits for both
    passes) never pays: where the exact gradient cancels (V = 1, a one-hot p) its error is 0.
    Per row, sum_j |delta dz_rj| <= delta / T * G_r with G_r = |g_lp| + |g_E| (2 + 2 log V);
    propagated through the gradient matmuls this gives the floors (d_hidden, d_weight, d_bias)."""
    hidden, weight, bias = (x.detach().double().cpu() if x is not None else None
                            for x in (problem["hidden"], problem["weight"], problem["bias"]))
    rows, vocab = hidden.shape[0], weight.shape[0]
    if rows == 0:
        return 0.0, 0.0, 0.0
    magnitude = hidden.abs() @ weight.abs().T
    if bias is not None:
        magnitude += bias.abs().nan_to_num(posinf=0.0)
    temperature = problem["temperature"]
    delta = 4 * torch.finfo(torch.float32).eps * float(magnitude.max()) / temperature
    row_grad = torch.zeros(rows, dtype=torch.float64)
    if problem["upstream_entropy"] is not None:
        row_grad += problem["upstream_entropy"].double().cpu().abs() * (2 + 2 * math.log(vocab))
    if problem["upstream_logprobs"] is not None and problem["tokens"] is not None:
        row_grad += problem["upstream_logprobs"].double().cpu().abs()
    scale = delta / temperature
    return (scale * float(row_grad.max()) * float(weight.abs().max()),
            scale * float(row_grad.max()) * float(hidden.abs().sum(0).max()),
            scale * float(row_grad.sum()))


def check_against_oracle(problem, backend, **kwargs):
    entropy, logprobs, grads = values_and_grads(kernel_fn(problem, backend, **kwargs), problem)
    ref_entropy, ref_logprobs, ref_grads = values_and_grads(
        oracle_fn(problem), problem, torch.float64)
    eager_entropy, eager_logprobs, eager_grads = values_and_grads(eager_fn(problem), problem)
    assert entropy.dtype == torch.float32 and entropy.shape == problem["hidden"].shape[:1]
    assert_matches_oracle(entropy, ref_entropy, eager_entropy, 1e-5, "entropy")
    if problem["tokens"] is None:
        assert logprobs is None
    else:
        assert logprobs.dtype == torch.float32
        assert_matches_oracle(logprobs, ref_logprobs, eager_logprobs, 1e-5, "logprobs")
    assert_grads_match_oracle(grads, ref_grads, eager_grads, problem, recompute_floors(problem))


def assert_grads_match_oracle(grads, ref_grads, eager_grads, problem, extra_floors):
    """d_hidden, d_weight (and d_bias) against the oracle's by the tolerance rule, each with one
    ulp of its dtype plus its entry of ``extra_floors`` as the floor; dtypes and shapes match."""
    for name, grad, ref, eager, leaf, extra in zip(
            ("d_hidden", "d_weight", "d_bias"), grads, ref_grads, eager_grads,
            [x for x in (problem["hidden"], problem["weight"], problem["bias"]) if x is not None],
            extra_floors):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert_matches_oracle(grad, ref, eager, grad_floor(ref, leaf.dtype) + extra, name)


# backend_device only names the backend: nothing to reset between examples.
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_matches_oracle(backend_device, data):
    backend, device = backend_device
    problem = to_device(data.draw(problems(backend, device)), device)
    with small_chunks():
        check_against_oracle(problem, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", ["entropy", "logprobs", "both"])
def test_upstream_combinations(backend_device, dtype, grads):
    """Entropy-only, log-probs-only and both upstream gradients, shapes off every tile size."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(7)
    rows, features, vocab = 19, 35, 53
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64)
    bias[::5] = float("-inf")
    finite = torch.nonzero(bias > float("-inf")).squeeze(-1)
    problem = dict(
        hidden=torch.randn(rows, features, generator=generator, dtype=torch.float64).to(dtype),
        weight=(torch.randn(vocab, features, generator=generator, dtype=torch.float64) / 6
                ).to(dtype),
        bias=bias.to(dtype),
        tokens=finite[torch.randint(0, len(finite), (rows,), generator=generator)],
        temperature=0.8,
        upstream_entropy=torch.randn(rows, generator=generator) if grads != "logprobs" else None,
        upstream_logprobs=torch.randn(rows, generator=generator) if grads != "entropy" else None,
    )
    with small_chunks():
        check_against_oracle(to_device(problem, device), backend)


def random_problem(rows, features, vocab, device, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=generator) * scale
    weight = torch.randn(vocab, features, generator=generator) / math.sqrt(features)
    bias = torch.randn(vocab, generator=generator)
    tokens = torch.randint(0, vocab, (rows,), generator=generator)
    return (hidden.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype),
            tokens.to(device))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_oracle_is_the_formula_written_out(dtype):
    """linear_entropy_ref, the oracle of this file, against its formula written out: z = (h W^T
    + b) / T formed in float64 (in float32 for 16-bit operands, cast before the matmul), the
    token's log-prob log_softmax(z)[y], the entropy sum(entr(softmax(z))); with and without
    bias and tokens. check_against_oracle cannot see an error of the oracle itself: its
    yardstick (eager_fn) does not share it, so the error widens the tolerance by as much (an
    oracle returning (logprobs, entropy) swapped passed test_matches_oracle)."""
    hidden, weight, bias, tokens = random_problem(6, 8, 30, "cpu", dtype, seed=2, scale=2.0)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for with_bias in (False, True):
        logits = hidden.to(wide) @ weight.to(wide).T + (bias.to(wide) if with_bias else 0.0)
        for with_tokens in (False, True):
            entropy, logprobs = reference.linear_entropy_ref(
                hidden, weight, bias if with_bias else None, tokens if with_tokens else None,
                temperature=0.7)
            expected_entropy, expected_logprobs = written_out(
                logits / 0.7, tokens if with_tokens else None)
            assert entropy.dtype == wide
            torch.testing.assert_close(entropy, expected_entropy)
            torch.testing.assert_close(logprobs, expected_logprobs)


def test_autocast_casts_operands_like_linear(backend_device):
    """Inside torch.autocast, fp32 hidden, weight and bias are cast to its dtype as nn.Linear's
    are, and the op runs with autocast off: the values are bitwise those of bf16 operands cast
    by hand outside it (with autocast leaking in, the torch path's fp32 logits matmul ran in
    bf16), and the gradients, with the backward run inside the region too, are theirs, in
    fp32."""
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(9, 16, 40, device)
    generator = torch.Generator().manual_seed(4)
    upstream = [torch.randn(9, generator=generator).to(device) for _ in range(2)]

    def run(operands, cast):
        leaves_ = [x.clone().requires_grad_() for x in operands]
        used = [x.to(torch.bfloat16) for x in leaves_] if cast else leaves_
        out = em_kernels.linear_entropy(used[0], used[1], bias=used[2], tokens=tokens,
                                        backend=backend)
        loss = (out.entropy * upstream[0] + out.logprobs * upstream[1]).sum()
        return out, torch.autograd.grad(loss, leaves_)

    with torch.autocast(device, dtype=torch.bfloat16):
        under_autocast, autocast_grads = run((hidden, weight, bias), cast=False)
    by_hand, by_hand_grads = run((hidden, weight, bias), cast=True)
    assert torch.equal(under_autocast.entropy, by_hand.entropy)
    assert torch.equal(under_autocast.logprobs, by_hand.logprobs)
    for got, want in zip(autocast_grads, by_hand_grads):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_vmap_batched_gradients_and_no_double_backward(backend_device):
    """torch.vmap over hidden states (and tokens) with a shared head runs one call on the
    flattened rows (no per-sample fallback: its warning is an error here; only it, as Triton
    3.4's interpreter warns of NumPy deprecations), over a batched head one per sample, also
    with no samples; is_grads_batched gives each upstream gradient's own backward;
    differentiating a gradient raises a clear error."""
    import warnings

    backend, device = backend_device
    generator = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 5, 8, generator=generator).to(device)
    weight = torch.randn(30, 8, generator=generator).to(device)
    heads = torch.randn(2, 30, 8, generator=generator).to(device)
    bias = torch.randn(30, generator=generator).to(device)
    tokens = torch.randint(0, 30, (2, 5), generator=generator).to(device)

    def op(x, w, t=None):
        return em_kernels.linear_entropy(x, w, bias=bias, tokens=t, backend=backend)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", "There is a performance drop because we have not yet "
                                "implemented the batching rule")
        shared = torch.vmap(lambda x, t: op(x, weight, t))(hidden, tokens)
        batched = torch.vmap(lambda x, w: op(x, w).entropy)(hidden, heads)
        empty = torch.vmap(lambda x, w: op(x, w).entropy)(hidden[:0], heads[:0])
    for b in range(2):
        alone = op(hidden[b], weight, tokens[b])
        torch.testing.assert_close(shared.entropy[b], alone.entropy)
        torch.testing.assert_close(shared.logprobs[b], alone.logprobs)
        torch.testing.assert_close(batched[b], op(hidden[b], heads[b]).entropy)
    assert empty.shape == (0, 5)

    leaves = [hidden[0].clone().requires_grad_(), weight.clone().requires_grad_()]
    out = op(*leaves, tokens[0])
    upstream = torch.randn(3, 5, generator=generator).to(device)
    rows = torch.autograd.grad(out.entropy + 0.5 * out.logprobs, leaves, upstream,
                               retain_graph=True, is_grads_batched=True)
    for k in range(3):
        expected = torch.autograd.grad(out.entropy + 0.5 * out.logprobs, leaves, upstream[k],
                                       retain_graph=True)
        for got, want in zip(rows, expected):
            torch.testing.assert_close(got[k], want)
    (grad_hidden,) = torch.autograd.grad(out.entropy.sum(), leaves[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="differentiable once"):
        grad_hidden.sum().backward()


def test_strided_inputs(backend_device):
    """Views with any strides (a column slice of hidden, a transposed weight, every other bias
    entry and token) give the same results as their contiguous copies."""
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(18, 40, 66, device)
    hidden_view = hidden[:, ::2]
    weight_view = weight[::2, ::2].T.contiguous().T
    bias_view, tokens_view = bias[::2], (tokens % 33)[::2]
    hidden_view = hidden_view[::2]
    out = em_kernels.linear_entropy(hidden_view, weight_view, bias=bias_view, tokens=tokens_view,
                                    backend=backend)
    expected = em_kernels.linear_entropy(
        hidden_view.contiguous(), weight_view.contiguous(), bias=bias_view.contiguous(),
        tokens=tokens_view.contiguous(), backend=backend)
    assert not weight_view.is_contiguous() and not hidden_view.is_contiguous()
    assert not bias_view.is_contiguous() and not tokens_view.is_contiguous()
    torch.testing.assert_close(out.entropy, expected.entropy)
    torch.testing.assert_close(out.logprobs, expected.logprobs)


def test_bounds_and_uniform(backend_device):
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(21, 18, 37, device, scale=3.0)
    out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens, backend=backend)
    assert bool((out.entropy >= -1e-6).all()) and bool((out.entropy <= math.log(37) + 1e-5).all())
    assert bool((out.logprobs <= 1e-6).all())
    # Zero weight: every row is uniform, H = log V and log p = -log V.
    uniform = em_kernels.linear_entropy(
        hidden, torch.zeros_like(weight), tokens=tokens, backend=backend)
    torch.testing.assert_close(uniform.entropy, torch.full_like(uniform.entropy, math.log(37)))
    torch.testing.assert_close(uniform.logprobs, torch.full_like(uniform.logprobs, -math.log(37)))


def test_masked_token_and_all_masked_row(backend_device):
    """A token on a -inf entry has log p = -inf and no gradient there; with every entry masked
    the entropy is NaN."""
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(4, 16, 20, device)
    bias[3] = float("-inf")
    tokens[1] = 3
    out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens, backend=backend)
    assert out.logprobs[1].item() == float("-inf")
    assert bool(torch.isfinite(out.entropy).all())
    # Its gradient: 0 at the -inf entry (no one-hot term), as the entropy ops give it.
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = em_kernels.linear_entropy(*leaves[:2], bias=leaves[2], tokens=tokens, backend=backend)
    (out.entropy.sum() + out.logprobs[[0, 2, 3]].sum() + 0.5 * out.logprobs[1]).backward()
    assert leaves[2].grad[3] == 0
    expected = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    logits = expected[0] @ expected[1].T + expected[2]
    logprobs, entropy = em_kernels.logprobs_and_entropy(logits, tokens, backend="torch")
    (entropy.sum() + logprobs[[0, 2, 3]].sum() + 0.5 * logprobs[1]).backward()
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    # Every entry masked: NaN entropy and log-probs, and a zero gradient (as the entropy ops
    # give it), not NaN spread through the shared d_weight.
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    everything_masked = torch.full_like(bias, float("-inf")).requires_grad_()
    out = em_kernels.linear_entropy(*leaves, bias=everything_masked, tokens=tokens,
                                    backend=backend)
    assert bool(torch.isnan(out.entropy).all()) and bool(torch.isnan(out.logprobs).all())
    (out.entropy.nan_to_num(0.0).sum() + out.logprobs.nan_to_num(0.0).sum()).backward()
    for leaf in (*leaves, everything_masked):
        assert bool((leaf.grad == 0).all()), leaf.grad
    # A masked loss hands such rows NaN upstream gradients (0 * 2 H = NaN): still no gradient.
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    out = em_kernels.linear_entropy(*leaves, bias=everything_masked, tokens=tokens,
                                    backend=backend)
    ((out.entropy**2 + out.logprobs**2) * 0.0).sum().backward()
    for leaf in leaves:
        assert bool((leaf.grad == 0).all()), leaf.grad


def test_maxima_whose_difference_overflows(backend_device):
    """Logits of +-2e38: tiles and splits whose maxima lie 4e38 apart (the shift between them
    overflows float32 to -inf) must merge with scale 0, not 0 * -inf = NaN. Row 0 has one
    +2e38 among 60 entries at -2e38 (entropy 0), row 1 the negation (uniform over those 60).
    Only the entropy: log p = chosen - lse, and an lse of 2e38 (ulp 2e31) absorbs log s."""
    backend, device = backend_device
    vocab, run, peak = 100, 60, 80
    weight = torch.zeros(vocab, 1)
    weight[:run] = -2e19
    weight[peak] = 2e19
    hidden = torch.tensor([[1e19], [-1e19]])
    out = em_kernels.linear_entropy(hidden.to(device), weight.to(device), backend=backend)
    expected = torch.tensor([0.0, math.log(run)], device=device)
    torch.testing.assert_close(out.entropy, expected, rtol=1e-6, atol=1e-6)


def confident_head(rows: int = 8, features: int = 16, vocab: int = 40):
    """float32 (hidden, weight) whose logit rows are confident with |lse| ~ 60-100: feature 0 adds
    60-100 to every logit of a row, features 2.. spread them as N(0, 1), and feature 1 lifts
    token 7 by 12 to 26 nats (entropies 0.1 down to ~1e-8)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, features, generator=generator, dtype=torch.float64)
    hidden[:, 2:] /= math.sqrt(features - 2)
    hidden[:, 0] = 60 + 40 * torch.rand(rows, generator=generator, dtype=torch.float64)
    hidden[:, 1] = torch.linspace(12, 26, rows, dtype=torch.float64)
    weight = torch.randn(vocab, features, generator=generator, dtype=torch.float64)
    weight[:, 0] = 1.0
    weight[:, 1] = 0.0
    weight[7, 1] = 1.0
    return hidden.float(), weight.float()


def confident_head_oracle(hidden: torch.Tensor, weight: torch.Tensor):
    """float64 d(sum_r H_r) / d(hidden, weight) of confident_head's inputs."""
    exact = [x.detach().cpu().double().requires_grad_() for x in (hidden, weight)]
    reference.entropy_ref(exact[0] @ exact[1].T).sum().backward()
    return [x.grad for x in exact]


def test_confident_rows_have_relatively_exact_gradients(backend_device):
    """On confident rows with |lse| ~ 100 (`confident_head`), every row of d(hidden) and
    d(weight) matches float64 relative to its own size. log p of the argmax is ~ -H there, far
    below an ulp of |lse|: with a float32 lse these rows were 5-10% off; the float64 lse keeps
    them to the float32 logits' own rounding."""
    backend, device = backend_device
    hidden, weight = (x.to(device).requires_grad_() for x in confident_head())
    em_kernels.linear_entropy(hidden, weight, backend=backend).entropy.sum().backward()
    exact_hidden, exact_weight = confident_head_oracle(hidden, weight)
    assert_row_relative(hidden.grad, exact_hidden, 1e-4, "d(hidden)")
    assert_row_relative(weight.grad, exact_weight, 1e-4, "d(weight)")


def test_nan_poisons_only_its_row(backend_device):
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(20, 16, 40, device)
    hidden[5, 2] = float("nan")
    out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens, backend=backend)
    nan_rows = torch.isnan(out.entropy)
    assert nan_rows.tolist() == [i == 5 for i in range(20)]
    assert torch.isnan(out.logprobs).tolist() == [i == 5 for i in range(20)]


def test_out_of_range_tokens_in_the_op(backend_device):
    """The stats op itself (the path without a host sync: CUDA tensors, torch.compile) gives a
    NaN log-prob (chosen logit) for an id outside [0, V), also for an int64 id whose low 32 bits
    fall inside the vocabulary, and its backward adds no one-hot for it: that row's log-prob
    gradient is lse's alone, -p / T (test_entropy's test of the same name, for the LM head).
    The other rows are unaffected."""
    backend, device = backend_device
    hidden, weight, bias, _ = random_problem(4, 16, 40, device)
    tokens = torch.tensor([-1, 5, 40, (1 << 32) + 3], device=device)
    entropy, lse, chosen = ops.linear_entropy_stats(hidden, weight, bias, tokens, 0.5, 0.0,
                                                    backend)
    logprobs = chosen - lse
    outside = [0, 2, 3]
    assert bool(torch.isnan(logprobs[outside]).all()) and bool(torch.isfinite(logprobs[1]))
    ones = torch.ones(4, device=device)
    with_lp = ops.linear_entropy_backward(hidden, weight, bias, tokens, entropy, lse, ones,
                                          -ones, ones, 0.5, 0.0, True, True, backend)
    without = ops.linear_entropy_backward(hidden, weight, bias, None, entropy, lse, ones,
                                          torch.zeros_like(ones), None, 0.5, 0.0, True, True,
                                          backend)
    # d_bias of the log-prob terms: sum over the rows of (onehot - p) / T, no one-hot outside
    logits = (hidden.double() @ weight.double().T + bias.double()) / 0.5
    p = torch.softmax(logits, -1)
    onehot = torch.zeros_like(p)
    onehot[1, 5] = 1.0
    torch.testing.assert_close((with_lp[2] - without[2]).double(), ((onehot - p) / 0.5).sum(0),
                               rtol=1e-4, atol=1e-5)


def test_deterministic_and_batch_invariant(backend_device):
    """Same input, same bits; a row's forward result does not depend on the other rows."""
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(40, 24, 70, device, dtype=torch.bfloat16)
    first = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens, backend=backend)
    second = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens, backend=backend)
    assert torch.equal(first.entropy, second.entropy)
    assert torch.equal(first.logprobs, second.logprobs)
    if backend == "triton":  # the chunked torch path leaves batch invariance to the BLAS
        part = em_kernels.linear_entropy(
            hidden[17:30], weight, bias=bias, tokens=tokens[17:30], backend=backend)
        assert torch.equal(part.entropy, first.entropy[17:30])
        assert torch.equal(part.logprobs, first.logprobs[17:30])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, features, vocab", [(40, 24, 70), (7, 40, 33), (1, 16, 17)])
def test_tma_operands_match_pointer_operands(backend_device, dtype, rows, features, vocab):
    """TileConfig.tma (operands, and the backward's dz, by tensor descriptors: the 16-bit default
    on Hopper): tails of N, H, V and of each vocab chunk come back as zeros from the descriptors
    and stores past them are clipped, so the values and every gradient are those of the masked
    pointer loads and stores."""
    backend, device = backend_device
    if backend != "triton":
        pytest.skip("a Triton tile option")
    if device == "cpu" and triton_older_than((3, 6)):
        pytest.skip("Triton 3.4-3.5's interpreter checks descriptor strides in elements, not bytes")
    from em_kernels.triton import linear_entropy as kernels

    hidden, weight, bias, tokens = random_problem(rows, features, vocab, device, dtype=dtype)
    problem = dict(hidden=hidden, weight=weight, bias=bias, tokens=tokens, temperature=0.8,
                   upstream_entropy=torch.randn(rows).to(device),
                   upstream_logprobs=torch.randn(rows).to(device))
    names = {"cpu": ["_INTERPRETER"], "cuda": ["_GPU_FP32", "_BWD_GPU_FP32"]
             if dtype == torch.float32 else ["_FWD_GPU_16BIT", "_BWD_GPU_16BIT"]}[device]
    results = {}
    for tma in (False, True):
        configs = {name: dataclasses.replace(getattr(kernels, name), tma=tma) for name in names}
        with mock.patch.multiple(kernels, **configs), small_chunks(), \
                mock.patch.object(kernels.TensorDescriptor, "from_tensor",
                                  wraps=kernels.TensorDescriptor.from_tensor) as descriptors:
            results[tma] = values_and_grads(kernel_fn(problem, backend), problem)
        # hidden and weight in the forward; hidden, the weight chunk and dz per backward chunk
        # (but a chunk whose dz rows are not 16-byte multiples, which takes the pointer path)
        if tma:
            assert descriptors.call_count >= 2 + 3 and (descriptors.call_count - 2) % 3 == 0
        else:
            assert descriptors.call_count == 0
    # The same dot products in the same order: equal on the interpreter; on a GPU allow the
    # accumulation order of another instruction schedule.
    for pointer, bulk in zip(results[False][:2] + tuple(results[False][2]),
                             results[True][:2] + tuple(results[True][2])):
        if device == "cpu":
            assert torch.equal(pointer, bulk)
        else:
            torch.testing.assert_close(pointer, bulk, rtol=1e-2 if dtype != torch.float32
                                       else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_deterministic_across_chunks(backend_device, dtype):
    """The backward has no atomics: two runs give the same bits, with the vocab cut into many
    chunks and tiles, and the result is the unchunked one up to d_hidden's summation order.
    With float32 inputs the gradients come back in fp32, unrounded, so the bit comparison also
    sees the order in which d_hidden sums the chunks (a bf16 rounding can hide it)."""
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(13, 24, 70, device, dtype=dtype)
    problem = dict(hidden=hidden, weight=weight, bias=bias, tokens=tokens, temperature=0.7,
                   upstream_entropy=torch.randn(13).to(device),
                   upstream_logprobs=torch.randn(13).to(device))
    with small_chunks():
        _, _, first = values_and_grads(kernel_fn(problem, backend), problem)
        _, _, second = values_and_grads(kernel_fn(problem, backend), problem)
    _, _, whole = values_and_grads(kernel_fn(problem, backend), problem)
    # Chunking only changes the fp32 summation order of d_hidden (then, for bf16, one rounding).
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2,
                                                                               atol=1e-3)
    for a, b, c in zip(first, second, whole):
        assert a.dtype == dtype
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), c.double(), **tolerance)


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_dz_kernels_agree(eps):
    """The fused Triton dz kernel (logits recomputed from the operands) and its torch twin agree
    with dz from the float64 formula: both in the CPU layout (fp32 operands, dz in fp32) and
    with dz rounded to bf16 (the 16-bit CUDA layout; the twin's fp32 logits then come from fp32
    operands, as torch has no CPU matmul from bf16 operands to fp32), and the Triton kernel also
    from bf16 operands."""
    if not runnable("triton", "cpu"):
        pytest.skip(em_kernels.available_backends()["triton"])
    generator = torch.Generator().manual_seed(3)
    rows, features, width, vocab, start, temperature, segment = 9, 24, 48, 80, 16, 0.8, 16
    hidden = torch.randn(rows, features, generator=generator).bfloat16()
    weight_chunk = torch.randn(width, features, generator=generator).bfloat16()
    bias = torch.randn(vocab, generator=generator)
    bias[start + 5] = float("-inf")
    tokens = torch.randint(0, vocab, (rows,), generator=generator)
    z = (hidden.double() @ weight_chunk.double().T + bias[start:start + width].double()) \
        / temperature
    lse = torch.logsumexp(z, -1) + torch.rand(rows, generator=generator, dtype=torch.float64)
    lse_center, lse_offset = split_lse(lse, torch.float32)  # float64 lse + the rest's mass
    entropy = torch.rand(rows, generator=generator) * 2
    grad_entropy, grad_lse, grad_chosen = torch.randn(3, rows, generator=generator)
    exact = (z - lse[:, None]).exp()
    log_p = torch.where(exact > 0, z - lse[:, None], 0.0)
    exact = exact * (grad_lse.double()[:, None] - grad_entropy.double()[:, None] * (
        log_p + entropy.double()[:, None]))
    local = tokens - start
    hit = (local >= 0) & (local < width)
    # no one-hot term where the chosen logit is -inf (the masked bias entry)
    hit &= z.gather(-1, local.clamp(0, width - 1)[:, None]).squeeze(-1) != float("-inf")
    exact[hit.nonzero()[:, 0], local[hit]] += grad_chosen.double()[hit]
    exact /= temperature
    runs = [(ops._torch_dz, torch.float32, torch.float32),
            (ops._triton_dz, torch.float32, torch.float32),
            (ops._torch_dz, torch.float32, torch.bfloat16),
            (ops._triton_dz, torch.bfloat16, torch.bfloat16)]
    for dz_fn, operand_dtype, dz_dtype in runs:
        dz = torch.full((rows, width), float("nan"), dtype=dz_dtype)
        kept = torch.full((rows, width // segment), -1, dtype=torch.int8) if eps > 0 else None
        dz_fn(hidden.to(operand_dtype), weight_chunk.to(operand_dtype), bias, start, tokens,
              entropy, lse_center, lse_offset, grad_entropy, grad_lse, grad_chosen, temperature,
              eps, segment, dz, kept)
        # fp32: the logits' rounding (~1e-6 relative) through p; bf16: dz's own rounding
        rtol = 1e-5 if dz_dtype == torch.float32 else 2**-7
        segment_max = exact.abs().unflatten(1, (-1, segment)).amax(-1)
        if eps == 0:
            torch.testing.assert_close(dz.double(), exact, rtol=rtol, atol=1e-6)
            continue
        # a row's entries of a tile are zeroed together, only when all are below eps
        dropped = (dz == 0) & (exact != 0)
        assert bool((exact[dropped].abs() < eps).all())
        assert bool(dropped.any()) and not bool(dropped.all()), "filter test is vacuous"
        torch.testing.assert_close(dz[~dropped].double(), exact[~dropped], rtol=rtol, atol=1e-6)
        segment_zero = (dz == 0).unflatten(1, (-1, segment)).all(-1)
        assert torch.equal(segment_zero, segment_max < eps)
        assert torch.equal(kept, (segment_max >= eps).to(torch.int8))  # exactly those it kept


@given(rows=st.integers(1, 1 << 16), vocab=st.integers(1, 1 << 18),
       entry=st.sampled_from([2, 4, 6, 8]))
def test_backward_chunk_columns(rows, vocab, entry):
    """Chunks are DZ_TILE_COLS-aligned, within the vocabulary, and within the workspace budget
    whenever more than one tile's width fits."""
    columns = ops.backward_chunk_columns(rows, entry, vocab)
    assert 1 <= columns <= vocab
    if columns < vocab:
        assert columns % ops.DZ_TILE_COLS == 0
    if columns > ops.DZ_TILE_COLS:
        assert rows * columns * entry <= ops.BWD_CHUNK_BYTES


def test_only_requested_grads(backend_device):
    """A frozen LM head gets no gradient, and none is computed (autograd would discard one, so
    the backward's arguments are checked: no [V, H] matmul for a head that does not train);
    hidden still gets the exact one."""
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(9, 20, 33, device)
    hidden.requires_grad_()
    out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens, backend=backend)
    with mock.patch.object(ops, "chunked_backward", wraps=ops.chunked_backward) as backward:
        (grad_hidden,) = torch.autograd.grad(out.entropy.sum() + out.logprobs.sum(), (hidden,))
    need_grad_hidden, need_grad_weight = backward.call_args.args[11:13]
    assert need_grad_hidden is True and need_grad_weight is False
    exact_hidden = hidden.detach().double().requires_grad_()
    entropy, logprobs = reference.linear_entropy_ref(
        exact_hidden, weight.double(), bias.double(), tokens)
    (exact,) = torch.autograd.grad(entropy.sum() + logprobs.sum(), (exact_hidden,))
    torch.testing.assert_close(grad_hidden.double(), exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-3, 3e-2])
def test_grad_filter_error_bound(backend_device, eps):
    """Filtering changes each gradient entry by at most eps * sum over the vocab (resp. rows) of
    |operand|, and by nothing where no segment was zeroed; a huge eps drops every segment."""
    backend, device = backend_device
    rows, features, vocab = 30, 20, 64
    # Like a real LM head, the mass sits on a few shared ids (here the first 16: one segment),
    # so whole segments of dz are tiny and filtering has work to do. Only the entropy has an
    # upstream gradient (a log-prob gradient puts a large entry at the token of every row).
    hidden, weight, bias, _ = random_problem(rows, features, vocab, device)
    bias[:16] += 12.0
    problem = dict(hidden=hidden, weight=weight, bias=bias, tokens=None, temperature=1.0,
                   upstream_entropy=torch.randn(rows).to(device), upstream_logprobs=None)
    with small_chunks():
        _, _, exact = values_and_grads(kernel_fn(problem, backend), problem)
        _, _, filtered = values_and_grads(
            kernel_fn(problem, backend, grad_filter_eps=eps), problem)
        _, _, dropped = values_and_grads(
            kernel_fn(problem, backend, grad_filter_eps=1e30), problem)
    grad_hidden, grad_weight, grad_bias = (g.double() for g in filtered)
    exact_hidden, exact_weight, exact_bias = (g.double() for g in exact)
    hidden_bound = eps * weight.double().abs().sum(0).expand(rows, features)
    weight_bound = eps * hidden.double().abs().sum(0).expand(vocab, features)
    slack = 1e-5
    assert bool(((grad_hidden - exact_hidden).abs() <= hidden_bound + slack).all())
    assert bool(((grad_weight - exact_weight).abs() <= weight_bound + slack).all())
    assert bool(((grad_bias - exact_bias).abs() <= eps * rows + slack).all())
    assert not torch.equal(filtered[0], exact[0]), "nothing was filtered: the test is vacuous"
    for grad in dropped:
        assert bool((grad == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_filter_skips_quiet_rows_exactly(backend_device, dtype):
    """Rows whose dz a chunk zeroes entirely drop out of that chunk's gradient matmuls: the
    gradients equal those of the same filtered dz with every row kept (dense matmuls), and the
    skip path really runs. Row r's logits peak twice, at ids 4k and 4k + 50 (k = r mod 12,
    p ~ 0.5 each), and the chunks are 32 columns (two 16-column segments) wide, so each row is
    active in two chunks of three, through either segment of a chunk: choosing the active rows
    by one segment or by all of them, or adding a chunk's d_hidden rows onto the accumulator
    instead of writing the accumulated rows back, changes the gradients."""
    backend, device = backend_device
    rows, features, vocab = 24, 12, 96
    generator = torch.Generator().manual_seed(5)
    hidden = 10.0 * torch.eye(features).repeat(2, 1) + 0.01 * torch.randn(
        rows, features, generator=generator)
    weight = 0.01 * torch.randn(vocab, features, generator=generator)
    peaks = torch.arange(features) * 4
    weight[peaks] += torch.eye(features)  # in chunk 0 (k < 8) or 1
    weight[peaks + 50] += torch.eye(features)  # in chunk 1 (k < 4) or 2
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    upstream = torch.randn(rows, generator=generator).to(device)
    selected = []
    real_select = torch.Tensor.index_select

    def recording_select(self, dim, index):
        selected.append(index.numel())
        return real_select(self, dim, index)

    def grads():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = em_kernels.linear_entropy(h, w, backend=backend, grad_filter_eps=1e-3)
        return torch.autograd.grad((upstream * out.entropy).sum(), (h, w))

    # Chunks of two segments (32 columns), whatever the bytes a dz entry takes on this path.
    with small_chunks(), mock.patch.object(ops, "backward_chunk_columns",
                                           lambda rows, entry, vocab: min(32, vocab)):
        with mock.patch.object(ops, "SKIP_MAX_ACTIVE_FRACTION", 1.0), \
                mock.patch.object(torch.Tensor, "index_select", recording_select):
            skipping = grads()
        with mock.patch.object(ops, "SKIP_MAX_ACTIVE_FRACTION", -1.0):
            dense = grads()
    assert selected and max(selected) < rows, f"the skip path did not run: {selected}"
    tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2,
                                                                               atol=1e-4)
    for got, want in zip(skipping, dense):
        torch.testing.assert_close(got, want, **tolerance)
    assert not torch.equal(dense[0], torch.zeros_like(dense[0]))


@pytest.mark.parametrize("skip", [True, False])
def test_grad_filter_never_drops_a_nan(backend_device, skip):
    """A NaN in one row's hidden state poisons the gradients exactly as without filtering,
    whether the quiet rows are skipped or not (NaN < eps is false: a NaN segment is kept)."""
    backend, device = backend_device
    hidden, weight, bias, _ = random_problem(12, 10, 40, device)
    hidden[3, 2] = float("nan")

    def grads(eps):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = em_kernels.linear_entropy(h, w, bias=bias, backend=backend, grad_filter_eps=eps)
        return torch.autograd.grad(out.entropy.nansum(), (h, w))

    with small_chunks(), mock.patch.object(ops, "SKIP_MAX_ACTIVE_FRACTION", 1.0 if skip else -1.0):
        exact, filtered = grads(None), grads(1e-2)
    for got, want in zip(filtered, exact):
        assert torch.equal(got.isnan(), want.isnan())
    assert bool(exact[0][3].isnan().all())


def test_backend_names():
    hidden, weight, bias, tokens = random_problem(6, 16, 20, "cpu")
    torch_out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens,
                                          backend="torch")
    for backend in ("auto", "cpu"):
        out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens,
                                        backend=backend)
        assert torch.equal(out.entropy, torch_out.entropy)
    with pytest.raises(em_kernels.BackendUnavailableError, match="CUDA tensors only"):
        em_kernels.linear_entropy(hidden, weight, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        em_kernels.linear_entropy(hidden, weight, backend="fast")
    double = em_kernels.linear_entropy(hidden.double(), weight.double(), backend="torch")
    assert double.entropy.dtype == torch.float64


def _bad_inputs():
    hidden, weight, bias, tokens = random_problem(4, 8, 10, "cpu")
    return [
        (dict(hidden=hidden.numpy()), TypeError, "hidden must be a torch.Tensor"),
        (dict(hidden=hidden.long()), TypeError, "hidden must be float32"),
        (dict(weight=weight.half()), TypeError, "same dtype|cast them"),
        (dict(hidden=hidden[0]), ValueError, "2-D"),
        (dict(weight=weight.T.contiguous()), ValueError, "H must match"),
        (dict(weight=weight[None]), ValueError, "weight must be 2-D"),
        (dict(weight=weight[:0], bias=None, tokens=None), ValueError, "at least one entry"),
        (dict(hidden=hidden[:, :0], weight=weight[:, :0]), ValueError, "hidden size H"),
        (dict(bias=bias[:5]), ValueError, r"bias must have shape \(V,\)"),
        (dict(bias=bias.double()), TypeError, "cast bias"),
        (dict(bias=[0.0] * 10), TypeError, "bias must be a torch.Tensor"),
        (dict(hidden=hidden.to_sparse()), TypeError, "hidden must be a dense"),
        (dict(weight=weight.to_sparse_csr()), TypeError, "weight must be a dense"),
        (dict(bias=bias.to_sparse()), TypeError, "bias must be a dense"),
        # Meta tensors: the device checks, runnable without a GPU.
        (dict(weight=weight.to("meta")), ValueError, "hidden is on cpu but weight is on meta"),
        (dict(bias=bias.to("meta")), ValueError, "bias is on meta but weight is on cpu"),
        (dict(tokens=tokens.to("meta")), ValueError,
         "tokens are on meta but the hidden states are on cpu"),
        (dict(tokens=tokens.int()), TypeError, "int64"),
        (dict(tokens=tokens[:3]), ValueError, "shape"),
        (dict(tokens=tokens + 10), ValueError, r"outside \[0, 10\)"),
        (dict(tokens=tokens - 10), ValueError, r"outside \[0, 10\)"),
        (dict(temperature=0.0), ValueError, "finite positive"),
        (dict(temperature=-1.0), ValueError, "finite positive"),
        (dict(temperature=float("nan")), ValueError, "finite positive"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(grad_filter_eps=-1.0), ValueError, "grad_filter_eps"),
        (dict(grad_filter_eps="x"), TypeError, "grad_filter_eps"),
        (dict(backend=3), TypeError, "backend must be a string"),
        (dict(process_group=object()), ValueError, "torch.distributed is not initialised"),
        (dict(tokens=[0, 1, 2, 3], process_group=object()), TypeError, "torch.Tensor"),
        (dict(hidden=hidden.double(), weight=weight.double(), backend="auto"), TypeError,
         "float64"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input(index):
    override, error, message = _bad_inputs()[index]
    hidden, weight, bias, tokens = random_problem(4, 8, 10, "cpu")
    kwargs = dict(hidden=hidden, weight=weight, bias=bias, tokens=tokens, temperature=1.0)
    kwargs.update(override)
    hidden, weight = kwargs.pop("hidden"), kwargs.pop("weight")
    with pytest.raises(error, match=message):
        em_kernels.linear_entropy(hidden, weight, **kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch():
    hidden, weight, bias, tokens = random_problem(4, 8, 10, "cpu")
    with pytest.raises(ValueError, match="weight is on"):
        em_kernels.linear_entropy(hidden, weight.cuda())
    with pytest.raises(ValueError, match="tokens are on"):
        em_kernels.linear_entropy(hidden.cuda(), weight.cuda(), tokens=tokens)


def test_zero_rows(backend_device):
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(0, 16, 20, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens, backend=backend)
    assert out.entropy.shape == (0,) and out.logprobs.shape == (0,)
    grad_hidden, grad_weight = torch.autograd.grad(out.entropy.sum(), (hidden, weight))
    assert grad_hidden.shape == (0, 16) and bool((grad_weight == 0).all())


_PEAK_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, em_kernels
    from em_kernels._ops import linear_entropy as ops
    ops.TORCH_ROW_CHUNK, ops.TORCH_CHUNK_ELEMENTS = 128, 1 << 18  # 1 MiB blocks
    ops.BWD_CHUNK_BYTES = 1 << 20
    rows, features, vocab = 2048, 8, 32768
    hidden = torch.randn(rows, features, requires_grad=True)
    weight = torch.randn(vocab, features, requires_grad=True)
    tokens = torch.randint(0, vocab, (rows,))
    em_kernels.linear_entropy(hidden[:2], weight, tokens=tokens[:2], backend="torch")  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = em_kernels.linear_entropy(hidden, weight, tokens=tokens, backend="torch")
    (out.entropy.sum() + out.logprobs.sum()).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(after - before)
""")


def peak_rss_growth(script: str) -> int:
    """Run ``script`` in a fresh process (2 threads); the last line it prints, as an int: the
    growth of its peak RSS around the step it measures."""
    environment = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=environment, timeout=300, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def cuda_head_operands(rows=4096, features=256, vocab=131072):
    """bf16 hidden and weight requiring grad, and tokens, on CUDA: bf16 logits of this shape
    would take 1 GiB."""
    hidden = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, features, device="cuda", dtype=torch.bfloat16,
                         requires_grad=True)
    return hidden, weight, torch.randint(0, vocab, (rows,), device="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_16bit_gemms_on_cuda_without_float32_output_forms(backend):
    """torch < 2.8 has no out_dtype GEMMs and torch < 2.10 no addmm adding to float32: there
    the 16-bit products are rounded to bf16 before they are added in float32. Simulated on this
    torch by switching the version flags off: the values and gradients stay within bf16
    rounding of the float32-output forms'."""
    if not runnable(backend, "cuda"):
        pytest.skip(em_kernels.available_backends()[backend])
    hidden, weight, tokens = cuda_head_operands(rows=256, features=64, vocab=40000)

    def run():
        leaves_ = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
        out = em_kernels.linear_entropy(*leaves_, tokens=tokens, backend=backend)
        (out.entropy.sum() - out.logprobs.sum()).backward()
        return [out.entropy, out.logprobs] + [x.grad.float() for x in leaves_]

    expected = run()
    with mock.patch.object(em_kernels._ops, "MM_HAS_OUT_DTYPE", False), \
            mock.patch.object(ops, "ADDMM_HAS_FLOAT32_OUT_DTYPE", False):
        fallback = run()
    for got, want in zip(fallback, expected):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_chunked_path_never_holds_n_by_v():
    """fp32 logits of this shape take 256 MiB; the chunked path's peak resident memory over
    forward+backward must stay far below that (its blocks are shrunk to 1 MiB here, so that a
    shape cheap to compute still separates the two; a few blocks are alive at once and the C
    allocator keeps some freed ones resident). Measured in a fresh process as the growth of the
    peak RSS, so any [N, V] temporary would show in full."""
    growth = peak_rss_growth(_PEAK_MEMORY_SCRIPT)
    logits_bytes = 2048 * 32768 * 4
    assert growth < logits_bytes / 8, f"peak memory grew by {growth / 2**20:.0f} MiB"


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_triton_never_holds_n_by_v_on_cuda():
    hidden, weight, tokens = cuda_head_operands()
    (rows, features), vocab = hidden.shape, weight.shape[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = em_kernels.linear_entropy(hidden, weight, tokens=tokens, backend="triton")
    forward_peak = torch.cuda.max_memory_allocated() - base
    (out.entropy.sum() + out.logprobs.sum()).backward()
    total_peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = rows * vocab * 2  # even bf16 logits: 1 GiB
    assert forward_peak < 16 * 2**20
    # Backward: the gradients (bf16), the fp32 d_hidden accumulator and the chunk workspace.
    gradients = (rows + vocab) * features * 2 + rows * features * 4
    assert total_peak < gradients + ops.BWD_CHUNK_BYTES + 16 * 2**20 < logits_bytes


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("op", ["linear_entropy", "linear_entropy_loss"])
def test_cuda_graph_capture_of_forward_and_backward(op):
    """Forward and backward captured in one CUDA graph (trainers with CUDA graphs, or
    torch.compile's mode="reduce-overhead": no host sync, no allocation that depends on the data;
    gradient filtering is off, the default) replay to the bits of eager calls on new hidden
    states copied into the captured input."""
    skip_unless_runnable("triton", "cuda")
    rows, features, vocab = 256, 512, 32000
    generator = torch.Generator(device="cuda").manual_seed(5)
    static = torch.randn(rows, features, device="cuda", generator=generator).to(torch.bfloat16)
    weight = (torch.randn(vocab, features, device="cuda", generator=generator) * 0.05).to(
        torch.bfloat16)
    tokens = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    row_weights = torch.randn(rows, device="cuda", generator=generator)

    def step(values):
        hidden = values.detach().requires_grad_()
        head = weight.detach().requires_grad_()
        if op == "linear_entropy":
            out = em_kernels.linear_entropy(hidden, head, tokens=tokens, backend="triton")
            loss = (row_weights * out.entropy - out.logprobs).sum()
        else:
            out = em_kernels.linear_entropy_loss(hidden, head, tokens=tokens,
                                                 entropy_weight=row_weights,
                                                 logprob_weight=-torch.ones_like(row_weights),
                                                 backend="triton")
            loss = out.loss
        grads = torch.autograd.grad(loss, (hidden, head))
        return (out.entropy.detach(), out.logprobs.detach(), *grads)

    assert_cuda_graph_replays_eager(step, static, [
        (torch.randn(rows, features, device="cuda", generator=generator) * scale).to(
            torch.bfloat16) for scale in (0.5, 2.0)])


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(transposed):
    """Also with transposed (non-contiguous) operands, as a head stored (H, V) and passed as
    W.T gives: the gradients come back contiguous, and the fake kernel must say so (else a
    compiled backward fails on its stride assertion)."""
    hidden, weight, bias, tokens = random_problem(7, 16, 20, "cpu")
    if transposed:
        hidden, weight = hidden.T.contiguous().T, weight.T.contiguous().T
    for backend in ("torch", "triton"):
        if not runnable(backend, "cpu"):
            continue
        args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), tokens,
                1.3, 0.0, backend)
        torch.library.opcheck(ops.linear_entropy_stats, args)
        entropy, lse, _ = ops.linear_entropy_stats(*[
            a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        grad = torch.randn(7)
        torch.library.opcheck(ops.linear_entropy_backward, (
            hidden.detach(), weight.detach(), bias.detach(), tokens, entropy, lse, grad, -grad,
            grad, 1.3, 0.0, True, True, backend))


def test_torch_compile_fullgraph():
    hidden, weight, bias, tokens = random_problem(11, 16, 20, "cpu")

    def step(hidden, weight, bias, tokens):
        out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens,
                                        temperature=0.9, backend="torch")
        return (out.entropy * 0.5 + out.logprobs).sum()

    assert_compiles_like_eager(step, (hidden, weight, bias), tokens)


def assert_compiles_like_eager(step, differentiable, *constants):
    """torch.compile(step, fullgraph=True) gives eager's scalar and its gradients w.r.t. the
    ``differentiable`` inputs (fresh leaf copies for each run); ``constants`` follow them."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_inputs = [x.clone().requires_grad_() for x in differentiable]
    compiled_inputs = [x.clone().requires_grad_() for x in differentiable]
    expected = step(*eager_inputs, *constants)
    expected.backward()
    actual = compiled(*compiled_inputs, *constants)
    actual.backward()
    torch.testing.assert_close(actual, expected)
    for got, want in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(got.grad, want.grad)



# Run by sm90.run_lowering_script (a fresh process, without the interpreter).
_LOWER_FOR_HOPPER_SCRIPT = textwrap.dedent("""
    import json, torch
    from em_kernels._ops import linear_entropy as ops
    from em_kernels.triton import linear_entropy as kernels
    from sm90 import compile_for_sm90, resource_usage

    def lower(kernel, dtype, backward, tma=False):
        element = "bf16" if dtype == torch.bfloat16 else "fp32"
        cuda = torch.device("cuda")
        constants = dict(HAS_BIAS=True, HAS_TOKENS=True, UPCAST_OPERANDS=False, TMA=tma,
                         DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                         stride_hidden_h=1, stride_weight_h=1)
        if backward:  # the fused logits -> dz kernel, with the dispatcher's segment
            config = kernels.backward_tile_config(cuda, dtype, ops.DZ_TILE_COLS)
            constants.update(FILTER=True)
        else:
            config = kernels.tile_config(cuda, dtype)
            constants.update(TILES_PER_SPLIT=config.tiles_per_split)
        constants.update(BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h,
                         GROUP_N=config.group_n)
        types = {name: "*" + element for name in ("hidden_ptr", "weight_ptr", "bias_ptr", "dz_ptr")}
        types.update(tokens_ptr="*i64", kept_ptr="*i8", inv_temperature="fp32",
                     grad_filter_eps="fp32")
        if tma:  # operand (and dz) descriptors, typed as a launch mangles them
            types.update(hidden_ptr=f"tensordesc<{element}[{config.block_n}, {config.block_h}]>",
                         weight_ptr=f"tensordesc<{element}[{config.block_v}, {config.block_h}]>",
                         dz_ptr=f"tensordesc<{element}[{config.block_n}, {config.block_v}]>")
        # What a real launch specialises: 16-divisible pointers, row strides, H (every LM's
        # hidden size is a multiple of 16; other H get unvectorised, unpipelined loads) and the
        # backward's chunk width (a multiple of DZ_TILE_COLS but for the last chunk).
        divisible = [n for n in kernel.arg_names if n.endswith("_ptr") or n in (
            "stride_hidden_n", "stride_weight_v", "H", "width")]
        compiled = compile_for_sm90(kernel, constants, types, divisible,
                                    num_warps=config.num_warps, num_stages=config.num_stages)
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        return dict(wgmma="warp_group_dot" in ttgir,
                    pipelined="async_copy_global_to_local" in ttgir,
                    tma="cp.async.bulk.tensor" in ptx,
                    tma_store="cp.async.bulk.tensor.2d.global.shared" in ptx,
                    spill_bytes=resource_usage(compiled)[1])

    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        results[f"fwd-{dtype}"] = lower(kernels._linear_entropy_fwd_kernel, dtype, False)
        results[f"dz-{dtype}"] = lower(kernels._linear_entropy_dz_kernel, dtype, True)
    for name, kernel, backward in [("fwd", kernels._linear_entropy_fwd_kernel, False),
                                   ("dz", kernels._linear_entropy_dz_kernel, True)]:
        results[f"{name}-tma-bf16"] = lower(kernel, torch.bfloat16, backward, tma=True)
    print(json.dumps(results))
""")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the launches themselves compile the kernels")
def test_kernels_lower_for_hopper():
    """The interpreter never compiles the kernels: lower the forward and the backward's fused
    dz kernel to sm_90 with the specialisations a real launch gets, and check that 16-bit tiles
    use wgmma with software-pipelined (async-copy or TMA) loads, and what ptxas spills.

    A 16-bit tile holds a 128-register fp32 accumulator a thread, which leaves little room at
    255 registers: with tokens, the one-hot's 64-bit column compares made the forward spill 496
    to 552 bytes a thread and the dz kernel 104 (Triton 3.8 here); with 32-bit tile columns
    and the statistics' shifts clamped by a max (not a compare and a select) the 16-bit kernels
    spill nothing and the fp32 ones 8 bytes. max_spill_bytes keeps it so: a change that spills
    more fails here before it costs time on a GPU. The tiles are tuned with Triton >= 3.6: 3.4
    spills up to 272 bytes a thread in them (the default TMA dz tile included), 3.5 168."""
    max_spill_bytes = 64 if not triton_older_than((3, 6)) else 288
    results = run_lowering_script(_LOWER_FOR_HOPPER_SCRIPT)
    for name, found in results.items():
        assert found["spill_bytes"] <= max_spill_bytes, (name, found)
        if "bfloat16" in name:
            assert found["wgmma"] and found["pipelined"], (name, found)
    # The TMA operands (TileConfig.tma, the 16-bit default): bulk tensor copies feeding wgmma,
    # and the backward's dz leaving by a bulk store.
    for name in ("fwd-tma-bf16", "dz-tma-bf16"):
        assert results[name]["tma"] and results[name]["wgmma"], (name, results[name])
    assert results["dz-tma-bf16"]["tma_store"], results["dz-tma-bf16"]
