"""Public fused losses on the LM head: `linear_entropy_loss` (a weighted sum of the rows'
entropies and log-probs) and `linear_policy_loss` (PPO's clipped surrogate with a k3 KL), both
computing their gradients in the forward: three matmuls where `linear_entropy` needs four (see
em_kernels/_ops/linear_entropy_loss.py for the op)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks, reference
from ._backend import resolve_backend
from ._ops import DYNAMO_TRACES_IS_BATCHEDTENSOR
from ._ops import linear_entropy_loss as loss_ops
from ._vocab_parallel import RankCall, VocabShard, shares_refusals
from .linear_entropy import _check_matrices, autocast_like_linear


class LinearEntropyLoss(NamedTuple):
    loss: torch.Tensor
    entropy: torch.Tensor
    logprobs: torch.Tensor | None


def _row_values(name: str, value, hidden: torch.Tensor, op: str = "linear_entropy_loss",
                constant: bool = False) -> torch.Tensor | None:
    """None, a Python number for every row, or a float tensor (N,) on hidden's device; returned
    as a contiguous (N,) tensor of the statistics' dtype (differentiable if ``value`` is, unless
    ``constant``: then a tensor that requires grad in grad mode is refused)."""
    if value is None:
        return None
    rows = hidden.shape[0]
    dtype = reference.compute_dtype(hidden.dtype)
    if not isinstance(value, torch.Tensor):
        largest = float(torch.finfo(dtype).max)  # what a row weight of dtype holds
        value = _checks.check_number(f"{name} (a number, a tensor (N,) or None)", value,
                                     low=-largest, high=largest)
        return torch.full((rows,), value, dtype=dtype, device=hidden.device)
    _checks.check_dense(value, name)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.shape != (rows,):
        raise ValueError(f"{name} must have shape (N,) = ({rows},), one value per row of hidden, "
                         f"got {tuple(value.shape)}")
    if value.device != hidden.device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")
    _checks.check_autograd_mode(value, op)
    if constant and value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} is a constant of {op}'s loss (no gradient flows to it): "
                         "pass it detached")
    return value.to(dtype).contiguous()


@shares_refusals
@autocast_like_linear
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
            and d_bias the shard's). Every rank must pass the same hidden (and its requires_grad),
            tokens, row weights, temperature and policy settings. The ranks compare all of it but
            the values of hidden and of the row weights (tokens by a checksum:
            em_kernels/_vocab_parallel.py) and raise the same ValueError on every rank where they
            differ; an argument that fails its own checks on one rank raises there, and the others
            raise an error that names that rank. Costs an all-gather of the shard sizes and calls,
            read on the host to cut every rank's row chunks alike (one sync on CUDA), two
            all-reduces of chunk-sized row vectors per row chunk and one of d_hidden (N x H).
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

    float16: dz is scaled to the largest row weight to stay clear of underflow, so d_weight and
    d_bias are sums over all N rows of unit-weight terms until the backward multiplies the
    weight back in; such sums pass float16's 65504 at large N with large hidden states, so they
    are kept in float32 (V x H x 4 bytes from the forward to the backward instead of 2, plus
    the float16 result at the end) and rounded once, after the upstream gradient (a
    GradScaler's scale) is applied: they overflow only where the true gradient does.
    """
    if entropy_weight is None and logprob_weight is None:
        raise ValueError("give entropy_weight, logprob_weight or both: the loss is their "
                         "weighted sum of the rows' entropies and log-probs")
    if logprob_weight is not None and tokens is None:
        raise ValueError("logprob_weight weighs the log-probs of tokens: pass tokens too")
    return _fused_loss("linear_entropy_loss", hidden, weight, bias, tokens, entropy_weight,
                       logprob_weight, None, temperature, process_group, backend)


class _Policy(NamedTuple):
    """linear_policy_loss's row constants (as given; then (N,) tensors) and settings."""
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    clip_low: float
    clip_high: float
    kl_weight: float


