"""The dispatcher op behind `linear_entropy_loss`: a weighted sum of the rows' entropies and
log-probs, fused with the LM head, whose gradients are computed in its forward.

    em_kernels::linear_entropy_loss(hidden[N, H], weight[V, H], bias[V]?, tokens[N]?,
                                    entropy_weight[N], logprob_weight[N]?, advantages[N]?,
                                    old_logprobs[N]?, ref_logprobs[N]?, clip_low, clip_high,
                                    kl_weight, temperature, need_grad_hidden, need_grad_weight,
                                    need_grad_bias, backend)
        -> (loss[], entropy[N], logprobs[N] or [0], grad_hidden or [0], grad_weight or [0],
            grad_bias or [0], grad_scale[])

    loss = sum_r entropy_weight[r] H_r + logprob_weight[r] f_r(log p_r(tokens[r]))

with f_r(lp) = lp, or, given advantages (policy mode, `policy_terms`), PPO's clipped surrogate
plus kl_weight times the k3 estimate of KL(pi || pi_ref):

    f_r(lp) = -min(rho A_r, clip(rho, 1 - clip_low, 1 + clip_high) A_r) + kl_weight k3,
    rho = exp(lp - old_r),  k3 = exp(c) - c - 1,  c = clamp(ref_r - lp, -K3_MAX_LOG_RATIO, +...)

(old_logprobs None: rho = exp(lp - lp), on-policy; ref_logprobs None: no KL term). Each row's
f depends on its own log-prob only, which the chunk's statistics give before dz, so its
derivative is the row's upstream log-prob gradient there: three matmuls for a PPO/GRPO loss too.

The gradients returned are those of the loss divided by grad_scale, the power of two at or
below the largest finite row weight's magnitude (times |A| + kl_weight in policy mode), so that
dz, which carries the weights, stays O(p) in a 16-bit dtype and rounds as it would unscaled.

The op has no autograd formula of its own: `LinearEntropyLossFunction` wraps it, keeps the
gradients it returns, and hands them to autograd in the backward (torch.compile traces both).

Why a second op: `linear_entropy` takes any upstream gradients, which autograd hands over only in
the backward, so its backward must recompute the logits: four matmuls of N x H x V in all, at
best 1.33x the three of a linear layer. A loss whose upstream gradients are known in the forward
(EM-FT's mean entropy, a policy-gradient sum of advantage-weighted log-probs) needs no
recomputation. For each chunk of R rows (`loss_chunk_rows`):

    z_c      = h_c @ W^T + b                 (BLAS, R x V logits in the input dtype)
    H, lse   = softmax statistics of z_c / T (the entropy kernels of `backend`)
    dz_c     = d loss / d z_c                (the entropy backward kernel; in place over z_c on
                                              the Triton backend, a second buffer elsewhere)
    d_h_c    = dz_c @ W                      (BLAS, complete for these rows)
    d_W     += dz_c^T @ h_c                  (BLAS, accumulated in the weight's dtype; float32
                                              for float16, see gradient_accumulation_dtype)
    d_b     += sum_rows dz_c                 (fp32)

Three matmuls plus, per chunk, one write and one read of the logits for the statistics and one
read and one write for dz (in bf16 at N 8192, V 152064: ~2.5 GB each over all chunks, ~0.5 ms at
an H200's bandwidth), and N / R read+write passes of d_W by the accumulating matmul. The backward
only scales the saved gradients, in place, by the upstream gradient of the loss (one pass over
them).

Precision: the logits are rounded to the input dtype, as a model's own LM head rounds them
(`linear_entropy` keeps them in fp32); with 16-bit inputs the statistics are in fp32, dz is
rounded to the input dtype for the tensor cores, and a bf16 d_W takes one rounding per row chunk
(a float16 one sums in float32 and rounds once, in the backward). Extra memory: the chunk buffer
(LOSS_CHUNK_BYTES) and O(N) statistics; the gradients themselves live from the forward to the
backward (float16's d_W and d_b in float32 there, twice their size, plus their float16 copy at
the end of the backward). Deterministic: no atomics, a fixed chunk order.

Vocab-parallel mode (`linear_entropy_loss(process_group=...)`) runs the same loop eagerly, outside
the op: each chunk's shard statistics are merged across the ranks (two all-reduces of R-vectors)
before dz, and d_h is summed across the ranks once at the end (see `loss_and_grads`).
"""

