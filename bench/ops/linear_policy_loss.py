"""linear_policy_loss: PPO's clipped surrogate plus a k3 KL to a reference policy, the token
mean over the rows, on the tokens' log-probs under softmax(hidden @ weight^T) from hidden [M, H],
weight [V, H] (the policy loss of GRPO, DAPO and EM-RL, fused with the LM head).

Inputs: linear_entropy's shapes, dtypes, hidden and weight, plus per row a random token, a
random advantage, and old and reference log-probs: the row's own log-prob (in float64) plus
N(0, LOGPROB_NOISE^2) noise, so that the clip range bites on both sides (about 12% of the rows
have a clipped ratio on the side of their advantage's sign, a zero policy gradient);
CLIP_RANGE (DAPO's), KL_WEIGHT, no entropy term.

Work (as linear_entropy; compute-bound at these sizes):
    fwd      2 M H V        the logits matmul (the loss's value: under torch.no_grad
                            linear_policy_loss computes only the statistics)
    bwd      4 M H V        d(hidden) and d(weight)
    fwd+bwd  6 M H V        the three matmuls of a linear layer

Providers: matmul (the bare LM-head matmul, the floor, as in linear_entropy), eager (what TRL
and verl write: the logits, fp32 log_softmax and gather for the tokens' log-probs, then the loss
in PyTorch on them), compile (torch.compile of eager), chunked (the log-probs over checkpointed
row chunks, verl's memory-saving form, then the same loss), em-kernels' backends (the op itself,
its gradients computed in the forward: no bwd row, as for linear_entropy's "-loss" rows), and,
when installed, Liger-Kernel's fused linear GRPO loss: the same loss on these inputs, with no
error column (it returns the loss alone, no log-probs to compare). Checked by hand on CPU
(Liger-Kernel 0.8.5, whose chunked losses are plain PyTorch, 2026-11-28): at M 64, H 32, V 200
in fp32 with these clip range, KL weight and log-prob noise, its loss was within 1.5e-8 of
linear_policy_loss's (backend "cpu") and its d(hidden) and d(weight) within 1.1e-8 and 1.5e-7.

Error: every provider that compares shows the harness two row outputs (`_LossAndLogprobs`): the
loss repeated on every row, and the rows' log-probs. Against float64: the loss and every row's
log-prob, and in the backward modes d(hidden) on a subset of rows and d(weight) on vocabulary
rows spread over the vocabulary plus those rows' tokens (where the one-hot part of the logits'
gradient lands). The upstream gradient the harness gives the repeated loss is summed into the
loss's, as for any repeat, so the gradients compared are the loss's times that sum, the
oracle's as every provider's. The oracle takes every row's log-prob in float64 first (the loss
and its gradient weigh every row): linear_entropy's float64 pass over the whole M x H x V
matmul, in vocabulary chunks.

Each output is held to eager's error on that output. The loss's errors, largest and normwise,
are taken relative to the mean of its terms' magnitudes (`Summed`), not to the loss: the terms'
signs follow the advantages', so the loss is a small mean of terms of size ~1, and a float32
sum's rounding is relative to the terms. Against the loss itself, the cpu provider, correct,
failed on 11 of 200 seeds at M 64 in fp32 (2026-11-28); against the terms it passes on all 200
in fp32 and 50 in bf16, forward and forward+backward (2026-11-29). A dropped clip or KL term
fails on the loss in fp32 and in bf16, forward included (M 64, H 256, V 32000, 2026-11-29).
"""

from __future__ import annotations

import torch

from em_kernels._ops.linear_entropy_loss import K3_MAX_LOG_RATIO

from ..harness import Provider, Summed
from .common import (chunk_rows, chunked, compile_unavailable, compiled, em_providers,
                     package_unavailable)
from .linear_entropy import (Float64Rows, LinearEntropyBench, case_float64_rows,
                             float64_logit_chunks, float64_rows, lm_head_matmul, spread_rows,
                             weight_grad_rows)

# DAPO's asymmetric clip range (eps_low, eps_high): exercises both of the op's bounds.
CLIP_RANGE = (0.2, 0.28)
# beta of the k3 term: DeepSeekMath's GRPO value, also Liger's default.
KL_WEIGHT = 0.04
# Spread of the old and reference log-probs around the row's own: about a quarter of the
# ratios fall outside CLIP_RANGE, half of them on the side where the clip takes effect.
LOGPROB_NOISE = 0.2
# The per-row constants of the loss, after hidden, tokens and weight in the eager functions.
ROW_CONSTANTS = ("advantages", "old_logprobs", "ref_logprobs")


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)


