"""em_kernels.entropy and logprobs_and_entropy on every backend (the `backend_device` fixture):
closeness to the float64 oracle (tests/oracle.py's rule), properties, the dispatcher ops, and
every bad input.

The Triton kernels run under TRITON_INTERPRET=1 on CPU tensors, where each program costs a few
milliseconds: those cases draw fewer examples, fewer rows and smaller vocabularies (block
boundaries and multi-chunk rows are still drawn; one test covers a real vocabulary).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import assert_cuda_graph_replays_eager, bits, skip_unless_runnable
from oracle import assert_matches_oracle, assert_row_relative, written_out
from sm90 import run_lowering_script

import em_kernels
from em_kernels import _checks, reference
from em_kernels._checks import MAX_TEMPERATURE
from em_kernels._ops.entropy import softmax_stats, softmax_stats_backward

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tile boundaries of the Triton kernels (4096, 8192 = one chunk) and multi-chunk rows (merge).
BOUNDARY_VOCABS = (1, 2, 3, 7, 31, 127, 1009, 4095, 4096, 4097, 8191, 8193, 20011)
REAL_VOCABS = (32000, 128256, 151936)
SCALES = (1e-3, 0.1, 1.0, 8.0, 100.0, 1e4)
EPS32 = torch.finfo(torch.float32).eps

# The interpreter evaluates masked lanes too (0 * -inf, log2(0)) and numpy warns about them;
# the kernels discard those values.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def is_slow(backend: str, device: str) -> bool:
    """The Triton interpreter: a few milliseconds per program."""
    return backend == "triton" and device == "cpu"


def hypothesis_settings(slow: bool, slow_examples: int = 8):
    """The loaded profile (ci: derandomised, no deadline), with fewer examples and no shrinking
    under the interpreter (shrinking would rerun it thousands of times). The backend_device
    fixture is a constant per test, so it is safe under hypothesis."""
    checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
              HealthCheck.data_too_large]
    if slow:
        return settings(max_examples=slow_examples, suppress_health_check=checks,
                        phases=[Phase.explicit, Phase.reuse, Phase.generate])
    return settings(suppress_health_check=checks)


@dataclasses.dataclass
class Case:
    """A batch of logits: `view(base)` is what the op sees (any leading shape and strides)."""

    base: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]
    tokens: torch.Tensor
    temperature: float

    @property
    def logits(self) -> torch.Tensor:
        return self.view(self.base)


def _finite_max(dtype: torch.dtype) -> float:
    return 6e4 if dtype == torch.float16 else 1e30


@st.composite
def cases(draw, slow: bool, device: str, dtypes=DTYPES) -> Case:
    """Shapes, dtypes, scales, -inf fractions, strides and temperatures: the ranges every kernel
    must hold in."""
    dtype = draw(st.sampled_from(dtypes))
    vocab_kind = draw(st.sampled_from(["boundary", "small"] + ([] if slow else ["real"])))
    vocab = draw({"boundary": st.sampled_from(BOUNDARY_VOCABS), "small": st.integers(1, 300),
                  "real": st.sampled_from(REAL_VOCABS)}[vocab_kind])
    # The interpreter costs a few ms per (row, 8192-entry chunk); the oracle is float64.
    max_rows = min(12 if slow else 40, max(1, (40_000 if slow else 250_000) // vocab))
    rows = draw(st.integers(0, max_rows) if draw(st.integers(0, 9)) == 0 else
                st.integers(1, max_rows))
    leading = draw(st.sampled_from([(rows,), (rows,), (1, rows), (rows, 1)]))
    if rows >= 4 and rows % 2 == 0 and draw(st.booleans()):
        leading = (2, rows // 2) if rows % 4 else (2, 2, rows // 4)
    layout = draw(st.sampled_from(["contiguous", "padded_rows", "every_other_row",
                                   "transposed_leading", "strided_vocab", "shifted_positions"]))
    if layout in ("transposed_leading", "shifted_positions") and len(leading) < 2:
        layout = "contiguous"
    scale = draw(st.sampled_from(SCALES))
    inf_fraction = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.95]))
    temperature = draw(st.sampled_from([1.0, 0.6, 1.7]) | st.floats(0.05, 20.0))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    # The stored tensor (base) is bigger than the view where the layout needs it.
    if layout == "padded_rows":
        base_shape, view = leading + (vocab + 3,), lambda t: t[..., :vocab]
    elif layout == "every_other_row":
        base_shape = (2 * leading[0],) + leading[1:] + (vocab,)
        view = lambda t: t[::2]  # noqa: E731
    elif layout == "transposed_leading":
        base_shape = (leading[1], leading[0]) + leading[2:] + (vocab,)
        view = lambda t: t.transpose(0, 1)  # noqa: E731
    elif layout == "strided_vocab":
        base_shape, view = leading + (vocab, 2), lambda t: t[..., 0]
    elif layout == "shifted_positions":  # logits[:, :-1], the positions that predict a token
        base_shape = (leading[0], leading[1] + 1) + leading[2:] + (vocab,)
        view = lambda t: t[:, :-1]  # noqa: E731
    else:
        base_shape, view = leading + (vocab,), lambda t: t
    values = torch.randn(base_shape, generator=generator, dtype=torch.float64) * scale
    values = values.clamp(-_finite_max(dtype), _finite_max(dtype))
    masked = torch.rand(base_shape, generator=generator, dtype=torch.float64) < inf_fraction
    base = values.masked_fill(masked, float("-inf")).to(dtype).to(device)
    tokens = torch.randint(0, vocab, leading, generator=generator).to(device)
    return Case(base=base, view=view, tokens=tokens, temperature=temperature)


def stats_floor(logits: torch.Tensor, temperature: float) -> float:
    """Absolute floor for entropy and log-probs: a few float32 ulps of the largest |z / T| and
    of |lse| <= max |z / T| + log V (the kernels carry z / T in float32 and round a log-prob,
    the difference of z / T and lse, to float32; the "torch" backend keeps lse in float32)."""
    finite = logits.double()[torch.isfinite(logits)] / temperature
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    return 4 * EPS32 * (1.0 + largest + math.log(logits.shape[-1]))


def grad_floor(logits: torch.Tensor, temperature: float, grad_entropy, grad_logprobs) -> float:
    """Absolute floor for gradients. The torch backend recomputes p_j = exp(z_j / T - lse) from
    z / T rounded to float32, an absolute error delta of a few ulps of max |z / T| in log p_j;
    that moves every entry by about (delta / T) p_j (|gH| (|ln p_j| + H + 1) + |gL|) <=
    (delta / T)(|gH|(2 + log V) + |gL|). Plain PyTorch's autograd uses that same rounded z / T
    in the forward, so this error is not in the baseline. (The kernels form log p_j relative to
    the row max from a float64 lse and need no such floor:
    test_confident_rows_have_relatively_exact_gradients holds them to a row-relative bound.)"""
    vocab = logits.shape[-1]
    delta = stats_floor(logits, temperature)
    g_h = float(grad_entropy.abs().max()) if grad_entropy.numel() else 0.0
    g_l = float(grad_logprobs.abs().max()) if grad_logprobs.numel() else 0.0
    return delta / temperature * (g_h * (2 + math.log(vocab)) + g_l)


# ----------------------------------------------------------------------------------------------
# Closeness to the float64 oracle


def test_entropy_matches_oracle(backend_device):
    backend, device = backend_device
    slow = is_slow(backend, device)

    @hypothesis_settings(slow, slow_examples=12)
    @given(case=cases(slow, device))
    def check(case: Case):
        logits, temperature = case.logits, case.temperature
        result = em_kernels.entropy(logits, temperature=temperature, backend=backend)
        assert result.dtype == torch.float32 and result.shape == logits.shape[:-1]
        assert result.device == logits.device
        oracle = reference.entropy_ref(logits.double(), temperature)
        baseline = reference.entropy_ref(logits, temperature)
        assert_matches_oracle(result, oracle, baseline, stats_floor(logits, temperature),
                              "entropy")

    check()


def test_logprobs_and_entropy_match_oracle(backend_device):
    backend, device = backend_device
    slow = is_slow(backend, device)

    @hypothesis_settings(slow, slow_examples=12)
    @given(case=cases(slow, device))
    def check(case: Case):
        logits, temperature, tokens = case.logits, case.temperature, case.tokens
        logprobs, result = em_kernels.logprobs_and_entropy(
            logits, tokens, temperature=temperature, backend=backend)
        assert logprobs.dtype == result.dtype == torch.float32
        assert logprobs.shape == result.shape == logits.shape[:-1]
        oracle_lp, oracle_h = reference.logprobs_and_entropy_ref(
            logits.double(), tokens, temperature)
        base_lp, base_h = reference.logprobs_and_entropy_ref(logits, tokens, temperature)
        floor = stats_floor(logits, temperature)
        assert_matches_oracle(result, oracle_h, base_h, floor, "entropy")
        assert_matches_oracle(logprobs, oracle_lp, base_lp, floor, "logprobs")

    check()


def _public(backend: str):
    """(entropy, logprobs_and_entropy) of the library on ``backend``."""
    return (
        lambda z, t: em_kernels.entropy(z, temperature=t, backend=backend),
        lambda z, y, t: em_kernels.logprobs_and_entropy(z, y, temperature=t, backend=backend),
    )


REFERENCE = (reference.entropy_ref, reference.logprobs_and_entropy_ref)


def _gradient(ops, case: Case, tokens, grad_entropy, grad_logprobs, dtype=None):
    """d/dlogits of sum(gH * H + gL * logp) (gL only when given), shaped like the view; the
    logits are case.base cast to ``dtype`` (the case's dtype when None) seen through the view."""
    entropy_fn, logprobs_and_entropy_fn = ops
    base = (case.base if dtype is None else case.base.to(dtype)).detach().requires_grad_()
    logits = case.view(base)
    if grad_logprobs is None:
        loss = (entropy_fn(logits, case.temperature) * grad_entropy).sum()
    else:
        logprobs, result = logprobs_and_entropy_fn(logits, tokens, case.temperature)
        loss = (result * grad_entropy).sum() + (logprobs * grad_logprobs).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_gradients_match_oracle(backend_device):
    backend, device = backend_device
    slow = is_slow(backend, device)

    @hypothesis_settings(slow, slow_examples=12)
    @given(case=cases(slow, device), with_tokens=st.booleans())
    def check(case: Case, with_tokens: bool):
        # Tokens may fall on -inf logits and rows may be all -inf: the oracle gives 0 there, by
        # the contract of every backend.
        logits, temperature, tokens = case.logits, case.temperature, case.tokens
        generator = torch.Generator().manual_seed(logits.numel())
        grad_entropy = torch.randn(logits.shape[:-1], generator=generator).to(device)
        grad_logprobs = torch.randn(logits.shape[:-1], generator=generator).to(device)
        if not with_tokens:
            grad_logprobs = None
        actual = _gradient(_public(backend), case, tokens, grad_entropy, grad_logprobs)
        assert actual.dtype == logits.dtype and actual.shape == logits.shape
        oracle = _gradient(REFERENCE, case, tokens, grad_entropy, grad_logprobs, torch.float64)
        baseline = _gradient(REFERENCE, case, tokens, grad_entropy, grad_logprobs)
        floor = grad_floor(logits, temperature, grad_entropy,
                           grad_entropy[:0] if grad_logprobs is None else grad_logprobs)
        assert_matches_oracle(actual, oracle, baseline, floor, "gradient")

    check()


def test_real_vocabulary(backend_device):
    """A real vocabulary (V = 151936: 19 chunks merged) on two rows, forward and gradients."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(2, 151936, generator=generator) * 4).to(torch.bfloat16).to(device)
    base[1, ::3] = float("-inf")
    tokens = torch.tensor([5, 151934], device=device)  # 151934 % 3 != 0: finite
    logits = base.detach().requires_grad_()
    logprobs, result = em_kernels.logprobs_and_entropy(logits, tokens, temperature=0.8,
                                                        backend=backend)
    (result.sum() - 0.5 * logprobs.sum()).backward()
    oracle_lp, oracle_h = reference.logprobs_and_entropy_ref(base.double(), tokens, 0.8)
    base_lp, base_h = reference.logprobs_and_entropy_ref(base, tokens, 0.8)
    floor = stats_floor(base, 0.8)
    assert_matches_oracle(result, oracle_h, base_h, floor, "entropy")
    assert_matches_oracle(logprobs, oracle_lp, base_lp, floor, "logprobs")
    grads = []
    for dtype in (torch.float64, None):
        leaf = (base if dtype is None else base.to(dtype)).detach().requires_grad_()
        lp, h = reference.logprobs_and_entropy_ref(leaf, tokens, 0.8)
        (h.sum() - 0.5 * lp.sum()).backward()
        grads.append(leaf.grad)
    ones = torch.ones(2, device=device)
    assert_matches_oracle(logits.grad, grads[0], grads[1],
                          grad_floor(base, 0.8, ones, 0.5 * ones), "gradient")


def test_offsets_past_2_31(backend_device):
    """N * V > 2^31 elements (4.3 GB of bf16 logits and as much gradient): the last rows are
    right, so no offset wraps at 32 bits. GPU only (too big for the CPU backends' CI)."""
    backend, device = backend_device
    if device != "cuda" or backend == "torch":
        pytest.skip("a 4.3 GB case for the GPU kernels only")
    vocab = 131075
    rows = 2**31 // vocab + 2
    generator = torch.Generator(device=device).manual_seed(6)
    logits = torch.randn((rows, vocab), generator=generator, device=device,
                         dtype=torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, vocab, (rows,), generator=generator, device=device)
    logprobs, result = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
    (result.sum() + logprobs.sum()).backward()
    checked = [0, rows - 2, rows - 1]
    picked = logits.detach()[checked]
    leaf = picked.double().requires_grad_()
    oracle_lp, oracle_h = reference.logprobs_and_entropy_ref(leaf, tokens[checked])
    (oracle_h.sum() + oracle_lp.sum()).backward()
    base_lp, base_h = reference.logprobs_and_entropy_ref(picked, tokens[checked])
    floor = stats_floor(picked, 1.0)
    assert_matches_oracle(result[checked], oracle_h, base_h, floor, "entropy")
    assert_matches_oracle(logprobs[checked], oracle_lp, base_lp, floor, "logprobs")
    baseline_leaf = picked.clone().requires_grad_()
    base_lp, base_h = reference.logprobs_and_entropy_ref(baseline_leaf, tokens[checked])
    (base_h.sum() + base_lp.sum()).backward()
    ones = torch.ones(3, device=device)
    assert_matches_oracle(logits.grad[checked], leaf.grad, baseline_leaf.grad,
                          grad_floor(picked, 1.0, ones, ones), "gradient")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("check", ["0", "1"])
def test_cuda_token_check_is_eager_only_when_asked(check):
    """On CUDA tensors an id outside [0, V) gives a NaN log-prob without a host sync, unless
    EM_KERNELS_CHECK_TOKENS=1 was set before the import: then a ValueError (a fresh process,
    since the variable is read at import)."""
    script = (
        "import torch, em_kernels\n"
        "logits = torch.randn(2, 50, device='cuda')\n"
        "tokens = torch.tensor([1, 50], device='cuda')\n"
        "try:\n"
        "    logprobs, _ = em_kernels.logprobs_and_entropy(logits, tokens)\n"
        "    print('nan' if bool(logprobs[1].isnan()) and bool(logprobs[0].isfinite()) "
        "else 'wrong')\n"
        "except ValueError as error:\n"
        "    print('refused' if '[0, 50)' in str(error) else 'wrong')\n")
    env = {**os.environ, "EM_KERNELS_CHECK_TOKENS": check}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == ("refused" if check == "1" else "nan"), done.stderr


def test_row_offsets_past_2_31_on_the_cpu_kernels():
    """The C++ kernels index rows with 64-bit offsets: two rows 2^31 + 64 elements apart (a
    view of a 4.3 GB bf16 buffer that is never touched but at those rows: no memory is
    committed for the rest) give the results and gradients of the same rows side by side, for
    the entropy ops, em_inf_adjust and adaptive_temperature."""
    if em_kernels.available_backends()["cpu"] != "available":
        pytest.skip(em_kernels.available_backends()["cpu"])
    vocab, stride = 1000, 2**31 + 64
    buffer = torch.empty(stride + vocab, dtype=torch.bfloat16)
    far = buffer.as_strided((2, vocab), (stride, 1))
    far.copy_(3 * torch.randn(2, vocab, generator=torch.Generator().manual_seed(8)))
    near = far.clone()
    tokens = torch.tensor([3, vocab - 1])
    results = []
    for rows in (far, near):
        leaf = rows.detach().requires_grad_()
        logprobs, entropy = em_kernels.logprobs_and_entropy(leaf, tokens, backend="cpu")
        (entropy.sum() + 0.5 * logprobs.sum()).backward()
        results.append((logprobs, entropy, leaf.grad,
                        em_kernels.em_inf_adjust(rows, backend="cpu"),
                        em_kernels.adaptive_temperature(rows, backend="cpu")))
    for got, want in zip(*results):
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("vocab", [5, 4097])
@pytest.mark.parametrize("temperature", [1e-2, 1e-4, 1e-6])
def test_small_temperatures_match_oracle(backend_device, temperature, vocab):
    """At small T, z / T is large (|z| / T ~ 2e7 at T = 1e-6) but log p of the argmax is near 0:
    plain PyTorch's z / T - max(z / T) is exactly 0 there, so the kernels must form exponents from
    z - max (exact) rather than from z k - max k (an ulp of |max| / T off: +0.01 nats at 1e-4).
    Entropy and the argmax's log-prob get a floor of a few ulps of log V only. The gradient keeps
    grad_floor, which the torch backend's rounded z / T needs."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(vocab)
    base = (torch.randn((4, vocab), generator=generator, dtype=torch.float64) * 5).float()
    case = Case(base=base.to(device), view=lambda t: t, tokens=base.argmax(-1).to(device),
                temperature=temperature)
    logits, tokens = case.logits, case.tokens
    logprobs, result = em_kernels.logprobs_and_entropy(
        logits, tokens, temperature=temperature, backend=backend)
    oracle_lp, oracle_h = reference.logprobs_and_entropy_ref(logits.double(), tokens, temperature)
    base_lp, base_h = reference.logprobs_and_entropy_ref(logits, tokens, temperature)
    floor = 4 * EPS32 * (1.0 + math.log(vocab))
    assert_matches_oracle(result, oracle_h, base_h, floor, "entropy")
    assert_matches_oracle(logprobs, oracle_lp, base_lp, floor, "logprobs")

    grad_entropy = torch.randn(4, generator=generator).to(device)
    grad_logprobs = torch.randn(4, generator=generator).to(device)
    actual = _gradient(_public(backend), case, tokens, grad_entropy, grad_logprobs)
    oracle = _gradient(REFERENCE, case, tokens, grad_entropy, grad_logprobs, torch.float64)
    baseline = _gradient(REFERENCE, case, tokens, grad_entropy, grad_logprobs)
    assert_matches_oracle(actual, oracle, baseline,
                          grad_floor(logits, temperature, grad_entropy, grad_logprobs), "gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_computes_16_bit_logits_in_float32(dtype):
    """The reference in float32 is every test's plain-PyTorch yardstick: on 16-bit logits it
    casts to float32 before anything, the division by T included, so its entropy and log-probs
    are the float32 formula's on logits.float() / T (sum of entr(softmax), log_softmax at the
    token). Dividing in the 16-bit dtype first would widen every tolerance here by that dtype's
    rounding of z / T (~1e-3 nats at bf16), and no oracle comparison would notice."""
    generator = torch.Generator().manual_seed(6)
    logits = (torch.randn(4, 300, generator=generator) * 3).to(dtype)
    tokens = torch.randint(0, 300, (4,), generator=generator)
    entropy, logprobs = written_out(logits.float() / 0.7, tokens)
    torch.testing.assert_close(reference.entropy_ref(logits, 0.7), entropy)
    ref_logprobs, ref_entropy = reference.logprobs_and_entropy_ref(logits, tokens, 0.7)
    torch.testing.assert_close(ref_entropy, entropy)
    torch.testing.assert_close(ref_logprobs, logprobs)


def test_reference_gradient_keeps_the_masking_contract():
    """The oracle's gradient obeys the contract every backend is tested to: 0 at a -inf logit
    even where it is the chosen token (calculus: 1 / T), 0 over a row that is all -inf even
    under a NaN upstream gradient (calculus: NaN), and the forward unchanged (NaN, -inf)
    there. Elsewhere it is the closed form -gH p (log p + H) + gL (onehot - p), over T."""
    generator = torch.Generator().manual_seed(9)
    z = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    z[0] = float("-inf")
    z[1, [2, 5]] = float("-inf")
    tokens = torch.tensor([4, 2, 6])
    grad_entropy = torch.tensor([float("nan"), 0.7, -1.3], dtype=torch.float64)
    grad_logprobs = torch.tensor([float("nan"), 1.1, 0.4], dtype=torch.float64)
    for with_tokens in (False, True):
        logits = z.clone().requires_grad_()
        if with_tokens:
            logprobs, entropy = reference.logprobs_and_entropy_ref(logits, tokens, 0.5)
            assert logprobs[0].isnan() and logprobs[1] == float("-inf")
            loss = (entropy * grad_entropy).sum() + (logprobs * grad_logprobs).sum()
        else:
            entropy = reference.entropy_ref(logits, 0.5)
            loss = (entropy * grad_entropy).sum()
        assert entropy[0].isnan() and bool(entropy[1:].isfinite().all())
        loss.backward()
        p = torch.softmax(z[1:] / 0.5, -1)
        safe_logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
        expected = -grad_entropy[1:, None] * p * (safe_logp + entropy[1:, None].detach())
        if with_tokens:
            onehot = torch.nn.functional.one_hot(tokens[1:], 7).double()
            onehot[0, 2] = 0.0  # the masked chosen token: no one-hot term
            expected = expected + grad_logprobs[1:, None] * (onehot - p)
        assert bool((logits.grad[0] == 0).all()) and bool((logits.grad[1, [2, 5]] == 0).all())
        torch.testing.assert_close(logits.grad[1:], expected / 0.5)


# ----------------------------------------------------------------------------------------------
# Properties


def _entropy(backend, logits, temperature=1.0):
    return em_kernels.entropy(logits, temperature=temperature, backend=backend)


def test_bounds(backend_device):
    """0 <= H <= log(number of finite logits in the row)."""
    backend, device = backend_device
    slow = is_slow(backend, device)

    @hypothesis_settings(slow, slow_examples=6)
    @given(case=cases(slow, device))
    def check(case: Case):
        logits = case.logits
        result = _entropy(backend, logits, case.temperature).double().cpu()
        support = torch.isfinite(logits).sum(-1).double().cpu()
        finite = torch.isfinite(result)
        # The kernels sum terms relative to the row max and stay within 1e-6 of the bound; the
        # torch backend's plain fp32 -(p * log p).sum() carries the float32 summation error of
        # V terms, some eps32 * log2(V) relative: 2 of them past log V seen at V = 128256, over
        # 4 (1.1e-4 nats) on a near-uniform row at V = 151936 (logits within +-0.003, T = 5,
        # found by a random hypothesis run): allow 16 eps32 * log2(V) there.
        slack = 1e-6
        if backend == "torch":
            slack = max(slack, 16 * 2.0**-23 * math.log2(max(logits.shape[-1], 2)))
        assert bool((result[finite] >= -slack).all())
        assert bool((result[finite] <= support[finite].log() * (1 + slack) + slack).all())

    check()


@pytest.mark.parametrize("vocab", [1, 2, 5, 4096, 4099, 20011])
def test_uniform_row_gives_log_v(backend_device, vocab):
    backend, device = backend_device
    logits = torch.tensor([[0.0], [-3.5], [1e4], [-1e4]], device=device).expand(4, vocab)
    masked = torch.full((1, vocab), float("-inf"), device=device)
    masked[0, : (vocab + 1) // 2] = 7.25
    for dtype in DTYPES:
        result = _entropy(backend, logits.to(dtype))
        torch.testing.assert_close(
            result, torch.full_like(result, math.log(vocab)), rtol=2e-6, atol=2e-6)
        result = _entropy(backend, masked.to(dtype), temperature=0.3)
        torch.testing.assert_close(
            result, torch.full_like(result, math.log((vocab + 1) // 2)), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("vocab", [1, 2, 4096, 9000])
def test_one_hot_row_gives_zero(backend_device, vocab):
    backend, device = backend_device
    position = vocab // 3
    only_one = torch.full((1, vocab), float("-inf"), device=device)
    only_one[0, position] = 2.0
    huge = torch.zeros((1, vocab), device=device)
    huge[0, position] = 1e4
    for dtype in DTYPES:
        logprobs, result = em_kernels.logprobs_and_entropy(
            only_one.to(dtype), torch.tensor([position], device=device), backend=backend)
        assert result.item() == 0.0 and logprobs.item() == 0.0
        result = _entropy(backend, huge.to(dtype), temperature=0.5)
        assert abs(result.item()) < 1e-6


def test_shift_invariance(backend_device):
    """H(z + c) == H(z), bitwise: z on a 2^-8 grid in [-16, 16] and integer c, so z + c is
    exact in float32, and every backend subtracts the row max before it scales ((z - m) k, also
    in the merges of partial maxima) and forms H from differences alone; scaling first (an FMA,
    z k - m k) would leave rounding of size c's ulp."""
    backend, device = backend_device
    slow = is_slow(backend, device)

    @hypothesis_settings(slow, slow_examples=6)
    @given(rows=st.integers(1, 6), vocab=st.sampled_from([3, 100, 4097, 9000]),
           shift=st.integers(-4000, 4000), seed=st.integers(0, 2**16))
    def check(rows, vocab, shift, seed):
        generator = torch.Generator().manual_seed(seed)
        z = torch.randint(-4096, 4096, (rows, vocab), generator=generator) / 256.0
        z = z.to(device)
        assert torch.equal(bits(_entropy(backend, z + shift)), bits(_entropy(backend, z)))

    check()


@pytest.mark.parametrize("vocab", [2, 777, 4096, 9001])
def test_gradient_rows_sum_to_zero(backend_device, vocab):
    """Shifting a row does not change H or log p, so every gradient row sums to 0."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(5, vocab, generator=generator) * 3).to(device)
    logits[1, ::2] = float("-inf")
    logits = logits.requires_grad_()
    tokens = torch.tensor([0, 1, 0, vocab - 1, 1], device=device)
    grad_entropy = torch.randn(5, generator=generator).to(device)
    grad_logprobs = torch.randn(5, generator=generator).to(device)
    logprobs, result = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
    ((result * grad_entropy).sum() + (logprobs * grad_logprobs).sum()).backward()
    grad = logits.grad.double()
    # Each entry rounds terms as large as |gL| and |gH| (|ln p| + H) p even where they cancel.
    term_sizes = grad_entropy.abs().double() * (2 + math.log(vocab)) + 2 * grad_logprobs.abs()
    tolerance = 1e-6 * (grad.abs().sum(-1) + term_sizes)
    assert bool((grad.sum(-1).abs() <= tolerance).all()), grad.sum(-1)


def _forward_and_gradient(backend, logits, tokens, temperature=1.0):
    logits = logits.detach().requires_grad_()
    logprobs, result = em_kernels.logprobs_and_entropy(
        logits, tokens, temperature=temperature, backend=backend)
    (result.sum() + 0.25 * logprobs.sum()).backward()
    return logprobs, result, logits.grad


def _assert_row_matches_oracle(logits, tokens, outputs):
    """(logprobs, entropy, gradient) of _forward_and_gradient at temperature 1 against the
    float64 oracle, with plain PyTorch in float32 as the yardstick (tests/oracle.py)."""
    logprobs, result, grad = outputs
    oracle_lp, oracle_h = reference.logprobs_and_entropy_ref(logits.double(), tokens)
    base_lp, base_h = reference.logprobs_and_entropy_ref(logits.float(), tokens)
    floor = stats_floor(logits, 1.0)
    assert_matches_oracle(result, oracle_h, base_h, floor, "entropy")
    assert_matches_oracle(logprobs, oracle_lp, base_lp, floor, "logprobs")
    grads = []
    for dtype in (torch.float64, torch.float32):
        leaf = logits.detach().to(dtype).requires_grad_()
        lp, h = reference.logprobs_and_entropy_ref(leaf, tokens)
        (h.sum() + 0.25 * lp.sum()).backward()
        grads.append(leaf.grad)
    ones = torch.ones(logits.shape[0], device=logits.device)
    assert_matches_oracle(grad, grads[0], grads[1],
                          grad_floor(logits, 1.0, ones, 0.25 * ones), "gradient")


@pytest.mark.parametrize("loss", ["logprobs", "entropy"])
def test_one_output_in_the_loss(backend_device, loss):
    """A loss of one output only: the gradient is that output's alone, against the oracle
    (torch hands the backward zeros for the unused output; every other gradient test puts
    both outputs in the loss)."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(11)
    logits = (torch.randn(4, 5000, generator=generator) * 3).to(device)
    tokens = torch.randint(0, 5000, (4,), generator=generator).to(device)
    grads = []
    for dtype in (None, torch.float64, torch.float32):
        leaf = logits.detach().clone() if dtype is None else logits.detach().to(dtype)
        leaf.requires_grad_()
        if dtype is None:
            logprobs, entropy = em_kernels.logprobs_and_entropy(leaf, tokens, backend=backend)
        else:
            logprobs, entropy = reference.logprobs_and_entropy_ref(leaf, tokens)
        (logprobs if loss == "logprobs" else entropy).sum().backward()
        grads.append(leaf.grad)
    ones, zeros = torch.ones(4, device=device), torch.zeros(4, device=device)
    g_entropy, g_logprobs = (zeros, ones) if loss == "logprobs" else (ones, zeros)
    assert_matches_oracle(grads[0], grads[1], grads[2],
                          grad_floor(logits, 1.0, g_entropy, g_logprobs), "gradient")


def test_bitwise_determinism(backend_device):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(1)
    for vocab in (300, 20011):
        logits = (torch.randn(6, vocab, generator=generator) * 5).to(torch.bfloat16).to(device)
        tokens = torch.randint(0, vocab, (6,), generator=generator).to(device)
        first = _forward_and_gradient(backend, logits, tokens, 0.7)
        second = _forward_and_gradient(backend, logits, tokens, 0.7)
        for a, b in zip(first, second):
            assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("vocab", [50, 4097, 20011])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(backend_device, vocab, dtype):
    """A row alone (a fresh, aligned tensor) and the same row at other positions in batches of
    other sizes: same bits, forward and gradient. Batches are built by copying the rows behind
    0, 1 or 3 other rows, so with a V that is not a multiple of 8 the row starts at a different
    offset from a 16-byte boundary each time (vector loads must not change a row's summation
    order). (The torch backend is PyTorch's own reductions: not promised.)"""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("batch invariance is promised by the kernels, not by the torch backend")
    generator = torch.Generator().manual_seed(vocab)
    batch = (torch.randn(9, vocab, generator=generator) * 6).to(dtype).to(device)
    batch[4, : vocab // 2] = float("-inf")
    tokens = torch.randint(0, vocab, (9,), generator=generator).to(device)
    filler = (torch.randn(3, vocab, generator=generator) * 6).to(dtype).to(device)
    filler_tokens = torch.zeros(3, dtype=torch.long, device=device)
    alone = [_forward_and_gradient(backend, batch[i : i + 1].clone(), tokens[i : i + 1])
             for i in (0, 4, 8)]
    for rows, lead in ((slice(0, 9), 0), (slice(0, 5), 1), (slice(4, 9), 3)):
        together = _forward_and_gradient(backend, torch.cat([filler[:lead], batch[rows]]),
                                         torch.cat([filler_tokens[:lead], tokens[rows]]))
        for i, single in zip((0, 4, 8), alone):
            if not rows.start <= i < rows.stop:
                continue
            for a, b in zip(together, single):
                assert torch.equal(bits(a[lead + i - rows.start]), bits(b[0]))


@pytest.mark.parametrize("view, lattice", [
    (lambda t: t[:, :-1], True),        # the positions that predict a next token
    (lambda t: t[:, 2:-1], True),       # a response slice
    (lambda t: t[1:, :-1, :], True),
    (lambda t: t.transpose(0, 1), True),  # every row, in another order
    (lambda t: t[:, :2], False),        # 2 rows of every 20: a superset 7x larger, copied
    (lambda t: t[:, ::3], False),       # strides 20 and 3 rows: no one lattice, copied
])
def test_sliced_positions_run_on_the_logits_memory(backend_device, view, lattice):
    """logits[:, :-1] of a (B, T, V) batch has no single row stride, so reshape would copy all
    of it; the ops run on the B T - 1 rows of stride V that hold it instead (RowLayout), and
    give the contiguous copy's results and gradient (bitwise on the kernels, which are
    batch-invariant); a view whose superset would be too large is still copied."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(5)
    base = (torch.randn(3, 20, 70, generator=generator) * 4).to(torch.bfloat16).to(device)
    base[0, 3, :40] = float("-inf")
    logits = view(base)
    rows, layout = _checks.RowLayout.rows_of(logits)
    shares_memory = rows.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert shares_memory == lattice == (layout.lattice_strides is not None)
    tokens = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator)
    tokens = tokens.to(device)
    upstream = [torch.randn(logits.shape[:-1], generator=generator).to(device) for _ in "ab"]
    results = []
    for leaf in (base.clone().requires_grad_(), logits.contiguous().requires_grad_()):
        rows = view(leaf) if leaf.shape == base.shape else leaf
        logprobs, entropy = em_kernels.logprobs_and_entropy(rows, tokens, backend=backend)
        alone = em_kernels.entropy(rows, backend=backend)
        (grad,) = torch.autograd.grad((logprobs * upstream[0] + entropy * upstream[1]).sum(),
                                      leaf)
        assert logprobs.is_contiguous() and entropy.is_contiguous() and alone.is_contiguous()
        results.append((logprobs, entropy, alone, view(grad) if leaf.shape == base.shape
                        else grad))
        if leaf.shape == base.shape:  # nothing outside the view gets a gradient
            untouched = torch.ones_like(grad, dtype=torch.bool)
            view(untouched).fill_(False)
            assert not grad[untouched].any()
    for ours, copied in zip(*results):
        assert ours.shape == copied.shape
        if backend == "torch":
            torch.testing.assert_close(ours, copied, equal_nan=True)
        else:
            assert torch.equal(bits(ours), bits(copied))


@pytest.mark.parametrize("view", [lambda t: t, lambda t: t[:, :-1]], ids=["batch", "shifted"])
def test_the_backward_keeps_the_logits_and_per_row_statistics_only(backend_device, view):
    """The memory contract: what the ops keep for the backward is the logits themselves (not a
    copy, for a shifted slice too) and per-row vectors; nothing else of the logits' size."""
    backend, device = backend_device
    vocab = 70
    base = torch.randn(3, 9, vocab, device=device, requires_grad=True)
    logits = view(base)
    tokens = torch.randint(0, vocab, logits.shape[:-1], device=device)
    calls = {"entropy": lambda: em_kernels.entropy(logits, backend=backend),
             "logprobs_and_entropy": lambda: em_kernels.logprobs_and_entropy(
                 logits, tokens, backend=backend)}
    for name, call in calls.items():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            call()
        own = [t for t in saved
               if t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()]
        rest = [tuple(t.shape) for t in saved if t.numel() > base.numel() // vocab
                and t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()]
        assert own and not rest, (name, [tuple(t.shape) for t in own], rest)


class _AtenOps(TorchDispatchMode):
    """The names of the ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _shifted_and_sliced(backend, logits, tokens, shift, upstream):
    """[(logprobs, entropy, entropy alone, d loss / d logits, the backward's ops)] of the ops
    with ``shift`` on logits (..., T, V) and tokens (..., T), then of the ops on the slice
    logits[..., :-shift, :] and tokens[..., shift:], for loss = upstream . (logprobs, entropy
    + entropy alone), NaN terms dropped."""
    runs = []
    for sliced in (False, True):
        leaf = logits.detach().clone().requires_grad_()
        activation = leaf * 1.0  # a model's output: not a leaf
        if sliced:
            logprobs, entropy = em_kernels.logprobs_and_entropy(
                activation[..., :-shift, :], tokens[..., shift:], backend=backend)
            alone = em_kernels.entropy(activation[..., :-shift, :], backend=backend)
        else:
            logprobs, entropy = em_kernels.logprobs_and_entropy(activation, tokens, shift=shift,
                                                                backend=backend)
            alone = em_kernels.entropy(activation, shift=shift, backend=backend)
        loss = (logprobs * upstream[0] + (entropy + alone) * upstream[1]).nan_to_num().sum()
        with _AtenOps() as ops:
            (grad,) = torch.autograd.grad(loss, leaf)
        runs.append((logprobs, entropy, alone, grad, ops.names))
    return runs


_SHIFTABLE = {  # (B, T, V) logits whose rows have one stride, as a model's output has
    "batch": lambda t: t,
    "one_sequence": lambda t: t[0],
    "padded_rows": lambda t: torch.nn.functional.pad(t, (0, 6))[..., :t.shape[-1]],
}


@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("layout", list(_SHIFTABLE))
def test_shift_hands_the_logits_their_whole_gradient(backend_device, layout, shift):
    """shift=k on logits (..., T, V) is logits[..., :-k, :] with tokens[..., k:] (bitwise on
    the kernels), but the ops run on all T positions and their backward writes the logits'
    gradient whole (`RowLayout.rows_of_shifted`): torch's slice backward (a zeroed tensor of
    the logits' size and a copy into it) never runs, and the last k positions get exactly 0,
    whatever they hold (NaN here)."""
    backend, device = backend_device
    vocab, positions = 70, 20
    generator = torch.Generator().manual_seed(9)
    values = (torch.randn(3, positions, vocab, generator=generator) * 4).to(device)
    values[:, positions - shift:] = float("nan")  # the positions with no next token
    values[0, 5, :30] = float("-inf")
    logits = _SHIFTABLE[layout](values)
    tokens = torch.randint(0, vocab, logits.shape[:-1], generator=generator).to(device)
    upstream = [torch.randn(tokens[..., shift:].shape, generator=generator).to(device)
                for _ in "ab"]
    ours, sliced = _shifted_and_sliced(backend, logits, tokens, shift, upstream)
    backwards = [name for name in ours[-1] if name.startswith("aten.") and "_backward" in name]
    assert not backwards and "aten.zero_.default" in ours[-1], ours[-1]
    assert any("slice_backward" in name for name in sliced[-1])
    grad = ours[3]
    assert grad.shape == logits.shape and not grad[..., positions - shift:, :].any()
    for mine, exact in zip(ours[:3] + (grad[..., :-shift, :],), sliced[:3] + (
            sliced[3][..., :-shift, :],)):
        assert mine.shape == exact.shape
        if backend == "torch":
            torch.testing.assert_close(mine, exact, equal_nan=True)
        else:
            assert torch.equal(bits(mine), bits(exact))


@pytest.mark.parametrize("case, rows_read", [("transposed", 33), ("short", 11), ("zero", 36)])
def test_shift_where_the_whole_gradient_is_not_written(backend_device, case, rows_read):
    """Logits whose leading dims have no one row stride (positions-major, seen batch-first) or
    too few positions for the extra rows (T - shift < 0.8 T): the ops run on the slice as if it
    were passed (read in place, on RowLayout's lattice of 33 or 11 rows); shift=0 is no shift.
    Same results and gradient."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(12)
    positions, shift = (4, 1) if case == "short" else (12, 0 if case == "zero" else 1)
    if case == "transposed":
        logits = torch.randn(positions, 3, 50, generator=generator).to(device).transpose(0, 1)
    else:
        logits = torch.randn(3, positions, 50, generator=generator).to(device)
    tokens = torch.randint(0, 50, logits.shape[:-1], generator=generator).to(device)
    assert _checks.RowLayout.rows_of_shifted(logits, shift)[1].total == rows_read
    if shift == 0:
        for mine, exact in zip(
                em_kernels.logprobs_and_entropy(logits, tokens, shift=0, backend=backend),
                em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)):
            torch.testing.assert_close(mine, exact, rtol=0, atol=0)
        return
    upstream = [torch.randn(tokens[..., shift:].shape, generator=generator).to(device)
                for _ in "ab"]
    ours, sliced = _shifted_and_sliced(backend, logits, tokens, shift, upstream)
    for mine, exact in zip(ours[:4], sliced[:4]):
        torch.testing.assert_close(mine, exact, rtol=0, atol=0)


def test_shift_under_anomaly_detection_reads_the_slice(backend_device):
    """torch.autograd.detect_anomaly flags a NaN in any backward output, so there shift reads
    the rows asked for alone, as a slice does (a copy): the last positions' NaN logits, which
    the whole-gradient path would read and then zero, are never read."""
    backend, device = backend_device
    logits = torch.randn(2, 9, 30).to(device)
    logits[:, -1] = float("nan")
    tokens = torch.zeros(2, 9, dtype=torch.long, device=device)
    upstream = [torch.ones(2, 8, device=device)] * 2
    with torch.autograd.detect_anomaly():
        ours, sliced = _shifted_and_sliced(backend, logits, tokens, 1, upstream)
    assert any("slice_backward" in name for name in ours[-1])
    for mine, exact in zip(ours[:4], sliced[:4]):
        torch.testing.assert_close(mine, exact, rtol=0, atol=0)


def test_shift_keeps_the_logits_for_the_backward(backend_device):
    """With shift the ops keep the logits themselves for the backward (a view of their rows),
    so writing into them before it raises torch's own error, as without a shift."""
    backend, device = backend_device
    for shift in (0, 1):
        leaf = torch.randn(2, 9, 30, device=device, requires_grad=True)
        logits = leaf * 1.0
        entropy = em_kernels.entropy(logits, shift=shift, backend=backend)
        with torch.no_grad():
            logits.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            entropy.sum().backward()


def test_shift_under_vmap_compile_and_batched_gradients(backend_device):
    """Where the ops trace (torch.vmap, torch.compile) shift is the slice; without gradients
    the rows are read as with them; and the backward that writes the whole gradient takes a
    batch of upstream gradients (is_grads_batched)."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 3, 11, 40, generator=generator).to(device)
    tokens = torch.randint(0, 40, (2, 3, 11), generator=generator).to(device)
    expected = em_kernels.logprobs_and_entropy(logits[..., :-1, :], tokens[..., 1:],
                                               backend=backend)
    mapped = torch.vmap(lambda z, t: em_kernels.logprobs_and_entropy(
        z, t, shift=1, backend=backend))(logits, tokens)
    compiled = torch.compile(lambda z, t: em_kernels.logprobs_and_entropy(
        z, t, shift=1, backend=backend), backend="eager", fullgraph=True)(logits, tokens)
    with torch.no_grad():
        plain = em_kernels.logprobs_and_entropy(logits, tokens, shift=1, backend=backend)
    for result in (mapped, compiled, plain):
        for mine, exact in zip(result, expected):
            torch.testing.assert_close(mine, exact, rtol=0, atol=0)
    leaf = logits[0].clone().requires_grad_()
    logprobs, entropy = em_kernels.logprobs_and_entropy(leaf, tokens[0], shift=1,
                                                        backend=backend)
    upstream = torch.randn(4, 3, 10, generator=generator).to(device)
    (batched,) = torch.autograd.grad(entropy + 0.5 * logprobs, leaf, upstream,
                                     retain_graph=True, is_grads_batched=True)
    for k in range(4):
        (one,) = torch.autograd.grad(entropy + 0.5 * logprobs, leaf, upstream[k],
                                     retain_graph=True)
        torch.testing.assert_close(batched[k], one, rtol=0, atol=0)
        assert not one[:, -1].any()


def test_vmap_over_other_arguments_than_the_logits(backend_device):
    """Under torch.vmap the ops take the dispatcher and the plain slice even where the logits
    are not batched: over the tokens alone (with a shift, and on Triton, which reads raw
    pointers), or over nothing the op takes. Each sample as alone."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(17)
    logits = torch.randn(2, 5, 13, generator=generator).to(device)
    tokens = torch.randint(0, 13, (3, 2, 5), generator=generator).to(device)
    for shift in (0, 1):
        mapped = torch.vmap(lambda t: em_kernels.logprobs_and_entropy(
            logits, t, shift=shift, backend=backend))(tokens)
        for k in range(tokens.shape[0]):
            alone = em_kernels.logprobs_and_entropy(logits, tokens[k], shift=shift,
                                                    backend=backend)
            for mine, exact in zip(mapped, alone, strict=True):
                torch.testing.assert_close(mine[k], exact, rtol=0, atol=0)
    scales = torch.tensor([1.0, -2.0], device=device)
    mapped = torch.vmap(lambda s: em_kernels.entropy(logits[:, :-1], backend=backend) * s)(
        scales)
    alone = em_kernels.entropy(logits[:, :-1], backend=backend)
    torch.testing.assert_close(mapped, torch.stack([alone, -2 * alone]), rtol=0, atol=0)


def test_sliced_positions_under_anomaly_detection(backend_device):
    """torch.autograd.detect_anomaly flags a NaN in any backward output, so there a slice is
    not read in place: RowLayout's lattice would also read the rows between the sequences, and
    a NaN there would show in the backward op's output before its rows are dropped. The results
    and gradient of a copy, without the mode's error."""
    backend, device = backend_device
    values = torch.randn(2, 9, 30).to(device)
    values[:, -1] = float("nan")
    tokens = torch.zeros(2, 8, dtype=torch.long, device=device)
    results = []
    for anomaly in (True, False):
        leaf = values.clone().requires_grad_()
        logits = leaf[:, :-1] if anomaly else leaf[:, :-1].contiguous()
        with torch.autograd.set_detect_anomaly(anomaly):
            logprobs, entropy = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
            (entropy.sum() + logprobs.sum()).backward()
        results.append((logprobs, entropy, leaf.grad))
    for mine, exact in zip(*results):
        torch.testing.assert_close(mine, exact, rtol=0, atol=0)


def test_calls_without_gradients_skip_the_dispatcher(backend_device):
    """Eager calls that differentiate nothing (inference, decode-time entropies) run the
    forward op's body directly, skipping the custom-op dispatch (tens of microseconds of Python
    per call); calls with gradients go through the op and its autograd. Same results."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(14)
    logits = torch.randn(3, 50, generator=generator).to(device)
    tokens = torch.randint(0, 50, (3,), generator=generator).to(device)
    results = []
    for requires_grad, grad_mode in ((True, True), (False, True), (True, False)):
        leaf = logits.clone().requires_grad_(requires_grad)
        with torch.set_grad_enabled(grad_mode), _AtenOps() as ops:
            logprobs, entropy = em_kernels.logprobs_and_entropy(leaf, tokens, backend=backend)
            alone = em_kernels.entropy(leaf, backend=backend)
        dispatched = [name for name in ops.names if name.startswith("em_kernels.softmax_stats")]
        assert len(dispatched) == (2 if requires_grad and grad_mode else 0), dispatched
        assert entropy.requires_grad == alone.requires_grad == (requires_grad and grad_mode)
        results.append([t.detach() for t in (logprobs, entropy, alone)])
    for differentiated, plain in itertools.product(results[:1], results[1:]):
        for a, b in zip(differentiated, plain):
            assert torch.equal(bits(a), bits(b))


def test_sliced_positions_of_an_empty_batch(backend_device):
    """A slice with a zero-size leading dim has no rows to read (the lattice of its other dims
    would reach past its storage): empty results of the view's shape."""
    backend, device = backend_device
    for logits in (torch.randn(0, 4, 6, 8)[:, :, :-1], torch.randn(2, 4, 6, 8)[2:, :, :-1],
                   torch.randn(3, 0, 6, 8)[:, :, :-1]):
        logits = logits.to(device)
        tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=device)
        logprobs, entropy = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
        assert logprobs.shape == entropy.shape == logits.shape[:-1]
        assert em_kernels.entropy(logits, backend=backend).shape == logits.shape[:-1]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_triton_log_prob_backward_one_hot_entry(device):
    """The Triton backward writes a row's one-hot entry as a scalar store after its tile's
    (_softmax_stats_bwd_kernel): it must land in its own row whatever the row stride, read its
    logit before any program overwrites it in place (out=logits, as linear_entropy_loss runs it;
    rows 0 and 1 choose a token in the first of three tiles, so a later tile's program that
    wrongly read it would see a gradient), and a token id of V or more, which has no one-hot
    term, must write nothing (the last row's id V would land one entry past the buffer, in a
    guard region here). Padded rows and the in-place run give the plain run's bits."""
    skip_unless_runnable("triton", device)
    from em_kernels.triton import entropy as kernels

    rows, vocab, temperature = 4, 2 * kernels.MAX_BLOCK + 100, 0.7  # the third tile is partial
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    tokens = torch.tensor([5, kernels.MAX_BLOCK - 1, vocab - 1, vocab])
    # Chosen tokens well above the rest (p ~ 0.9): a gradient read back as their logit would
    # change their entries far beyond a bf16 ulp.
    logits[:3].scatter_(1, tokens[:3, None], 20.0)
    logits, tokens = logits.to(torch.bfloat16).to(device), tokens.to(device)
    grad_entropy = torch.randn(rows, generator=generator).to(device)
    grad_logprobs = torch.randn(rows, generator=generator).to(device)
    entropy, lse, _ = kernels.softmax_stats_fwd(logits, tokens, temperature)

    def backward(values, tokens=tokens, out=None):
        return kernels.softmax_stats_bwd(values, tokens, entropy, lse, grad_entropy,
                                         grad_logprobs, temperature, out=out)

    plain = backward(logits)
    padded = torch.zeros(rows, vocab + 40, dtype=logits.dtype, device=device)[:, :vocab]
    padded.copy_(logits)
    assert torch.equal(bits(backward(padded)), bits(plain))

    guard = 64
    storage = torch.full((rows * vocab + guard,), 7.0, dtype=logits.dtype, device=device)
    in_place = storage[: rows * vocab].view(rows, vocab)
    in_place.copy_(logits)
    backward(in_place, out=in_place)
    assert torch.equal(bits(in_place), bits(plain))
    assert bool((storage[rows * vocab:] == 7.0).all()), "a one-hot store left its row"

    no_one_hot = backward(logits, tokens=torch.tensor([5, 6, 7, -1], device=device))
    assert torch.equal(bits(plain[3]), bits(no_one_hot[3]))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_of_forward_and_backward(backend):
    """Both ops' forward and backward captured in one CUDA graph (how trainers that use CUDA
    graphs, or torch.compile's mode="reduce-overhead", run them: no host sync, no allocation
    that depends on the data) replay to the bits of eager calls on new data copied into the
    captured input."""
    skip_unless_runnable(backend, "cuda")
    rows, vocab = 64, 151936
    generator = torch.Generator(device="cuda").manual_seed(4)
    static = torch.randn(rows, vocab, device="cuda", generator=generator).to(torch.bfloat16)
    tokens = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    weights = torch.randn(rows, device="cuda", generator=generator)

    def step(values):
        logits = values.detach().requires_grad_()
        logprobs, entropy = em_kernels.logprobs_and_entropy(logits, tokens, temperature=0.7,
                                                            backend=backend)
        alone = em_kernels.entropy(logits, backend=backend)
        loss = (weights * (entropy + alone) - logprobs).sum()
        (grad,) = torch.autograd.grad(loss, logits)
        return logprobs.detach(), entropy.detach(), alone.detach(), grad

    assert_cuda_graph_replays_eager(step, static, [
        (torch.randn(rows, vocab, device="cuda", generator=generator) * scale).to(torch.bfloat16)
        for scale in (0.5, 4.0)])


def test_masking_nan_and_empty_rows(backend_device):
    """-inf entries drop out of the distribution; an all -inf row gives NaN, a NaN entry poisons
    its own row only, also one alone among -inf entries (row 4: from 4096 on, a whole CPU chunk
    and more, every entry is -inf but one NaN); gradients are finite wherever the entropy is,
    and exactly 0 at -inf."""
    backend, device = backend_device
    for vocab in (6, 4100, 9000):
        generator = torch.Generator().manual_seed(vocab)
        logits = torch.randn(5, vocab, generator=generator).to(device)
        keep = torch.arange(vocab, device=device) % 3 != 1
        logits[0, ~keep] = float("-inf")
        logits[1] = float("-inf")
        logits[2, vocab // 2] = float("nan")
        masked_from = 4096 if vocab > 4096 else vocab // 2
        logits[4, masked_from:] = float("-inf")
        logits[4, -1] = float("nan")
        tokens = torch.tensor([0, 0, 0, vocab - 1, 0], device=device)
        logprobs, result, grad = _forward_and_gradient(backend, logits, tokens)
        poisoned = [1, 2, 4]
        assert torch.isnan(result[poisoned]).all() and torch.isnan(logprobs[poisoned]).all()
        assert torch.isfinite(result[[0, 3]]).all() and torch.isfinite(logprobs[[0, 3]]).all()
        assert torch.isfinite(grad[[0, 3]]).all()
        assert bool((grad[0, ~keep] == 0).all()) and bool((grad[1] == 0).all())
        masked_alone = _entropy(backend, logits[0:1, keep])
        torch.testing.assert_close(result[0:1], masked_alone, rtol=1e-6, atol=1e-6)
        clean = _forward_and_gradient(backend, logits[3:4], tokens[3:4])
        if backend == "torch" and device == "cuda":
            # PyTorch's CUDA reductions are not batch invariant (the last bits of a row depend
            # on the batch), so the row in the batch and alone are each held to the oracle rule.
            in_batch = (logprobs[3:4], result[3:4], grad[3:4])
            for outputs in (in_batch, clean):
                _assert_row_matches_oracle(logits[3:4], tokens[3:4], outputs)
        else:
            for a, b in zip((logprobs, result, grad), clean):
                assert torch.equal(bits(a[3:4]), bits(b))


def test_masking_with_the_most_negative_float(backend_device):
    """Logits masked with finfo(float32).min (a common idiom) overflow to -inf once scaled by
    log2(e) / T; whole vectors, tiles and chunks of them must still drop out like -inf entries
    (a scaled max of -inf must not become the shift: 2^(-inf + inf) = NaN)."""
    backend, device = backend_device
    for vocab in (6, 4100, 9000):
        generator = torch.Generator().manual_seed(vocab)
        logits = torch.randn(2, vocab, generator=generator).to(device)
        logits[0, vocab // 2 :] = torch.finfo(torch.float32).min
        logits[1, 1::2] = torch.finfo(torch.float32).min
        tokens = torch.zeros(2, dtype=torch.long, device=device)
        logprobs, result, grad = _forward_and_gradient(backend, logits, tokens)
        assert torch.isfinite(result).all() and torch.isfinite(logprobs).all()
        assert torch.isfinite(grad).all()
        assert bool((grad[0, vocab // 2 :] == 0).all()) and bool((grad[1, 1::2] == 0).all())
        for row, kept in ((0, slice(0, vocab // 2)), (1, slice(0, None, 2))):
            alone = _entropy(backend, logits[row : row + 1, kept])
            torch.testing.assert_close(result[row : row + 1], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature, grad_entropy",
                         [(1.0, 4.0), (0.5, 2.0), (1e-20, 1.0), (1e-38, 1.0)])
def test_zero_probability_entries_get_zero_gradients(backend_device, temperature, grad_entropy):
    """Entries whose p is 0 while their logit is finite: a -1e38 "mask" (code that masks with a
    large negative number), and at T = 1e-20 every entry but the max. With a chosen token their
    ln p_j, huge but finite, times gH / T overflowed in the Triton backward and 0 * inf made
    them NaN (found by a review; in a fused loss the NaN then spread through d_hidden and
    d_weight). At T = 1e-38 even the clamped log2 p_j (-127) times gH ln2 / T overflowed, on every
    kernel, until 1 / T was applied last. Their gradient is 0, and the row's is the float64 one
    (row 1's token is not its argmax: +-gL / T there, 1e38 at the smallest T)."""
    backend, device = backend_device
    logits = torch.tensor([[0.5, 1.0, 2.0, -1e38, 0.25], [0.0, 0.0, 1.0, 0.0, -1e38]])
    tokens = torch.tensor([2, 0])
    exact = logits.double().requires_grad_()
    exact_logprobs, exact_entropy = reference.logprobs_and_entropy_ref(exact, tokens, temperature)
    (grad_entropy * exact_entropy - exact_logprobs).sum().backward()
    ours = logits.to(device).requires_grad_()
    logprobs, entropy = em_kernels.logprobs_and_entropy(
        ours, tokens.to(device), temperature=temperature, backend=backend)
    (grad_entropy * entropy - logprobs).sum().backward()
    assert bool(torch.isfinite(ours.grad).all()), ours.grad
    assert bool((ours.grad[0, 3] == 0) & (ours.grad[1, 4] == 0))
    torch.testing.assert_close(ours.grad.double().cpu(), exact.grad, rtol=1e-5, atol=1e-6)


def test_maxima_whose_difference_overflows(backend_device):
    """Chunks whose maxima lie 4e38 apart: the shift between them overflows float32 to -inf, and
    merging must still give the chunk's scale 0 (not 0 * -inf = NaN). Row 0 is one +2e38 among
    a long run of -2e38 (entropy 0), row 1 its negation (uniform over the 40000 entries at +2e38:
    entropy log 40000); every chunk size of every backend leaves a chunk of one sign only. Row 2
    puts -2e38 in the first 8 entries and +2e38 at 1024 (entropy 0): in the CUDA forward one
    thread meets both (its vectors 0 and 256 in fp32) and rescales its own sums across them.
    |lse| >= 2e38 is past the backward's trust limit (2^40: from a float64 lse of 2e38, ulp
    4e22, no backward recovers log s), so row 1's gradient is NaN on purpose at both
    temperatures (a one-hot term alone would look plausible); rows 0 and 2 are one-hot (entropy
    exactly 0, ln s = 0: nothing to lose), and their gradient is exactly 0, as in float64. (The
    torch backend, plain float32 PyTorch, forms lse first even in the forward: not held to
    this.)"""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("plain float32 PyTorch: its log-probs come from lse, which absorbs log s here")
    vocab, run, peak = 70000, 40000, 60000
    logits = torch.zeros(3, vocab)
    logits[0, :run] = -2e38
    logits[0, peak] = 2e38
    logits[1] = -logits[0]
    logits[2, :8] = -2e38
    logits[2, 1024] = 2e38
    logits = logits.to(device)
    tokens = torch.tensor([peak, 0, 1024], device=device)
    expected = torch.tensor([0.0, math.log(run), 0.0], device=device)
    for temperature in (1.0, 1e-30):
        logprobs, result, grad = _forward_and_gradient(backend, logits, tokens, temperature)
        torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logprobs, -expected, rtol=1e-6, atol=1e-6)
        assert torch.isnan(grad[1]).all()
        assert torch.equal(grad[[0, 2]], torch.zeros_like(grad[[0, 2]]))


def _confident_rows(temperature: float, generator: torch.Generator) -> torch.Tensor:
    """32 x 512 float32 logits whose rows are confident (entropy 0.1 down to ~1e-7). At T >= 0.1
    (|lse| ~ 100 / T): rows 60-100 + N(0, 1), the argmax 12-26 nats (of z / T) above them. At
    smaller T (|lse| ~ 7e7 at T ~ 1e-4): the argmax 6500-8100 and the rest 4 or 5 float32 ulps
    below it, 20 to 25 nats (where a backward center an ulp off the max cost 1-2%)."""
    rows, vocab = 32, 512
    if temperature >= 0.1:
        base = 60 + 40 * torch.rand(rows, 1, generator=generator, dtype=torch.float64)
        logits = base + torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
        gaps = torch.linspace(12, 26, rows, dtype=torch.float64)
        logits[:, 7] = base[:, 0] + gaps * temperature
        return logits.float()
    peak = (6500 + 1600 * torch.rand(rows, 1, generator=generator, dtype=torch.float64)).float()
    ulp = peak - torch.nextafter(peak, torch.zeros_like(peak))
    logits = peak - torch.randint(4, 6, (rows, vocab), generator=generator).float() * ulp
    logits[:, 7] = peak[:, 0]
    return logits


# 1.0000522e-4: a T whose float 1 / T is off by 0.8 of its ulp, so that m / T rounded through
# floats lands an ulp away from m for the upper half of a binade (the rows' maxima here).
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.0000522e-4, 1.000835e-4])
def test_confident_rows_have_relatively_exact_gradients(backend_device, temperature):
    """On confident rows with large |lse| (`_confident_rows`), each row's gradient matches
    float64 relative to that row's own largest entry: that of H alone, and that of H + 0.25 log p
    (the argmax's, or a random token's) off the chosen column; there the log-prob term's 1 - p
    is formed in float32 and holds to an ulp of 1 (times gL / T). On these rows log p of the
    argmax is ~ -H, far below an ulp of |lse|: with the float32 lse saved before (what plain
    float32 PyTorch's z / T - logsumexp(z / T) does too) they were 5-10% off at T = 1, 4x at
    T = 0.6 and far worse at T ~ 1e-4. The float64 lse, with T and 1 / T carried in double,
    keeps them to float32 rounding. (The torch backend is plain float32 PyTorch, which rounds
    z / T itself: not held to this.)"""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("plain float32 PyTorch: z / T is rounded to an ulp of |lse| before anything")
    generator = torch.Generator().manual_seed(round(1 / temperature))
    logits = _confident_rows(temperature, generator)
    rows = torch.arange(logits.shape[0])
    tokens = torch.where(rows % 2 == 0, 7, torch.randint(0, logits.shape[1], rows.shape,
                                                         generator=generator))

    leaf = logits.clone().to(device).requires_grad_()
    em_kernels.entropy(leaf, temperature=temperature, backend=backend).sum().backward()
    exact = logits.double().requires_grad_()
    reference.entropy_ref(exact / temperature).sum().backward()
    assert_row_relative(leaf.grad, exact.grad, 1e-4, "entropy alone")

    _, _, grad = _forward_and_gradient(backend, logits.to(device), tokens.to(device), temperature)
    exact.grad = None
    lp, h = reference.logprobs_and_entropy_ref(exact / temperature, tokens)
    (h.sum() + 0.25 * lp.sum()).backward()
    error = (grad.cpu().double() - exact.grad).abs()
    chosen = torch.zeros_like(error, dtype=torch.bool).scatter_(1, tokens[:, None], True)
    off_chosen = torch.where(chosen, 0.0, exact.grad).abs().amax(-1)
    assert (torch.where(chosen, 0.0, error).amax(-1) / off_chosen).max() < 1e-4, "off the token"
    assert error[chosen].max() < 2 * EPS32 * 0.25 / temperature + 1e-4 * off_chosen.max()


@pytest.mark.parametrize("temperature", [MAX_TEMPERATURE, 3e37])
def test_huge_temperatures_keep_far_entries(backend_device, temperature):
    """At T near MAX_TEMPERATURE a -FLT_MAX logit among zeros is only -4 (or -11) nats away:
    the largest entry of the row's gradient. The backward's center must not push z - c past
    float32's range there (it is 0 from T = FLT_MAX / 1024 on: softmax_stats.h)."""
    backend, device = backend_device
    logits = torch.zeros(2, 16)
    logits[0, 5] = logits[1, 9] = -torch.finfo(torch.float32).max
    leaf = logits.clone().to(device).requires_grad_()
    em_kernels.entropy(leaf, temperature=temperature, backend=backend).sum().backward()
    exact = logits.double().requires_grad_()
    reference.entropy_ref(exact / temperature).sum().backward()
    # The gradient is subnormal here (~1e-41 at MAX_TEMPERATURE, ~3e-43 at 3e37): a few of its
    # spacings (2^-149) on top of the relative bound.
    bound = 1e-3 * exact.grad.abs().amax(-1, keepdim=True) + 4 * 2.0**-149
    assert ((leaf.grad.cpu().double() - exact.grad).abs() <= bound).all(), (leaf.grad, exact.grad)


def test_maxima_near_float32_max_below_the_centerless_temperature(backend_device):
    """Row maxima at +-FLT_MAX with T = 1e35 (below CENTERLESS_TEMPERATURE, so the backward
    centers on lse T): lse T = m + T ln s passes float32's range by T ln s ~ 1e35, and the
    center must be clamped to +-FLT_MAX (softmax_stats.h, the Triton backward), not become
    +-inf (z - c = -inf everywhere: a zero or NaN gradient). The rows are 0.4 nats apart per
    entry, |lse| ~ 3.4e3: well inside the trusted range."""
    backend, device = backend_device
    temperature = 1e35
    fmax = torch.finfo(torch.float32).max
    steps = torch.arange(16, dtype=torch.float64) * 0.4 * temperature
    logits = torch.stack([fmax - steps, -fmax + steps]).float()
    leaf = logits.clone().to(device).requires_grad_()
    em_kernels.entropy(leaf, temperature=temperature, backend=backend).sum().backward()
    exact = logits.double().requires_grad_()
    reference.entropy_ref(exact / temperature).sum().backward()
    # The torch backend rounds z / T (~3.4e3) to float32 first: ~1e-4 of the row's size.
    assert_row_relative(leaf.grad, exact.grad, 1e-3, "gradient at +-FLT_MAX")


def test_float32_lse_where_float64_is_missing(monkeypatch):
    """On Apple's MPS, which has no float64, the saved lse is float32 (`lse_dtype`): the torch
    backend's paths (the entropy ops and chunked linear_entropy) must run with it. Simulated on
    CPU by making lse_dtype answer float32."""
    from em_kernels._ops import entropy as entropy_ops
    from em_kernels._ops import linear_entropy as linear_ops

    for module in (entropy_ops, linear_ops):
        monkeypatch.setattr(module, "lse_dtype", lambda device: torch.float32)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 300, generator=generator)
    tokens = torch.randint(0, 300, (6,), generator=generator)
    assert softmax_stats(logits, tokens, 0.7, "torch")[1].dtype == torch.float32
    leaf = logits.clone().requires_grad_()
    logprobs, result = em_kernels.logprobs_and_entropy(leaf, tokens, temperature=0.7,
                                                       backend="torch")
    (result.sum() + logprobs.sum()).backward()
    exact = logits.double().requires_grad_()
    exact_lp, exact_h = reference.logprobs_and_entropy_ref(exact / 0.7, tokens)
    (exact_h.sum() + exact_lp.sum()).backward()
    torch.testing.assert_close(result.double(), exact_h.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), exact.grad, rtol=1e-4, atol=1e-6)
    hidden = torch.randn(6, 8, generator=generator).requires_grad_()
    weight = torch.randn(300, 8, generator=generator)
    out = em_kernels.linear_entropy(hidden, weight, tokens=tokens, backend="torch")
    assert out.logprobs.dtype == torch.float32
    (out.entropy.sum() + out.logprobs.sum()).backward()
    exact_hidden = hidden.detach().double().requires_grad_()
    exact_lp, exact_h = reference.logprobs_and_entropy_ref(exact_hidden @ weight.double().T,
                                                           tokens)
    (exact_h.sum() + exact_lp.sum()).backward()
    torch.testing.assert_close(hidden.grad.double(), exact_hidden.grad, rtol=1e-4, atol=1e-5)


def test_a_masked_chosen_token_gets_no_gradient(backend_device):
    """A token whose logit is -inf has log-prob -inf and, like every -inf entry, a zero
    gradient; the other entries keep the log-prob's -p_j gL / T term. Tokens in the first and
    in a later vocabulary chunk; the reference backend's gradient is the yardstick."""
    backend, device = backend_device
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in (4, 9000):
            generator = torch.Generator().manual_seed(vocab)
            logits = torch.randn(3, vocab, generator=generator).to(dtype)
            tokens = torch.tensor([2, vocab - 1, 1])
            logits[0, 2] = logits[1, vocab - 1] = logits[1, 0] = float("-inf")
            logits, tokens = logits.to(device), tokens.to(device)
            logprobs, _, grad = _forward_and_gradient(backend, logits, tokens, 0.5)
            _, _, expected = _forward_and_gradient("torch", logits, tokens, 0.5)
            assert logprobs[:2].tolist() == [float("-inf")] * 2 and logprobs[2].isfinite()
            assert grad[0, 2] == 0 and grad[1, vocab - 1] == 0 and grad[1, 0] == 0
            torch.testing.assert_close(grad.float(), expected.float(), rtol=2e-2, atol=1e-5)


def test_a_row_of_the_most_negative_float_has_no_distribution(backend_device):
    """All of a row masked with finfo.min: NaN entropy and NaN log-prob, as an all -inf row
    (the kernels take finfo.min for a mask once it overflows when scaled), never a log-prob of
    +inf; its gradient is 0. V 9000 spans several chunks on every backend, so the merge of
    empty partials is covered too. The torch backend computes softmax of equal numbers
    instead."""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("the reference treats finfo.min as a number: a uniform row")
    for dtype, vocab in itertools.product((torch.float32, torch.bfloat16), (300, 9000)):
        logits = torch.randn(2, vocab, dtype=dtype)
        logits[0] = torch.finfo(dtype).min
        logits = logits.to(device)
        tokens = torch.tensor([1, 1], device=device)
        logprobs, result, grad = _forward_and_gradient(backend, logits, tokens)
        assert result[0].isnan() and logprobs[0].isnan(), (result, logprobs)
        assert result[1].isfinite() and logprobs[1].isfinite()
        assert bool((grad[0] == 0).all()) and bool(grad[1].isfinite().all())


def test_rows_without_a_distribution_ignore_their_upstream_gradient(backend_device):
    """A padded row that is all -inf (or, on the kernels, all finfo.min) has NaN entropy and
    log-prob, so a masked loss such as sum(mask * H^2) hands it a NaN upstream gradient
    (0 * 2H = NaN) even though it is masked out. Its gradient is still exactly 0 (the row has no
    distribution: the kernels take its upstream gradients as 0), and the other rows are
    untouched. The torch backend sees a finfo.min row as uniform (finite H): only the -inf row
    there."""
    backend, device = backend_device
    empty_rows = [0] if backend == "torch" else [0, 1]
    for vocab in (300, 9000):
        generator = torch.Generator().manual_seed(vocab)
        logits = torch.randn(3, vocab, generator=generator)
        logits[0] = float("-inf")
        logits[1] = torch.finfo(torch.float32).min
        logits = logits.to(device).requires_grad_()
        tokens = torch.tensor([0, 1, 2], device=device)
        mask = torch.tensor([0.0, 0.0, 1.0], device=device)
        logprobs, result = em_kernels.logprobs_and_entropy(logits, tokens, temperature=0.7,
                                                            backend=backend)
        assert torch.isnan(result[empty_rows]).all() and torch.isnan(logprobs[empty_rows]).all()
        (mask * (result**2 + logprobs**2)).sum().backward()
        grad = logits.grad
        assert bool((grad[empty_rows] == 0).all()), grad[empty_rows]
        assert bool(grad[2].isfinite().all()) and bool((grad[2] != 0).any())


def test_gradients_finite_at_extreme_scales(backend_device):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        for scale in (1e-3, 1e4):
            base = (torch.randn(3, 2000, generator=generator) * scale).clamp(-6e4, 6e4)
            base[1, 100:] = float("-inf")
            logits = base.to(dtype).to(device)
            tokens = torch.tensor([1, 7, 1999], device=device)
            logprobs, result, grad = _forward_and_gradient(backend, logits, tokens, 0.05)
            assert torch.isfinite(result).all() and torch.isfinite(logprobs).all()
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 5), (0, 9000)])
def test_zero_rows(backend_device, shape):
    backend, device = backend_device
    logits = torch.randn(shape, device=device, requires_grad=True)
    tokens = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    logprobs, result = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
    assert result.shape == logprobs.shape == shape[:-1]
    (result.sum() + logprobs.sum()).backward()
    assert logits.grad.shape == shape
    assert em_kernels.entropy(logits, backend=backend).shape == shape[:-1]


# ----------------------------------------------------------------------------------------------
# The dispatcher ops


def test_out_of_range_tokens_in_the_op(backend_device):
    """The op itself (the path without a host sync) gives a NaN log-prob for an id outside
    [0, V), and treats its logit as lying outside the row (a vocabulary shard's rule): its
    log-prob gradient is lse's alone, -p / T, with no one-hot anywhere, also for an int64 id
    whose low 32 bits fall inside the row. The other rows are unaffected."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 40, generator=generator).to(device)
    tokens = torch.tensor([-1, 5, 40, (1 << 32) + 3], device=device)
    entropy_, lse, logprobs = softmax_stats(logits, tokens, 0.5, backend)
    outside = [0, 2, 3]
    assert torch.isnan(logprobs[outside]).all() and torch.isfinite(logprobs[1])
    ones = torch.ones(4, device=device)
    with_lp = softmax_stats_backward(logits, tokens, entropy_, lse, ones, ones, 0.5, backend)
    without = softmax_stats_backward(logits, tokens, entropy_, lse, ones, None, 0.5, backend)
    p = torch.softmax(logits.double() / 0.5, -1)
    torch.testing.assert_close((with_lp - without)[outside].double(), -p[outside] / 0.5,
                               rtol=1e-5, atol=1e-6)
    onehot = torch.zeros_like(p[1])
    onehot[5] = 1.0
    torch.testing.assert_close((with_lp - without)[1].double(), (onehot - p[1]) / 0.5,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        lse.cpu(), torch.logsumexp(logits.double() / 0.5, -1).cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab", [40, 9000])
def test_negative_token_ids_leave_other_rows_alone(backend_device, vocab):
    """Negative ids (-1, or an ignore_index of -100 left in the labels: on CUDA no range check
    runs) on rows after the first: each such row gets the -p / T term alone, and every other
    row's gradient, in particular the entries just before the bad row (row r's id -1 would land
    on row r - 1's last entry, -100 one hundred entries before row r's start, if the one-hot
    store took the id for a column), is its own. V = 9000 spans two Triton tiles (chunk 0 is
    where a truncating -1 // BLOCK lands)."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator).to(device)
    tokens = torch.tensor([5, vocab - 1, -1, -100, 3, -1], device=device)
    entropy_, lse, logprobs = softmax_stats(logits, tokens, 0.5, backend)
    outside = tokens < 0
    assert torch.isnan(logprobs[outside]).all() and torch.isfinite(logprobs[~outside]).all()
    ones = torch.ones(6, device=device)
    with_lp = softmax_stats_backward(logits, tokens, entropy_, lse, ones, ones, 0.5, backend)
    without = softmax_stats_backward(logits, tokens, entropy_, lse, ones, None, 0.5, backend)
    p = torch.softmax(logits.double() / 0.5, -1).cpu()
    onehot = torch.zeros_like(p)
    inside = (~outside).cpu()
    onehot[inside] = torch.nn.functional.one_hot(tokens.cpu()[inside], vocab).double()
    torch.testing.assert_close((with_lp - without).double().cpu(), (onehot - p) / 0.5,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_tokens", [False, True])
def test_opcheck(backend_device, with_tokens):
    backend, device = backend_device
    generator = torch.Generator().manual_seed(5)
    for dtype, vocab in ((torch.float32, 33), (torch.bfloat16, 9000)):
        logits = torch.randn(3, vocab, generator=generator).to(dtype).to(device)
        tokens = torch.tensor([0, 4, vocab - 1], device=device) if with_tokens else None
        torch.library.opcheck(softmax_stats, (logits.requires_grad_(), tokens, 0.7, backend))
        entropy_, lse, _ = softmax_stats(logits.detach(), tokens, 0.7, backend)
        grad_entropy = torch.randn(3, generator=generator).to(device)
        grad_logprobs = torch.randn(3, generator=generator).to(device) if with_tokens else None
        torch.library.opcheck(
            softmax_stats_backward,
            (logits.detach(), tokens, entropy_, lse, grad_entropy, grad_logprobs, 0.7, backend))


# ----------------------------------------------------------------------------------------------
# Bad input


def _both(logits, tokens=None, **kwargs):
    """Call both public ops; each must raise the same way."""
    with pytest.raises(Exception) as first:
        em_kernels.entropy(logits, **kwargs)
    if tokens is None:
        tokens = torch.zeros(logits.shape[:-1] if logits.dim() else (), dtype=torch.long)
    with pytest.raises(first.type) as second:
        em_kernels.logprobs_and_entropy(logits, tokens, **kwargs)
    return first.value, second.value


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_bad_logits(backend):
    if backend == "triton":  # some errors come from the backend, once it is resolved
        skip_unless_runnable("triton", "cpu")
    for bad in (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.bool),
                torch.zeros(3, 4, dtype=torch.complex64)):
        for error in _both(bad, backend=backend):
            assert isinstance(error, TypeError) and "float32, bfloat16 or float16" in str(error)
    for error in _both([[0.0, 1.0]], tokens=torch.zeros(1, dtype=torch.long), backend=backend):
        assert isinstance(error, TypeError) and "torch.Tensor" in str(error)
    for error in _both(torch.tensor(1.0), backend=backend):
        assert isinstance(error, ValueError) and "0-d" in str(error)
    for error in _both(torch.zeros(3, 0), backend=backend):
        assert isinstance(error, ValueError) and "V = 0" in str(error)
    for bad, hint in ((torch.eye(3, 4).to_sparse(), "logits.to_dense()"),
                      (torch.eye(3, 4).to_sparse_csr(), "logits.to_dense()"),
                      (torch.nested.nested_tensor([torch.zeros(4), torch.zeros(2)],
                                                  layout=torch.jagged),
                       "torch.nested.to_padded_tensor")):
        for error in _both(bad, tokens=torch.zeros(3, dtype=torch.long), backend=backend):
            assert isinstance(error, TypeError) and "dense (strided)" in str(error), error
            assert hint in str(error), error
    if backend != "torch":
        for error in _both(torch.zeros(3, 4, dtype=torch.float64), backend=backend):
            assert isinstance(error, TypeError) and 'backend="torch"' in str(error)
    for error in _both(torch.zeros(3, 4), backend=backend, process_group=object()):
        assert isinstance(error, ValueError) and "not initialised" in str(error)


def test_float64_runs_with_the_torch_backend():
    logits = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(em_kernels.entropy(logits, backend="torch"),
                               reference.entropy_ref(logits).float())


def test_vocab_parallel_refuses_vmap():
    """Vocab-parallel mode under torch.vmap, over the logits, the tokens alone or nothing the op
    takes, and linear_entropy's too: a clear error on every rank, before any collective."""
    logits = torch.randn(2, 3, 10)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(lambda z: em_kernels.entropy(z, process_group=object()))(logits)
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(lambda t: em_kernels.logprobs_and_entropy(
            logits[0], t, process_group=object()))(tokens)
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(lambda s: em_kernels.entropy(logits[0], process_group=object()) * s)(
            torch.ones(2))
    weight = torch.randn(10, 4)
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(lambda h: em_kernels.linear_entropy(h, weight, process_group=object()).entropy)(
            torch.randn(2, 3, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_tokens(backend):
    if backend == "triton":
        skip_unless_runnable("triton", "cpu")
    logits = torch.randn(2, 3, 10)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    cases_ = [
        ([0, 1], TypeError, "torch.Tensor"),
        (tokens.int(), TypeError, "int64"),
        (tokens.float(), TypeError, "int64"),
        (tokens.reshape(6), ValueError, "leading shape (2, 3)"),
        (tokens[:, :2], ValueError, "leading shape (2, 3)"),
        (tokens.to("meta"), ValueError, "are on meta"),
        (tokens.to_sparse(), TypeError, "tokens must be a dense (strided) tensor"),
        (tokens.clone().fill_(10), ValueError, "token id 10 is outside [0, 10)"),
        (tokens.clone().index_fill_(1, torch.tensor([1]), -3), ValueError, "token id -3"),
    ]
    for bad, error, message in cases_:
        with pytest.raises(error) as info:
            em_kernels.logprobs_and_entropy(logits, bad, backend=backend)
        assert message in str(info.value), str(info.value)
        if not message.startswith("token id"):  # vocab-parallel: checked before any collective
            with pytest.raises(error) as info:
                em_kernels.logprobs_and_entropy(logits, bad, backend=backend,
                                                process_group=object())
            assert message in str(info.value), str(info.value)


def test_bad_shift():
    """shift: an int in [0, T] on logits with a positions dim; with a shift, tokens are the
    logits' own positions' ids, and the scored ids alone are refused with a message that says
    so."""
    logits, tokens = torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long)
    cases_ = [
        (dict(shift=-1), ValueError, "shift must be >= 0, got -1"),
        (dict(shift=1.0), TypeError, "shift must be an int, got float"),
        (dict(shift=True), TypeError, "shift must be an int, got bool"),
        (dict(shift=4), ValueError, "shift=4 is more than the logits' 3 positions"),
        (dict(logits=torch.randn(10), shift=1), ValueError, "shift needs logits of shape"),
        (dict(tokens=tokens[:, 1:], shift=1), ValueError,
         "tokens are the ids of all the logits' positions, of shape (2, 3)"),
        (dict(tokens=tokens[:, 2:], shift=2), ValueError,
         "with shift=2, tokens are the ids of all the logits' positions, of shape (2, 3)"),
        (dict(tokens=tokens.reshape(6), shift=1), ValueError, "got (6,)"),
    ]
    for arguments, error, message in cases_:
        calls = [lambda group, given=arguments: em_kernels.logprobs_and_entropy(
            **{"logits": logits, "tokens": tokens, **given}, backend="torch",
            process_group=group)]
        if "tokens" not in arguments:
            calls.append(lambda group, given=arguments: em_kernels.entropy(
                **{"logits": logits, **given}, backend="torch", process_group=group))
        for call, group in itertools.product(calls, (None, object())):
            with pytest.raises(error) as info:  # vocab-parallel: before any collective
                call(group)
            assert message in str(info.value), str(info.value)
    assert em_kernels.entropy(logits, shift=3, backend="torch").shape == (2, 0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_temperature_value(temperature):
    for error in _both(torch.randn(2, 5), temperature=temperature, backend="torch"):
        assert isinstance(error, ValueError) and "finite positive" in str(error)


@pytest.mark.parametrize("temperature", [1e-39, 4e-39, 1e38, 1e50, 10**400])
def test_temperatures_the_kernels_cannot_scale_by(temperature):
    """log2(e) / T must be a finite float32 (T >= ~4.2e-39) and 1 / T a normal one (T <=
    ~8.5e37: from ~1e45 both round to 0 and masked entries gave NaN), and an int beyond float64
    is a ValueError, not an OverflowError."""
    for error in _both(torch.randn(2, 5), temperature=temperature, backend="torch"):
        assert isinstance(error, ValueError) and "temperature must be" in str(error), error


@pytest.mark.parametrize("temperature", [1e-39, 8.51e37])
def test_the_temperature_bound_a_message_names_is_allowed(temperature):
    """The message names its bound rounded into the range (8.50e+37, not 8.51e+37, which is
    past the bound of ~8.507e37), so the user can pass the number it names."""
    for error in _both(torch.randn(2, 5), temperature=temperature, backend="torch"):
        bound = float(re.search(r"must be [<>]= (\S+) ", str(error)).group(1))
        assert em_kernels.entropy(torch.randn(2, 5), temperature=bound).isfinite().all()
        assert str(error).startswith(f"temperature must be {'>=' if temperature < 1 else '<='} "
                                     f"{'4.24e-39' if temperature < 1 else '8.50e+37'} ")


@pytest.mark.parametrize("mode", ["jvp", "forward_ad", "func.grad"])
def test_autograd_modes_other_than_torch_autograd_are_refused(mode):
    """The ops have a torch.autograd reverse-mode formula only: a forward-mode tangent would
    silently come back as 0, and torch.func.grad fails inside torch."""
    import torch.autograd.forward_ad as forward_ad

    logits, tangent = torch.randn(3, 9), torch.randn(3, 9)
    tokens = torch.zeros(3, dtype=torch.long)
    calls = [lambda z: em_kernels.entropy(z, backend="torch"),
             lambda z: em_kernels.logprobs_and_entropy(z, tokens, backend="torch")[0],
             lambda z: em_kernels.linear_entropy(z, torch.randn(5, 9), backend="torch").entropy]
    for call in calls:
        with pytest.raises(NotImplementedError, match="forward-mode AD|torch.func gradient"):
            if mode == "jvp":
                torch.func.jvp(call, (logits,), (tangent,))
            elif mode == "func.grad":
                torch.func.grad(lambda z: call(z).sum())(logits)
            else:
                with forward_ad.dual_level():
                    call(forward_ad.make_dual(logits, tangent))


def test_vmap_of_the_backward_op(backend_device):
    """The backward op's own vmap rule (what torch.func transforms of the gradient reach; torch
    2.14's is_grads_batched loops over the samples instead, so test_vmap never calls it): over a
    batch of upstream gradients it gives each sample's backward, without the per-sample
    fallback's warning."""
    import warnings

    backend, device = backend_device
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 300, generator=generator).to(device)
    tokens = torch.randint(0, 300, (3,), generator=generator).to(device)
    entropy, lse, _ = softmax_stats(logits, tokens, 0.8, backend)
    grad_entropy, grad_logprobs = torch.randn(2, 4, 3, generator=generator).to(device)

    def backward(g_entropy, g_logprobs):
        return softmax_stats_backward(logits, tokens, entropy, lse, g_entropy, g_logprobs, 0.8,
                                      backend)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = torch.vmap(backward)(grad_entropy, grad_logprobs)
        only_entropy = torch.vmap(backward, in_dims=(0, None))(grad_entropy, grad_logprobs[0])
    for k in range(4):
        torch.testing.assert_close(batched[k], backward(grad_entropy[k], grad_logprobs[k]))
        torch.testing.assert_close(only_entropy[k], backward(grad_entropy[k], grad_logprobs[0]))


def test_vmap(backend_device):
    """torch.vmap over the ops, forward and (through is_grads_batched, which vmaps the
    backward) backward: the batched results, by one call on the flattened rows (torch's
    per-sample fallback would warn, an error here)."""
    import warnings

    backend, device = backend_device
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 300, generator=generator).to(device)
    tokens = torch.randint(0, 300, (2, 3), generator=generator).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logprobs, result = torch.vmap(
            lambda z, t: em_kernels.logprobs_and_entropy(z, t, backend=backend))(logits, tokens)
        entropy_only = torch.vmap(lambda z: em_kernels.entropy(z, backend=backend),
                                  in_dims=1)(logits)
        leaf = logits[0].clone().requires_grad_()
        lp, h = em_kernels.logprobs_and_entropy(leaf, tokens[0], backend=backend)
        upstream = torch.randn(4, 3, generator=generator).to(device)
        (jacobian_rows,) = torch.autograd.grad(h + 0.5 * lp, leaf, upstream,
                                               retain_graph=True, is_grads_batched=True)
    expected = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
    torch.testing.assert_close(logprobs, expected[0])
    torch.testing.assert_close(result, expected[1])
    torch.testing.assert_close(entropy_only, em_kernels.entropy(logits.transpose(0, 1),
                                                                backend=backend))
    for k in range(4):
        (row,) = torch.autograd.grad(h + 0.5 * lp, leaf, upstream[k], retain_graph=True)
        torch.testing.assert_close(jacobian_rows[k], row)
    # A vmapped batch of 0 samples (the rows' count spelled out, never an ambiguous -1).
    empty = torch.vmap(lambda z, t: em_kernels.logprobs_and_entropy(z, t, backend=backend))(
        logits[:0], tokens[:0])
    assert [tuple(x.shape) for x in empty] == [(0, 3), (0, 3)]


def test_double_backward_is_refused(backend_device):
    """Differentiable once: differentiating the gradient raises a clear error, where torch would
    advise calling register_autograd."""
    backend, device = backend_device
    logits = torch.randn(3, 9, device=device, requires_grad=True)
    tokens = torch.zeros(3, dtype=torch.long, device=device)
    logprobs, result = em_kernels.logprobs_and_entropy(logits, tokens, backend=backend)
    (grad,) = torch.autograd.grad((result + logprobs).sum(), logits, create_graph=True)
    with pytest.raises(NotImplementedError, match="differentiable once"):
        grad.sum().backward()


def test_meta_tensors_trace_with_tokens():
    """Shapes only: the token range check reads no values of meta (or fake) tensors."""
    logits = torch.empty(3, 7, device="meta")
    tokens = torch.empty(3, dtype=torch.long, device="meta")
    logprobs, result = em_kernels.logprobs_and_entropy(logits, tokens, backend="torch")
    assert logprobs.shape == result.shape == (3,) and result.device.type == "meta"


@pytest.mark.parametrize("temperature", ["1.0", None, True, torch.tensor(1.0), 1j])
def test_bad_temperature_type(temperature):
    for error in _both(torch.randn(2, 5), temperature=temperature, backend="torch"):
        assert isinstance(error, TypeError) and "temperature must be a Python number" in str(error)


def test_integer_temperature_is_accepted():
    logits = torch.randn(2, 5)
    torch.testing.assert_close(em_kernels.entropy(logits, temperature=2, backend="torch"),
                               em_kernels.entropy(logits, temperature=2.0, backend="torch"))


def test_numpy_integer_shift_is_accepted():
    """A shift computed with NumPy (np.int64) counts as the int it holds; np.bool_ does not."""
    np = pytest.importorskip("numpy")
    logits = torch.randn(2, 6, 5)
    torch.testing.assert_close(em_kernels.entropy(logits, shift=np.int64(1), backend="torch"),
                               em_kernels.entropy(logits, shift=1, backend="torch"))
    for error in _both(logits, shift=np.bool_(True), backend="torch"):
        assert isinstance(error, TypeError) and "shift must be an int, got bool" in str(error)


def test_numpy_scalar_temperatures_are_accepted():
    """A NumPy scalar (a sweep's np.float32, say) counts as the number it holds; np.bool_ and
    arrays with a dim do not."""
    np = pytest.importorskip("numpy")
    logits = torch.randn(2, 5)
    for temperature in (np.float32(0.75), np.float64(0.75), np.int64(2)):
        torch.testing.assert_close(
            em_kernels.entropy(logits, temperature=temperature, backend="torch"),
            em_kernels.entropy(logits, temperature=float(temperature), backend="torch"))
    for temperature in (np.bool_(True), np.array([0.5])):
        for error in _both(logits, temperature=temperature, backend="torch"):
            assert isinstance(error, TypeError), error


def test_unknown_and_unavailable_backends():
    logits = torch.randn(2, 5)
    for name in ("tritonn", "CUDA", ""):
        for error in _both(logits, backend=name):
            assert isinstance(error, ValueError) and "unknown backend" in str(error)
    for error in _both(logits, backend=None):
        assert isinstance(error, TypeError) and "backend must be a string" in str(error)
    # "cuda" never runs CPU tensors: unavailable here whatever was built.
    for error in _both(logits, backend="cuda"):
        assert isinstance(error, em_kernels.BackendUnavailableError)
        assert 'backend="cuda"' in str(error)
    status = em_kernels.available_backends()
    assert set(status) == {"triton", "cuda", "cpu", "torch"} and status["torch"] == "available"
    if status["cpu"] != "available":
        for error in _both(logits, backend="cpu"):
            assert isinstance(error, em_kernels.BackendUnavailableError)
            assert status["cpu"] in str(error)


def test_auto_backend_matches_an_explicit_one():
    logits = torch.randn(3, 50)
    expected = "cpu" if em_kernels.available_backends()["cpu"] == "available" else "torch"
    assert torch.equal(em_kernels.entropy(logits, backend="auto"),
                       em_kernels.entropy(logits, backend=expected))


# ------------------------------------------------------------- compiled path, without a GPU

# Run by sm90.run_lowering_script; prints {variant: [registers, spill bytes a thread, memory
# trace]}: the trace is the PTX's order of scalar 16-bit loads (L), barriers (B), 16-byte
# stores (S) and scalar 16-bit stores (s), repeats collapsed.
_LOWER_SCRIPT = textwrap.dedent("""
    import itertools
    import json
    import re
    import triton
    from em_kernels.triton import entropy as kernels
    from sm90 import compile_for_sm90, resource_usage

    VOCAB = 151936
    TYPES = dict(logits_ptr="*bf16", grad_logits_ptr="*bf16", tokens_ptr="*i64", lse_ptr="*fp64",
                 scale2="fp32", inv_temperature="fp32", inv_temperature_hi="fp32",
                 inv_temperature_lo="fp32", center_temperature_hi="fp32",
                 center_temperature_lo="fp32")

    EVENTS = [("L", r"ld\\.global(\\.[\\w:]+)*\\.b16 "), ("B", r"bar\\.sync "),
              ("S", r"st\\.global(\\.[\\w:]+)*\\.v4\\."), ("s", r"st\\.global(\\.[\\w:]+)*\\.b16 ")]

    def lower(kernel, constants, num_warps):
        divisible = [n for n in kernel.arg_names if n.endswith("_ptr") or n in ("V", "stride_row")]
        compiled = compile_for_sm90(kernel, constants, TYPES, divisible, num_warps=num_warps)
        events = []
        for line in compiled.asm["ptx"].splitlines():
            for mark, pattern in EVENTS:
                if re.search(pattern, line):
                    events.append(mark)
        trace = "".join(mark for mark, _ in itertools.groupby(events))
        return [*resource_usage(compiled), trace]

    block = kernels._block_size(VOCAB)
    results = {}
    for tokens in (False, True):
        results[f"fwd tokens={tokens}"] = lower(
            kernels._softmax_stats_fwd_kernel,
            dict(HAS_TOKENS=tokens, SINGLE_CHUNK=False, BLOCK=block), kernels._tile_warps(block))
        results[f"bwd logprob_grad={tokens}"] = lower(
            kernels._softmax_stats_bwd_kernel,
            dict(HAS_LOGPROB_GRAD=tokens, ROUND_TO_BF16=False, BLOCK=block),
            kernels._tile_warps(block))
        chunks = triton.next_power_of_2(triton.cdiv(VOCAB, block))
        results[f"merge tokens={tokens}"] = lower(
            kernels._softmax_stats_merge_kernel,
            dict(HAS_TOKENS=tokens, BLOCK_ROWS=kernels.MERGE_TILE // chunks, BLOCK_CHUNKS=chunks),
            kernels.MERGE_WARPS)
    print(json.dumps(results))
""")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the launches themselves compile the kernels")
def test_tile_kernels_lower_for_hopper_without_spills():
    """The tile kernels at the launcher's block and warps for V = 151936, bf16, compiled for
    sm_90: no spills, and at most 128 registers a thread, so that at least two 256-thread (or
    four 128-thread) programs share an SM. The log-prob backward once took 167 registers (64-bit
    column indices for the one-hot) and ran 43% slower than the entropy backward on an H200; it
    now does the entropy backward's work per entry, so it may take only a few registers more.
    Its one-hot entry is a scalar store ordered by two barriers: the chosen logit is read (L)
    before the first, the tile stored (S) between them, the entry (s) after the second; else
    another warp's store of that entry could land last, or overwrite the logit in place before
    it is read."""
    usage = run_lowering_script(_LOWER_SCRIPT)
    assert not any(spills for _, spills, _ in usage.values()), usage
    assert all(registers <= 128 for registers, _, _ in usage.values()), usage
    entropy_registers = usage["bwd logprob_grad=False"][0]
    assert usage["bwd logprob_grad=True"][0] <= entropy_registers + 8, usage
    assert usage["bwd logprob_grad=True"][2] == "LBSBs", usage