from __future__ import annotations

import functools

import torch

from .. import reference
from . import ADDMM_HAS_FLOAT32_OUT_DTYPE, double_backward_error
from .entropy import _EMPTY_SHAPE, _bwd_impl, _fwd_impl, _torch_fwd

# The row chunk's logits buffer, plus its gradient buffer off the Triton backend: 256 MiB, so
# that the op stays under 0.5 GiB of extra memory while a chunk keeps 768 rows at V 152064 in
# bf16 (882 fit, rounded down to ROW_ALIGN), and d_W's accumulating matmul (K = rows) stays
# compute-bound. The "torch" backend's reference statistics add fp32 temporaries of a few
# chunk sizes on top.
LOSS_CHUNK_BYTES = 256 << 20
# Chunk rows are a multiple of this when at least that many fit: the M tile of the BLAS kernels.
ROW_ALIGN = 128
# k3's log ratio ref - lp is clamped to +-this (as em_algos.k3_kl), so that the KL stays finite.
K3_MAX_LOG_RATIO = 20.0


def loss_chunk_rows(rows: int, vocab: int, bytes_per_entry: int) -> int:
    """Rows per chunk: the most whose [rows, V] buffers fit in LOSS_CHUNK_BYTES (at least 1)."""
    fit = LOSS_CHUNK_BYTES // max(1, vocab * bytes_per_entry)
    if fit >= ROW_ALIGN:
        fit -= fit % ROW_ALIGN
    return max(1, min(fit, rows))


_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000),
                  torch.float64: (torch.int64, 0x7FF0000000000000)}


def _power_of_two_floor(value: torch.Tensor) -> torch.Tensor:
    """2^floor(log2(value)) for a positive normal float32/float64 tensor, exactly: its exponent
    bits alone (0 for 0 and subnormals)."""
    int_dtype, mask = _EXPONENT_BITS[value.dtype]
    return (value.view(int_dtype) & mask).view(value.dtype)


def _chunk_logits(hidden_rows, weight, bias, out):
    if bias is None:
        return torch.mm(hidden_rows, weight.T, out=out)
    return torch.addmm(bias, hidden_rows, weight.T, out=out)


