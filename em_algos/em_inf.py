"""EM-INF in Hugging Face `generate()`: logits processors, no monkey-patching, no autograd.

    from em_algos.em_inf import em_inf_processors, NEUTRAL_SAMPLING
    out = model.generate(**inputs, do_sample=True, max_new_tokens=256,
                         logits_processor=em_inf_processors(temperature=0.7, top_p=0.95),
                         **NEUTRAL_SAMPLING)

`EMInfLogitsProcessor` runs `em_kernels.em_inf_adjust` on the next-token scores of every row at
every decoding step: one call for the whole batch, each row deciding its own early exit
(early_exit="row"), so batched generation gives every sequence what it would get alone.
`AdaptiveTemperatureLogitsProcessor` is the paper's adaptive-temperature baseline.

Where it sits: generate() applies a user's `logits_processor` list before the temperature, top-k
and top-p warpers that it builds from the generation config, so passing just
`[EMInfLogitsProcessor()]` already puts EM-INF ahead of sampling. `em_inf_processors` makes that
order explicit in one list; pass `NEUTRAL_SAMPLING` with it so that generate() does not apply a
second temperature / top-k / top-p of its own (a model's generation_config often sets them).
The paper's released evaluation kept the model's generation_config (for Qwen2.5-Instruct a
top-k, a top-p and a repetition penalty) after EM-INF: to reproduce it, give its top_k and
top_p to `em_inf_processors`. generate() applies its own processors (repetition penalty, bad
words, min length) before a user's list, so EM-INF sees their output, where the released code
adjusted the raw logits first.

Both processors return the adjusted scores in the dtype of the scores they get (generate() hands
processors float32 scores, so that is what they return); -inf entries set by earlier processors
(bad words, min length) stay -inf.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import em_kernels
from em_kernels import _checks
from em_kernels import em_inf as em_inf_ops

__all__ = [
    "AdaptiveTemperatureLogitsProcessor",
    "EMInfLogitsProcessor",
    "NEUTRAL_SAMPLING",
    "em_inf_processors",
]

_BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# generate() arguments under which it adds no temperature / top-k / top-p warper of its own.
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


# A 1 x 2 CPU row on which the constructors run the op once with backend="torch" (and at most
# one step or iteration: the counts are checked in full, not run), so that bad options raise when
# the processor is built rather than at the first generated token.
_PROBE = torch.zeros(1, 2)


def _checked_backend(backend, steps: int | None = None) -> str:
    """``backend``, refused where it cannot run in this process at all (not built, no GPU, no
    Triton), or where Triton would get more EM-INF steps than it takes; which device the scores
    are on shows only at the first token."""
    backend = _checks.check_choice("backend", backend, _BACKENDS)
    status = "available" if backend == "auto" else em_kernels.available_backends()[backend]
    if status != "available":
        raise em_kernels.BackendUnavailableError(f'backend="{backend}" is unavailable: {status}')
    if backend == "triton" and steps is not None and steps > em_inf_ops.TRITON_MAX_STEPS:
        raise ValueError(f"steps={steps}: the Triton EM-INF kernel takes at most "
                         f'{em_inf_ops.TRITON_MAX_STEPS} steps; pass backend="auto", which '
                         "picks one that takes them")
    return backend


class EMInfLogitsProcessor(LogitsProcessor):
    """EM-INF on the next-token scores (see `em_kernels.em_inf_adjust` for the options).

    Defaults are those of the released code's EM-INF function (5 Adam steps, lr 0.1, KL weight
    0.001, entropy threshold 0.3). Its evaluation script (EM-INF/em_inf_eval.sh) runs 3 steps
    with KL weight 0.05 and samples at temperature 0.1 after the adjustment: to reproduce it,
    `em_inf_processors(EMInfLogitsProcessor(steps=3, kl_weight=0.05), temperature=0.1)`.
    early_exit="row" (default) lets every sequence of a batch stop on its own entropy; "batch"
    reproduces the released code's batch-wide loss (the same at batch size 1, as it generates).
    Bad options raise here, not at the first token: so does an explicit backend that cannot run
    in this process (build the processor where it will run, not on a CPU-only driver for GPU
    workers; "auto" is never refused).
    """

    def __init__(self, steps: int = 5, lr: float = 0.1, kl_weight: float = 0.001,
                 threshold: float = 0.3, early_exit: str = "row", optimizer: str = "adam",
                 backend: str = "auto"):
        steps = _checks.check_int("steps", steps, 0, em_inf_ops.MAX_STEPS)
        self.options = dict(steps=steps, lr=lr, kl_weight=kl_weight, threshold=threshold,
                            early_exit=early_exit, optimizer=optimizer)
        em_kernels.em_inf_adjust(_PROBE, backend="torch",
                                 **{**self.options, "steps": min(steps, 1)})
        self.backend = _checked_backend(backend, steps)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        adjusted = em_kernels.em_inf_adjust(scores, backend=self.backend, **self.options)
        return adjusted.to(scores.dtype)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"EMInfLogitsProcessor({options}, backend={self.backend!r})"


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """The paper's adaptive-temperature baseline on the next-token scores, per row (see
    `em_kernels.adaptive_temperature`). alpha 0.5 follows the paper's text ("alpha in (0.4,
    0.6) works best"), which gives no delta or tol; the released processor's defaults are
    alpha 0.2, delta 1e-6, tol 0.1, and its evaluation script (EM-INF/adaptive_temp_eval.sh)
    runs alpha 0.85, delta 1e-5, tol 0.1: pass those to reproduce it."""

    def __init__(self, alpha: float = 0.5, delta: float = 0.1, max_iters: int = 100,
                 tol: float = 0.01, backend: str = "auto"):
        max_iters = _checks.check_int("max_iters", max_iters, 0, em_inf_ops.MAX_STEPS)
        self.options = dict(alpha=alpha, delta=delta, max_iters=max_iters, tol=tol)
        em_kernels.adaptive_temperature(_PROBE, backend="torch",
                                        **{**self.options, "max_iters": min(max_iters, 1)})
        self.backend = _checked_backend(backend)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scaled = em_kernels.adaptive_temperature(scores, backend=self.backend, **self.options)
        return scaled.to(scores.dtype)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"AdaptiveTemperatureLogitsProcessor({options}, backend={self.backend!r})"


def em_inf_processors(
    adjust: LogitsProcessor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_tokens_to_keep: int = 1,
) -> LogitsProcessorList:
    """[adjust, temperature, top-k, top-p] for generate(..., do_sample=True, **NEUTRAL_SAMPLING).

    Args:
        adjust: the logit adjustment that goes first; default `EMInfLogitsProcessor()` (the
            released EM-INF function's defaults). An `AdaptiveTemperatureLogitsProcessor` works
            as well.
        temperature: sampling temperature applied after the adjustment, a finite number > 0
            (1.0: none; the released evaluation samples EM-INF at 0.1).
        top_k: keep the k most likely tokens after the adjustment, an int >= 0 (None or 0: no
            top-k).
        top_p: nucleus sampling after the adjustment, a number in [0, 1] (None or 1.0: no
            top-p).
        min_tokens_to_keep: an int >= 1, as in transformers' warpers.

    Bad values raise here (TypeError for a wrong type, ValueError out of range) rather than in
    transformers' warpers, which refuse an int temperature and take top_k=True for 1.
    """
    if adjust is None:
        adjust = EMInfLogitsProcessor()
    elif not isinstance(adjust, LogitsProcessor):
        raise TypeError("adjust must be None or a transformers LogitsProcessor (e.g. "
                        f"EMInfLogitsProcessor()), got {type(adjust).__name__}")
    temperature = _checks.check_temperature(temperature)
    if top_k is not None:
        top_k = _checks.check_int("top_k", top_k, 0)
    if top_p is not None:
        top_p = _checks.check_number("top_p", top_p, low=0.0, high=1.0)
    min_tokens_to_keep = _checks.check_int("min_tokens_to_keep", min_tokens_to_keep, 1)
    processors = LogitsProcessorList([adjust])
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=min_tokens_to_keep))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=min_tokens_to_keep))
    return processors
