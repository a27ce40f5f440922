"""linear_entropy_loss (the weighted entropy / log-prob loss with its gradients computed in the
forward) against the float64 oracle, against linear_entropy, and on bad input."""

from __future__ import annotations

import math
import textwrap
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import em_kernels
from em_kernels import reference
from em_kernels._ops import DYNAMO_TRACES_IS_BATCHEDTENSOR
from em_kernels._ops import linear_entropy_loss as loss_ops

from conftest import HAS_CUDA, runnable
from oracle import assert_matches_oracle, assert_row_relative, max_abs_error
from test_linear_entropy import (assert_compiles_like_eager, assert_grads_match_oracle,
                                 confident_head, confident_head_oracle,
                                 cuda_head_operands, eager_fn, leaves, loss_of, oracle_fn,
                                 peak_rss_growth, problems, random_problem, recompute_floors,
                                 to_device, values_and_grads)


def chunks_of(rows: int, problem) -> mock._patch:
    """A chunk budget that gives ``rows`` rows per chunk with two buffers (2 * rows with the
    Triton backend's one), so that small problems cross several chunks."""
    vocab = problem["weight"].shape[0]
    entry = problem["hidden"].element_size()
    return mock.patch.object(loss_ops, "LOSS_CHUNK_BYTES", rows * vocab * entry * 2)