def gradient_accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op sums d_weight and d_bias in over the row chunks, and returns them in:
    the parameter's own, except float16's, whose 65504 the unit-scaled sums can pass (each is
    a sum over all N rows of dz ~ p times h, before the backward applies the row weights'
    scale: 8192 rows of a frequent token with a feature of 40 passed it in a mean-entropy loss
    whose true d_weight was 12), where the true gradient is far inside the range: float32
    there. The backward rounds to float16 once, after the upstream gradient (a loss scaler's,
    say) is applied."""
    return torch.float32 if dtype == torch.float16 else dtype


# Without cuBLAS's float32-output form, a float16 chunk's d_W product is formed in vocab
# blocks whose temporaries take at most this many bytes: O(1) memory, where the whole product
# would be a second V x H.
PRODUCT_BLOCK_BYTES = 16 << 20


def add_weight_gradient(grad_weight: torch.Tensor, grad_logits: torch.Tensor,
                        hidden_rows: torch.Tensor, first: bool) -> None:
    """grad_weight += grad_logits^T @ hidden_rows; the first chunk writes over the buffer
    instead (beta 0: neither a zero fill nor a read of it, one V x H pass saved). A float32
    accumulator with float16 operands (`gradient_accumulation_dtype`) takes cuBLAS's
    float32-output GEMM on CUDA, at the 16-bit tensor-core rate. Without it, vocab blocks:
    on CUDA (torch < 2.10) a block's product stays on the tensor cores and is rounded to float16
    before it is added (so one chunk's sum over its rows must fit float16); elsewhere the
    operands are converted to float32 first (exact)."""
    beta = 0.0 if first else 1.0
    if grad_weight.dtype == grad_logits.dtype:
        torch.addmm(grad_weight, grad_logits.T, hidden_rows, beta=beta, out=grad_weight)
        return
    if grad_logits.is_cuda and ADDMM_HAS_FLOAT32_OUT_DTYPE:
        torch.addmm(grad_weight, grad_logits.T, hidden_rows, beta=beta,
                    out_dtype=grad_weight.dtype, out=grad_weight)
        return
    product_dtype = grad_logits.dtype if grad_logits.is_cuda else grad_weight.dtype
    hidden_rows = hidden_rows.to(product_dtype)
    rows, features = hidden_rows.shape
    block = max(1, PRODUCT_BLOCK_BYTES // (grad_weight.element_size() * (rows + features)))
    for start in range(0, grad_logits.shape[1], block):
        product = torch.mm(grad_logits[:, start:start + block].T.to(product_dtype), hidden_rows)
        target = grad_weight[start:start + block]
        if first:
            target.copy_(product)
        else:
            target.add_(product)


def policy_terms(logprobs, advantages, old_logprobs, ref_logprobs, clip_low: float,
                 clip_high: float, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the policy loss f(lp) of the module docstring and its derivative f'(lp): the
    derivative of the unclipped ratio (and of the unclamped k3 log ratio) wherever it lies in
    its clip range, bounds included, else 0; where the two branches of the min tie, half from
    each (torch.minimum's rule). Away from those measure-zero points this is what autograd
    gives the plain PyTorch form; on them torch versions differ (2.14's clamp passes nothing on
    its bounds). On-policy (old_logprobs None) the ratio is exp(lp - lp), 1 for a finite
    log-prob and NaN otherwise, as exp(lp - lp.detach()) gives. A NaN log-prob (an id outside
    the vocabulary) gets f' = 0, so that its NaN stays in the loss and out of the shared
    d_weight."""
    ratio = torch.exp(logprobs - (logprobs if old_logprobs is None else old_logprobs))
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    unclipped_term, clipped_term = ratio * advantages, clipped * advantages
    loss = -torch.minimum(unclipped_term, clipped_term)
    inside = (ratio >= 1 - clip_low) & (ratio <= 1 + clip_high)
    # d(-min)/dlp = -A rho (the unclipped branch's share + the clipped one's, which has rho's
    # derivative only inside the clip range); a tie splits the gradient between the two
    share = torch.where(unclipped_term < clipped_term, 1.0,
                        torch.where(unclipped_term == clipped_term, 0.5, 0.0))
    total_share = share + torch.where(inside, 1.0 - share, 0.0)
    # a share of 0 gives 0 even where A rho overflows (not 0 * inf)
    grad = torch.where(total_share > 0, -advantages * ratio * total_share, 0.0)
    if ref_logprobs is not None and kl_weight != 0:
        gap = ref_logprobs - logprobs
        log_ratio = gap.clamp(-K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO)
        loss = loss + kl_weight * (torch.exp(log_ratio) - log_ratio - 1)
        within = (gap >= -K3_MAX_LOG_RATIO) & (gap <= K3_MAX_LOG_RATIO)
        grad = grad + kl_weight * torch.where(within, 1 - torch.exp(log_ratio), 0.0)
    return loss, torch.where(torch.isnan(logprobs), 0.0, grad)


def loss_and_grads(hidden, weight, bias, tokens, entropy_weight, logprob_weight, advantages,
                   old_logprobs, ref_logprobs, clip_low, clip_high, kl_weight, temperature,
                   need_grad_hidden, need_grad_weight, need_grad_bias, backend, shard=None):
    """The op's implementation (see the module docstring); every backend of the entropy ops.

    ``shard`` (an em_kernels._vocab_parallel.VocabShard, eager only: not through the op) runs
    vocab-parallel mode, where weight and bias are this rank's shard and tokens are global ids.
    Each chunk's shard statistics are merged across the ranks before dz, so dz is this shard's
    slice of the full-vocabulary one, and d_hidden is summed across the ranks at the end. A row
    whose token another rank owns has a local id outside [0, V_r), which the entropy backward
    kernels give exactly the log-prob's -p term and no one-hot."""
    if need_grad_bias and bias is None:
        raise ValueError("need_grad_bias is set but there is no bias")
    if advantages is not None and (logprob_weight is None or tokens is None):
        raise ValueError("policy mode (advantages) needs tokens and logprob_weight")
    rows, features = hidden.shape
    vocab = weight.shape[0]
    stats_dtype = reference.compute_dtype(hidden.dtype)
    entropy = hidden.new_empty((rows,), dtype=stats_dtype)
    has_tokens = tokens is not None
    logprobs = hidden.new_empty((rows,) if has_tokens else _EMPTY_SHAPE, dtype=stats_dtype)
    grad_hidden = hidden.new_empty((rows, features) if need_grad_hidden else _EMPTY_SHAPE)
    # Written over by the first chunk's matmul (zeroed here only when there is none).
    grad_weight = weight.new_empty((vocab, features) if need_grad_weight else _EMPTY_SHAPE,
                                   dtype=gradient_accumulation_dtype(weight.dtype))
    if rows == 0:
        grad_weight.zero_()
    grad_bias = hidden.new_zeros((vocab,) if need_grad_bias else _EMPTY_SHAPE, dtype=stats_dtype)
    any_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    in_place = backend == "triton"  # the Triton backward may overwrite the logits it reads
    buffers = 1 if in_place or not any_grad else 2
    if shard is not None:
        # Every rank must cut the same row chunks (each chunk's merge is a collective), whatever
        # its backend and which of its inputs need gradients: size them for two buffers.
        buffers = 2
    chunk = loss_chunk_rows(rows, vocab if shard is None else shard.widest,
                            hidden.element_size() * buffers)
    logits_buffer = hidden.new_empty((min(chunk, rows) * vocab,))
    forward_stats, backward_dz = _fwd_impl(backend), _bwd_impl(backend)
    if backend == "torch":  # statistics in float64 for float64 inputs
        forward_stats = functools.partial(_torch_fwd, stats_dtype=stats_dtype)
    kernel_tokens = tokens
    if shard is not None and has_tokens:
        kernel_tokens, owned, tokens_valid = shard.local_ids(tokens)
    # dz carries the row weights (1 / N for a mean): divided by their largest magnitude it
    # stays O(p), clear of fp16's underflow; the backward multiplies grad_scale back in, in the
    # pass that applies the upstream gradient anyway. A power of two, so that neither division
    # nor product rounds: dz rounds to the input dtype exactly as it would unscaled.
    # In policy mode the log-prob gradient is logprob_weight f'(lp), of size |A| + kl_weight
    # where the ratio and exp(ref - lp) are near 1 (not |A| (1 + clip_high): a huge clip_high,
    # which switches the upper clip off, would scale every dz into fp16's underflow). Weights
    # that are not finite are left out: their rows' gradients are, but not everyone's.
    weights = [entropy_weight]
    if logprob_weight is not None:
        weights.append(logprob_weight if advantages is None else logprob_weight * (
            advantages.abs() + kl_weight))
    magnitudes = torch.cat(weights + [entropy_weight.new_zeros(1)]).abs()
    largest = torch.where(torch.isfinite(magnitudes), magnitudes, 0.0).amax()  # 0 if no rows
    grad_scale = _power_of_two_floor(largest)
    grad_scale = torch.where(grad_scale > 0, grad_scale, torch.ones_like(grad_scale))
    unit_entropy_weight = entropy_weight / grad_scale
    policy_loss = hidden.new_empty((rows,) if advantages is not None else _EMPTY_SHAPE,
                                   dtype=stats_dtype)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        hidden_rows = hidden[start:end]
        chunk_logits = _chunk_logits(
            hidden_rows, weight, bias,
            logits_buffer[:(end - start) * vocab].view(end - start, vocab))
        chunk_tokens = kernel_tokens[start:end] if has_tokens else None
        chunk_entropy, chunk_lse, chunk_logprobs = forward_stats(
            chunk_logits, chunk_tokens, temperature)
        if shard is not None and has_tokens:
            chunk_entropy, chunk_lse, chunk_logprobs = shard.merge_logprobs(
                chunk_entropy, chunk_lse, chunk_logprobs, owned[start:end],
                tokens_valid[start:end])
        elif shard is not None:
            chunk_entropy, chunk_lse, _ = shard.merge(chunk_entropy, chunk_lse, None, None)
        entropy[start:end] = chunk_entropy
        chunk_logprob_weight = None
        if has_tokens:
            logprobs[start:end] = chunk_logprobs
        if advantages is not None:
            rows_here = slice(start, end)
            chunk_policy_loss, policy_grad = policy_terms(
                chunk_logprobs, advantages[rows_here],
                None if old_logprobs is None else old_logprobs[rows_here],
                None if ref_logprobs is None else ref_logprobs[rows_here],
                clip_low, clip_high, kl_weight)
            policy_loss[rows_here] = chunk_policy_loss
            # The weight times f' before the division: where f' is 0 (A = 0 and no KL) the
            # weight is left out of grad_scale, and weight / grad_scale alone may overflow.
            chunk_logprob_weight = logprob_weight[rows_here] * policy_grad / grad_scale
        elif logprob_weight is not None:
            chunk_logprob_weight = logprob_weight[start:end] / grad_scale
        if not any_grad:
            continue
        row_grads = (chunk_logits, chunk_tokens, chunk_entropy, chunk_lse,
                     unit_entropy_weight[start:end], chunk_logprob_weight, temperature)
        grad_logits = (backward_dz(*row_grads, out=chunk_logits) if in_place
                       else backward_dz(*row_grads))
        if need_grad_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if need_grad_weight:
            add_weight_gradient(grad_weight, grad_logits, hidden_rows, first=start == 0)
        if need_grad_bias:
            grad_bias += grad_logits.sum(0, dtype=stats_dtype)
    if shard is not None and need_grad_hidden:
        shard.all_reduce_sum_(grad_hidden)
    loss = torch.linalg.vecdot(entropy_weight.to(stats_dtype), entropy)
    if logprob_weight is not None:
        loss = loss + torch.linalg.vecdot(logprob_weight.to(stats_dtype),
                                          logprobs if advantages is None else policy_loss)
    return (loss, entropy, logprobs, grad_hidden, grad_weight,
            grad_bias.to(gradient_accumulation_dtype(bias.dtype)) if need_grad_bias else grad_bias,
            grad_scale)


@torch.library.custom_op("em_kernels::linear_entropy_loss", mutates_args=())
def linear_entropy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor | None,
    entropy_weight: torch.Tensor,
    logprob_weight: torch.Tensor | None,
    advantages: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    kl_weight: float,
    temperature: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    return loss_and_grads(hidden, weight, bias, tokens, entropy_weight, logprob_weight,
                          advantages, old_logprobs, ref_logprobs, clip_low, clip_high, kl_weight,
                          temperature, need_grad_hidden, need_grad_weight, need_grad_bias,
                          backend)


@linear_entropy_loss.register_fake
def _(hidden, weight, bias, tokens, entropy_weight, logprob_weight, advantages, old_logprobs,
      ref_logprobs, clip_low, clip_high, kl_weight, temperature, need_grad_hidden,
      need_grad_weight, need_grad_bias, backend):
    rows = hidden.shape[0]
    stats_dtype = reference.compute_dtype(hidden.dtype)
    return (
        hidden.new_empty((), dtype=stats_dtype),
        hidden.new_empty((rows,), dtype=stats_dtype),
        hidden.new_empty((rows,) if tokens is not None else _EMPTY_SHAPE, dtype=stats_dtype),
        hidden.new_empty(hidden.shape if need_grad_hidden else _EMPTY_SHAPE),  # contiguous
        weight.new_empty(weight.shape if need_grad_weight else _EMPTY_SHAPE,
                         dtype=gradient_accumulation_dtype(weight.dtype)),
        bias.new_empty(bias.shape, dtype=gradient_accumulation_dtype(bias.dtype))
        if need_grad_bias else hidden.new_empty(_EMPTY_SHAPE, dtype=stats_dtype),
        hidden.new_empty((), dtype=stats_dtype),
    )


def _batched(tensor: torch.Tensor) -> bool:
    """A vmapped tensor: functorch's, or the legacy kind autograd.grad's is_grads_batched makes
    (not to be asked while Dynamo traces: it cannot trace these probes)."""
    functorch = torch._C._functorch
    return (functorch.is_functorch_wrapped_tensor(tensor)
            or functorch.is_legacy_batchedtensor(tensor))


class LinearEntropyLossFunction(torch.autograd.Function):
    """Autograd around the op: the forward returns (loss, entropy, logprobs), the last two not
    differentiable, and keeps the op's gradients, which no caller ever sees; the backward scales
    them by the loss's upstream gradient times grad_scale. d loss / d row weights are the
    entropies and the log-probs' terms (lp, or the policy loss f(lp)) themselves (kept only when
    a row-weight tensor requires grad); advantages, old and reference log-probs are constants.

    Eagerly the kept gradients are scaled in place and handed over: autograd releases them from
    ctx when the backward returns (without retain_graph), so d_weight becomes weight.grad with no
    copy, where an out-of-place product would hold a second V x H tensor (a float16
    parameter's float32 accumulator is rounded into a new one: a copy at half its size). A
    second backward through the same call (retain_graph=True) therefore raises. Traced by
    torch.compile, or with batched upstream gradients (autograd.grad's is_grads_batched), the
    product is out of place."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, entropy_weight, logprob_weight, advantages,
                old_logprobs, ref_logprobs, clip_low, clip_high, kl_weight, temperature,
                need_grad_hidden, need_grad_weight, need_grad_bias, backend, shard):
        # Vocab-parallel mode's collectives stay out of the dispatcher op: eager Python.
        compute = linear_entropy_loss if shard is None else functools.partial(
            loss_and_grads, shard=shard)
        (loss, entropy, logprobs, grad_hidden, grad_weight, grad_bias,
         grad_scale) = compute(
            hidden, weight, bias, tokens, entropy_weight, logprob_weight, advantages,
            old_logprobs, ref_logprobs, clip_low, clip_high, kl_weight, temperature,
            need_grad_hidden, need_grad_weight, need_grad_bias, backend)
        needs_entropy_weight, needs_logprob_weight = ctx.needs_input_grad[4:6]
        logprob_terms = None
        if needs_logprob_weight:  # d loss / d logprob_weight
            logprob_terms = logprobs if advantages is None else policy_terms(
                logprobs, advantages, old_logprobs, ref_logprobs, clip_low, clip_high,
                kl_weight)[0]
        ctx.save_for_backward(entropy if needs_entropy_weight else None, logprob_terms,
                              grad_hidden, grad_weight, grad_bias, grad_scale)
        ctx.computed = (need_grad_hidden, need_grad_weight, need_grad_bias)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.handed_over = False
        ctx.mark_non_differentiable(entropy, logprobs)
        return loss, entropy, logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_entropy, _grad_logprobs):
        if torch.is_grad_enabled():
            raise double_backward_error("linear_entropy_loss")
        hand_over = not torch.compiler.is_compiling() and not _batched(grad_loss)
        if hand_over:
            if ctx.handed_over:
                raise RuntimeError(
                    "linear_entropy_loss handed its saved gradients to the first backward "
                    "through this call; a second one (retain_graph=True) is not supported: call "
                    "it again instead")
            ctx.handed_over = True
        entropy, logprob_terms, grad_hidden, grad_weight, grad_bias, grad_scale = (
            ctx.saved_tensors)
        factor = grad_loss * grad_scale
        grads = []
        for needed, computed, saved, dtype in zip(ctx.needs_input_grad[:3], ctx.computed,
                                                  (grad_hidden, grad_weight, grad_bias),
                                                  ctx.input_dtypes):
            if needed and not computed:
                raise RuntimeError(
                    "LinearEntropyLossFunction was applied with a need_grad_* flag off for an "
                    "input that requires grad: call em_kernels.linear_entropy_loss, which sets "
                    "them")
            if not needed:
                grads.append(None)
            else:
                # A float32 accumulator of a float16 parameter rounds once, here.
                scaled = saved.mul_(factor) if hand_over else saved * factor
                grads.append(scaled.to(dtype))
        needs_entropy_weight, needs_logprob_weight = ctx.needs_input_grad[4:6]
        return (*grads, None,
                entropy * grad_loss if needs_entropy_weight else None,
                logprob_terms * grad_loss if needs_logprob_weight else None,
                *(None,) * 12)
