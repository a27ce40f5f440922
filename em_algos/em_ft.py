"""EM-FT: fine-tune a causal LM on its own unlabelled samples by minimising their token entropy.

The loss (the paper's Eq. 2) over a batch D of sampled responses y:

    L = 1/|D| * sum_{y in D} sum_t H(pi(. | x, y_<t))                 normalize="sequence"
    L = sum_{y in D} sum_t H(pi(. | x, y_<t)) / (number of tokens)    normalize="token" (as verl)

The loss is a weighted sum of the response tokens' entropies with weights known before the
forward (1/B or 1/N), so it comes from `em_kernels.linear_entropy_loss` on the final hidden states
and the LM head, which computes its gradients in the forward: three N x H x V matmuls, not the
four of `linear_entropy`, whose backward recomputes the logits. The (B, T, V) logits never
exist: the extra memory is a row chunk of logits (at most 256 MiB) and O(response tokens). With
a KL term (kl_coef > 0) each token adds kl_coef times the k3 estimate, a function of its own
log-prob: `em_kernels.linear_policy_loss` with zero advantages computes that sum the same way.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import em_kernels

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

__all__ = ["EMFTTrainer", "em_ft_loss"]

NORMALIZATIONS = ("sequence", "token")


def _divisor(normalize: str, batch_size: int, token_count: int) -> int:
    """Sum per sequence then mean over the B sequences, or mean over all N response tokens."""
    return batch_size if normalize == "sequence" else max(token_count, 1)


def _entropy_loss(model: nn.Module, batch, normalize: str, reference_logprobs=None,
                  kl_coef: float = 0.0, num_items: int | None = None
                  ) -> em_kernels.LinearEntropyLoss:
    """The loss, gradients in its forward: linear_entropy_loss without a KL term; with one,
    linear_policy_loss with zero advantages, which leaves the entropy plus kl_coef times k3.
    num_items, when given, replaces the batch's own divisor (`_divisor`)."""
    rows = response_rows(model, *batch)
    weight = 1.0 / (num_items or _divisor(normalize, rows.batch_size, rows.hidden.shape[0]))
    if reference_logprobs is None:
        return em_kernels.linear_entropy_loss(rows.hidden, rows.head.weight, bias=rows.head_bias,
                                              entropy_weight=weight, backend=rows.backend)
    return em_kernels.linear_policy_loss(
        rows.hidden, rows.head.weight, bias=rows.head_bias, tokens=rows.tokens, advantages=0.0,
        ref_logprobs=reference_logprobs, kl_weight=kl_coef, token_weight=weight,
        entropy_weight=weight, backend=rows.backend)


