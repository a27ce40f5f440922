"""The tolerance rule of every kernel test: a kernel's error against the float64
oracle may be at most twice the error of plain PyTorch doing the same computation (in float32,
the precision the kernels promise), plus a small absolute floor. NaNs must be where the oracle
has them."""

from __future__ import annotations

import torch


def written_out(z: torch.Tensor, tokens: torch.Tensor | None = None):
    """(entropy, log-probs of ``tokens`` or None) of softmax(z) over the last dim, by the
    textbook formulas (sum of entr(p), log_softmax at the token) in z's dtype: what the
    reference's own tests hold it to, independent of its code."""
    entropy = torch.special.entr(torch.softmax(z, -1)).sum(-1)
    if tokens is None:
        return entropy, None
    return entropy, torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def max_abs_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest |value - oracle| over the entries where the oracle is finite (0 if none)."""
    value = value.detach().double().cpu()
    oracle = oracle.detach().double().cpu()
    finite = torch.isfinite(oracle)
    if not bool(finite.any()):
        return 0.0
    return float((value[finite] - oracle[finite]).abs().max())


def assert_row_relative(grad: torch.Tensor, exact: torch.Tensor, bound: float, what: str):
    """Each row of grad within ``bound`` of float64's ``exact``, relative to that row's largest
    entry (for rows whose gradients are far below the absolute floors: confident rows)."""
    relative = (grad.detach().cpu().double() - exact).abs().amax(-1) / exact.abs().amax(-1)
    assert relative.max() < bound, f"{what}: {relative}"


def assert_matches_oracle(
    actual: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor, floor: float, what: str
) -> None:
    """Check ``actual`` against ``oracle`` with the error of ``baseline`` as the yardstick."""
    actual_c, oracle_c = actual.detach().double().cpu(), oracle.detach().double().cpu()
    assert actual_c.shape == oracle_c.shape, f"{what}: shape {actual_c.shape} != {oracle_c.shape}"
    nan_oracle = torch.isnan(oracle_c)
    assert torch.equal(torch.isnan(actual_c), nan_oracle), (
        f"{what}: NaN pattern differs from the oracle "
        f"({int(torch.isnan(actual_c).sum())} NaNs vs {int(nan_oracle.sum())})")
    inf_oracle = torch.isinf(oracle_c)
    assert torch.equal(actual_c[inf_oracle], oracle_c[inf_oracle]), f"{what}: infinities differ"
    bound = 2.0 * max_abs_error(baseline, oracle_c) + floor
    error = max_abs_error(actual_c, oracle_c)
    assert error <= bound, (
        f"{what}: max error {error:.3e} against the float64 oracle exceeds {bound:.3e} "
        f"(2 x plain PyTorch's {max_abs_error(baseline, oracle_c):.3e} + floor {floor:.1e})")