def run_loss(problem, backend, leaves_=None, **kwargs):
    """(loss, entropy, logprobs, [grads of those of hidden, weight, bias that require grad]) with
    the problem's upstream gradients as the row weights."""
    hidden, weight, bias = leaves_ if leaves_ is not None else leaves(problem)
    out = em_kernels.linear_entropy_loss(
        hidden, weight, bias=bias, tokens=problem["tokens"],
        entropy_weight=problem["upstream_entropy"], logprob_weight=problem["upstream_logprobs"],
        temperature=problem["temperature"], backend=backend, **kwargs)
    inputs = [x for x in (hidden, weight, bias) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(out.loss, inputs)
    return out.loss, out.entropy, out.logprobs, list(grads)


def chunk_rounding_floor(problem, chunks: int) -> float:
    """bf16 d_weight is accumulated over the row chunks in its dtype (float16's in float32):
    each of the `chunks` additions rounds a partial sum bounded by sum_r |dz_rj| |h_rk| (dz from
    float64)."""
    accumulation_dtype = loss_ops.gradient_accumulation_dtype(problem["weight"].dtype)
    if chunks <= 1 or accumulation_dtype == torch.float32:
        return 0.0
    hidden = problem["hidden"].detach().double().cpu()
    logits = hidden @ problem["weight"].detach().double().cpu().T
    if problem["bias"] is not None:
        logits = logits + problem["bias"].detach().double().cpu()
    logits.requires_grad_()
    tokens = problem["tokens"].cpu() if problem["tokens"] is not None else None
    if tokens is None:
        entropy, logprobs = reference.entropy_ref(logits, problem["temperature"]), None
    else:
        logprobs, entropy = reference.logprobs_and_entropy_ref(
            logits, tokens, problem["temperature"])
    (grad_logits,) = torch.autograd.grad(loss_of(entropy, logprobs, problem), logits)
    partial = grad_logits.abs().T @ hidden.abs()
    return chunks * torch.finfo(accumulation_dtype).eps * float(partial.max())


def check_loss_against_oracle(problem, backend, rows_per_chunk=5):
    with chunks_of(rows_per_chunk, problem):
        loss, entropy, logprobs, grads = run_loss(problem, backend)
    ref_entropy, ref_logprobs, ref_grads = values_and_grads(
        oracle_fn(problem), problem, torch.float64)
    # The yardstick rounds its logits as the loss does: once, bias included (nn.Linear's way).
    eager_entropy, eager_logprobs, eager_grads = values_and_grads(
        eager_fn(problem, fused_bias=True), problem)
    assert loss.shape == () and loss.dtype == torch.float32
    assert not entropy.requires_grad and entropy.dtype == torch.float32
    assert_matches_oracle(entropy, ref_entropy, eager_entropy, 1e-5, "entropy")
    if problem["tokens"] is None:
        assert logprobs is None
    else:
        assert_matches_oracle(logprobs, ref_logprobs, eager_logprobs, 1e-5, "logprobs")
    # The loss is a weighted sum of the rows' values, each held to the rule above: its bound is
    # the same sum of their bounds (eager's one scalar error may cancel by luck).
    loss_bound = 0.0
    for weights, eager, ref in ((problem["upstream_entropy"], eager_entropy, ref_entropy),
                                (problem["upstream_logprobs"], eager_logprobs, ref_logprobs)):
        if weights is not None:
            row_bound = 2 * max_abs_error(eager, ref) + 1e-5
            loss_bound += float(weights.double().abs().sum()) * row_bound
    ref_loss = loss_of(ref_entropy, ref_logprobs, problem)
    assert_matches_oracle(loss, ref_loss, ref_loss, loss_bound, "loss")
    # chunks_of's budget holds twice the rows where the Triton backward works in place.
    chunk_rows = rows_per_chunk * (2 if backend == "triton" else 1)
    chunks = math.ceil(problem["hidden"].shape[0] / chunk_rows)
    # dz comes from p = exp(z / T - lse) with the saved fp32 lse, whose rounding (~4 eps |z|max)
    # eager autograd does not pay: the same floors as linear_entropy's recomputed logits.
    hidden_floor, weight_floor, bias_floor = recompute_floors(problem)
    weight_floor += chunk_rounding_floor(problem, chunks)
    assert_grads_match_oracle(grads, ref_grads, eager_grads, problem,
                              (hidden_floor, weight_floor, bias_floor))


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_matches_oracle(backend_device, data):
    backend, device = backend_device
    implementation = "triton" if backend == "triton" else "torch"  # the shape limits' key
    problem = to_device(data.draw(problems(implementation, device)), device)
    check_loss_against_oracle(problem, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_linear_entropy(backend_device, dtype):
    """The same loss and gradients as the weighted sum of linear_entropy's outputs, across
    chunks, with masked entries, tokens, a bias and a temperature."""
    backend, device = backend_device
    problem = _problem(23, 35, 53, device, dtype)
    with chunks_of(4, problem):
        loss, entropy, logprobs, grads = run_loss(problem, backend)
    hidden, weight, bias = leaves(problem)
    out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=problem["tokens"],
                                    temperature=problem["temperature"])
    expected = loss_of(out.entropy, out.logprobs, problem)
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    # bf16: the loss rounds its logits to bf16, linear_entropy keeps them in fp32.
    tolerance = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=0.05,
                                                                               atol=0.05)
    torch.testing.assert_close(loss, expected, **tolerance)
    torch.testing.assert_close(entropy, out.entropy, **tolerance)
    torch.testing.assert_close(logprobs, out.logprobs, **tolerance)
    for got, want in zip(grads, expected_grads):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tolerance)


def _problem(rows, features, vocab, device, dtype, seed=3):
    generator = torch.Generator().manual_seed(seed)
    hidden, weight, bias, _ = random_problem(rows, features, vocab, "cpu", seed=seed)
    bias[::6] = float("-inf")
    finite = torch.nonzero(bias > float("-inf")).squeeze(-1)
    problem = dict(
        hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype),
        tokens=finite[torch.randint(0, len(finite), (rows,), generator=generator)],
        temperature=0.8, upstream_entropy=torch.randn(rows, generator=generator),
        upstream_logprobs=torch.randn(rows, generator=generator))
    return to_device(problem, device)


