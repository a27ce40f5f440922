"""The dispatcher ops behind `linear_entropy` (the LM head fused with the softmax statistics).

Two ops, registered with torch.library (fake kernels give the shapes, so torch.compile with
fullgraph=True traces them; no host sync on this path, except in a backward with gradient
filtering, which reads one count per vocab chunk):

    em_kernels::linear_entropy_stats(hidden[N, H], weight[V, H], bias[V]?, tokens[N]?,
                                     temperature, grad_filter_eps, backend)
        -> (entropy[N], lse[N], chosen[N] or [0])
    em_kernels::linear_entropy_backward(hidden, weight, bias?, tokens?, entropy, lse,
                                        grad_entropy, grad_lse, grad_chosen?, temperature,
                                        grad_filter_eps, need_grad_hidden, need_grad_weight,
                                        backend)
        -> (grad_hidden or [0], grad_weight or [0], grad_bias or [0])

with z = (hidden @ weight^T + bias) / T over this weight's rows (the whole vocabulary, or one
rank's shard), lse = logsumexp(z) (float64 but on MPS, `lse_dtype`: max + log s, where a float32
sum would round log s to an ulp of |lse|, all of it on a confident row), entropy = lse - sum_j p_j
z_j, and chosen = z[token] for tokens in [0, V) (NaN for the others: the caller turns it into
log p = chosen - lse). The backward takes the row's final (entropy, lse), which in vocab-parallel
mode are the full-vocabulary ones, and computes

    dz_j = (1/T) [ p_j (grad_lse - grad_entropy (z_j - lse + entropy)) + grad_chosen [j = token] ]

then d_hidden = dz @ W, d_weight = dz^T @ hidden, d_bias = sum_rows dz, one vocab chunk of dz at
a time (`chunked_backward`: a dz pass, then BLAS matmuls; no atomics, bitwise deterministic).
The gradients come in the inputs' dtypes (fp32 accumulation; float64 for float64 inputs, "torch"
backend only).

grad_filter_eps > 0 zeroes every row segment of DZ_TILE_COLS entries of dz whose entries are all
below it in magnitude (0 = off), which changes the gradients within the bound tested, and leaves
the rows that a chunk zeroes entirely out of that chunk's gradient matmuls (`chunked_backward`).
It is an input of the forward op only so that autograd can hand it to the backward.

``backend`` is already resolved: "triton" (Triton forward, em_kernels/triton/linear_entropy.py;
backward: a Triton kernel that recomputes the logits and writes dz, then the BLAS gradient
matmuls) or "torch" (any device: a chunked PyTorch forward over blocks of TORCH_ROW_CHUNK rows by
vocab chunks sized so that one block of logits holds TORCH_CHUNK_ELEMENTS numbers, and the same
chunked backward with the logits by BLAS and dz in torch; never N x V).
"""

from __future__ import annotations

import torch

from .. import reference
from . import (ADDMM_HAS_FLOAT32_OUT_DTYPE, autocast_off, batch_first, mm_to_float32,
               refuse_double_backward)
from .entropy import lse_dtype, split_lse

# One block of logits in the chunked torch path: 512 rows x 8192 vocab entries (16 MiB in fp32).
# The vocab chunk depends only on these constants, never on N (the BLAS may still round a row's
# logits differently in a batch of another size: this path is deterministic, not batch-invariant).
# 512 rows amortise the weight-chunk conversion to fp32 over many rows.
TORCH_ROW_CHUNK = 512
TORCH_CHUNK_ELEMENTS = 1 << 22

# The backward's chunk workspace (the dz buffer, plus an fp32 logits buffer on the torch path's
# 16-bit CUDA layout): 128 MiB, half of what the fp32 logits and dz buffers took together before
# the Triton dz kernel fused the logits in, while a chunk stays wide enough (8192 columns at
# N 8192 with bf16 on the Triton path, 19 chunks at V 152064; 2560 columns on the torch path's
# 16-bit CUDA layout) for cuBLAS to run at full speed.
BWD_CHUNK_BYTES = 128 << 20
# dz tile width: the Triton backward's tile is [BLOCK_N, DZ_TILE_COLS], the forward's 256-wide
# logit tile; chunk widths are multiples of it. Gradient filtering keeps or zeroes a row's
# DZ_TILE_COLS entries of a tile together (its segment), on both backends.
DZ_TILE_COLS = 256
# Filtering leaves a chunk's quiet rows (no kept segment) out of its gradient matmuls only when
# at most this fraction of rows is active: gathering the active rows of dz and h costs a pass
# over them, which dense matmuls on mostly active rows do not repay (an estimate: unmeasured).
SKIP_MAX_ACTIVE_FRACTION = 0.5

