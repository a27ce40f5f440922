"""Public entropy ops on logits: `entropy` and `logprobs_and_entropy`."""

from __future__ import annotations

import torch

from . import _checks
from ._backend import resolve_backend
from ._ops.entropy import backward_from_stats, softmax_stats, softmax_stats_impl
from ._vocab_parallel import RankCall, VocabShard, shares_refusals


def _softmax_stats(rows, tokens, temperature, backend):
    """The softmax_stats op, or its body without the dispatcher where nothing is traced or
    differentiated (inference, decode-time calls)."""
    if _checks.eager_tensor(rows) and not (torch.is_grad_enabled() and rows.requires_grad):
        return softmax_stats_impl(rows, tokens, temperature, backend)
    return softmax_stats(rows, tokens, temperature, backend)


class _VocabParallelSoftmaxStats(torch.autograd.Function):
    """Entropy and log-probs of logits sharded by vocabulary: each rank's (N, V_r) rows are its
    contiguous slice of the full (N, V) logits. The forward merges the shards' (entropy, lse,
    chosen logit) into the full-vocabulary ones (em_kernels/_vocab_parallel.py); the backward
    runs the entropy backward on this shard with the full-vocabulary (entropy, lse), so each
    rank gets exactly its slice of the unsharded gradient (a row whose token another rank owns
    gets the log-prob's -p term and no one-hot, the kernels' rule for an id outside the row).

    The kernels run on the layout's M rows (`_checks.RowLayout`: a sliced batch is read in
    place), and the N rows asked for are picked out before the merge, so every rank all-reduces
    the same N rows whatever the layout of its logits. The backward runs on the M rows with the
    merged statistics on those N and this shard's own on the rows that only fill the lattice
    (whose gradient the layout drops)."""

    @staticmethod
    def forward(ctx, rows, layout, local_tokens, owned, tokens_valid, temperature, backend,
                shard):
        local_entropy, local_lse, local_logprobs = softmax_stats(
            rows, local_tokens, temperature, backend)
        if local_tokens is None:  # logprobs: the empty placeholder
            entropy, lse, _ = shard.merge(layout.picked(local_entropy), layout.picked(local_lse),
                                          None, None)
            logprobs = local_logprobs
        else:
            entropy, lse, logprobs = shard.merge_logprobs(
                layout.picked(local_entropy), layout.picked(local_lse),
                layout.picked(local_logprobs), owned, tokens_valid)
        ctx.save_for_backward(rows, local_tokens, layout.row_values(entropy, local_entropy),
                              layout.row_values(lse, local_lse))
        ctx.layout, ctx.temperature, ctx.backend = layout, temperature, backend
        return entropy, logprobs

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprobs):
        rows, local_tokens, entropy, lse = ctx.saved_tensors
        grad_entropy, grad_logprobs = (
            None if grad is None or grad.numel() == 0 else ctx.layout.row_values(grad)
            for grad in (grad_entropy, grad_logprobs))
        grad_rows = backward_from_stats(rows, local_tokens, entropy, lse, grad_entropy,
                                        grad_logprobs, ctx.temperature, ctx.backend)
        return grad_rows, None, None, None, None, None, None, None


@torch.compiler.disable
def _vocab_parallel_stats(logits, tokens, temperature, shift, backend, process_group):
    """(entropy, logprobs or None) of vocab-sharded logits at their positions t < T - shift
    (all rows at shift 0; tokens: the scored ids, already shifted), shaped like those
    positions; always eager (a graph break under torch.compile: the merge's collectives stay
    out of the graph)."""
    call = RankCall("entropy" if tokens is None else "logprobs_and_entropy", (
        ("the logits' shape but the vocabulary", tuple(logits.shape[:-1])), ("shift", shift),
        ("dtype", logits.dtype), ("temperature", temperature)), tokens)
    shard = VocabShard.of(process_group, logits.shape[-1], logits.device, call)
    rows, layout = _checks.RowLayout.rows_of_shifted(logits, shift)
    local_tokens = owned = tokens_valid = None
    if tokens is not None:
        _checks.check_token_range(tokens, shard.total)
        local_tokens, owned, tokens_valid = shard.local_ids(
            tokens.reshape(tokens.numel()).contiguous())
        local_tokens = layout.row_values(local_tokens)
    entropy, logprobs = _VocabParallelSoftmaxStats.apply(
        rows, layout, local_tokens, owned, tokens_valid, temperature, backend, shard)
    return (entropy.reshape(layout.leading),
            None if tokens is None else logprobs.reshape(layout.leading))