def em_ft_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               response_mask: torch.Tensor, *, normalize: str = "sequence",
               num_items: int | None = None) -> torch.Tensor:
    """The token-level entropy of the responses, differentiable w.r.t. the model.

    Args:
        model: a Hugging Face causal LM, plain, DDP-wrapped or FSDP2-sharded.
        input_ids: (B, T) int64, prompt followed by response (prompts left-padded).
        attention_mask: (B, T) bool or 0/1, the real tokens.
        response_mask: (B, T) bool or 0/1, the response tokens; the entropy counted for token t
            is that of the distribution that predicted it (position t - 1).
        normalize: "sequence" (sum over a response's tokens, mean over the B sequences; the
            paper's Eq. 2) or "token" (mean over all response tokens of the batch).
        num_items: what to divide the summed entropy by in place of this batch's own count (B
            sequences, or its response tokens): with gradient accumulation, the count over all
            the micro-batches of one optimiser step (on this rank: DDP and FSDP average the
            ranks' gradients), so that the accumulated loss is the whole batch's mean. A token
            mean of micro-batch means would weight a short micro-batch's tokens more. None:
            this batch's count.

    Returns:
        A float32 scalar. An empty response contributes 0. Its gradients are computed in the
        forward (`em_kernels.linear_entropy_loss`) while grad mode is on, for one backward (call
        it under torch.no_grad() for the value alone).

    The model runs in the mode it is in, as with any loss: in train mode, its dropout (and any
    other train-mode randomness) applies. EMFTTrainer calls it in `scoring_mode`.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    if num_items is not None:
        num_items = check_positive("num_items", num_items, integer=True)
    return _entropy_loss(model, (input_ids, attention_mask, response_mask), normalize,
                         num_items=num_items).loss


class EMFTTrainer:
    """EM-FT: for each batch of unlabelled prompts, sample responses, then one optimiser step on
    em_ft_loss (plus, optionally, kl_coef times the k3 estimate of KL(pi || pi_initial)).

    A step samples in eval mode and runs every pass of the policy and of the reference model in
    `scoring_mode` (the sampling network, without dropout or other train-mode randomness, with
    gradient checkpointing kept), then restores each module's mode: the KL at equal weights is
    exactly 0, and the loss is the entropy of the distribution that was sampled.

    Runs unchanged under torchrun with DDP or FSDP2: give it the wrapped model, each rank its own
    prompts. Under FSDP2 pass ``reference_model`` yourself when kl_coef > 0 (a deep copy of a
    sharded model is not a model).

    Args:
        model: the causal LM to train (plain, DDP-wrapped or FSDP2-sharded).
        pad_token_id, eos_token_id: for generation and to end responses (eos_token_id: an id,
            a list of ids, or None to always generate max_new_tokens).
        num_samples: responses sampled per prompt (the paper: 1).
        max_new_tokens: response length limit.
        temperature: sampling temperature (1.0: the model's own distribution; the paper
            states none for EM-FT, and no EM-FT training code was released).
        lr, weight_decay: AdamW settings, used when no ``optimizer`` is given.
        max_grad_norm: global gradient-norm clip (None: no clipping).
        kl_coef: weight of the KL to the initial model (0: none, the paper's setting), estimated
            by k3 on the sampled tokens with the log-probs at temperature 1 (the distribution the
            loss acts on): unbiased for KL(pi || pi_initial) when temperature is 1.
        reference_model: the KL reference when kl_coef > 0 (default: a frozen copy of the
            model); it may be in train mode, with dropout: it is scored in `scoring_mode` and
            left in its own mode after.
        normalize: em_ft_loss normalisation, "sequence" or "token".
        save_dir, save_every: save_pretrained checkpoints to save_dir/step-<k> every k steps.
        progress: show a tqdm bar (on rank 0) with loss and mean entropy.
    """

    def __init__(self, model: nn.Module, *, pad_token_id: int,
                 eos_token_id: int | list[int] | None,
                 num_samples: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 lr: float = 1e-6, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 kl_coef: float = 0.0, reference_model: nn.Module | None = None,
                 normalize: str = "sequence", optimizer: torch.optim.Optimizer | None = None,
                 save_dir: str | os.PathLike | None = None, save_every: int = 0,
                 progress: bool = True):
        num_samples = check_positive("num_samples", num_samples, integer=True)
        max_new_tokens = check_positive("max_new_tokens", max_new_tokens, integer=True)
        temperature = check_temperature(temperature)
        lr = check_positive("lr", lr)
        kl_coef = check_positive("kl_coef", kl_coef, allow_zero=True)
        save_every = check_positive("save_every", save_every, integer=True, allow_zero=True)
        if max_grad_norm is not None:
            max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        check_choice("normalize", normalize, NORMALIZATIONS)
        if save_every and save_dir is None:
            raise ValueError("save_every is set but save_dir is None: say where to save")
        vocab_size = input_vocab_size(model)
        check_token_ids("pad_token_id", pad_token_id, allow_none=False, allow_list=False,
                        vocab_size=vocab_size)
        check_token_ids("eos_token_id", eos_token_id, allow_none=True, allow_list=True,
                        vocab_size=vocab_size)
        self.model = model
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.temperature, self.max_grad_norm = temperature, max_grad_norm
        self.kl_coef, self.normalize = kl_coef, normalize
        self.reference_model = None
        if kl_coef > 0:
            self.reference_model = reference_model if reference_model is not None else (
                frozen_copy(model))
        self.optimizer = trainer_optimizer(model, optimizer, lr, weight_decay)
        self.save_dir, self.save_every, self.progress = save_dir, save_every, progress
        self.global_step = 0

    def step(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, float]:
        """Sample, then one optimiser step, in `scoring_mode`. Returns loss, mean token entropy,
        kl, and grad_norm, the gradient norm before clipping (the step is skipped when it is
        not finite)."""
        with scoring_mode(self.model):
            return self._step(prompt_ids, prompt_mask)

    def _step(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, float]:
        rollout = sample_responses(
            self.model, prompt_ids, prompt_mask, num_samples=self.num_samples,
            max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, temperature=self.temperature)
        batch = (rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        kl = torch.zeros(())
        if self.reference_model is None:
            loss, entropy, _ = _entropy_loss(self.model, batch, self.normalize)
        else:
            with torch.no_grad(), scoring_mode(self.reference_model):
                reference = response_token_stats(self.reference_model, *batch, with_logprobs=True)
            loss, entropy, logprobs = _entropy_loss(self.model, batch, self.normalize,
                                                    reference.logprobs, self.kl_coef)
            weight = 1.0 / _divisor(self.normalize, reference.batch_size, logprobs.numel())
            kl = k3_kl(logprobs, reference.logprobs).sum() * weight
        grad_norm = clip_and_step(self.model, self.optimizer, loss, self.max_grad_norm)
        self.global_step += 1
        save_if_due(self.model, self.save_dir, self.save_every, self.global_step)
        return {"loss": float(loss.detach()), "kl": float(kl.detach()),
                "entropy": float(entropy.mean()) if entropy.numel() else 0.0,
                "grad_norm": grad_norm, "response_tokens": entropy.numel()}

    def train(self, prompt_batches, num_steps: int | None = None) -> list[dict[str, float]]:
        """One step per batch of prompts (dicts with input_ids and attention_mask, or pairs),
        stopping after ``num_steps`` (an int >= 0) when given. Returns each step's
        statistics."""
        return training_loop(self.step, prompt_batches, num_steps, "EM-FT", self.progress,
                             ("loss", "entropy"))