# Where a shift between two maxima (nats) multiplies a sum it is clamped here: exp of it is 0 in
# fp32 and float64, so the clamp changes nothing but 0 * -inf (an empty part, or maxima ~1e38
# apart, whose difference overflows) into 0 instead of NaN.
SHIFT_FLOOR = -1.0e4

_EMPTY = (0,)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.compute_dtype(dtype)


def merge_partials(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-chunk row statistics [4, chunks, N] = (max m_k, s_k = sum exp(z - m_k),
    t_k = sum exp(z - m_k)(z - m_k), chosen_k) over the chunk dim, in a fixed order.

    Returns (entropy, lse, chosen) with lse = m + log s (float64) and entropy = log s - t / s. A
    row with no finite logit has lse = -inf and entropy NaN; a NaN stays in its row."""
    part_max, part_sum, part_sum_z, part_chosen = partials.unbind(0)
    row_max = part_max.amax(0)
    safe_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    shift = (part_max - safe_max).clamp_min(SHIFT_FLOOR)
    scale = torch.exp(shift)
    total = (scale * part_sum).sum(0)
    total_z = (scale * (part_sum_z + part_sum * shift)).sum(0)
    log_total = torch.log(total)
    wide = lse_dtype(partials.device)
    return log_total - total_z / total, safe_max.to(wide) + log_total.to(wide), part_chosen.sum(0)


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
    lse = hidden.new_empty((rows,), dtype=lse_dtype(hidden.device))
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
            part_chosen = torch.zeros_like(part_max)
            if tokens is not None:
                local = tokens[row_start:row_end] - start
                inside = (local >= 0) & (local < end - start)
                picked = torch.gather(z, -1, local.clamp(0, end - start - 1).unsqueeze(-1))
                part_chosen = torch.where(inside, picked.squeeze(-1), part_chosen)
            shifted = z.sub_(safe_max.unsqueeze(-1))  # in place: z is this chunk's own buffer
            e = torch.exp(shifted)
            part_sum = e.sum(-1)
            # Masked entries (-inf) have e = 0; clamped, their e * shift is 0 * floor, not NaN.
            part_sum_z = torch.linalg.vecdot(e, shifted.clamp_(min=SHIFT_FLOOR))
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


def _torch_dz(hidden, weight_chunk, bias, vocab_start, tokens, entropy, lse_center, lse_offset,
              grad_entropy, grad_lse, grad_chosen, temperature, grad_filter_eps, segment, dz,
              kept):
    """The torch twin of `linear_entropy_dz` (em_kernels/triton/linear_entropy.py; same
    arguments, math and filtering segments): the chunk's logits by BLAS, in place in dz when dz
    has the stats dtype, else (16-bit dz on CUDA) in a stats-dtype buffer, then dz from them."""
    width = weight_chunk.shape[0]
    if dz.dtype == entropy.dtype:
        z = torch.mm(hidden, weight_chunk.T, out=dz)
    elif hidden.dtype == entropy.dtype:
        z = torch.mm(hidden, weight_chunk.T)
    else:  # fp32 logits from 16-bit operands on the tensor cores (CUDA only: no CPU kernel)
        z = mm_to_float32(hidden, weight_chunk.T)
    if bias is not None:
        z += bias[vocab_start:vocab_start + width].to(z.dtype)
    # dz = p (g_lse - g_E (log p + E)): the blocks alive at once are z and p only. log p is
    # z - lse with the float64 lse split in two (exact near the row max).
    log_p = z.div_(temperature).sub_(lse_center.unsqueeze(-1)).sub_(lse_offset.unsqueeze(-1))
    if tokens is not None:
        local = tokens - vocab_start
        index = local.clamp(0, width - 1).unsqueeze(-1)
        # A -inf chosen logit gets no one-hot term: 0, as every -inf entry.
        chosen_here = (local >= 0) & (local < width) & (log_p.gather(-1, index).squeeze(-1)
                                                         != float("-inf"))
    p = torch.exp(log_p)
    grad_z = log_p.masked_fill_(p == 0, 0.0).add_(entropy.unsqueeze(-1))
    grad_z = grad_z.mul_(-grad_entropy.unsqueeze(-1)).add_(grad_lse.unsqueeze(-1)).mul_(p)
    del p
    if tokens is not None:
        grad_z.scatter_add_(-1, index, grad_chosen.masked_fill(~chosen_here, 0.0).unsqueeze(-1))
    grad_z = grad_z.div_(temperature)
    if grad_filter_eps > 0:  # a row's segment of `segment` columns is kept or zeroed together
        padded = torch.nn.functional.pad(grad_z.abs(), (0, -width % segment))
        # amax passes a NaN on, and a NaN segment is kept (NaN < eps is False)
        segment_kept = ~padded.unflatten(1, (-1, segment)).amax(-1).lt(grad_filter_eps)
        kept.copy_(segment_kept)
        grad_z.masked_fill_(~segment_kept.repeat_interleave(segment, 1)[:, :width], 0.0)
    if grad_z.data_ptr() != dz.data_ptr():
        dz.copy_(grad_z)


def _triton_dz(*args):
    from ..triton import linear_entropy as triton_linear_entropy

    triton_linear_entropy.linear_entropy_dz(*args)


def backward_chunk_columns(rows: int, bytes_per_entry: int, vocab: int) -> int:
    """Vocab columns per backward chunk: the most that keep the chunk's buffers within
    BWD_CHUNK_BYTES, a multiple of DZ_TILE_COLS (so filtering segments align across chunks)."""
    columns = BWD_CHUNK_BYTES // max(1, rows * bytes_per_entry)
    columns = max(DZ_TILE_COLS, columns // DZ_TILE_COLS * DZ_TILE_COLS)
    return max(1, min(columns, vocab))


def chunked_backward(hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse,
                     grad_chosen, temperature, grad_filter_eps, need_grad_hidden,
                     need_grad_weight, backend):
    """The backward of both backends: for each chunk of Vc vocab columns
    (`backward_chunk_columns`),

        dz_c     = dz of (h @ W_c^T + b_c) / T   (Triton: one fused kernel that recomputes the
                                                   logits tile by tile; torch: BLAS then torch)
        d_W_c    = dz_c^T @ h                    (BLAS, written straight into its rows of d_W)
        d_b_c    = sum_rows dz_c                 (fp32)
        d_h_acc += dz_c @ W_c                    (fp32 accumulator, cast at the end)

    so d_W and d_b are complete per chunk and d_h is summed over chunks in a fixed order: no
    atomics, bitwise deterministic, and (without filtering) no host sync. With 16-bit CUDA inputs
    the matmuls take the 16-bit operands (tensor cores), dz is rounded to the operand dtype, d_W
    is written in the weight dtype (fp32 accumulation inside cuBLAS), and d_h accumulates in
    fp32. Elsewhere (CPU, fp32 or fp64 inputs) everything runs in the stats dtype. Extra memory:
    the chunk's dz buffer (plus an fp32 logits buffer on the torch backend's 16-bit CUDA path),
    <= BWD_CHUNK_BYTES, plus the fp32 d_h accumulator (N x H x 4: 112 MiB at N 8192, H 3584;
    twice that on 16-bit CUDA, where each chunk's addmm writes a fresh one), plus fp32 copies of
    h and of one weight chunk on the other path. Work at N 8192, H 3584, V 152064: three matmuls
    (~13 ms each on an H200), one write of dz, and 19 chunks' passes over the d_h accumulator.

    Gradient filtering (grad_filter_eps > 0) zeroes each row segment of dz whose entries are all
    below eps, and the dz pass says which segments it kept. A row with no kept segment in the
    chunk has dz = 0 there, so when at most SKIP_MAX_ACTIVE_FRACTION of the rows are active,
    d_W_c, d_b_c and d_h take only the active rows (gathered; d_h's rows written back with
    index_copy_, no atomics), and the two gradient matmuls shrink in proportion: on a confident
    model most rows put all their mass in a few chunks. The logits matmul stays dense (dz decides
    what is kept). Costs one host sync per chunk (the active count, 19 at N 8192, V 152064),
    inside the op, so the CPU queues the next chunk only after the GPU reaches it (not under CUDA
    graph capture: there every chunk runs dense); the gathered dz and h rows take up to about a
    chunk's dz buffer more memory. Speed unmeasured on a GPU."""
    stats_dtype = entropy.dtype
    rows, features = hidden.shape
    vocab = weight.shape[0]
    tensor_cores = hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16)
    if tensor_cores:
        operand_dtype, operand_hidden = hidden.dtype, hidden.contiguous()  # once, not per chunk
    else:
        operand_dtype, operand_hidden = stats_dtype, hidden.to(stats_dtype)
    bytes_per_entry = operand_hidden.element_size()
    if backend == "torch" and tensor_cores:
        bytes_per_entry += torch.finfo(stats_dtype).bits // 8  # the fp32 logits buffer
    dz_fn = _triton_dz if backend == "triton" else _torch_dz
    columns = backward_chunk_columns(rows, bytes_per_entry, vocab)
    gradient_dtype = weight.dtype if tensor_cores else stats_dtype
    grad_weight = (weight.new_empty((vocab, features), dtype=gradient_dtype) if need_grad_weight
                   else weight.new_empty(_EMPTY))
    grad_hidden = (hidden.new_zeros((rows, features), dtype=stats_dtype) if need_grad_hidden
                   else hidden.new_empty(_EMPTY))
    grad_bias = (hidden.new_empty((vocab,), dtype=stats_dtype) if bias is not None
                 else hidden.new_empty(_EMPTY))
    if rows == 0:
        if need_grad_weight:
            grad_weight.zero_()
        grad_bias.zero_()
    else:
        # A row with no distribution (every logit -inf: lse -inf, entropy NaN) gets dz = 0, as
        # every masked entry does and as the entropy ops give it: with lse, entropy and its
        # upstream gradients taken as 0 its p_j = exp(-inf - 0) = 0 multiplies finite numbers
        # only (else -inf - -inf = NaN, or the NaN upstream gradient a masked loss such as
        # sum(mask * H^2) hands such a row, which the shared gradient matmuls would spread to
        # every row's d_weight).
        no_distribution = lse == float("-inf")
        grad_entropy = grad_entropy.masked_fill(no_distribution, 0.0)
        grad_lse = grad_lse.masked_fill(no_distribution, 0.0)
        if grad_chosen is not None:
            grad_chosen = grad_chosen.masked_fill(no_distribution, 0.0)
        # The float64 lse as center + offset in the stats dtype: z - center - offset is log p
        # exact near the row max, where a float32 lse would round it to an ulp of |lse|.
        lse_center, lse_offset = split_lse(lse.masked_fill(no_distribution, 0.0), stats_dtype)
        entropy = entropy.masked_fill(no_distribution, 0.0)
        bias_used = bias.contiguous() if bias is not None else None
        tokens_used = tokens.contiguous() if tokens is not None else None
        dz_buffer = hidden.new_empty((rows * columns,), dtype=operand_dtype)
        filtering = grad_filter_eps > 0
        # Skipping reads the active count on the host, which a CUDA graph capture cannot do:
        # there the filtered dz goes through the dense matmuls (the same gradients, to rounding).
        skipping = filtering and not (hidden.is_cuda and torch.cuda.is_current_stream_capturing())
        segments = -(-columns // DZ_TILE_COLS)
        kept_buffer = hidden.new_empty((rows * segments,) if filtering else _EMPTY,
                                       dtype=torch.int8)
        for start in range(0, vocab, columns):
            end = min(start + columns, vocab)
            width = end - start
            dz = dz_buffer[:rows * width].view(rows, width)
            kept = (kept_buffer[:rows * -(-width // DZ_TILE_COLS)].view(rows, -1) if filtering
                    else None)
            weight_chunk = weight[start:end].to(operand_dtype)
            dz_fn(operand_hidden, weight_chunk, bias_used, start, tokens_used, entropy,
                  lse_center, lse_offset, grad_entropy, grad_lse, grad_chosen, temperature,
                  grad_filter_eps, DZ_TILE_COLS, dz, kept)
            active = None  # every row
            if skipping:
                active_rows = kept.any(1).nonzero().squeeze(1)  # one host sync per chunk
                if active_rows.numel() <= SKIP_MAX_ACTIVE_FRACTION * rows:
                    active = active_rows
            dz_used, hidden_used = dz, operand_hidden
            if active is not None:  # only the active rows: the others' dz is 0 in this chunk
                dz_used = dz.index_select(0, active)
                if need_grad_weight:
                    hidden_used = operand_hidden.index_select(0, active)
            if need_grad_weight:
                torch.mm(dz_used.T, hidden_used, out=grad_weight[start:end])
            if bias is not None:
                torch.sum(dz_used, 0, dtype=stats_dtype, out=grad_bias[start:end])
            if need_grad_hidden:
                grad_hidden = _accumulate_grad_hidden(grad_hidden, dz_used, weight_chunk, active,
                                                      tensor_cores)
    return (
        grad_hidden.to(hidden.dtype),
        grad_weight.to(weight.dtype),
        grad_bias.to(bias.dtype) if bias is not None else grad_bias,
    )


def _accumulate_grad_hidden(grad_hidden, dz, weight_chunk, active, tensor_cores):
    """grad_hidden (fp32 or float64) += dz @ W_c, on the rows `active` (an index tensor; None:
    every row, dz then [N, width]). Returns the accumulator (a new tensor on 16-bit CUDA)."""
    target = grad_hidden if active is None else grad_hidden.index_select(0, active)
    if tensor_cores and ADDMM_HAS_FLOAT32_OUT_DTYPE:
        # Not out=: addmm's out_dtype form with out= has had cuBLAS bugs (pytorch#154086); the
        # new buffer alternates with the old one (+N x H x 4).
        target = torch.addmm(target, dz, weight_chunk, out_dtype=grad_hidden.dtype)
    elif tensor_cores:  # torch < 2.10: the chunk's product is rounded to the 16-bit dtype first
        target.add_(torch.mm(dz, weight_chunk))
    else:
        target.addmm_(dz, weight_chunk)
    if active is None:
        return target
    return grad_hidden.index_copy_(0, active, target)


def _triton_fwd(hidden, weight, bias, tokens, temperature):
    from ..triton import linear_entropy as triton_linear_entropy

    partials = triton_linear_entropy.linear_entropy_fwd(hidden, weight, bias, tokens, temperature)
    entropy, lse, chosen = merge_partials(partials)
    if tokens is None:
        return entropy, lse, hidden.new_empty(_EMPTY, dtype=torch.float32)
    return entropy, lse, _nan_outside(chosen, tokens, weight.shape[0])


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
def _stats_like(hidden, weight, bias, tokens, temperature, grad_filter_eps, backend):
    """The forward's outputs, uninitialised (the fake kernel; also the vmap rule's buffers)."""
    rows = hidden.shape[0]
    dtype = _stats_dtype(hidden.dtype)
    return (
        hidden.new_empty((rows,), dtype=dtype),
        hidden.new_empty((rows,), dtype=lse_dtype(hidden.device)),
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
    # A backward run inside an autocast region would have its fp32 matmuls recast.
    with autocast_off(hidden.device.type):
        return chunked_backward(
            hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse, grad_chosen,
            temperature, grad_filter_eps, need_grad_hidden, need_grad_weight, backend)


@linear_entropy_backward.register_fake
def _(hidden, weight, bias, tokens, entropy, lse, grad_entropy, grad_lse, grad_chosen,
      temperature, grad_filter_eps, need_grad_hidden, need_grad_weight, backend):
    # Contiguous, as chunked_backward returns them, whatever the operands' strides (empty_like
    # would copy a transposed operand's).
    return (
        hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(_EMPTY),
        weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(_EMPTY),
        bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(_EMPTY),
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
refuse_double_backward("em_kernels::linear_entropy_backward", "linear_entropy")


def _linear_entropy_stats_vmap(info, in_dims, hidden, weight, bias, tokens, temperature,
                               grad_filter_eps, backend):
    """torch.vmap of the forward. Over hidden states (and tokens) with one shared head, the
    common case: one call on the flattened (B N, H) rows, which reads the head once where
    torch's per-sample fallback would read it B times. A batched head (or bias): one call per
    sample."""
    size = info.batch_size
    hidden = batch_first(hidden, in_dims[0], size)
    tokens = batch_first(tokens, in_dims[3], size)
    samples, rows = hidden.shape[:2]
    if in_dims[1] is None and in_dims[2] is None:
        entropy, lse, chosen = linear_entropy_stats(
            hidden.reshape(samples * rows, hidden.shape[-1]),
            weight, bias, None if tokens is None else tokens.reshape(samples * rows),
            temperature, grad_filter_eps, backend)
        entropy, lse = entropy.reshape(samples, rows), lse.reshape(samples, rows)
        if tokens is None:  # chosen is the empty placeholder, the same for every sample
            return (entropy, lse, chosen), (0, 0, None)
        return (entropy, lse, chosen.reshape(samples, rows)), (0, 0, 0)
    weight = batch_first(weight, in_dims[1], size)
    bias = batch_first(bias, in_dims[2], size)
    entropy, lse, chosen = _stats_like(
        hidden.reshape(samples * rows, hidden.shape[-1]), None, None,
        None if tokens is None else tokens.reshape(samples * rows), None, None, None)
    entropy, lse = entropy.view(samples, rows), lse.view(samples, rows)
    if tokens is not None:
        chosen = chosen.view(samples, rows)
    for b in range(samples):
        entropy[b], lse[b], chosen_b = linear_entropy_stats(
            hidden[b], weight[b], None if bias is None else bias[b],
            None if tokens is None else tokens[b], temperature, grad_filter_eps, backend)
        if tokens is not None:
            chosen[b] = chosen_b
    return (entropy, lse, chosen), (0, 0, 0 if tokens is not None else None)


torch.library.register_vmap("em_kernels::linear_entropy_stats", _linear_entropy_stats_vmap)
