"""EM-RL: reinforcement learning whose only reward is the model's own confidence.

Rewards of a sampled response y to prompt x (no labels anywhere), from one no-grad pass of
`em_kernels.linear_entropy_loss` (log-probs and entropies of the response tokens, no (B, T, V)
logits):

    sequence_reward:  mean_t log pi(y_t | x, y_<t)       reduce="mean" (the released code)
                      sum_t  log pi(y_t | x, y_<t)       reduce="sum"  (the paper's Eq. 3)
    token_reward:     -mean_t H(pi(. | x, y_<t))         reduce="mean"
                      -sum_t  H(pi(. | x, y_<t))         reduce="sum"  (the paper's Eq. 4)

Advantages over the n responses of a prompt (consecutive rows): RLOO, r_i - mean_{j != i} r_j;
GRPO, (r_i - mean_j r_j) / (std_j r_j + eps). The policy loss is PPO's clipped surrogate on every
response token plus beta times the k3 estimate of KL(pi || pi_ref) (and, optionally, verl's
entropy bonus, which the released runs kept at 0.001), averaged over the tokens,
from `em_kernels.linear_policy_loss` on the final hidden states and the LM head: its gradients
come from its forward, three N x H x V matmuls where linear_entropy and the loss in PyTorch take
four.
"""

from __future__ import annotations

import math

import os

import torch
from torch import nn

import em_kernels
from em_kernels import _checks

from ._common import (
    check_choice,
    check_positive,
    check_temperature,
    check_token_ids,
    clip_and_step,
    frozen_copy,
    input_vocab_size,
    k3_kl,
    response_rows,
    response_token_stats,
    sample_responses,
    save_if_due,
    scoring_mode,
    trainer_optimizer,
    training_loop,
)

__all__ = ["EMRLTrainer", "grpo_advantages", "rloo_advantages", "sequence_reward", "token_reward"]

REDUCTIONS = ("mean", "sum")
REWARDS = ("sequence", "token")
ADVANTAGES = ("rloo", "grpo")


def _reduce_per_sequence(values: torch.Tensor, tokens, reduce: str) -> torch.Tensor:
    if reduce == "sum":
        return tokens.per_sequence_sum(values)
    return tokens.per_sequence_mean(values)


def _rewards_from(tokens, kind: str, reduce: str) -> torch.Tensor:
    if kind == "sequence":
        return _reduce_per_sequence(tokens.logprobs, tokens, reduce)
    return -_reduce_per_sequence(tokens.entropy, tokens, reduce)


@torch.no_grad()
def sequence_reward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor, *, reduce: str = "mean",
                    temperature: float = 1.0) -> torch.Tensor:
    """Trajectory-level confidence of each response: its token log-probs' mean (reduce="mean",
    the released code) or sum (reduce="sum", the paper's Eq. 3). (B) float32, no gradient; an
    empty response gets 0. Batch layout as in em_ft_loss. The model is scored in `scoring_mode`
    (no dropout or other train-mode randomness: the same batch always gets the same rewards),
    its modules' modes restored after. ``temperature``: the distribution softmax(logits / T)
    that is scored (EMRLTrainer scores its rewards at its sampling temperature)."""
    check_choice("reduce", reduce, REDUCTIONS)
    check_temperature(temperature)
    with scoring_mode(model):
        tokens = response_token_stats(model, input_ids, attention_mask, response_mask,
                                      with_logprobs=True, temperature=temperature)
    return _rewards_from(tokens, "sequence", reduce)