@shares_refusals
def entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    shift: int = 0,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim, in float32.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 with backend="torch"), any
            leading shape and strides. Run eagerly (outside torch.compile, and always in
            vocab-parallel mode), a slice of positions such as logits[:, :-1] whose rows are at
            least 80% of the rows they span is read in place, not copied (`_checks.RowLayout`),
            and kept for the backward: write into the tensor it slices only after the backward.
            For the positions that predict a next token, pass the whole logits with shift=1
            rather than logits[:, :-1]: see ``shift``.
            Entries equal to -inf are masked (probability 0). So, in the compiled backends, is
            a finite entry whose logit * log2(e) / T overflows float32 to -inf (finfo.min used
            as a mask): a row made only of such entries gives NaN like an all -inf row, where
            the "torch" backend sees a uniform row. And so is a finite entry whose distance
            below the row's max overflows float32 (finite logits ~3.4e38 apart), which drops
            a probability that is not 0 only at T past ~3e36 (its log-prob becomes -inf).
        temperature: finite positive number in [~4.2e-39, ~8.5e37] (the range float32 can
            scale by); every formula is on logits / temperature.
        shift: an int >= 0: the rows asked for are the positions t < T - shift of logits
            (..., T, V), those whose token ``shift`` positions on is known (1 for a causal LM's
            next token): logits[..., :T - shift, :], with the result of shape (..., T - shift).
            The difference from passing that slice is the backward's: when the logits' leading
            dims merge into one row stride (a model's output does) and T - shift >= 0.8 T, the
            kernels run on every row and hand the logits their whole gradient, zeros in the last
            ``shift`` positions, where the slice's gradient would go through torch's slice
            backward (a zeroed tensor of the logits' size, and a copy into it): one gradient
            written once (at 8 x 1025 x 151936 in bf16, 7.5 GB less traffic and 2.5 GB less
            at the peak). Run eagerly, and not under anomaly detection; under torch.compile or
            vmap it is the slice. Rows are sequences: with a packed batch (sequences laid end
            to end in one row, as verl's remove-padding path has them) shift would score across
            their boundaries; roll the ids there instead, and never pass rolled ids with a
            shift. Anomaly detection turned on for the backward alone raises on a NaN or inf
            logit in the last positions, which this path reads (a slice read in place has the
            same with the rows between its sequences): turn it on around the forward too.
        process_group: a torch.distributed group for vocab-parallel logits (as a tensor-parallel
            LM head gives them): each rank passes its contiguous slice of the vocabulary, rank r
            the entries after those of ranks 0..r-1 (slices may differ in size, none empty),
            and every rank gets the full-vocabulary entropy; the gradient is this rank's slice
            of the unsharded one. Every rank must pass the same rows (their leading shape, shift),
            dtype, temperature, token ids and upstream gradients (a replicated loss). The ranks
            compare their calls but for the upstream gradients (the op, shapes, dtype, temperature,
            a checksum of the ids: em_kernels/_vocab_parallel.py): on CPU tensors, or on CUDA with
            EM_KERNELS_CHECK_RANKS=1 (one host sync), a mismatch raises the same ValueError on every
            rank; on CUDA otherwise it makes every result and gradient NaN, except a mismatch in the
            rows, which fails or hangs in the collectives. An argument that fails its own checks on
            one rank raises there, and the others raise an error that names that rank where they
            compare on the host (elsewhere they wait in their next collective). Costs an all-gather
            of the slice sizes and calls (not read on the host: no sync on CUDA) and two all-reduces
            of N-vectors; runs eagerly, also inside torch.compile (a graph break).
        backend: "auto", "triton", "cuda", "cpu" or "torch" (see `available_backends()`).

    Returns:
        float32 tensor of shape (...). A row that is all -inf gives NaN; a NaN poisons only its
        own row (its gradient is NaN, at its -inf entries too on the "cpu" and "cuda" backends).
        Differentiable w.r.t. logits (the gradient has the logits' dtype, and is exactly 0 at
        every -inf entry); the forward keeps 12 bytes per row (the entropy in float32, the
        logsumexp in float64; float32 on MPS, which lacks float64) and the backward recomputes
        the probabilities from them relative to the row max. On the compiled and Triton backends
        log p thus rounds relative to its own size and a confident row's gradient is exact to
        float32 rounding relative to the row's largest entry ("torch" is plain float32 PyTorch,
        with z / T rounded first). There, a row whose |logsumexp| exceeds 2^40 (|logits| / T
        past ~1e12), where even the float64 no longer holds log p, gets a NaN gradient whatever
        its upstream gradient (at its -inf entries too, except on the "triton" backend), unless
        it is one-hot (entropy exactly 0, as a token forced by a huge logit): that one's
        gradient is exact. The compiled backends are deterministic and batch-invariant: a row's
        result has the same bits whatever the other rows and the batch size.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), 3.0]])
        >>> em_kernels.entropy(logits, backend="torch")
        tensor([1.3863, 0.3666])
    """
    temperature = _checks.check_temperature(temperature)
    _checks.check_logits(logits, backend)
    _checks.check_autograd_mode(logits, "entropy")
    shift = _checks.check_shift(shift, logits)
    backend = resolve_backend(backend, logits.device)
    if process_group is not None:
        return _vocab_parallel_stats(logits, None, temperature, shift, backend,
                                     process_group)[0]
    rows, layout = _checks.RowLayout.rows_of_shifted(logits, shift)
    result, _, _ = _softmax_stats(rows, None, temperature, backend)
    return layout.results(result)


@shares_refusals
def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    shift: int = 0,
    process_group=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(tokens) and the entropy per row, from one read of the logits (the RL path).

    Args:
        logits: (..., V) float32, bfloat16 or float16, any leading shape and strides.
        tokens: int64 of shape (...), ids in [0, V); with a shift, the ids of the logits' own
            positions (the input ids), of which those ``shift`` on from each scored position
            are read (tokens[..., shift:]). On CPU tensors an id out of range raises
            ValueError at once. On CUDA tensors that check would need a host sync, so it is not
            made (set EM_KERNELS_CHECK_TOKENS=1 to make it), nor inside torch.compile or
            torch.vmap on any device (no values to read there): the kernels give such a row a
            NaN log-prob instead, and treat its logit as lying outside these logits (its
            log-prob gradient is the -p term alone, no one-hot).
            With a process_group: global ids in [0, V_total).
        temperature: finite positive number; p = softmax(logits / temperature).
        shift: as in `entropy`: shift=1 gives log p(tokens[..., t + 1]) at the positions
            t < T - 1, and the entropy there, from the whole (..., T, V) logits, and writes
            their whole gradient in the backward, without torch's slice backward.
        process_group: vocab-parallel logits, as in `entropy`; every rank gets the full
            vocabulary's log-probs and entropies (the owner rank's chosen logit, shared by the
            same all-reduce).
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        (logprobs, entropy), float32, each of shape (...) ((..., T - shift) with a shift).
        Both are differentiable w.r.t. the logits, with any upstream gradients for both at
        once. A token whose logit is -inf has log-prob -inf and, like every -inf entry, gets a
        zero gradient.
    """
    temperature = _checks.check_temperature(temperature)
    _checks.check_logits(logits, backend)
    _checks.check_autograd_mode(logits, "logprobs_and_entropy")
    shift = _checks.check_shift(shift, logits)
    backend = resolve_backend(backend, logits.device)
    if shift and isinstance(tokens, torch.Tensor) and tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"with shift={shift}, tokens are the ids of all the logits' positions, of shape "
            f"{tuple(logits.shape[:-1])} (the input ids, of which tokens[..., {shift}:] are "
            f"scored), got {tuple(tokens.shape)}")
    _checks.check_tokens(tokens, logits.shape[:-1], None, logits.device)
    tokens = tokens[..., shift:] if shift else tokens
    if process_group is not None:  # the range checked once the whole vocabulary is known
        entropy_, logprobs = _vocab_parallel_stats(logits, tokens, temperature, shift, backend,
                                                   process_group)
        return logprobs, entropy_
    _checks.check_token_range(tokens, logits.shape[-1])
    rows, layout = _checks.RowLayout.rows_of_shifted(logits, shift)
    result, _, logprobs = _softmax_stats(rows, layout.row_values(tokens), temperature, backend)
    return layout.results(logprobs), layout.results(result)
