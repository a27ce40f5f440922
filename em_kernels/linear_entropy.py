"""Public `linear_entropy`: entropy and log-probs straight from hidden states and the LM head,
never holding the [N, V] logits (see em_kernels/_ops/linear_entropy.py for the ops)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks, reference
from ._backend import BackendUnavailableError, available_backends, resolve_backend
from ._ops import linear_entropy_loss as loss_ops
from ._ops.linear_entropy import backward_from_row_grads, linear_entropy_stats
from ._vocab_parallel import VocabShard


class LinearEntropyOutput(NamedTuple):
    entropy: torch.Tensor
    logprobs: torch.Tensor | None


class LinearEntropyLoss(NamedTuple):
    loss: torch.Tensor
    entropy: torch.Tensor
    logprobs: torch.Tensor | None


def _resolve(backend: str, device: torch.device) -> str:
    """The implementation ("triton" or "torch") that runs ``backend`` on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda" and available_backends()["triton"] == "available":
            return "triton"
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f'backend="cpu" runs CPU tensors only; these tensors are on {device}')
        return "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(
                f'backend="cuda" runs CUDA tensors only; these tensors are on {device}')
        status = available_backends()["triton"]
        if status != "available":
            raise BackendUnavailableError(
                f'backend="cuda" runs linear_entropy with the Triton kernels, which are '
                f"unavailable: {status}")
        return "triton"
    return resolve_backend(backend, device)  # "triton", "torch", or a clear error


def _check_matrices(hidden, weight, bias, backend: str, op: str = "linear_entropy") -> None:
    _checks.check_float_tensor(hidden, backend, "hidden")
    _checks.check_float_tensor(weight, backend, "weight")
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be 2-D (N, H); got shape {tuple(hidden.shape)} "
            "(flatten the leading dims with hidden.reshape(-1, H))")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H); got shape {tuple(weight.shape)}")
    if hidden.shape[1] == 0:
        raise ValueError(
            f"hidden is (N, H) = {tuple(hidden.shape)}: the hidden size H must be positive")
    if weight.shape[0] == 0:
        # Also in vocab-parallel mode: every rank must hold at least one vocabulary entry (mask
        # entries a rank does not need with a -inf bias; a fully masked shard is supported).
        raise ValueError(
            f"weight is (V, H) = {tuple(weight.shape)}: the vocabulary (this rank's shard, with "
            "a process_group) must have at least one entry")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden is (N, H) = {tuple(hidden.shape)} but weight is (V, H) = "
            f"{tuple(weight.shape)}: their H must match (pass the LM head's weight, not its "
            "transpose)")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast them to one dtype")
    if weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    for operand in (hidden, weight):
        _checks.check_autograd_mode(operand, op)
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != weight.shape[:1]:
        raise ValueError(
            f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}: cast bias to it")
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    _checks.check_autograd_mode(bias, op)


