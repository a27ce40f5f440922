"""Public `linear_entropy`: entropy and log-probs straight from hidden states and the LM head,
never holding the [N, V] logits (see em_kernels/_ops/linear_entropy.py for the ops). The fused
losses built on the same head are in em_kernels/linear_loss.py."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import _checks
from ._backend import BackendUnavailableError, available_backends, resolve_backend
from ._ops import autocast_available, autocast_off
from ._ops.linear_entropy import backward_from_row_grads, linear_entropy_stats
from ._vocab_parallel import RankCall, VocabShard, shares_refusals


class LinearEntropyOutput(NamedTuple):
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


def autocast_like_linear(head_op):
    """Give ``head_op`` (hidden, weight, *, bias, ...) nn.Linear's rule inside torch.autocast on
    hidden's device: each floating-point operand but a float64 one is cast to the autocast
    dtype, differentiably (its gradient comes back in its own dtype), so that an fp32 model
    under autocast runs the head's matmuls on the tensor cores as its own head would; the op
    then runs with autocast off, so that its statistics keep their own precision (autocast
    would otherwise recast the matmuls and reductions inside). Outside autocast: as given."""

    @functools.wraps(head_op)
    def under_autocast(hidden, weight, *args, bias=None, **kwargs):
        device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
        if device_type is None or not (autocast_available(device_type)
                                       and torch.is_autocast_enabled(device_type)):
            return head_op(hidden, weight, *args, bias=bias, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)

        def cast(operand):
            if (isinstance(operand, torch.Tensor) and operand.is_floating_point()
                    and operand.dtype != torch.float64 and operand.device.type == device_type):
                return operand.to(dtype)
            return operand

        with autocast_off(device_type):
            return head_op(cast(hidden), cast(weight), *args, bias=cast(bias), **kwargs)

    return under_autocast


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
    _checks.check_dense(bias, "bias")
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
            logprobs = torch.where(tokens_valid, (chosen - lse).to(entropy.dtype),
                                   torch.full_like(entropy, float("nan")))
        ctx.save_for_backward(hidden, weight, bias, local_tokens, tokens_valid, entropy, lse)
        ctx.temperature, ctx.grad_filter_eps = temperature, grad_filter_eps
        ctx.backend, ctx.shard = backend, shard
        return entropy, logprobs

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprobs):
        hidden, weight, bias, local_tokens, tokens_valid, entropy, lse = ctx.saved_tensors
        grad_lse = grad_chosen = None
        if local_tokens is not None and grad_logprobs is not None:
            # log p = chosen - lse, and an id outside the vocabulary (unchecked where checking
            # would sync) has no chosen logit: its row keeps the -p term, as unsharded.
            grad_chosen = torch.where(
                tokens_valid, grad_logprobs, torch.zeros_like(grad_logprobs))
            grad_lse = -grad_logprobs
        grad_hidden, grad_weight, grad_bias = backward_from_row_grads(
            hidden, weight, bias, local_tokens, entropy, lse, grad_entropy, grad_lse,
            grad_chosen, ctx.temperature, ctx.grad_filter_eps,
            tuple(ctx.needs_input_grad[:3]), ctx.backend)
        if grad_hidden is not None:
            ctx.shard.all_reduce_sum_(grad_hidden)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


@shares_refusals
@autocast_like_linear
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
        hidden: (N, H) float32, bfloat16 or float16 (float64 with backend="torch"). Inside
            torch.autocast (on hidden's device), hidden, weight and bias are cast to its dtype
            first, as nn.Linear's operands are (float64 excepted; the gradients come back in
            the operands' own dtypes).
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
            logits / temperature, formed in float32 in the matmul's epilogue, as the torch
            backend forms them: a row whose logits / T overflow float32 has lost its
            distribution. At T = 1e-38, a logit above 3.4 gives the row NaN results and
            gradients; every logit below -3.4 makes it all -inf (masked): NaN results and a
            zero gradient.
        process_group: a torch.distributed group for vocab-parallel mode (see `weight`); every
            rank gets the full-vocabulary entropy and log-probs, the gradients equal the
            unsharded ones (d_hidden is all-reduced, each rank's part rounded to hidden's dtype
            first, so in 16 bits it is off by up to ~1.5 ulp more than unsharded, growing with
            the ranks; d_weight/d_bias are the shard's). Every rank must pass the same hidden
            (values, shape, dtype and requires_grad: the backward's all-reduce runs where a gradient
            is needed), tokens, temperature, grad_filter_eps and upstream gradients. The ranks
            compare all of it but the values of hidden and of the upstream gradients (tokens by a
            checksum: em_kernels/_vocab_parallel.py): on CPU tensors, or on CUDA with
            EM_KERNELS_CHECK_RANKS=1 (one host sync), a mismatch raises the same ValueError on every
            rank; on CUDA otherwise it makes every result and gradient NaN, except a mismatch in the
            rows or in hidden's requires_grad, which fails or hangs in the collectives. An argument
            that fails its own checks on one rank raises there, and the others raise an error that
            names that rank where they compare on the host (elsewhere they wait in their next
            collective). Costs an all-gather of the shard sizes and calls (not read on the host: no
            sync on CUDA) and two N-vector all-reduces in the forward, one (N, H) all-reduce in the
            backward. Runs eagerly, also inside torch.compile (a graph break, as the other ops'
            vocab-parallel modes): traced, torch warned of an unwaited collective at exit, which now
            and then ended in an abort (torch 2.14, 2 gloo processes).
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
        over vocab chunks, no atomics) adds a chunk workspace of at most 128 MiB and an fp32
        (N, H) d_hidden accumulator. A chunk keeps at least 256 vocab columns, so past
        128 MiB / (256 x bytes per entry) rows the workspace is N x 256 entries: past 262144
        rows with 16-bit CUDA inputs on Triton (2 bytes an entry), 87381 on the "torch"
        backend there (6: an fp32 logits buffer too), 131072 elsewhere (4; CPU runs 16-bit
        inputs in fp32). Gradient filtering adds up to about one more chunk (gathered rows).
    """
    temperature = _checks.check_temperature(temperature)
    grad_filter_eps = 0.0 if grad_filter_eps is None else _checks.check_number(
        "grad_filter_eps (None: off)", grad_filter_eps, low=0.0, low_open=True,
        high=_checks.FLOAT32_MAX)
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
        return LinearEntropyOutput(
            entropy, None if tokens is None else (chosen - lse).to(entropy.dtype))
    if tokens is not None:  # the range once the whole vocabulary is known
        _checks.check_tokens(tokens, hidden.shape[:1], None, hidden.device,
                             rows_of="hidden states")
    return _vocab_parallel_linear_entropy(hidden, weight, bias, tokens, temperature,
                                          grad_filter_eps, implementation, process_group)


@torch.compiler.disable
def _vocab_parallel_linear_entropy(hidden, weight, bias, tokens, temperature, grad_filter_eps,
                                   implementation, process_group) -> LinearEntropyOutput:
    """linear_entropy over this rank's vocabulary shard, always eager (a graph break under
    torch.compile: the collectives stay out of the graph)."""
    call = RankCall.on_head("linear_entropy", hidden, temperature,
                            torch.is_grad_enabled() and hidden.requires_grad, tokens,
                            ("grad_filter_eps", grad_filter_eps))
    shard = VocabShard.of(process_group, weight.shape[0], hidden.device, call)
    local_tokens = owned = tokens_valid = None
    if tokens is not None:
        _checks.check_token_range(tokens, shard.total)
        local_tokens, owned, tokens_valid = shard.local_ids(tokens)
    entropy, logprobs = _VocabParallelLinearEntropy.apply(
        hidden, weight, bias, local_tokens, owned, tokens_valid, temperature, grad_filter_eps,
        implementation, shard)
    return LinearEntropyOutput(entropy, logprobs)