def policy_terms(logprobs, advantages, old_logprobs, ref_logprobs) -> torch.Tensor:
    """linear_policy_loss's per-token terms on given log-probs, as RL trainers write them:
    -min(rho A, clip(rho) A) + KL_WEIGHT k3, the k3 log ratio clamped as the op (and verl's
    low_var_kl) clamps it."""
    low, high = CLIP_RANGE
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - low, 1 + high) * advantages)
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO)
    return KL_WEIGHT * (log_ratio.exp() - log_ratio - 1) - surrogate


def policy_loss(*arguments) -> torch.Tensor:
    """The loss: the token mean of `policy_terms`."""
    return policy_terms(*arguments).mean()


def eager_logprobs(hidden, tokens, weight) -> tuple[torch.Tensor]:
    return (chosen_logprobs((hidden @ weight.T).float(), tokens),)


def eager_linear_policy_loss(hidden, tokens, weight, *constants) -> tuple[torch.Tensor, ...]:
    (logprobs,) = eager_logprobs(hidden, tokens, weight)
    return policy_loss(logprobs, *constants), logprobs


def _float64_logprobs(rows: Float64Rows, weight, tokens) -> torch.Tensor:
    """Every row's log p(token) in float64, from float64_rows' lse."""
    return (rows.hidden * weight.detach().index_select(0, tokens).double()).sum(-1) - rows.lse


