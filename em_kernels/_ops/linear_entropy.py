"""The dispatcher ops behind `linear_entropy` (the LM head fused with the softmax statistics).

Two ops, registered with torch.library (fake kernels give the shapes, so torch.compile with
fullgraph=True traces them; no host sync on this path):

    em_kernels::linear_entropy_stats(hidden[N, H], weight[V, H], bias[V]?, tokens[N]?,
                                     temperature, grad_filter_eps, backend)
        -> (entropy[N], lse[N], chosen[N] or [0])
    em_kernels::linear_entropy_backward(hidden, weight, bias?, tokens?, entropy, lse,
                                        grad_entropy, grad_lse, grad_chosen?, temperature,
                                        grad_filter_eps, need_grad_hidden, need_grad_weight,
                                        backend)
        -> (grad_hidden or [0], grad_weight or [0], grad_bias or [0])

with z = (hidden @ weight^T + bias) / T over this weight's rows (the whole vocabulary, or one
rank's shard), lse = logsumexp(z), entropy = lse - sum_j p_j z_j, and chosen = z[token] for
tokens in [0, V) (NaN for the others: the caller turns it into log p = chosen - lse). The backward
takes the row's final (entropy, lse), which in vocab-parallel mode are the full-vocabulary ones,
and computes

    dz_j = (1/T) [ p_j (grad_lse - grad_entropy (z_j - lse + entropy)) + grad_chosen [j = token] ]

then d_hidden = dz @ W, d_weight = dz^T @ hidden, d_bias = sum_rows dz, never holding dz whole.
The results are float32 (float64 for float64 inputs, "torch" backend only).

grad_filter_eps > 0 drops every tile of dz whose entries are all below it in magnitude (0 = off);
it is an input of the forward op only so that autograd can hand it to the backward.

``backend`` is already resolved: "triton" (em_kernels/triton/linear_entropy.py) or "torch"
(chunked PyTorch below, any device: blocks of TORCH_ROW_CHUNK rows by vocab chunks sized so that
one block of logits holds TORCH_CHUNK_ELEMENTS numbers; never N x V).
"""

from __future__ import annotations

import torch

from .. import reference

# One block of logits in the chunked torch path: 512 rows x 8192 vocab entries (16 MiB in fp32).
# The vocab chunk depends only on these constants, never on N, so a row's result does not depend
# on the batch. 512 rows amortise the weight-chunk conversion to fp32 over many rows.
TORCH_ROW_CHUNK = 512
TORCH_CHUNK_ELEMENTS = 1 << 22

_EMPTY = (0,)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.compute_dtype(dtype)