class _VocabParallelLinearEntropy(torch.autograd.Function):
    """Each rank holds a contiguous vocab shard of weight/bias (em_kernels/_vocab_parallel.py).
    The forward merges the shards' (lse, entropy, chosen logit) into the full-vocabulary ones.
    The backward computes each shard's dz with the full-vocabulary (lse, entropy), so
    d_weight/d_bias are exactly the shard's slices of the unsharded gradients; d_hidden is
    all-reduced (summed) across ranks. Upstream gradients are assumed to be the same on every
    rank (a replicated loss)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, local_tokens, owned, tokens_valid, temperature,
                grad_filter_eps, backend, shard):
        local_entropy, local_lse, local_chosen = linear_entropy_stats(
            hidden, weight, bias, local_tokens, temperature, grad_filter_eps, backend)
        entropy, lse, chosen = shard.merge(local_entropy, local_lse,
                                           None if local_tokens is None else local_chosen, owned)
        logprobs = None
        if local_tokens is not None:
            logprobs = torch.where(
                tokens_valid, chosen - lse, torch.full_like(lse, float("nan")))
        ctx.save_for_backward(hidden, weight, bias, local_tokens, tokens_valid, entropy, lse)
        ctx.temperature, ctx.grad_filter_eps = temperature, grad_filter_eps
        ctx.backend, ctx.shard = backend, shard
        return entropy, logprobs

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprobs):
        hidden, weight, bias, local_tokens, tokens_valid, entropy, lse = ctx.saved_tensors
        grad_lse = grad_chosen = None
        if local_tokens is not None and grad_logprobs is not None:
            grad_chosen = torch.where(
                tokens_valid, grad_logprobs, torch.zeros_like(grad_logprobs))
            grad_lse = -grad_chosen
        grad_hidden, grad_weight, grad_bias = backward_from_row_grads(
            hidden, weight, bias, local_tokens, entropy, lse, grad_entropy, grad_lse,
            grad_chosen, ctx.temperature, ctx.grad_filter_eps,
            tuple(ctx.needs_input_grad[:3]), ctx.backend)
        if grad_hidden is not None:
            ctx.shard.all_reduce_sum_(grad_hidden)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    temperature: float = 1.0,
    process_group=None,
    backend: str = "auto",
    grad_filter_eps: float | None = None,
) -> LinearEntropyOutput:
    """Entropy (and log-probs of ``tokens``) of softmax((hidden @ weight^T + bias) / temperature)
    per row, fused with the LM head: the [N, V] logits are never allocated.

    Args:
        hidden: (N, H) float32, bfloat16 or float16 (float64 with backend="torch").
        weight: (V, H), same dtype and device (the LM head's weight, not its transpose). With a
            process_group: this rank's contiguous shard of the vocabulary, rank r holding the ids
            after those of ranks 0..r-1 (shards may differ in size, but none may be empty:
            give a rank with nothing to add a -inf-masked entry).
        bias: optional (V,) of weight's dtype (this rank's shard); -inf entries mask their
            vocabulary entries (probability 0).
        tokens: optional int64 (N,) global ids in [0, V_total). On CPU tensors an id out of range
            raises ValueError; on CUDA tensors that check would need a host sync, so it is not
            made (set EM_KERNELS_CHECK_TOKENS=1 to make it), nor inside torch.compile, and such
            a row gets a NaN log-prob, whose gradient is the -p term alone (no one-hot), as in
            logprobs_and_entropy.
        temperature: finite positive number in [~4.2e-39, ~8.5e37]; every formula is on the
            logits / temperature.
        process_group: a torch.distributed group for vocab-parallel mode (see `weight`); every
            rank gets the full-vocabulary entropy and log-probs, the gradients equal the
            unsharded ones (d_hidden is all-reduced; d_weight/d_bias are the shard's). Costs an
            all-gather of the shard sizes (not read on the host: no sync on CUDA) and two
            N-vector all-reduces in the forward, one (N, H) all-reduce in the backward. torch.compile traced it with
            fullgraph=True, forward and backward, in a check by hand (torch 2.14, 2 gloo
            processes, same results as eager), but torch then warns of an unwaited collective
            at exit, which now and then ended in an abort: not part of the tests.
        backend: "auto" (Triton on CUDA tensors, chunked PyTorch elsewhere), "triton" (CUDA
            tensors; CPU tensors under TRITON_INTERPRET=1), "cuda" (CUDA tensors, run by the
            Triton kernels: there is no separate CUDA C++ kernel for this op; raises
            BackendUnavailableError when Triton cannot run), "cpu" (CPU tensors, chunked
            PyTorch) or "torch" (chunked PyTorch on any device: blocks of at most 512 rows x 8192
            vocab entries, never N x V).
        grad_filter_eps: None (default, exact) or a positive threshold: the backward zeroes each
            row's segments of 256 vocab entries of dz = dLoss/dlogits whose entries are all below
            it in magnitude. Each gradient entry then errs by at most grad_filter_eps times the
            sum of |operand| over the zeroed logits (d_hidden[r, k]: sum_j |W[j, k]|); a NaN is
            never filtered. Rows left with no kept segment in one of the backward's vocab
            chunks drop out of that chunk's two gradient matmuls (when they are at least half
            the rows), which is meant to save time on confident models, whose rows keep their
            mass in a few chunks (unmeasured on a GPU). That reads one count per chunk on the
            host; under CUDA graph capture every chunk runs dense instead. In vocab-parallel
            mode the segments start at each shard's first id, so filtered sharded gradients
            are within the same bound of the exact ones but not equal to filtered unsharded
            ones.

    Returns:
        LinearEntropyOutput(entropy, logprobs): float32 (N,) each (float64 for float64 inputs),
        logprobs None without tokens. A row whose logits are all -inf has NaN entropy and log-prob
        and adds nothing to the gradients. Both are differentiable w.r.t. hidden, weight and bias,
        with any upstream gradients for both at once. The Triton forward's bits do not depend on the
        other rows (batch invariance); the chunked PyTorch path leaves that to the BLAS, which may
        round a row's logits differently at another batch size. Extra memory: O(N) statistics plus a
        fixed tile workspace in the forward; the backward (deterministic: a dz pass and BLAS matmuls
        over vocab chunks, no atomics) adds a chunk workspace of at most 128 MiB and an fp32 (N, H)
        d_hidden accumulator.
    """
    temperature = _checks.check_temperature(temperature)
    grad_filter_eps = 0.0 if grad_filter_eps is None else _checks.check_number(
        "grad_filter_eps (None: off)", grad_filter_eps, low=0.0, low_open=True)
    _check_matrices(hidden, weight, bias, backend if isinstance(backend, str) else "auto")
    implementation = _resolve(backend, hidden.device)
    if hidden.dtype == torch.float64 and implementation != "torch":
        raise TypeError('float64 inputs run only with backend="torch"')
    local_vocab = weight.shape[0]
    if bias is not None:
        bias = bias.contiguous()  # the kernels read bias and tokens with unit stride
    if tokens is not None and isinstance(tokens, torch.Tensor):
        tokens = tokens.contiguous()
    if process_group is None:
        if tokens is not None:
            _checks.check_tokens(tokens, hidden.shape[:1], local_vocab, hidden.device,
                                 rows_of="hidden states")
        entropy, lse, chosen = linear_entropy_stats(
            hidden, weight, bias, tokens, temperature, grad_filter_eps, implementation)
        return LinearEntropyOutput(entropy, None if tokens is None else chosen - lse)
    if tokens is not None:  # the range once the whole vocabulary is known
        _checks.check_tokens(tokens, hidden.shape[:1], None, hidden.device,
                             rows_of="hidden states")
    shard = VocabShard.of(process_group, local_vocab, hidden.device)
    local_tokens = owned = tokens_valid = None
    if tokens is not None:
        _checks.check_token_range(tokens, shard.total)
        local_tokens, owned, tokens_valid = shard.local_ids(tokens)
    entropy, logprobs = _VocabParallelLinearEntropy.apply(
        hidden, weight, bias, local_tokens, owned, tokens_valid, temperature, grad_filter_eps,
        implementation, shard)
    return LinearEntropyOutput(entropy, logprobs)


def _row_weight(name: str, value, hidden: torch.Tensor) -> torch.Tensor | None:
    """None, a Python number for every row, or a float tensor (N,) on hidden's device; returned
    as a contiguous (N,) tensor of the statistics' dtype (differentiable if ``value`` is)."""
    if value is None:
        return None
    rows = hidden.shape[0]
    dtype = reference.compute_dtype(hidden.dtype)
    if not isinstance(value, torch.Tensor):
        value = _checks.check_number(f"{name} (a number, a tensor (N,) or None)", value)
        return torch.full((rows,), value, dtype=dtype, device=hidden.device)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.shape != (rows,):
        raise ValueError(f"{name} must have shape (N,) = ({rows},), one weight per row of hidden, "
                         f"got {tuple(value.shape)}")
    if value.device != hidden.device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")
    _checks.check_autograd_mode(value, "linear_entropy_loss")
    return value.to(dtype).contiguous()