def test_only_requested_grads_are_computed(backend_device):
    """A frozen LM head skips d_weight; under no_grad nothing but the statistics is computed."""
    backend, device = backend_device
    problem = _problem(9, 16, 20, device, torch.float32)
    hidden, weight, bias = leaves(problem)
    weight.requires_grad_(False)
    flags = []
    unpatched = loss_ops.loss_and_grads

    def recording(*args):
        flags.append(args[13:16])  # need_grad_hidden, need_grad_weight, need_grad_bias
        return unpatched(*args)

    with mock.patch.object(loss_ops, "loss_and_grads", side_effect=recording):
        _, _, _, (grad_hidden, grad_bias) = run_loss(problem, backend, (hidden, weight, bias))
        with torch.no_grad():
            out = em_kernels.linear_entropy_loss(
                hidden, weight, bias=bias, entropy_weight=1.0, backend=backend)
    assert flags == [(True, False, True), (False, False, False)]
    assert not out.loss.requires_grad
    _, _, _, (full_hidden, _, full_bias) = run_loss(problem, backend)
    torch.testing.assert_close(grad_hidden, full_hidden)
    torch.testing.assert_close(grad_bias, full_bias)


def test_upstream_gradient_scales_and_row_weights_differentiate(backend_device):
    """backward(g) gives g times the gradients; d loss / d row weight is the row's statistic.
    The saved gradients are handed over, scaled in place: a second backward through the same
    call raises instead of scaling them twice."""
    backend, device = backend_device
    problem = _problem(7, 12, 15, device, torch.float32)
    hidden, weight, bias = leaves(problem)
    entropy_weight = problem["upstream_entropy"].clone().requires_grad_()
    logprob_weight = problem["upstream_logprobs"].clone().requires_grad_()

    def loss():
        return em_kernels.linear_entropy_loss(
            hidden, weight, bias=bias, tokens=problem["tokens"], entropy_weight=entropy_weight,
            logprob_weight=logprob_weight, backend=backend)

    (once,) = torch.autograd.grad(loss().loss, hidden)
    out = loss()
    scaled, d_weight, d_entropy_weight, d_logprob_weight = torch.autograd.grad(
        out.loss * -2.5, (hidden, weight, entropy_weight, logprob_weight), retain_graph=True)
    torch.testing.assert_close(scaled, once * -2.5)
    torch.testing.assert_close(d_entropy_weight, out.entropy * -2.5)
    torch.testing.assert_close(d_logprob_weight, out.logprobs * -2.5)
    with pytest.raises(RuntimeError, match="second one"):
        torch.autograd.grad(out.loss, weight)


def test_weight_gradient_is_handed_over_without_a_copy():
    """Without retain_graph the saved d_weight becomes weight.grad itself (no V x H copy)."""
    hidden, weight, bias, _ = random_problem(6, 8, 12, "cpu")
    weight.requires_grad_()
    computed = []
    unpatched = loss_ops.loss_and_grads

    def recording(*args):
        outputs = unpatched(*args)
        computed.append(outputs[4].data_ptr())  # not the tensor: a reference blocks the steal
        return outputs

    with mock.patch.object(loss_ops, "loss_and_grads", side_effect=recording):
        em_kernels.linear_entropy_loss(hidden, weight, entropy_weight=1.0).loss.backward()
    assert weight.grad.data_ptr() == computed[0]


def test_scalar_weights_and_entropy_only(backend_device):
    backend, device = backend_device
    problem = _problem(6, 10, 13, device, torch.float32)
    hidden, weight, bias = leaves(problem)
    out = em_kernels.linear_entropy_loss(hidden, weight, bias=bias, entropy_weight=0.25,
                                         backend=backend)
    assert out.logprobs is None
    expected = em_kernels.linear_entropy(hidden, weight, bias=bias).entropy
    torch.testing.assert_close(out.loss, expected.sum() * 0.25)
    torch.testing.assert_close(out.entropy, expected.detach())


def test_confident_rows_have_relatively_exact_gradients(backend_device):
    """test_linear_entropy's test of the same name for the loss: the entropy kernels' float64
    lse keeps confident rows' gradients exact relative to their own size. (The torch backend
    computes the float32 entropy as plain PyTorch does: not held to this.)"""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("plain float32 PyTorch statistics")
    hidden, weight = (x.to(device).requires_grad_() for x in confident_head())
    out = em_kernels.linear_entropy_loss(hidden, weight, entropy_weight=1.0, backend=backend)
    out.loss.backward()
    exact_hidden, exact_weight = confident_head_oracle(hidden, weight)
    assert_row_relative(hidden.grad, exact_hidden, 1e-4, "d(hidden)")
    assert_row_relative(weight.grad, exact_weight, 1e-4, "d(weight)")


