"""Pure PyTorch reference implementations: the oracle of every test and the "torch" backend.

Readable before fast. Every function works with autograd, on CPU and GPU, and in float64 (pass
float64 logits to get the float64 oracle). Inputs of lower precision are computed in float32, as
RL trainers do today, so the "torch" backend matches what users replace.

Conventions shared with the kernels:
- every reduction is over the last dim (the vocabulary, V entries);
- ``temperature`` T divides the logits first: every formula is on z / T;
- an entry equal to -inf is masked: it has probability 0 and contributes exactly 0 to the
  entropy (the 0 * -inf products are guarded, in the forward and in the gradient);
- a row that is all -inf has no distribution: its entropy (and log-prob) is NaN; a NaN entry
  poisons its row;
- gradients follow the same contract as every backend: exactly 0 at a -inf entry, even where
  it is the chosen token (where calculus would give 1 / T), and exactly 0 over a row without
  a distribution, whatever its upstream gradient (calculus gives NaN there).
"""

from __future__ import annotations


import torch

__all__ = [
    "compute_dtype",
    "entropy_ref",
    "logprobs_and_entropy_ref",
    "linear_entropy_ref",
    "em_inf_adjust_ref",
    "adaptive_temperature_ref",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle); every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_log_softmax(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, log p) with log p set to 0 where p == 0, so that p * log p and its gradient are 0
    there instead of 0 * -inf = NaN. Rows that are all -inf stay NaN (log_softmax gives NaN)."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return p, safe_logp


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.to(compute_dtype(logits.dtype))
    return z if temperature == 1.0 else z / temperature


def _split_off_empty_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z with every all -inf row replaced by zeros, which rows those were). The caller computes
    on the replaced rows and sets their results to NaN with torch.where, so their forward is NaN
    and no gradient reaches them (autograd through -inf - -inf would give NaN). A row of V = 0
    entries counts as all -inf: no distribution, NaN."""
    empty = torch.isneginf(z).all(-1)
    return z.masked_fill(empty.unsqueeze(-1), 0.0), empty


def _nan_where(empty: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(empty, torch.full_like(values, float("nan")), values)


def entropy_ref(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = -sum_j p_j log p_j with p = softmax(logits / temperature) over the last dim."""
    z, empty = _split_off_empty_rows(_scaled(logits, temperature))
    p, logp = _safe_log_softmax(z)
    return _nan_where(empty, -(p * logp).sum(-1))


def logprobs_and_entropy_ref(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(tokens), entropy) per row, p = softmax(logits / temperature)."""
    z, empty = _split_off_empty_rows(_scaled(logits, temperature))
    lse = torch.logsumexp(z, dim=-1)
    chosen = torch.gather(z, -1, tokens.unsqueeze(-1)).squeeze(-1)
    # A masked chosen token: log p = -inf, and no gradient to its -inf logit.
    chosen = torch.where(torch.isneginf(chosen), chosen.detach(), chosen)
    p, logp = _safe_log_softmax(z)
    return _nan_where(empty, chosen - lse), _nan_where(empty, -(p * logp).sum(-1))


def linear_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(entropy, logprobs or None) of softmax((hidden @ weight^T + bias) / temperature).

    Materialises the full [N, V] logits: it is the oracle, not the kernel."""
    dtype = compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if tokens is None:
        return entropy_ref(logits, temperature), None
    logprobs, entropy = logprobs_and_entropy_ref(logits, tokens, temperature)
    return entropy, logprobs


def _entropy_and_grad(z: torch.Tensor, p0: torch.Tensor, kl_weight: torch.Tensor | float):
    """Per row: entropy H, p, and d(H + kl_weight * KL(p0 || p))/dz in closed form.

    dH/dz_j = -p_j (log p_j + H);  dKL(p0 || p)/dz_j = p_j - p0_j."""
    p, logp = _safe_log_softmax(z)
    entropy = -(p * logp).sum(-1, keepdim=True)
    grad = -p * (logp + entropy) + kl_weight * (p - p0)
    return entropy.squeeze(-1), grad