class LinearPolicyLossBench(LinearEntropyBench):
    name = "linear_policy_loss"
    provider_notes = {
        "chunked": "the log-probs over checkpointed row chunks (verl's memory-saving form), "
                   "then the loss on all of them",
        "triton": "linear_policy_loss with the Triton entropy kernels: logits by cuBLAS in the "
                  "input dtype per row chunk, gradients in the forward (three matmuls)",
        "cuda": "linear_policy_loss with the CUDA entropy kernels",
        "cpu": "linear_policy_loss with the C++ entropy kernels",
        "liger": f"Liger-Kernel's LigerFusedLinearGRPOLoss (beta {KL_WEIGHT}, epsilon_low and "
                 f"epsilon_high {CLIP_RANGE}; its default loss_type, which sums over the mask's "
                 "tokens and divides by their count: the token mean here; k3 unclamped), every "
                 "row a one-token sequence with its own advantage, chunk_size rows as chunked's: "
                 "the same loss, not checked (it returns no log-probs)",
    }

    def make_inputs(self, dims, dtype, device, generator):
        inputs = super().make_inputs(dims, dtype, device, generator)
        rows = dims["M"]
        tokens = torch.randint(0, dims["V"], (rows,), device=device, generator=generator)
        logprobs = _float64_logprobs(float64_rows(inputs["hidden"], inputs["weight"]),
                                     inputs["weight"], tokens)
        advantages = torch.randn(rows, device=device, generator=generator)

        def near_logprobs():
            noise = torch.randn(rows, dtype=torch.float64, device=device, generator=generator)
            return (logprobs + LOGPROB_NOISE * noise).float()

        return {**inputs, "tokens": tokens, "advantages": advantages,
                "old_logprobs": near_logprobs(), "ref_logprobs": near_logprobs()}

    def _case_logprobs(self, case):
        """Every row's log-prob in float64 (computed once per case)."""
        return case.cached("logprobs", lambda: _float64_logprobs(
            case_float64_rows(case), case.inputs["weight"].detach(), case.inputs["tokens"]))

    def _terms(self, logprobs, case):
        return policy_terms(logprobs, *(case.inputs[name].double() for name in ROW_CONSTANTS))

    def output_oracle(self, case):
        logprobs = self._case_logprobs(case)
        terms = self._terms(logprobs, case)
        rows = logprobs.shape[0]
        # The terms' signs follow the advantages': the loss is a small sum of terms of size ~1.
        return [Summed(terms.mean().expand(rows), terms.abs().mean().expand(rows)), logprobs]

    def grad_oracle(self, case, upstream):
        weight = case.inputs["weight"].detach()
        tokens = case.inputs["tokens"]
        check = case.grad_rows
        logprobs = self._case_logprobs(case).clone().requires_grad_()
        # _LossAndLogprobs sums the repeated loss's upstream gradient into the loss's.
        (grad_logprob,) = torch.autograd.grad(self._terms(logprobs, case).mean(), logprobs,
                                              upstream[0].double().sum())
        rows = case_float64_rows(case)
        hidden = rows.hidden.index_select(0, check).requires_grad_()
        check_tokens = tokens.index_select(0, check)
        logits = torch.cat(list(float64_logit_chunks(hidden, weight)), -1)
        chosen_logprobs(logits, check_tokens).backward(grad_logprob.index_select(0, check))
        vocab_rows = torch.unique(torch.cat(
            [spread_rows(weight.shape[0], check.numel(), weight.device), check_tokens]))
        return {"hidden": hidden.grad, "weight": weight_grad_rows(
            rows, weight, vocab_rows, grad_logprob=grad_logprob, tokens=tokens)}

    def providers(self):
        import em_kernels

        def arguments(case):
            return [case.inputs[name] for name in ("hidden", "tokens", "weight", *ROW_CONSTANTS)]

        def eager(case):
            return lambda: _LossAndLogprobs.apply(*eager_linear_policy_loss(*arguments(case)))

        def compile_(case):
            fn = compiled(eager_linear_policy_loss)
            return lambda: _LossAndLogprobs.apply(*fn(*arguments(case)))

        def chunked_(case):
            hidden, tokens, weight, *constants = arguments(case)

            def run():
                (logprobs,) = chunked(eager_logprobs, (hidden, tokens), (weight,))
                return _LossAndLogprobs.apply(policy_loss(logprobs, *constants), logprobs)
            return run

        def ours(case, backend):
            hidden, tokens, weight, advantages, old_logprobs, ref_logprobs = arguments(case)

            def run():
                out = em_kernels.linear_policy_loss(
                    hidden, weight, tokens=tokens, advantages=advantages,
                    old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, clip_range=CLIP_RANGE,
                    kl_weight=KL_WEIGHT, backend=backend)
                return _LossAndLogprobs.apply(out.loss, out.logprobs)
            return run

        def liger(case):
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            low, high = CLIP_RANGE
            loss = LigerFusedLinearGRPOLoss(beta=KL_WEIGHT, epsilon_low=low, epsilon_high=high,
                                            chunk_size=chunk_rows(case.dims["M"]))
            hidden, tokens, weight, advantages, old_logprobs, ref_logprobs = arguments(case)
            # Liger takes [sequences, tokens] with one advantage per sequence: one-token ones.
            mask = torch.ones_like(tokens[:, None])
            return lambda: (loss(hidden[:, None], weight, tokens[:, None], mask, advantages,
                                 old_per_token_logps=old_logprobs[:, None],
                                 ref_per_token_logps=ref_logprobs[:, None])[0],)

        in_forward = ("computes its gradients in the forward: its fwd+bwd row is the comparable "
                      "one")
        return [
            Provider("matmul", lm_head_matmul, compares=False),
            Provider("eager", eager),
            Provider("compile", compile_, unavailable=compile_unavailable),
            Provider("chunked", chunked_),
            *em_providers(ours, modes_not_offered={"bwd": f"linear_policy_loss {in_forward}"}),
            Provider("liger", liger, compares=False,
                     unavailable=package_unavailable("liger_kernel", "liger-kernel"),
                     modes_not_offered={
                         "fwd": "Liger computes the gradients in every forward, under "
                                "torch.no_grad too: its fwd+bwd row is the comparable one",
                         "bwd": f"Liger {in_forward}"}),
        ]


class _LossAndLogprobs(torch.autograd.Function):
    """A provider's loss and its rows' log-probs as the harness's two row outputs, so that both
    are checked: the loss repeated on every row, whose upstream gradient is summed into the
    loss's (a repeat's derivative), and the log-probs, compared but not differentiated (the op
    returns them detached, and no provider's gradients may include them)."""

    @staticmethod
    def forward(ctx, loss, logprobs):
        return loss.expand(logprobs.shape).clone(), logprobs.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss, grad_logprobs):
        return grad_loss.sum(), None