def merge_partials(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-chunk row statistics [4, chunks, N] = (max m_k, s_k = sum exp(z - m_k),
    t_k = sum exp(z - m_k)(z - m_k), chosen_k) over the chunk dim, in a fixed order.

    Returns (entropy, lse, chosen) with lse = m + log s and entropy = log s - t / s. A row with no
    finite logit has lse = -inf and entropy NaN; a NaN stays in its row."""
    part_max, part_sum, part_sum_z, part_chosen = partials.unbind(0)
    row_max = part_max.amax(0)
    safe_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    scale = torch.exp(part_max - safe_max)
    shift = torch.where(part_max == float("-inf"), torch.zeros_like(part_max), part_max - safe_max)
    total = (scale * part_sum).sum(0)
    total_z = (scale * (part_sum_z + part_sum * shift)).sum(0)
    log_total = torch.log(total)
    return log_total - total_z / total, safe_max + log_total, part_chosen.sum(0)


def _torch_logits(hidden_rows, weight, bias, start, end, temperature, dtype):
    z = hidden_rows @ weight[start:end].to(dtype).T
    if bias is not None:
        z += bias[start:end].to(dtype)
    return z.div_(temperature)


def _torch_vocab_chunk(vocab: int) -> int:
    return max(1, min(vocab, TORCH_CHUNK_ELEMENTS // TORCH_ROW_CHUNK))


def _torch_fwd(hidden, weight, bias, tokens, temperature):
    dtype = _stats_dtype(hidden.dtype)
    rows, vocab = hidden.shape[0], weight.shape[0]
    vocab_chunk = _torch_vocab_chunk(vocab)
    entropy = hidden.new_empty((rows,), dtype=dtype)
    lse = torch.empty_like(entropy)
    chosen = hidden.new_empty((rows,) if tokens is not None else _EMPTY, dtype=dtype)
    for row_start in range(0, rows, TORCH_ROW_CHUNK):
        row_end = min(row_start + TORCH_ROW_CHUNK, rows)
        hidden_rows = hidden[row_start:row_end].to(dtype)
        parts = []
        for start in range(0, vocab, vocab_chunk):
            end = min(start + vocab_chunk, vocab)
            z = _torch_logits(hidden_rows, weight, bias, start, end, temperature, dtype)
            part_max = z.amax(-1)
            safe_max = torch.where(
                part_max == float("-inf"), torch.zeros_like(part_max), part_max)
            shifted = z - safe_max.unsqueeze(-1)
            e = torch.exp(shifted)
            part_sum = e.sum(-1)
            part_sum_z = torch.linalg.vecdot(e, shifted.masked_fill_(e == 0, 0.0))
            part_chosen = torch.zeros_like(part_max)
            if tokens is not None:
                local = tokens[row_start:row_end] - start
                inside = (local >= 0) & (local < end - start)
                picked = torch.gather(z, -1, local.clamp(0, end - start - 1).unsqueeze(-1))
                part_chosen = torch.where(inside, picked.squeeze(-1), part_chosen)
            parts.append(torch.stack([part_max, part_sum, part_sum_z, part_chosen]))
        block_entropy, block_lse, block_chosen = merge_partials(torch.stack(parts, 1))
        entropy[row_start:row_end] = block_entropy
        lse[row_start:row_end] = block_lse
        if tokens is not None:
            chosen[row_start:row_end] = block_chosen
    if tokens is not None:
        chosen = _nan_outside(chosen, tokens, vocab)
    return entropy, lse, chosen


def _nan_outside(chosen, tokens, vocab):
    """An id outside [0, V) has no logit here: NaN (no host sync)."""
    in_range = (tokens >= 0) & (tokens < vocab)
    return torch.where(in_range, chosen, torch.full_like(chosen, float("nan")))


def _torch_bwd(hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse, grad_chosen,
               temperature, grad_filter_eps, need_grad_hidden, need_grad_weight):
    dtype = _stats_dtype(hidden.dtype)
    rows, features = hidden.shape
    vocab = weight.shape[0]
    vocab_chunk = _torch_vocab_chunk(vocab)
    grad_hidden = (hidden.new_zeros((rows, features), dtype=dtype) if need_grad_hidden
                   else hidden.new_empty(_EMPTY))
    grad_weight = (weight.new_zeros((vocab, features), dtype=dtype) if need_grad_weight
                   else weight.new_empty(_EMPTY))
    grad_bias = (bias.new_zeros((vocab,), dtype=dtype) if bias is not None
                 else hidden.new_empty(_EMPTY))
    for row_start in range(0, rows, TORCH_ROW_CHUNK):
        row_end = min(row_start + TORCH_ROW_CHUNK, rows)
        block = slice(row_start, row_end)
        hidden_rows = hidden[block].to(dtype)
        row_lse = lse[block].to(dtype).unsqueeze(-1)
        row_entropy = entropy[block].to(dtype).unsqueeze(-1)
        row_grad_entropy = grad_entropy[block].to(dtype).unsqueeze(-1)
        row_grad_lse = grad_lse[block].to(dtype).unsqueeze(-1)
        for start in range(0, vocab, vocab_chunk):
            end = min(start + vocab_chunk, vocab)
            # dz = p (g_lse - g_E (log p + E)), built in place on the logits block: the blocks
            # alive at once are z and p only.
            log_p = _torch_logits(
                hidden_rows, weight, bias, start, end, temperature, dtype).sub_(row_lse)
            p = torch.exp(log_p)
            dz = log_p.masked_fill_(p == 0, 0.0).add_(row_entropy).mul_(-row_grad_entropy)
            dz = dz.add_(row_grad_lse).mul_(p)
            del p
            if tokens is not None:
                local = tokens[block] - start
                inside = (local >= 0) & (local < end - start)
                add = grad_chosen[block].to(dtype).masked_fill(~inside, 0.0)
                dz.scatter_add_(
                    -1, local.clamp(0, end - start - 1).unsqueeze(-1), add.unsqueeze(-1))
            dz = dz.div_(temperature)
            if grad_filter_eps > 0:
                # Same semantics as the Triton kernel with this block as the tile (no host sync,
                # so no time is saved here: the chunked path is the correct-everywhere one).
                dz = dz.masked_fill_(dz.abs().amax() < grad_filter_eps, 0.0)
            if need_grad_hidden:
                grad_hidden[block] += dz @ weight[start:end].to(dtype)
            if need_grad_weight:
                grad_weight[start:end] += dz.T @ hidden_rows
            if bias is not None:
                grad_bias[start:end] += dz.sum(0)
    return (
        grad_hidden.to(hidden.dtype),
        grad_weight.to(weight.dtype),
        grad_bias.to(bias.dtype) if bias is not None else grad_bias,
    )


def _triton_fwd(hidden, weight, bias, tokens, temperature):
    from ..triton import linear_entropy as triton_linear_entropy

    partials = triton_linear_entropy.linear_entropy_fwd(hidden, weight, bias, tokens, temperature)
    entropy, lse, chosen = merge_partials(partials)
    if tokens is None:
        return entropy, lse, hidden.new_empty(_EMPTY, dtype=torch.float32)
    return entropy, lse, _nan_outside(chosen, tokens, weight.shape[0])


def _triton_bwd(*args):
    from ..triton import linear_entropy as triton_linear_entropy

    return triton_linear_entropy.linear_entropy_bwd(*args)


@torch.library.custom_op("em_kernels::linear_entropy_stats", mutates_args=())
def linear_entropy_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor | None,
    temperature: float,
    grad_filter_eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    implementation = _triton_fwd if backend == "triton" else _torch_fwd
    return implementation(hidden, weight, bias, tokens, temperature)


@linear_entropy_stats.register_fake
def _(hidden, weight, bias, tokens, temperature, grad_filter_eps, backend):
    rows = hidden.shape[0]
    dtype = _stats_dtype(hidden.dtype)
    return (
        hidden.new_empty((rows,), dtype=dtype),
        hidden.new_empty((rows,), dtype=dtype),
        hidden.new_empty((rows,) if tokens is not None else _EMPTY, dtype=dtype),
    )


@torch.library.custom_op("em_kernels::linear_entropy_backward", mutates_args=())
def linear_entropy_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor | None,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_chosen: torch.Tensor | None,
    temperature: float,
    grad_filter_eps: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    implementation = _triton_bwd if backend == "triton" else _torch_bwd
    return implementation(
        hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse, grad_chosen,
        temperature, grad_filter_eps, need_grad_hidden, need_grad_weight)


@linear_entropy_backward.register_fake
def _(hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse, grad_chosen,
      temperature, grad_filter_eps, need_grad_hidden, need_grad_weight, backend):
    return (
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(_EMPTY),
        torch.empty_like(weight) if need_grad_weight else weight.new_empty(_EMPTY),
        torch.empty_like(bias) if bias is not None else hidden.new_empty(_EMPTY),
    )


def backward_from_row_grads(hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse,
                            grad_chosen, temperature, grad_filter_eps, needs_input_grad, backend):
    """Call the backward op with upstream row gradients (None = zero); returns the gradients of
    (hidden, weight, bias), None where not needed. Shared by the registered autograd and the
    vocab-parallel autograd.Function."""
    need_hidden, need_weight, need_bias = needs_input_grad
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    dtype = entropy.dtype

    def row_grad(grad):
        return torch.zeros_like(entropy) if grad is None else grad.to(dtype).contiguous()

    if tokens is None or grad_chosen is None:
        tokens_used, grad_chosen = None, None
    else:
        tokens_used, grad_chosen = tokens, row_grad(grad_chosen)
    grad_hidden, grad_weight, grad_bias = linear_entropy_backward(
        hidden, weight, bias, tokens_used, entropy, lse, row_grad(grad_entropy),
        row_grad(grad_lse), grad_chosen, temperature, grad_filter_eps, need_hidden,
        need_weight, backend)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, grad_filter_eps, backend = inputs
    entropy, lse, _ = output
    ctx.save_for_backward(hidden, weight, bias, tokens, entropy, lse)
    ctx.temperature = temperature
    ctx.grad_filter_eps = grad_filter_eps
    ctx.backend = backend


def _backward(ctx, grad_entropy, grad_lse, grad_chosen):
    hidden, weight, bias, tokens, entropy, lse = ctx.saved_tensors
    grads = backward_from_row_grads(
        hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse, grad_chosen,
        ctx.temperature, ctx.grad_filter_eps, tuple(ctx.needs_input_grad[:3]), ctx.backend)
    return (*grads, None, None, None, None)


torch.library.register_autograd(
    "em_kernels::linear_entropy_stats", _backward, setup_context=_setup_context)