@shares_refusals
@autocast_like_linear
def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    tokens: torch.Tensor,
    advantages: torch.Tensor | float,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_range: float | tuple[float, float] = 0.2,
    kl_weight: float = 0.0,
    token_weight: torch.Tensor | float | None = None,
    entropy_weight: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    process_group=None,
    backend: str = "auto",
) -> LinearEntropyLoss:
    """PPO's clipped policy loss (GRPO's, RLOO's, EM-RL's) on the LM head, with a k3 KL to a
    reference policy and an optional entropy term, its gradients computed in the forward:

        loss = sum_r token_weight[r] (-min(rho_r A_r, clip(rho_r, 1 - eps_low, 1 + eps_high) A_r)
                                      + kl_weight k3_r)  +  sum_r entropy_weight[r] H_r
        rho_r = exp(lp_r - old_r),  k3_r = exp(c) - c - 1,  c = clamp(ref_r - lp_r, -20, 20)

    over the rows' log-probs lp_r = log p_r(tokens[r]) of softmax((hidden @ weight^T + bias) /
    temperature). Each row's term depends on its own log-prob alone, which the forward knows
    before it forms the logits' gradient, so this takes three N x H x V matmuls where
    `linear_entropy` followed by the same loss in PyTorch takes four; the values and gradients
    are those of that PyTorch loss (torch.minimum's and clamp's gradient conventions included).

    Args:
        hidden, weight, bias, tokens, temperature, process_group, backend: as in
            `linear_entropy_loss` (tokens are required).
        advantages: (N,) float tensor (or one number for every row): A_r, a constant.
        old_logprobs: (N,) log-probs of the tokens under the policy that sampled them (a
            constant); None: on-policy, rho = 1 (its value; its gradient is still A's).
        ref_logprobs: (N,) log-probs under the reference policy (a constant), needed when
            kl_weight > 0.
        clip_range: eps, or (eps_low, eps_high) for asymmetric clipping (DAPO); each >= 0.
        kl_weight: beta >= 0 of the k3 term.
        token_weight: per-row weights of the policy term (a tensor (N,) or a number); None:
            1 / N, the token mean. Pass 1 / (tokens in the global batch) for other
            normalisations, or a per-sequence weight for a sequence mean. May require grad
            (d loss / d weight is the row's term).
        entropy_weight: optional per-row entropy weights (an entropy bonus is negative).

    Returns:
        LinearEntropyLoss(loss, entropy, logprobs), as `linear_entropy_loss`: the loss
        differentiable w.r.t. hidden, weight, bias and the row weights; entropy and logprobs
        detached (the ratio, the clip fraction and the KL follow from logprobs in O(N)). A NaN
        log-prob (an id outside the vocabulary, unchecked on CUDA) makes the loss NaN; a token
        on a -inf logit has ratio 0 given old_logprobs (a finite term), NaN without. Memory,
        precision, the one-backward rule and torch.compile as in `linear_entropy_loss`.

    Gradient conventions at the measure-zero points where the loss has no derivative: the
    unclipped ratio's derivative on the clip bounds themselves (and k3's at a log ratio of
    exactly +-20), half from each branch where the two terms of the min tie. Autograd's choice
    there depends on the torch version.

    float16 (not bfloat16): dz, the float16 operand of the gradient matmuls, is scaled by the
    largest |token_weight| (|A| + kl_weight), the size of a row's gradient at ratios near 1; a
    row whose ratio or exp(ref - lp) is thousands of times larger can overflow its dz, and so
    its d_hidden and d_weight, to inf. d_weight and d_bias are summed in float32, as in
    `linear_entropy_loss`.
    """
    name = "clip_range (eps or (eps_low, eps_high))"
    if isinstance(clip_range, (tuple, list)):
        if len(clip_range) != 2:
            raise ValueError(f"{name} has {len(clip_range)} entries")
        clip_low, clip_high = clip_range
    else:
        clip_low = clip_high = clip_range
    # Bounded by the largest float32: the clip bounds and kl_weight meet float32 tensors.
    clip_low = _checks.check_number(name, clip_low, low=0.0, high=_checks.FLOAT32_MAX)
    clip_high = _checks.check_number(name, clip_high, low=0.0, high=_checks.FLOAT32_MAX)
    kl_weight = _checks.check_number("kl_weight", kl_weight, low=0.0, high=_checks.FLOAT32_MAX)
    if kl_weight > 0 and ref_logprobs is None:
        raise ValueError("kl_weight > 0 needs ref_logprobs, the tokens' log-probs under the "
                         "reference policy")
    if tokens is None:
        raise ValueError("tokens are required: the policy loss is on their log-probs")
    if advantages is None:
        raise TypeError("advantages are required: a tensor (N,) or one number for every row")
    policy = _Policy(advantages, old_logprobs, ref_logprobs, clip_low, clip_high, kl_weight)
    return _fused_loss("linear_policy_loss", hidden, weight, bias, tokens, entropy_weight,
                       token_weight, policy, temperature, process_group, backend)