def linear_entropy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    entropy_weight: torch.Tensor | float | None = None,
    logprob_weight: torch.Tensor | float | None = None,
    temperature: float = 1.0,
    process_group=None,
    backend: str = "auto",
) -> LinearEntropyLoss:
    """The loss sum_r entropy_weight[r] H_r + logprob_weight[r] log p_r(tokens[r]) over the rows
    of softmax((hidden @ weight^T + bias) / temperature), with its gradients computed in the
    forward: three matmuls where `linear_entropy` (any upstream gradients, so it recomputes the
    logits in its backward) needs four. Use it when the loss is such a weighted sum with weights
    known before the forward: EM-FT's mean entropy (entropy_weight = 1 / number of tokens), a
    policy gradient's advantage-weighted log-probs (logprob_weight = -advantage / count).

    Args:
        hidden, weight, bias, tokens, temperature: as in `linear_entropy`.
        entropy_weight, logprob_weight: per-row weights, each a float tensor (N,) on hidden's
            device, a Python number for every row, or None (no such term); at least one of them
            is needed, and logprob_weight needs tokens. Tensors may require grad: d loss / d
            weight is the row's entropy (log-prob).
        backend: "auto", "triton", "cuda", "cpu" or "torch", as for `logprobs_and_entropy`:
            the kernels that compute each row chunk's statistics and dz; the matmuls are BLAS.
        process_group: a torch.distributed group for vocab-parallel mode, as in
            `linear_entropy`: weight and bias are this rank's contiguous shard, tokens global
            ids, and every rank gets the full-vocabulary loss, entropies and log-probs, and
            gradients equal to the unsharded ones (d_hidden summed across the ranks, d_weight
            and d_bias the shard's). Every rank must pass the same hidden, tokens, row weights
            and requires_grad flags. Costs an all-gather of the shard sizes, read on the host
            to cut every rank's row chunks alike (one sync on CUDA), two all-reduces of
            chunk-sized row vectors per row chunk and one of d_hidden (N x H).
            Runs eagerly, also inside torch.compile (a graph break: see _vocab_parallel_loss;
            fullgraph=True raises there).

    Returns:
        LinearEntropyLoss(loss, entropy, logprobs): loss a 0-d float32 tensor (float64 for
        float64 inputs), differentiable w.r.t. hidden, weight, bias and the row weights; entropy
        and logprobs (N,) of the loss's dtype, detached (nothing flows back through them),
        logprobs None without tokens. The loss is the plain weighted sum: a NaN entropy or
        log-prob (an all -inf row, an id outside [0, V) on CUDA) or a -inf log-prob (a token on
        a -inf logit) makes it NaN even where its weight is 0; the gradients stay finite.

    Compared with linear_entropy: the logits are rounded to the input dtype (bf16 logits from
    bf16 inputs, as the model's own LM head gives them; linear_entropy keeps fp32 logits), and
    with 16-bit inputs d_weight takes one rounding per row chunk. The gradients are computed
    only for the inputs that require grad while grad mode is on (a frozen LM head skips its
    d_weight matmul; under torch.no_grad only the statistics are computed: call it there for a
    value alone), and they live from the forward until the backward, which multiplies them by
    the loss's upstream gradient in place and hands them over (d_weight becomes weight.grad
    without a copy). Hence one backward per call: a second one through the same call
    (retain_graph=True) raises, and so does a backward with create_graph=True (differentiable
    once). autograd.grad's is_grads_batched works; torch.vmap raises (flatten into N instead).
    Extra memory: a row-chunk buffer of at most 256 MiB (LOSS_CHUNK_BYTES; the "torch" backend's
    reference statistics add fp32 temporaries of a few chunk sizes) plus O(N) statistics.
    Deterministic; torch.compile(fullgraph=True) traces it (without a process_group).
    """
    temperature = _checks.check_temperature(temperature)
    _check_matrices(hidden, weight, bias, backend if isinstance(backend, str) else "auto",
                    op="linear_entropy_loss")
    for operand in (hidden, weight, bias, entropy_weight, logprob_weight):
        if isinstance(operand, torch.Tensor) and torch._C._functorch.is_batchedtensor(operand):
            raise NotImplementedError(
                "linear_entropy_loss does not run under torch.vmap: its rows are a batch "
                "already (flatten the vmapped dim into N), or use linear_entropy")
    implementation = resolve_backend(backend, hidden.device)
    if hidden.dtype == torch.float64 and implementation != "torch":
        raise TypeError('float64 inputs run only with backend="torch"')
    if entropy_weight is None and logprob_weight is None:
        raise ValueError("give entropy_weight, logprob_weight or both: the loss is their "
                         "weighted sum of the rows' entropies and log-probs")
    if logprob_weight is not None and tokens is None:
        raise ValueError("logprob_weight weighs the log-probs of tokens: pass tokens too")
    if tokens is not None:  # with a process_group, the range once the whole vocabulary is known
        _checks.check_tokens(tokens, hidden.shape[:1],
                             weight.shape[0] if process_group is None else None, hidden.device,
                             rows_of="hidden states")
        tokens = tokens.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    entropy_weight = _row_weight("entropy_weight", entropy_weight, hidden)
    if entropy_weight is None:
        entropy_weight = hidden.new_zeros(hidden.shape[:1],
                                          dtype=reference.compute_dtype(hidden.dtype))
    logprob_weight = _row_weight("logprob_weight", logprob_weight, hidden)
    grad_mode = torch.is_grad_enabled()
    arguments = (hidden, weight, bias, tokens, entropy_weight, logprob_weight, temperature,
                 grad_mode and hidden.requires_grad, grad_mode and weight.requires_grad,
                 grad_mode and bias is not None and bias.requires_grad, implementation)
    if process_group is None:
        loss, entropy, logprobs = loss_ops.LinearEntropyLossFunction.apply(*arguments, None)
    else:
        loss, entropy, logprobs = _vocab_parallel_loss(process_group, *arguments)
    return LinearEntropyLoss(loss, entropy, None if tokens is None else logprobs)


@torch.compiler.disable
def _vocab_parallel_loss(process_group, hidden, weight, bias, tokens, *arguments):
    """linear_entropy_loss on a vocabulary shard, always eager: torch.compile would trace the
    all-reduce of d_hidden, which runs in the autograd forward on a tensor kept for the backward,
    into a functional collective whose result the backward does not see (wrong gradients in a
    check by hand, torch 2.14), so Dynamo breaks the graph here instead."""
    shard = VocabShard.of(process_group, weight.shape[0], hidden.device)
    if tokens is not None:
        _checks.check_token_range(tokens, shard.total)
    return loss_ops.LinearEntropyLossFunction.apply(hidden, weight, bias, tokens, *arguments,
                                                    shard)