def em_inf_adjust_ref(
    logits: torch.Tensor,
    steps: int = 5,
    lr: float = 0.1,
    kl_weight: float = 0.001,
    threshold: float = 0.3,
    optimizer: str = "adam",
    early_exit: str = "row",
) -> torch.Tensor:
    """EM-INF's logit adjustment, as the paper's released code does it, returned in float32
    (float64 for float64 input).

    z0 = logits, p0 = softmax(z0). Up to ``steps`` times: p = softmax(z), H = entropy(p); stop if
    H < threshold; loss = H + kl_weight * KL(p0 || p); one optimiser step on z with a fresh state
    (Adam: betas 0.9 / 0.999, eps 1e-8, bias-corrected; or plain SGD).

    early_exit="row": every row is its own problem (batch-invariant). early_exit="batch": the
    released code, which optimises one loss for the whole batch, sum of the rows' entropies plus
    kl_weight times the batch mean of the KLs ("batchmean"), and stops every row at once when the
    summed entropy falls below the threshold.
    """
    dtype = compute_dtype(logits.dtype)
    z = logits.detach().to(dtype).clone()
    shape = z.shape
    z = z.reshape(-1, shape[-1])
    p0 = torch.softmax(z, dim=-1)
    rows = z.shape[0]
    if early_exit == "batch":
        kl_scale = kl_weight / max(rows, 1)
    else:
        kl_scale = kl_weight
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    active = torch.ones(rows, 1, dtype=torch.bool, device=z.device)
    for step in range(1, steps + 1):
        entropy, grad = _entropy_and_grad(z, p0, kl_scale)
        if early_exit == "batch":
            if entropy.sum() < threshold:
                break
        else:
            active = active & ~(entropy < threshold).unsqueeze(-1)
            if not bool(active.any()):
                break
        grad = torch.where(torch.isfinite(z), grad, torch.zeros_like(grad))
        if optimizer == "sgd":
            update = lr * grad
        else:
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad * grad
            m_hat = m / (1 - beta1**step)
            v_hat = v / (1 - beta2**step)
            update = lr * (m_hat / (v_hat.sqrt() + eps))  # the kernels' order: no lr * |g| overflow
        z = torch.where(active, z - update, z)
    return z.reshape(shape)


def adaptive_temperature_ref(
    logits: torch.Tensor,
    alpha: float = 0.5,
    delta: float = 0.1,
    max_iters: int = 100,
    tol: float = 0.01,
) -> torch.Tensor:
    """The paper's adaptive-temperature baseline, per row, returned as z / tau in float32.

    target = max(delta, alpha * H(z)). Rows with H(z) <= delta are returned unchanged (tau = 1).
    Otherwise bisect tau in [0.01, 1]: tau = (lo + hi) / 2, stop when |H(z / tau) - target| < tol,
    else move hi (entropy too high) or lo (too low) to tau; at most ``max_iters`` halvings. A row
    also stops once the midpoint repeats (lo and hi have met in floating point): every further
    halving would try the same tau, so the result is the same and the time bounded."""
    dtype = compute_dtype(logits.dtype)
    z = logits.detach().to(dtype)
    shape = z.shape
    z = z.reshape(-1, shape[-1])
    h0 = entropy_ref(z)
    target = torch.clamp(alpha * h0, min=delta)
    tau = torch.ones_like(h0)
    lo = torch.full_like(h0, 0.01)
    hi = torch.ones_like(h0)
    searching = h0 > delta
    for _ in range(max_iters):
        mid = (lo + hi) / 2
        searching = searching & (mid != tau)  # tau holds the last midpoint tried
        if not bool(searching.any()):
            break
        h = entropy_ref(z / mid.unsqueeze(-1))
        tau = torch.where(searching, mid, tau)
        done = (h - target).abs() < tol
        too_high = h > target
        hi = torch.where(searching & ~done & too_high, mid, hi)
        lo = torch.where(searching & ~done & ~too_high, mid, lo)
        searching = searching & ~done
    return (z / tau.unsqueeze(-1)).reshape(shape)