def _fused_loss(op, hidden, weight, bias, tokens, entropy_weight, logprob_weight, policy,
                temperature, process_group, backend) -> LinearEntropyLoss:
    """The checks and the call shared by both losses (policy None: the plain weighted sum)."""
    temperature = _checks.check_temperature(temperature)
    _check_matrices(hidden, weight, bias, backend if isinstance(backend, str) else "auto", op=op)
    # Eagerly, any torch.func transform (vmap over any argument or none of them, grad): the
    # loss's autograd.Function has no rule for them. Traced, a vmapped operand (Dynamo traces
    # is_batchedtensor from torch 2.8).
    if not torch.compiler.is_compiling():
        transformed = _checks.transform_active()
    else:
        operands = (hidden, weight, bias, tokens, entropy_weight, logprob_weight,
                    *(policy or ()))
        transformed = DYNAMO_TRACES_IS_BATCHEDTENSOR and any(
            isinstance(operand, torch.Tensor) and torch._C._functorch.is_batchedtensor(operand)
            for operand in operands)
    if transformed:
        raise NotImplementedError(
            f"{op} does not run under torch.vmap or the other torch.func transforms (under "
            "vmap: its rows are a batch already, so flatten the vmapped dim into N, or use "
            "linear_entropy)")
    implementation = resolve_backend(backend, hidden.device)
    if hidden.dtype == torch.float64 and implementation != "torch":
        raise TypeError('float64 inputs run only with backend="torch"')
    if tokens is not None:  # with a process_group, the range once the whole vocabulary is known
        _checks.check_tokens(tokens, hidden.shape[:1],
                             weight.shape[0] if process_group is None else None, hidden.device,
                             rows_of="hidden states")
        tokens = tokens.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    entropy_weight = _row_values("entropy_weight", entropy_weight, hidden, op)
    if entropy_weight is None:
        entropy_weight = hidden.new_zeros(hidden.shape[:1],
                                          dtype=reference.compute_dtype(hidden.dtype))
    if policy is None:
        logprob_weight = _row_values("logprob_weight", logprob_weight, hidden, op)
        policy = (None, None, None, 0.0, 0.0, 0.0)
    else:
        if logprob_weight is None:
            logprob_weight = 1.0 / max(hidden.shape[0], 1)  # the token mean
        logprob_weight = _row_values("token_weight", logprob_weight, hidden, op)
        # (Not NamedTuple._replace, which dynamo cannot trace before torch 2.9.)
        policy = (*(_row_values(name, getattr(policy, name), hidden, op, constant=True)
                    for name in ("advantages", "old_logprobs", "ref_logprobs")),
                  policy.clip_low, policy.clip_high, policy.kl_weight)
    grad_mode = torch.is_grad_enabled()
    arguments = (hidden, weight, bias, tokens, entropy_weight, logprob_weight, *policy,
                 temperature, grad_mode and hidden.requires_grad,
                 grad_mode and weight.requires_grad,
                 grad_mode and bias is not None and bias.requires_grad, implementation)
    if process_group is None:
        loss, entropy, logprobs = loss_ops.LinearEntropyLossFunction.apply(*arguments, None)
    else:
        loss, entropy, logprobs = _vocab_parallel_loss(process_group, op, *arguments)
    return LinearEntropyLoss(loss, entropy, None if tokens is None else logprobs)


@torch.compiler.disable
def _vocab_parallel_loss(process_group, op, hidden, weight, bias, tokens, entropy_weight,
                         logprob_weight, advantages, old_logprobs, ref_logprobs, clip_low,
                         clip_high, kl_weight, temperature, need_grad_hidden, *arguments):
    """Either fused loss on a vocabulary shard, always eager: inductor would trace the
    all-reduce of d_hidden, which runs in the autograd forward on a tensor kept for the backward,
    into a functional collective whose result the backward does not see (a wrong loss and
    gradients, torch 2.14: tests/test_vocab_parallel.py), so Dynamo breaks the graph here."""
    call = RankCall.on_head(
        op, hidden, temperature, need_grad_hidden, tokens,
        ("old_logprobs given", old_logprobs is not None),
        ("ref_logprobs given", ref_logprobs is not None), ("clip_low", clip_low),
        ("clip_high", clip_high), ("kl_weight", kl_weight))
    # The host reads the shard sizes anyway (the row chunks): the calls are compared there too.
    shard = VocabShard.of(process_group, weight.shape[0], hidden.device, call,
                          check_on_host=True)
    if tokens is not None:
        _checks.check_token_range(tokens, shard.total)
    return loss_ops.LinearEntropyLossFunction.apply(
        hidden, weight, bias, tokens, entropy_weight, logprob_weight, advantages, old_logprobs,
        ref_logprobs, clip_low, clip_high, kl_weight, temperature, need_grad_hidden, *arguments,
        shard)
