"""Public entropy ops on logits: `entropy` and `logprobs_and_entropy`."""

from __future__ import annotations

import torch

from . import _checks
from ._backend import resolve_backend
from ._ops.entropy import softmax_stats


def entropy(
    logits: torch.Tensor, *, temperature: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim, in float32.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 with backend="torch"), any
            leading shape and strides. Entries equal to -inf are masked (probability 0). So,
            in the compiled backends, is a finite entry whose logit * log2(e) / T overflows
            float32 to -inf (finfo.min used as a mask): a row made only of such entries gives
            NaN like an all -inf row, where the "torch" backend sees a uniform row.
        temperature: finite positive number in [~4.2e-39, ~8.5e37] (the range float32 can
            scale by); every formula is on logits / temperature.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (see `available_backends()`).

    Returns:
        float32 tensor of shape (...). A row that is all -inf gives NaN; a NaN poisons only its
        own row. Differentiable w.r.t. logits (the gradient has the logits' dtype, and is exactly 0
        at every -inf entry); the forward keeps 8 bytes per row (entropy and logsumexp in float32)
        and the backward recomputes the probabilities from them, so log p is exact to about an ulp
        of |logsumexp| ~ |max logit| / T, and a row whose logsumexp overflows float32 (|logits| / T
        past ~3e38) gets a NaN gradient whatever its upstream gradient (at its -inf entries too,
        except on the "triton" backend). The compiled backends are deterministic and
        batch-invariant: a row's result has the same bits whatever the other rows and the batch
        size.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), 3.0]])
        >>> em_kernels.entropy(logits, backend="torch")
        tensor([1.3863, 0.3666])
    """
    temperature = _checks.check_temperature(temperature)
    _checks.check_logits(logits, backend)
    _checks.check_autograd_mode(logits, "entropy")
    backend = resolve_backend(backend, logits.device)
    rows = _checks.as_rows(logits)
    result, _, _ = softmax_stats(rows, None, temperature, backend)
    return result.reshape(logits.shape[:-1])


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(tokens) and the entropy per row, from one read of the logits (the RL path).

    Args:
        logits: (..., V) float32, bfloat16 or float16, any leading shape and strides.
        tokens: int64 of shape (...), ids in [0, V). On CPU tensors an id out of range raises
            ValueError at once. On CUDA tensors that check would need a host sync, so it is not
            made (set EM_KERNELS_CHECK_TOKENS=1 to make it), nor inside torch.compile on any
            device: the kernels give such a row a NaN log-prob and no log-prob gradient instead.
        temperature: finite positive number; p = softmax(logits / temperature).
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        (logprobs, entropy), float32, each of shape (...). Both are differentiable w.r.t. the
        logits, with any upstream gradients for both at once. A token whose logit is -inf has
        log-prob -inf and, like every -inf entry, gets a zero gradient.
    """
    temperature = _checks.check_temperature(temperature)
    _checks.check_logits(logits, backend)
    _checks.check_autograd_mode(logits, "logprobs_and_entropy")
    backend = resolve_backend(backend, logits.device)
    _checks.check_tokens(tokens, logits.shape[:-1], logits.shape[-1], logits.device)
    rows = _checks.as_rows(logits)
    result, _, logprobs = softmax_stats(
        rows, tokens.reshape(-1).contiguous(), temperature, backend)
    leading = logits.shape[:-1]
    return logprobs.reshape(leading), result.reshape(leading)
