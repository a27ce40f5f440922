"""The softmax-statistics ops behind `entropy` and `logprobs_and_entropy`.

Two dispatcher ops, registered with torch.library so that torch.compile(fullgraph=True) traces
through them (fake kernels give the output shapes; no host sync happens on this path):

    em_kernels::softmax_stats(logits[N, V], tokens[N]?, temperature, backend)
        -> (entropy[N], lse[N], logprobs[N] or [0])        lse float64, the others float32
    em_kernels::softmax_stats_backward(logits, tokens?, entropy, lse, grad_entropy[N],
                                       grad_logprobs[N]?, temperature, backend) -> grad_logits

lse is logsumexp(logits / T) (natural log), in float64: a float32 lse rounds log s away on a
confident row (csrc/include/em/softmax_stats.h). The forward saves only (entropy, lse): 12 bytes
per row; the backward recomputes p from the logits and those two numbers:

    dH/dz_j  = -(1/T) p_j (z_j / T - lse + H)
    dlp/dz_j =  (1/T) (onehot(y)_j - p_j)     (no one-hot for an id outside [0, V))

Both ops take 2-D logits whose last dim is contiguous (stride 1) and any row stride; the public
functions in em_kernels/entropy.py reshape and validate. The forward's body is also a plain
function, `softmax_stats_impl`, which they call directly in eager mode when nothing is to be
differentiated (the custom-op dispatch costs tens of microseconds of Python per call, as much
as the op itself at decode sizes). ``backend`` is already resolved (never
"auto") and picks the implementation: em_kernels.triton.entropy, the compiled extension
(torch.ops.em_C, CPU and CUDA), or the float32 reference.
"""

from __future__ import annotations

import torch

from .. import _checks, reference
from . import batch_first, refuse_double_backward

_EMPTY_SHAPE = (0,)