@torch.no_grad()
def token_reward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, *, reduce: str = "mean",
                 temperature: float = 1.0) -> torch.Tensor:
    """Minus the token entropy of each response: its mean (reduce="mean") or sum (reduce="sum",
    the paper's Eq. 4). (B) float32, no gradient; an empty response gets 0. Scored in
    `scoring_mode`, at ``temperature``, as sequence_reward."""
    check_choice("reduce", reduce, REDUCTIONS)
    check_temperature(temperature)
    with scoring_mode(model):
        tokens = response_token_stats(model, input_ids, attention_mask, response_mask,
                                      with_logprobs=False, temperature=temperature)
    return _rewards_from(tokens, "token", reduce)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor (one reward per response), got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a float tensor, got {rewards.dtype}")
    try:
        group_size = _checks.check_int("group_size", group_size, 2)
    except ValueError as error:
        raise ValueError(f"{error} (the baseline needs other responses to the same "
                         "prompt)") from None
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not a whole number of groups of "
                         f"{group_size}; the responses to one prompt must be consecutive")
    return rewards.reshape(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each reward minus the mean of the other rewards of its group
    (groups are consecutive runs of ``group_size``), no std normalisation. Same shape as rewards."""
    groups = _grouped(rewards, group_size)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(rewards.shape)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), with the unbiased std (as verl); eps is a
    finite number > 0 (a group of equal rewards then gets advantages 0, not 0 / 0)."""
    eps = check_positive("eps", eps)
    groups = _grouped(rewards, group_size)
    in_dtype = torch.tensor(eps, dtype=rewards.dtype)
    if in_dtype == 0 or torch.isinf(in_dtype):
        raise ValueError(f"eps {eps} rounds to {float(in_dtype)} in the rewards' {rewards.dtype}: "
                         "pass one that dtype holds (0 gives a group of equal rewards 0 / 0, inf "
                         "every advantage 0)")
    centred = groups - groups.mean(-1, keepdim=True)
    return (centred / (groups.std(-1, keepdim=True) + eps)).reshape(rewards.shape)


class EMRLTrainer:
    """EM-RL: n rollouts per prompt, rewards from the model itself (no labels), PPO-clip policy
    updates with a k3 KL penalty to a frozen reference model.

    Per step: sample ``num_rollouts`` responses per prompt; one no-grad pass gives the old
    log-probs and the rewards (both from the policy that sampled); advantages per group, put on
    every response token; then ``ppo_epochs`` passes over minibatches of ``minibatch_size``
    sequences, each one optimiser step on

        loss = token-mean( -min(rho * A, clip(rho, 1 - clip, 1 + clip) * A) + beta * k3
                           - entropy_coeff * H ),
        rho = exp(logp - logp_old),  k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1.

    Every log-prob and entropy (old, new, reference, rewards) is of softmax(logits /
    temperature), the distribution the rollouts were sampled from (as verl does); at the
    default temperature 1 the rewards are exactly sequence_reward / token_reward. Every pass,
    with or without gradient, of the policy and of the reference model runs in `scoring_mode`:
    the network that sampled (eval mode: no dropout, no router jitter, ...), gradient
    checkpointing kept, each module's mode restored after the step. The first update's ratio is
    then exactly 1, and the KL to a reference with the policy's weights exactly 0.

    Runs unchanged under torchrun with DDP or FSDP2 (give it the wrapped model, each rank its own
    prompts, the same minibatch count on every rank). Under FSDP2 pass ``reference_model``
    yourself when beta > 0.

    Args:
        reward: "sequence" (log-prob) or "token" (minus entropy); reward_reduce: "mean" or "sum".
        advantage: "rloo" or "grpo".
        num_rollouts: responses per prompt (>= 2), the advantage group size.
        clip_range: PPO ratio clip; beta: KL weight (0 disables the reference model).
        entropy_coeff: weight of verl's entropy bonus, a number >= 0 subtracted times each
            token's entropy H (0: none, as in the paper). The released EM-RL runs kept verl's
            default of 0.001 (their ppo_trainer.yaml): pass 0.001 to reproduce them.
        minibatch_size: sequences per optimiser step (None: the whole rollout batch). The
            released runs took 4 optimiser steps per rollout batch (ppo_mini_batch_size 128 of
            train_batch_size 512 prompts).
        The rest as in EMFTTrainer. The released runs used responses of up to 3072 tokens
        (max_new_tokens), lr 1e-6 and verl's AdamW weight decay of 0.01 (weight_decay).
    """

    def __init__(self, model: nn.Module, *, pad_token_id: int,
                 eos_token_id: int | list[int] | None,
                 reward: str = "sequence", reward_reduce: str = "mean", advantage: str = "rloo",
                 num_rollouts: int = 4, max_new_tokens: int = 256, temperature: float = 1.0,
                 clip_range: float = 0.2, beta: float = 0.001, entropy_coeff: float = 0.0,
                 reference_model: nn.Module | None = None, ppo_epochs: int = 1,
                 minibatch_size: int | None = None, lr: float = 1e-6, weight_decay: float = 0.0,
                 max_grad_norm: float | None = 1.0,
                 optimizer: torch.optim.Optimizer | None = None,
                 save_dir: str | os.PathLike | None = None, save_every: int = 0,
                 progress: bool = True):
        check_choice("reward", reward, REWARDS)
        check_choice("reward_reduce", reward_reduce, REDUCTIONS)
        check_choice("advantage", advantage, ADVANTAGES)
        num_rollouts = check_positive("num_rollouts", num_rollouts, integer=True)
        if num_rollouts < 2:
            raise ValueError(f"num_rollouts must be >= 2 (advantages compare the responses to one "
                             f"prompt), got {num_rollouts}")
        max_new_tokens = check_positive("max_new_tokens", max_new_tokens, integer=True)
        temperature = check_temperature(temperature)
        clip_range = check_positive("clip_range", clip_range)
        beta = check_positive("beta", beta, allow_zero=True)
        entropy_coeff = check_positive("entropy_coeff", entropy_coeff, allow_zero=True)
        ppo_epochs = check_positive("ppo_epochs", ppo_epochs, integer=True)
        if minibatch_size is not None:
            minibatch_size = check_positive("minibatch_size", minibatch_size, integer=True)
        lr = check_positive("lr", lr)
        save_every = check_positive("save_every", save_every, integer=True, allow_zero=True)
        if max_grad_norm is not None:
            max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        if save_every and save_dir is None:
            raise ValueError("save_every is set but save_dir is None: say where to save")
        vocab_size = input_vocab_size(model)
        check_token_ids("pad_token_id", pad_token_id, allow_none=False, allow_list=False,
                        vocab_size=vocab_size)
        check_token_ids("eos_token_id", eos_token_id, allow_none=True, allow_list=True,
                        vocab_size=vocab_size)
        self.model = model
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.reward, self.reward_reduce, self.advantage = reward, reward_reduce, advantage
        self.num_rollouts, self.max_new_tokens = num_rollouts, max_new_tokens
        self.temperature, self.clip_range, self.beta = temperature, clip_range, beta
        self.entropy_coeff = entropy_coeff
        self.ppo_epochs, self.minibatch_size = ppo_epochs, minibatch_size
        self.max_grad_norm = max_grad_norm
        self.reference_model = None
        if beta > 0:
            self.reference_model = reference_model if reference_model is not None else (
                frozen_copy(model))
        self.optimizer = trainer_optimizer(model, optimizer, lr, weight_decay)
        self.save_dir, self.save_every, self.progress = save_dir, save_every, progress
        self.global_step = 0

    def _policy_loss(self, batch, old_logprobs, ref_logprobs, advantages):
        """PPO-clip + beta * k3 - entropy_coeff * H over the response tokens of one minibatch,
        token-mean, from `em_kernels.linear_policy_loss` (gradients in its forward: three
        matmuls on the LM head). Returns the loss, and for the log the mean k3 and the clip
        fraction: the fraction of tokens whose clipped term is the one the loss takes (its
        surrogate -A clip(rho) above -A rho), as verl's pg_clipfrac and TRL's clip ratio count
        it; a ratio outside the range on the side where the min keeps it unclipped does not
        count."""
        rows = response_rows(self.model, *batch)
        count = max(rows.hidden.shape[0], 1)
        token_advantages = advantages[rows.sequence]
        out = em_kernels.linear_policy_loss(
            rows.hidden, rows.head.weight, bias=rows.head_bias, tokens=rows.tokens,
            advantages=token_advantages, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, clip_range=self.clip_range,
            kl_weight=self.beta if ref_logprobs is not None else 0.0, token_weight=1.0 / count,
            entropy_weight=-self.entropy_coeff / count if self.entropy_coeff else None,
            temperature=self.temperature, backend=rows.backend)
        ratio = (out.logprobs - old_logprobs).exp()
        clipped = ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        kl = (k3_kl(out.logprobs, ref_logprobs) if ref_logprobs is not None
              else torch.zeros_like(ratio))
        clipping = -token_advantages * clipped > -token_advantages * ratio
        clip_fraction = clipping.float().sum() / count
        return out.loss, kl.sum() / count, clip_fraction

    def step(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, float]:
        """Roll out, score, then the PPO updates, in `scoring_mode` (the first update's ratio is
        then exactly 1). Returns mean reward, loss, kl, entropy, clip fraction, the largest
        gradient norm (before clipping) of the step's updates, and how many updates were skipped
        for a gradient norm that was not finite."""
        with scoring_mode(self.model):
            return self._step(prompt_ids, prompt_mask)

    def _step(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, float]:
        rollout = sample_responses(
            self.model, prompt_ids, prompt_mask, num_samples=self.num_rollouts,
            max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, temperature=self.temperature)
        batch = (rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        with torch.no_grad():
            old = response_token_stats(self.model, *batch, with_logprobs=True,
                                       temperature=self.temperature)
            rewards = _rewards_from(old, self.reward, self.reward_reduce)
            reference = None
            if self.reference_model is not None:
                with scoring_mode(self.reference_model):
                    reference = response_token_stats(self.reference_model, *batch,
                                                     with_logprobs=True,
                                                     temperature=self.temperature)
        advantage_fn = rloo_advantages if self.advantage == "rloo" else grpo_advantages
        advantages = advantage_fn(rewards, self.num_rollouts)

        size = rollout.input_ids.shape[0]
        minibatch = self.minibatch_size or size
        losses, kls, clip_fractions, grad_norms = [], [], [], []
        for _ in range(self.ppo_epochs):
            for start in range(0, size, minibatch):
                rows = slice(start, start + minibatch)
                selected = (old.sequence >= start) & (old.sequence < start + minibatch)
                loss, kl, clip_fraction = self._policy_loss(
                    tuple(tensor[rows] for tensor in batch), old.logprobs[selected],
                    None if reference is None else reference.logprobs[selected],
                    advantages[rows])
                grad_norms.append(
                    clip_and_step(self.model, self.optimizer, loss, self.max_grad_norm))
                losses.append(loss.detach())
                kls.append(kl)
                clip_fractions.append(clip_fraction)
        self.global_step += 1
        save_if_due(self.model, self.save_dir, self.save_every, self.global_step)
        entropy = old.entropy
        return {"loss": float(torch.stack(losses).mean()), "kl": float(torch.stack(kls).mean()),
                "clip_fraction": float(torch.stack(clip_fractions).mean()),
                "grad_norm": max(grad_norms, key=lambda norm: (math.isnan(norm), norm)),
                "skipped_updates": sum(not math.isfinite(norm) for norm in grad_norms),
                "reward": float(rewards.mean()),
                "entropy": float(entropy.mean()) if entropy.numel() else 0.0,
                "response_tokens": entropy.numel()}

    def train(self, prompt_batches, num_steps: int | None = None) -> list[dict[str, float]]:
        """One step per batch of prompts (dicts with input_ids and attention_mask, or pairs),
        stopping after ``num_steps`` (an int >= 0) when given. Returns each step's
        statistics."""
        return training_loop(self.step, prompt_batches, num_steps, "EM-RL", self.progress,
                             ("loss", "reward", "entropy"))