def test_deterministic(backend_device):
    backend, device = backend_device
    problem = _problem(21, 24, 40, device, torch.bfloat16)
    with chunks_of(4, problem):
        first = run_loss(problem, backend)
        second = run_loss(problem, backend)
    for a, b in zip(first[:3] + tuple(first[3]), second[:3] + tuple(second[3])):
        assert torch.equal(a, b)


def test_zero_rows(backend_device):
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(0, 16, 20, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = em_kernels.linear_entropy_loss(hidden, weight, bias=bias, tokens=tokens,
                                         entropy_weight=1.0, logprob_weight=1.0, backend=backend)
    assert out.loss.item() == 0.0 and out.entropy.shape == (0,) and out.logprobs.shape == (0,)
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight))
    assert grad_hidden.shape == (0, 16) and bool((grad_weight == 0).all())


def test_all_masked_rows_add_no_gradient(backend_device):
    """Rows whose every logit is -inf have NaN entropies, so a NaN loss (the plain weighted sum,
    even where a weight is 0), and add nothing to the gradients."""
    backend, device = backend_device
    hidden, weight, bias, _ = random_problem(5, 8, 11, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = em_kernels.linear_entropy_loss(
        hidden, weight, bias=torch.full_like(bias, float("-inf")),
        entropy_weight=torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], device=device), backend=backend)
    assert bool(torch.isnan(out.entropy).all()) and bool(torch.isnan(out.loss))
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight))
    assert bool((grad_hidden == 0).all()) and bool((grad_weight == 0).all())


_PEAK_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, torch, em_kernels
    from em_kernels._ops import linear_entropy_loss as loss_ops
    loss_ops.LOSS_CHUNK_BYTES = 1 << 20
    rows, features, vocab = 2048, 8, 32768
    hidden = torch.randn(rows, features, requires_grad=True)
    weight = torch.randn(vocab, features, requires_grad=True)
    tokens = torch.randint(0, vocab, (rows,))
    def step(count):
        out = em_kernels.linear_entropy_loss(
            hidden[:count], weight, tokens=tokens[:count], entropy_weight=1.0,
            logprob_weight=-1.0, backend="{backend}")
        out.loss.backward()
    step(2)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(rows)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(after - before)