def lse_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the saved lse: float64 (see the module docstring), but float32 on Apple's MPS,
    which has no float64 (there confident rows keep float32's rounding of log s)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _torch_fwd(logits, tokens, temperature, stats_dtype=torch.float32):
    """The reference statistics: entropy and logprobs in ``stats_dtype`` (the op's float32;
    float64 keeps float64 logits exact for linear_entropy_loss), lse in float64 as max + log s,
    the log of the sum relative to the max (the float32 logsumexp would round it to |lse|);
    float32 on MPS (`lse_dtype`)."""
    z = logits.to(reference.compute_dtype(logits.dtype)) / temperature
    row_max = z.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    wide = lse_dtype(z.device)
    lse = row_max.squeeze(-1).to(wide) + torch.log(torch.exp(z - row_max).sum(-1)).to(wide)
    entropy = reference.entropy_ref(z)
    if tokens is None:
        logprobs = z.new_empty(_EMPTY_SHAPE)
    else:
        # An id outside [0, V) gets a NaN log-prob, as in the kernels (no host sync).
        in_range = (tokens >= 0) & (tokens < z.shape[-1])
        chosen = torch.gather(z, -1, tokens.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        logprobs = torch.where(in_range, chosen - lse, torch.full_like(lse, float("nan")))
    return entropy.to(stats_dtype), lse, logprobs.to(stats_dtype)


def split_lse(lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, offset) in ``dtype`` with center + offset = the float64 lse to dtype's rounding
    of the small offset: z - center - offset is then log p exact near the row max, where center
    is close to z (offset 0 when dtype is lse's own)."""
    center = lse.to(dtype)
    return center, (lse - center.to(lse.dtype)).to(dtype)


def _torch_bwd(logits, tokens, entropy, lse, grad_entropy, grad_logprobs, temperature):
    z = logits.to(reference.compute_dtype(logits.dtype)) / temperature
    center, offset = split_lse(lse, z.dtype)
    logp = z - center.unsqueeze(-1) - offset.unsqueeze(-1)
    p = logp.exp()
    # p == 0 where z == -inf: guard 0 * -inf.
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    grad = -grad_entropy.unsqueeze(-1) * p * (safe_logp + entropy.unsqueeze(-1))
    if grad_logprobs is not None:
        grad = grad - grad_logprobs.unsqueeze(-1) * p
        # The one-hot only at an id inside the row: one outside has its logit elsewhere (a
        # vocabulary shard), so its log-prob gradient here is lse's alone.
        in_range = (tokens >= 0) & (tokens < z.shape[-1])
        grad.scatter_add_(
            -1, tokens.clamp(0, z.shape[-1] - 1).unsqueeze(-1),
            torch.where(in_range, grad_logprobs, 0.0).unsqueeze(-1).to(grad.dtype))
    # A -inf logit gets exactly 0 (the contract of every backend), even as the chosen token.
    grad = torch.where(z == float("-inf"), torch.zeros_like(grad), grad)
    return (grad / temperature).to(logits.dtype)


def _fwd_impl(backend: str):
    if backend == "triton":
        from ..triton import entropy as triton_entropy

        return triton_entropy.softmax_stats_fwd
    if backend in ("cpu", "cuda"):
        return torch.ops.em_C.softmax_stats_fwd
    return _torch_fwd


def _bwd_impl(backend: str):
    if backend == "triton":
        from ..triton import entropy as triton_entropy

        return triton_entropy.softmax_stats_bwd
    if backend in ("cpu", "cuda"):
        return torch.ops.em_C.softmax_stats_bwd
    return _torch_bwd


def softmax_stats_impl(
    logits: torch.Tensor, tokens: torch.Tensor | None, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward op's body; eager callers on real tensors that need no gradient may call it
    directly (see em_kernels/entropy.py)."""
    return _fwd_impl(backend)(logits, tokens, temperature)


@torch.library.custom_op("em_kernels::softmax_stats", mutates_args=())
def softmax_stats(
    logits: torch.Tensor, tokens: torch.Tensor | None, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return softmax_stats_impl(logits, tokens, temperature, backend)


@softmax_stats.register_fake
def _(logits, tokens, temperature, backend):
    rows = logits.shape[0]
    logprobs_shape = (rows,) if tokens is not None else _EMPTY_SHAPE
    return (
        logits.new_empty((rows,), dtype=torch.float32),
        logits.new_empty((rows,), dtype=lse_dtype(logits.device)),
        logits.new_empty(logprobs_shape, dtype=torch.float32),
    )


@torch.library.custom_op("em_kernels::softmax_stats_backward", mutates_args=())
def softmax_stats_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor | None,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    return _bwd_impl(backend)(
        logits, tokens, entropy, lse, grad_entropy, grad_logprobs, temperature)


@softmax_stats_backward.register_fake
def _(logits, tokens, entropy, lse, grad_entropy, grad_logprobs, temperature, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, backend = inputs
    entropy, lse, _ = output
    ctx.save_for_backward(logits, tokens, entropy, lse)
    ctx.temperature = temperature
    ctx.backend = backend


def backward_from_stats(logits, tokens, entropy, lse, grad_entropy, grad_logprobs,
                        temperature, backend):
    """The backward op on upstream row gradients as autograd hands them over (None: zero; an
    empty grad_logprobs: none), from the saved (entropy, lse): the registered autograd's and the
    vocab-parallel one's (em_kernels/entropy.py), which saves full-vocabulary statistics."""
    if grad_entropy is None:  # if torch stops passing zeros for an unused output (2.14 does)
        grad_entropy = torch.zeros_like(entropy)
    if tokens is None or grad_logprobs is None or grad_logprobs.numel() == 0:
        tokens = grad_logprobs = None
    else:
        grad_logprobs = grad_logprobs.float().contiguous()
    return softmax_stats_backward(
        logits, tokens, entropy, lse, grad_entropy.float().contiguous(), grad_logprobs,
        temperature, backend)


def _backward(ctx, grad_entropy, grad_lse, grad_logprobs):
    logits, tokens, entropy, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    grad_logits = backward_from_stats(logits, tokens, entropy, lse, grad_entropy, grad_logprobs,
                                      ctx.temperature, ctx.backend)
    return grad_logits, None, None, None


torch.library.register_autograd(
    "em_kernels::softmax_stats", _backward, setup_context=_setup_context)
refuse_double_backward("em_kernels::softmax_stats_backward", "entropy / logprobs_and_entropy")


# torch.vmap: both ops take a batch of rows already, so a vmapped call is one call on the
# flattened (B * N) rows rather than torch's fallback, a loop over the B samples.

def _softmax_stats_vmap(info, in_dims, logits, tokens, temperature, backend):
    logits = batch_first(logits, in_dims[0], info.batch_size)
    batch, rows, _ = logits.shape
    tokens = batch_first(tokens, in_dims[1], info.batch_size)
    entropy, lse, logprobs = softmax_stats(
        _checks.as_rows(logits), None if tokens is None else tokens.reshape(-1), temperature,
        backend)
    if tokens is None:  # logprobs is the empty placeholder, the same for every sample
        return (entropy.reshape(batch, rows), lse.reshape(batch, rows), logprobs), (0, 0, None)
    return tuple(out.reshape(batch, rows) for out in (entropy, lse, logprobs)), (0, 0, 0)


def _softmax_stats_backward_vmap(info, in_dims, logits, tokens, entropy, lse, grad_entropy,
                                 grad_logprobs, temperature, backend):
    logits = batch_first(logits, in_dims[0], info.batch_size)
    per_row = [batch_first(x, dim, info.batch_size)
               for x, dim in zip((tokens, entropy, lse, grad_entropy, grad_logprobs), in_dims[1:6])]
    per_row = [None if x is None else x.reshape(-1) for x in per_row]
    grad = softmax_stats_backward(_checks.as_rows(logits), *per_row, temperature, backend)
    return grad.reshape(logits.shape), 0


torch.library.register_vmap("em_kernels::softmax_stats", _softmax_stats_vmap)
torch.library.register_vmap("em_kernels::softmax_stats_backward", _softmax_stats_backward_vmap)