""")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_never_holds_n_by_v(backend):
    """fp32 logits of this shape take 256 MiB; with 1 MiB chunks the peak resident memory over
    forward+backward must stay far below that (the gradients take 1 MiB). Measured in a fresh
    process as the growth of the peak RSS, so an [N, V] temporary would show in full."""
    if not runnable(backend, "cpu"):
        pytest.skip(em_kernels.available_backends()[backend])
    growth = peak_rss_growth(_PEAK_MEMORY_SCRIPT.replace("{backend}", backend))
    logits_bytes = 2048 * 32768 * 4
    assert growth < logits_bytes / 8, f"peak memory grew by {growth / 2**20:.0f} MiB"


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_extra_memory_on_cuda(backend, dtype):
    """The gradients, the chunk buffer(s) and O(N): at this shape bf16 logits would take 1 GiB.
    float16's d_weight is summed in float32 and rounded into a float16 copy at the end: 6 bytes
    an entry at the peak."""
    if not runnable(backend, "cuda"):
        pytest.skip(em_kernels.available_backends()[backend])
    hidden, weight, tokens = (x.detach().to(dtype).requires_grad_() if x.is_floating_point()
                              else x for x in cuda_head_operands())
    (rows, features), vocab = hidden.shape, weight.shape[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = em_kernels.linear_entropy_loss(hidden, weight, tokens=tokens, entropy_weight=1.0,
                                         logprob_weight=1.0, backend=backend)
    out.loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    # The gradients (bf16's handed over as .grad, not copied), the chunk buffer(s) within their
    # budget, and room for O(N) statistics and cuBLAS's workspace.
    weight_gradient_bytes = 2 if dtype == torch.bfloat16 else 4 + 2
    gradients = (rows * 2 + vocab * weight_gradient_bytes) * features
    assert peak < gradients + loss_ops.LOSS_CHUNK_BYTES + 64 * 2**20 < rows * vocab * 2
    assert weight.grad is not None and hidden.grad is not None


def test_double_backward_is_refused():
    """The saved gradients have no graph of their own: a backward that would build one
    (create_graph=True) raises rather than return gradients blind to second order."""
    hidden, weight, bias, _ = random_problem(4, 6, 9, "cpu")
    hidden.requires_grad_()
    out = em_kernels.linear_entropy_loss(hidden, weight, entropy_weight=1.0)
    with pytest.raises(NotImplementedError, match="differentiable once"):
        torch.autograd.grad(out.loss, hidden, create_graph=True)


@pytest.mark.parametrize("rows,vocab,entry", [(8192, 152064, 2), (8192, 152064, 4),
                                              (8192, 32000, 2), (3, 152064, 2),
                                              (5, 1 << 30, 4)])
def test_loss_chunk_rows(rows, vocab, entry):
    chunk = loss_ops.loss_chunk_rows(rows, vocab, entry)
    assert 1 <= chunk <= rows
    assert chunk == 1 or chunk * vocab * entry <= loss_ops.LOSS_CHUNK_BYTES
    if chunk >= loss_ops.ROW_ALIGN:
        assert chunk % loss_ops.ROW_ALIGN == 0


def _bad_inputs():
    hidden, weight, bias, tokens = random_problem(4, 8, 10, "cpu")
    return [
        (dict(entropy_weight=None), ValueError, "entropy_weight, logprob_weight or both"),
        (dict(logprob_weight=1.0, tokens=None), ValueError, "pass tokens too"),
        (dict(entropy_weight=torch.ones(3)), ValueError, r"shape \(N,\) = \(4,\)"),
        (dict(entropy_weight=torch.ones(4, dtype=torch.long)), TypeError, "floating-point"),
        (dict(entropy_weight=torch.ones(4, device="meta")), ValueError, "is on meta"),
        (dict(entropy_weight=True), TypeError, "entropy_weight"),
        (dict(entropy_weight=float("nan")), ValueError, "entropy_weight"),
        (dict(entropy_weight=1e300), ValueError, "entropy_weight"),  # beyond float32
        (dict(logprob_weight="1"), TypeError, "logprob_weight"),
        (dict(tokens=tokens + 10), ValueError, r"outside \[0, 10\)"),
        (dict(weight=weight.T.contiguous()), ValueError, "H must match"),
        (dict(bias=bias[:5]), ValueError, r"bias must have shape \(V,\)"),
        (dict(temperature=0.0), ValueError, "finite positive"),
        (dict(backend="nope"), ValueError, "unknown backend"),
        (dict(process_group=object()), ValueError, "torch.distributed is not initialised"),
        (dict(tokens=[0, 1, 2, 3], process_group=object()), TypeError, "torch.Tensor"),
        (dict(hidden=hidden.double(), weight=weight.double(), bias=bias.double(),
              backend="auto"), TypeError, "float64"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input(index):
    override, error, message = _bad_inputs()[index]
    hidden, weight, bias, tokens = random_problem(4, 8, 10, "cpu")
    kwargs = dict(hidden=hidden, weight=weight, bias=bias, tokens=tokens, entropy_weight=1.0,
                  temperature=1.0)
    kwargs.update(override)
    hidden, weight = kwargs.pop("hidden"), kwargs.pop("weight")
    with pytest.raises(error, match=message):
        em_kernels.linear_entropy_loss(hidden, weight, **kwargs)


def test_float64_with_the_torch_backend():
    """float64 inputs stay float64 throughout: the loss and gradients match linear_entropy's
    float64 ones to float64 rounding."""
    problem = _problem(9, 8, 10, "cpu", torch.float64)
    with chunks_of(4, problem):
        loss, entropy, logprobs, grads = run_loss(problem, "torch")
    assert loss.dtype == entropy.dtype == logprobs.dtype == torch.float64
    hidden, weight, bias = leaves(problem)
    out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=problem["tokens"],
                                    temperature=problem["temperature"], backend="torch")
    expected = loss_of(out.entropy, out.logprobs, problem)
    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, expected, **tight)
    for got, want in zip(grads, torch.autograd.grad(expected, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, **tight)


def test_small_row_weights_survive_fp16():
    """dz carries the row weights; scaled by the largest before it is rounded to fp16 (and back
    after), 1e-4 x p does not fall into fp16's subnormals (unscaled: d_hidden off by 10%)."""
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(16, 32, generator=generator).half()
    weight = (torch.randn(2000, 32, generator=generator) / math.sqrt(32)).half()
    for backend in ("torch", "cpu", "triton"):
        if not runnable(backend, "cpu"):
            continue
        ours = [x.clone().requires_grad_() for x in (hidden, weight)]
        em_kernels.linear_entropy_loss(*ours, entropy_weight=1e-4, backend=backend).loss.backward()
        exact = [x.float().requires_grad_() for x in (hidden, weight)]
        (em_kernels.linear_entropy(*exact, backend="torch").entropy.sum() * 1e-4).backward()
        for got, want in zip(ours, exact):
            error = float((got.grad.float() - want.grad).abs().max() / want.grad.abs().max())
            assert error < 1e-2, (backend, error)


def test_float16_parameter_gradients_are_summed_in_float32(backend_device):
    """The unit-scaled d_weight is a sum over all rows: 256 rows of a frequent token with a
    feature of 400 pass float16's 65504 (the old float16 accumulator gave inf), while the true
    gradient of their mean entropy is ~4e2. Summed in float32 over several chunks and rounded
    once, each gradient is within twice the error of float32 math on the float16-rounded logits
    (what rounding the logits costs: 1% in d_hidden here) plus float16's last rounding, and
    comes back in its parameter's dtype."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(5)
    rows, features, vocab = 256, 16, 64
    hidden = torch.randn(rows, features, generator=generator)
    hidden[:, 0] = 400.0
    weight = torch.randn(vocab, features, generator=generator) * 0.02
    weight[:, 0] = 0.0
    weight[3, 0] = 0.01  # a logit of 4: token 3 takes ~45% of every row, dz_3 ~ -1
    bias = torch.randn(vocab, generator=generator) * 0.1
    params = [x.half().to(device).requires_grad_() for x in (hidden, weight, bias)]
    with chunks_of(48, {"hidden": params[0], "weight": params[1]}):
        out = em_kernels.linear_entropy_loss(*params[:2], bias=params[2], entropy_weight=1 / rows,
                                             backend=backend)
        out.loss.backward()
    exact = [x.detach().double().cpu().requires_grad_() for x in params]
    reference.entropy_ref(exact[0] @ exact[1].T + exact[2]).mean().backward()
    yardstick = [x.detach().float().cpu().requires_grad_() for x in params]
    rounded_logits = (yardstick[0] @ yardstick[1].T + yardstick[2]).half().float()
    reference.entropy_ref(rounded_logits).mean().backward()
    for name, got, want, rounded in zip(("hidden", "weight", "bias"), params, exact, yardstick):
        assert got.grad.dtype == torch.float16, name
        scale = float(want.grad.abs().max())
        bound = (2 * float((rounded.grad.double() - want.grad).abs().max())
                 + torch.finfo(torch.float16).eps * scale)
        error = float((got.grad.double().cpu() - want.grad).abs().max())
        assert error <= bound, (name, error, bound)
    assert float(exact[1].grad.abs().max()) < 1e3  # the true gradient is far from overflowing


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_float16_weight_gradient_on_cuda_without_addmm_float32_output():
    """torch < 2.10 cannot add a float16 GEMM to a float32 matrix: there each row chunk's
    product is formed in float16 vocab blocks and added in float32. Simulated on this torch by
    switching the version flag off: d_weight within float16 rounding of the fast path's."""
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(700, 64, generator=generator).half().cuda()
    weight = (torch.randn(3000, 64, generator=generator) * 0.1).half().cuda()

    def run():
        leaves_ = [x.clone().requires_grad_() for x in (hidden, weight)]
        with chunks_of(128, {"hidden": leaves_[0], "weight": leaves_[1]}):
            em_kernels.linear_entropy_loss(*leaves_, entropy_weight=1 / 700).loss.backward()
        return leaves_[1].grad.float()

    expected = run()
    with mock.patch.object(loss_ops, "ADDMM_HAS_FLOAT32_OUT_DTYPE", False), \
            mock.patch.object(loss_ops, "PRODUCT_BLOCK_BYTES", 1 << 16):
        fallback = run()
    torch.testing.assert_close(fallback, expected, rtol=1e-2,
                               atol=1e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_add_weight_gradient_overwrites_then_accumulates(dtype):
    """The first chunk writes over whatever the buffer holds (NaN here), later ones add; a
    float16 product goes to its float32 accumulator in vocab blocks (a partial last one too)."""
    generator = torch.Generator().manual_seed(2)
    chunks = [(torch.randn(7, 45, generator=generator).to(dtype),
               torch.randn(7, 5, generator=generator).to(dtype)) for _ in range(3)]
    accumulator = torch.full((45, 5), float("nan"),
                             dtype=loss_ops.gradient_accumulation_dtype(dtype))
    with mock.patch.object(loss_ops, "PRODUCT_BLOCK_BYTES", 4 * (7 + 5) * 10):  # 10-row blocks
        for index, (grad_logits, hidden_rows) in enumerate(chunks):
            loss_ops.add_weight_gradient(accumulator, grad_logits, hidden_rows,
                                         first=index == 0)
    expected = sum(g.double().T @ h.double() for g, h in chunks)
    rounding = 3 * torch.finfo(accumulator.dtype).eps * float(
        sum(g.double().abs().T @ h.double().abs() for g, h in chunks).max())
    assert float((accumulator.double() - expected).abs().max()) <= rounding


def test_autocast_casts_operands_like_linear(backend_device):
    """Both fused losses inside torch.autocast: the head's fp32 operands are cast to its dtype
    (nn.Linear's rule) and the op runs with autocast off, so loss, statistics and gradients
    are bitwise those of bf16 operands cast by hand (with autocast leaking in, the loss came
    back in bf16), the gradients in fp32."""
    backend, device = backend_device
    hidden, weight, bias, tokens = random_problem(9, 16, 40, device)
    generator = torch.Generator().manual_seed(6)
    advantages = torch.randn(9, generator=generator).to(device)

    def run(loss_fn, cast, **kwargs):
        leaves_ = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        used = [x.to(torch.bfloat16) for x in leaves_] if cast else leaves_
        out = loss_fn(used[0], used[1], bias=used[2], tokens=tokens, backend=backend, **kwargs)
        return out, torch.autograd.grad(out.loss, leaves_)

    for loss_fn, kwargs in ((em_kernels.linear_entropy_loss,
                             dict(entropy_weight=0.5, logprob_weight=-0.25)),
                            (em_kernels.linear_policy_loss, dict(advantages=advantages))):
        with torch.autocast(device, dtype=torch.bfloat16):
            under_autocast, autocast_grads = run(loss_fn, False, **kwargs)
        by_hand, by_hand_grads = run(loss_fn, True, **kwargs)
        for got, want in zip(under_autocast, by_hand):
            assert got.dtype == torch.float32 and torch.equal(got, want), loss_fn.__name__
        for got, want in zip(autocast_grads, by_hand_grads):
            assert got.dtype == torch.float32 and torch.equal(got, want), loss_fn.__name__


def test_torch_compile_fullgraph_under_autocast():
    hidden, weight, bias, tokens = random_problem(11, 16, 20, "cpu")

    def step(hidden, weight, bias, tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = em_kernels.linear_entropy_loss(hidden, weight, bias=bias, tokens=tokens,
                                                 entropy_weight=0.5, logprob_weight=1.0,
                                                 backend="torch")
        return out.loss * 3.0

    assert_compiles_like_eager(step, (hidden, weight, bias), tokens)


def test_is_grads_batched_and_vmap():
    """Batched upstream gradients work (out of place); vmap raises with what to do instead."""
    hidden, weight, bias, _ = random_problem(5, 6, 9, "cpu")
    hidden.requires_grad_()
    out = em_kernels.linear_entropy_loss(hidden, weight, entropy_weight=1.0)
    (batched,) = torch.autograd.grad(out.loss, hidden, torch.tensor([1.0, -2.0]),
                                     is_grads_batched=True, retain_graph=True)
    (single,) = torch.autograd.grad(out.loss, hidden)  # batched did not hand the gradients over
    torch.testing.assert_close(batched, torch.stack([single, -2 * single]))
    def loss(h):
        return em_kernels.linear_entropy_loss(h, weight, entropy_weight=1.0).loss

    batch = hidden.detach()[None].expand(2, -1, -1)
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(loss)(batch)
    # vmapped over the tokens alone, or over nothing the loss takes
    tokens = torch.randint(0, 9, (2, 5))
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(lambda t: em_kernels.linear_entropy_loss(
            hidden.detach(), weight, tokens=t, logprob_weight=1.0).loss)(tokens)
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(lambda s: loss(hidden.detach()) * s)(torch.ones(2))
    if DYNAMO_TRACES_IS_BATCHEDTENSOR:  # also when torch.compile traces the vmapped call
        torch._dynamo.reset()
        with pytest.raises(NotImplementedError, match="torch.vmap"):
            torch.compile(torch.vmap(loss), backend="eager")(batch)


def test_returned_statistics_can_be_edited():
    """entropy and logprobs are the caller's to change: the backward does not read them unless
    a row-weight tensor requires grad."""
    hidden, weight, bias, tokens = random_problem(5, 6, 9, "cpu")
    hidden.requires_grad_()
    out = em_kernels.linear_entropy_loss(hidden, weight, tokens=tokens, entropy_weight=1.0,
                                         logprob_weight=0.5)
    out.entropy.div_(2)
    out.logprobs.zero_()
    out.loss.backward()
    assert hidden.grad is not None


def test_opcheck():
    """Also with transposed (non-contiguous) operands: the gradients come back contiguous, and
    the fake kernel must say so; and with float16 ones, whose d_weight and d_bias come back in
    float32 (gradient_accumulation_dtype)."""
    hidden, weight, bias, tokens = random_problem(7, 16, 20, "cpu")
    weights = torch.randn(7)
    policy = (torch.randn(7), torch.randn(7) - 3, torch.randn(7) - 3, 0.2, 0.3, 0.05)
    for backend in ("torch", "cpu", "triton"):
        if not runnable(backend, "cpu"):
            continue
        for h, w, b in ((hidden, weight, bias),
                        (hidden.T.contiguous().T, weight.T.contiguous().T, bias),
                        (hidden.half(), weight.half(), bias.half())):
            for mode in ((None, None, None, 0.0, 0.0, 0.0), policy):  # weighted sum, policy
                torch.library.opcheck(loss_ops.linear_entropy_loss, (
                    h, w, b, tokens, weights, -weights, *mode, 1.3, True, True, True,
                    backend))


def test_torch_compile_fullgraph():
    hidden, weight, bias, tokens = random_problem(11, 16, 20, "cpu")
    weights = torch.linspace(-1.0, 1.0, 11)

    def step(hidden, weight, bias, tokens):
        out = em_kernels.linear_entropy_loss(
            hidden, weight, bias=bias, tokens=tokens, entropy_weight=weights * 0.5,
            logprob_weight=weights, temperature=0.9, backend="torch")
        return out.loss * 3.0 + out.entropy.sum()

    assert_compiles_like_eager(step, (hidden, weight, bias), tokens)
