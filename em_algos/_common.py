"""Pieces shared by EM-FT and EM-RL: argument checks, rollouts, the per-token entropy and log-prob
of a response straight from the final hidden states and the LM head, and distributed helpers.

Conventions (the same for every public function of em_algos):

- ``input_ids`` (B, T) int64 holds prompt and response; ``attention_mask`` (B, T) marks the real
  tokens (prompts are left-padded, as Hugging Face generation wants); ``response_mask`` (B, T)
  marks the response tokens. Position ids are ``cumsum(attention_mask) - 1``, exactly what
  ``generate()`` uses, so that a rollout is scored as it was sampled (tested: the log-probs equal
  the sampling distribution's).
- The distribution that predicted token t sits at position t - 1: the response tokens' entropies
  and log-probs are read from the hidden states at the positions one to the left of the mask.
- Only those positions go through the LM head, inside the fused ops of em_kernels
  (`linear_entropy_loss` for EM-FT's loss and for scoring, `linear_policy_loss` for EM-RL's policy
  loss and EM-FT's KL term): the (B, T, V) logits are never formed. The model runs with
  ``logits_to_keep=1``, a hook on its decoder keeps the final (normed) hidden states; the LM head's
  weight and bias come from ``get_output_embeddings()``. Under FSDP2 that weight is read after the
  root module's forward, when fully_shard leaves the root's parameters (the LM head among them)
  unsharded until the backward; an LM head sharded as its own unit is refused with a ValueError. The
  first call with each LM head checks that the model's own logits at the last position are the head
  applied to the hidden state there, so a model that scales or caps its logits is refused rather
  than scored wrongly.
- Sampling is pure: the model's ``generation_config`` (a Hub repetition_penalty, min_p, EOS ...)
  is set aside while the rollouts are generated.
- Rollouts are sampled in eval mode, and the trainers, the rewards and the reference model score
  in `scoring_mode`: the network that sampled, with no train-mode randomness (dropout, Mixtral's
  router jitter, ...), so that scoring twice gives the same numbers. em_ft_loss alone runs in
  the caller's mode, as a loss function should.
- A model whose config sets ``return_dict=False`` is run with it set to True for the duration of
  each call (transformers' own forward cannot read its decoder's tuples then).
"""

from __future__ import annotations

import collections.abc
import contextlib
import math
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import em_kernels
from em_kernels import _checks


# ----------------------------------------------------------------------------- argument checks

check_choice = _checks.check_choice
# A sampling or scoring temperature: positive, and in the range the kernels scale by in float32.
check_temperature = _checks.check_temperature


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False):
    """An int (integer=True) or number, Python's or a NumPy scalar, > 0 (>= 0 with allow_zero);
    a number also at most the largest float32 (the losses and kernels take their settings in
    float32). Returned as a Python int or float, which the caller keeps."""
    if integer:
        return _checks.check_int(name, value, 0 if allow_zero else 1)
    return _checks.check_number(name, value, low=0.0, low_open=not allow_zero,
                                high=_checks.FLOAT32_MAX)


def check_sequence_batch(input_ids, attention_mask, response_mask=None, *,
                         vocab_size: int | None = None, prompts: bool = False) -> None:
    """Shapes, dtypes and devices of a non-empty (B, T) batch; integer masks of 0s and 1s
    only; token ids in [0, vocab_size) when it is given; response tokens must be attended and
    cannot be the first token (nothing predicts it). With ``prompts``, the batch is one of
    prompts to generate from, which must be left-padded with at least one real token per row:
    generate() appends after the last column, so a right-padded prompt would be continued from
    its padding (and its response would be predicted by a masked-out position). The value
    checks cost one host sync."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, seq_len) tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must be int64 (torch.long), got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): pass at least "
                         "one sequence of at least one token")
    masks = {"attention_mask": attention_mask}
    if response_mask is not None:
        masks["response_mask"] = response_mask
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(mask.shape)}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be bool or an integer 0/1 tensor, got {mask.dtype}")
        if mask.device != input_ids.device:
            raise ValueError(f"{name} is on {mask.device} but input_ids are on {input_ids.device}")
    # Only a bool mask says what it masks by its dtype: an integer one must hold 0 and 1 alone
    # (a 2 would pass .bool() and count twice in the position ids' cumsum).
    integer_masks = [name for name, mask in masks.items() if mask.dtype != torch.bool]
    if vocab_size is None and response_mask is None and not prompts and not integer_masks:
        return
    attended = attention_mask.bool()
    checks = [input_ids.min(), input_ids.max()] + [
        ((masks[name] != 0) & (masks[name] != 1)).any() for name in integer_masks]
    if prompts:
        checks += [(attended[:, :-1] & ~attended[:, 1:]).any(), ~attended[:, -1].all()]
    if response_mask is not None:
        response = response_mask.bool()
        checks += [response[:, :1].any(), (response & ~attended).any(),
                   (response[:, 1:] & ~attended[:, :-1]).any()]
    low, high, *flags = torch.stack([check.long() for check in checks]).tolist()
    for name in integer_masks:
        not_binary, *flags = flags
        if not_binary:
            raise ValueError(f"{name} holds values other than 0 and 1: pass a bool mask or an "
                             "integer one of 0s and 1s")
    if vocab_size is not None and (low < 0 or high >= vocab_size):
        raise ValueError(f"input_ids holds token id {low if low < 0 else high}, outside the "
                         f"model's vocabulary [0, {vocab_size}) (its input embedding's size)")
    if prompts:
        padding_after_real, empty_prompt, *flags = flags
        if padding_after_real:
            raise ValueError("the prompts must be left-padded (padding before the real tokens, "
                             "as generation needs), but the attention mask has padding after a "
                             "real token; with a Hugging Face tokenizer, set "
                             'tokenizer.padding_side = "left"')
        if empty_prompt:
            raise ValueError("a prompt has no real token (its attention mask is all 0): give "
                             "every prompt at least one token")
    if response_mask is None:
        return
    first_is_response, unattended, unattended_predictor = flags
    if first_is_response:
        raise ValueError("response_mask marks the first token of a sequence; no position predicts "
                         "it, so every sequence must start with at least one prompt token")
    if unattended:
        raise ValueError("response_mask marks tokens that attention_mask masks out; a response "
                         "token must be a real (attended) token")
    if unattended_predictor:
        raise ValueError("response_mask marks a token right after a masked-out (padding) "
                         "position, which would predict it; give every response at least one "
                         "real prompt token before it")


def check_token_ids(name: str, value, *, allow_none: bool, allow_list: bool,
                    vocab_size: int | None = None) -> tuple[int, ...] | None:
    """A token id, or with allow_list a non-empty list of them (EOS ids: Llama 3 and Qwen2.5
    have several) -> a tuple of ints >= 0, each below ``vocab_size`` when it is given (pad and
    EOS ids end up in the rollouts that the model embeds; an EOS the model cannot produce would
    never end a response); None passes when allow_none."""
    if value is None and allow_none:
        return None
    ids = list(value) if allow_list and isinstance(value, (list, tuple)) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                          for i in ids):
        allowed = ("an int >= 0" + (", a non-empty list of them" if allow_list else "")
                   + (" or None" if allow_none else ""))
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(f"{name}={value!r} is outside the model's vocabulary [0, {vocab_size}) "
                         "(its input embedding's size): pass the id the model's tokenizer uses")
    return tuple(ids)


# ----------------------------------------------------------------------------- models

def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DistributedDataParallel or torch.compile wrappers. FSDP2
    (``fully_shard``) modifies the module in place, so it is its own unwrapped model."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _check_supported_head(model: nn.Module) -> nn.Module:
    """The LM head (weight (V, H), optional bias), after refusing models whose logits are not a
    plain linear function of the final hidden state."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        raise TypeError("FSDP1 (FullyShardedDataParallel) wrappers hide the LM head's weight; "
                        "shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) instead")
    inner = unwrap_model(model)
    # The configs that scale or cap logits (Gemma 2, Cohere, Granite, FalconH1, ...), also where
    # a multimodal wrapper nests them (PaliGemma 2's Gemma 2 text_config caps at 30); others
    # are caught by check_head_reproduces_logits, which runs once per head and whose tolerance
    # a cap of 30 passes while the logits are below ~7.
    for where, config in _configs_of(getattr(inner, "config", None)):
        for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale",
                          "logits_scaling", "lm_head_multiplier"):
            if getattr(config, attribute, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"the model's {where} sets {attribute}: its logits are not a plain linear "
                    "function of the hidden states, which the fused ops assume")
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(inner).__name__} has no linear output embedding (LM head): "
                        "em_algos needs a causal LM with get_output_embeddings()")
    # The fused ops apply weight and bias themselves, so a head that computes anything else (a
    # LoRA adapter on lm_head, a quantized linear) would be scored and trained as its weight
    # alone: right while the adapter is zero, when check_head_reproduces_logits looks, and
    # silently wrong after.
    linear = _modules_to_save_copy(head)
    extra = [name for name, _ in linear.named_parameters() if name not in ("weight", "bias")]
    if type(linear).forward is not nn.Linear.forward or extra:
        raise TypeError(
            f"the LM head is a {type(linear).__name__}"
            + (f" with parameters {extra}" if extra else "")
            + ", not a plain nn.Linear: the fused ops compute hidden @ weight^T + bias "
            "themselves, so they cannot apply an adapter or a quantized weight; leave the LM "
            "head out of LoRA's target modules (freeze it, or train it fully: with PEFT, "
            "modules_to_save=[\"lm_head\"])")
    return linear


def _configs_of(config, where: str = "config", seen: set[int] | None = None):
    """(name, config) for a Hugging Face config and every config nested in it (text_config,
    vision_config, ...), depth first, each once; nothing for None."""
    seen = set() if seen is None else seen
    if config is None or id(config) in seen:
        return
    seen.add(id(config))
    yield where, config
    for name, value in vars(config).items():
        if type(value).__name__.endswith("Config") and hasattr(value, "to_dict"):
            yield from _configs_of(value, f"{where}.{name}", seen)


def _modules_to_save_copy(head: nn.Module) -> nn.Module:
    """The module that computes the logits: ``head`` itself, or for PEFT's modules_to_save
    wrapper (a trainable copy of the head per adapter beside the frozen original, which its
    forward and weight pass through to) the copy of the one active adapter, or the original
    when adapters are disabled. Several active adapters are refused (ambiguous)."""
    copies = getattr(head, "modules_to_save", None)
    original = getattr(head, "original_module", None)
    if not (isinstance(copies, nn.ModuleDict) and isinstance(original, nn.Module)):
        return head
    active = getattr(head, "active_adapters", None) or getattr(head, "active_adapter", None)
    active = [active] if isinstance(active, str) else list(active or [])
    if getattr(head, "disable_adapters", False) or not any(name in copies for name in active):
        return original
    if len(active) != 1:
        raise TypeError(f"the LM head's modules_to_save wrapper has several active adapters "
                        f"{active}: em_algos scores one head; activate one adapter")
    return copies[active[0]]


# LM heads that check_head_reproduces_logits has accepted (weakly held: a head that is freed
# leaves the set): on this rank, and with every rank agreeing (in a collective call).
_verified_heads: weakref.WeakSet = weakref.WeakSet()
_verified_heads_on_every_rank: weakref.WeakSet = weakref.WeakSet()
# Rows compared by that check: a transformation of the logits shows in any row.
_HEAD_CHECK_ROWS = 4


def runs_collectives(model: nn.Module) -> bool:
    """Whether calling ``model`` is a collective step of a process group: a DDP wrapper, or a
    model with FSDP2 (fully_shard) units, under an initialised group of several ranks. Then every
    rank calls it in step, and em_algos may add collectives of its own; a plain module (a rank-0
    evaluation of model.module, say) may be called on one rank alone."""
    if not is_distributed():
        return False
    while True:  # through torch.compile's wrappers, to a DDP one if there is one
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return True
        if not hasattr(model, "_orig_mod"):
            break
        model = model._orig_mod
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def check_head_reproduces_logits(head: nn.Module, hidden_last: torch.Tensor,
                                 logits_last: torch.Tensor, collective: bool) -> None:
    """After the model's forward: refuse a head whose weight is still sharded (a DTensor), and,
    the first time a head is seen, a model whose logits are not head(hidden), by comparing the
    model's own logits at the last position with the head applied to the hidden states there,
    on a few rows. The tolerance, 2% of a row's largest |logit|, is far above what another GEMM
    order or TF32 changes, and below any scaling of the logits that models use (Granite divides
    by 4-16, FalconH1 multiplies by a learnt factor, ...). When ``collective`` (the model's call
    is a collective step, `runs_collectives`) the ranks agree on the verdict (one all-reduce),
    so that none goes on into the next collective alone; a head that this rank verified in a
    local call is checked again then, so every rank takes part. Costs, once per head (and
    once more collectively): a (4, H) x (H, V) matmul and one host sync."""
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor):
        raise ValueError("the LM head's weight is a DTensor after the model's forward: the head "
                         "was sharded as its own FSDP2 unit, or by tensor parallelism, or the "
                         "root module reshards after forward (set_reshard_after_forward(True)). "
                         "em_algos reads the full weight then: shard the LM head with the root "
                         "module (fully_shard on the decoder layers and on the root only) and "
                         "keep the root's default resharding")
    if head in (_verified_heads_on_every_rank if collective else _verified_heads):
        return
    with torch.no_grad():
        rows = slice(0, _HEAD_CHECK_ROWS)
        expected = nn.functional.linear(hidden_last[rows], head.weight,
                                        getattr(head, "bias", None)).float()
        tolerance = 0.02 * expected.abs().amax(-1, keepdim=True)
        mismatch = ((logits_last[rows].float() - expected).abs() > tolerance).any().int()
        if collective:
            dist.all_reduce(mismatch, op=dist.ReduceOp.MAX)
    if bool(mismatch):
        raise ValueError("the model's logits are not its LM head applied to its final hidden "
                         "states (it scales, caps or otherwise transforms them), which "
                         "the fused ops assume; em_algos cannot score this model")
    _verified_heads.add(head)
    if collective:
        _verified_heads_on_every_rank.add(head)


def input_vocab_size(model: nn.Module) -> int | None:
    """The number of rows of the model's input embedding (token ids must be below it), or None
    when the model has no nn.Embedding-like input embedding to read it from."""
    inner = unwrap_model(model)
    embedding = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    return getattr(embedding, "num_embeddings", None)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """What generate() uses with left padding: the count of real tokens before each position."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def _returning_model_outputs(model: nn.Module):
    """``return_dict`` set to True for the duration on every config of the model that sets it
    False, and restored after. Passing return_dict=True to the call is not enough: the causal LM
    calls its decoder without it, the decoder reads the shared config and returns a tuple, and
    the causal LM (transformers 5), like our hook, reads it as a ModelOutput. Configs that
    already return dicts are left alone (nothing changes under torch.compile's guards)."""
    configs = {}
    for module in unwrap_model(model).modules():
        config = getattr(module, "config", None)
        if getattr(config, "return_dict", None) is False:
            configs[id(config)] = config
    for config in configs.values():
        config.return_dict = True
    try:
        yield
    finally:
        for config in configs.values():
            config.return_dict = False


def _final_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, H) final (normed) hidden states from a call of ``model`` itself, so that DDP's and
    FSDP's hooks run, and the model's (B, V) logits at the last position. A forward hook on the
    decoder catches the states, rather than output_hidden_states, which would also keep every
    layer's states alive (a waste under torch.no_grad, where nothing else keeps them);
    logits_to_keep=1 leaves the logits at (B, 1, V)."""
    decoder = unwrap_model(model).get_decoder()
    captured = []
    handle = decoder.register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        with _returning_model_outputs(model):
            output = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), logits_to_keep=1,
                           use_cache=False)
    finally:
        handle.remove()
    return captured[-1], output.logits[:, -1]


@dataclass
class ResponseTokens:
    """One row per response token, in row-major order of the (B, T) batch.

    entropy: (N) float32, of the distribution that predicted the token.
    logprobs: (N) float32 log-probability of the token, or None when not asked for.
    sequence: (N) int64, the sequence (batch row) the token belongs to.
    predicting: (B, T - 1) bool, the positions whose distributions these are (N of them).
    """

    entropy: torch.Tensor
    logprobs: torch.Tensor | None
    sequence: torch.Tensor
    predicting: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.predicting.shape[0]

    def per_sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """(N) per-token values -> (B) sums per sequence (0 for a sequence with no tokens).

        Each value is placed at its position of a zero (B, T - 1) tensor and the rows are summed:
        a fixed order, so identical responses get bitwise equal sums on every run (index_add
        sums with atomics on CUDA, whose order varies: rewards one ulp apart, which GRPO's
        division by a zero spread would blow up into an advantage)."""
        placed = torch.zeros(self.predicting.shape, dtype=values.dtype, device=values.device)
        return placed.masked_scatter(self.predicting, values).sum(-1)

    def tokens_per_sequence(self) -> torch.Tensor:
        return self.predicting.sum(-1, dtype=self.entropy.dtype)

    def per_sequence_mean(self, values: torch.Tensor) -> torch.Tensor:
        """(B) means per sequence; 0 for a sequence with no response tokens."""
        return self.per_sequence_sum(values) / self.tokens_per_sequence().clamp(min=1)


@dataclass
class ResponseRows:
    """The N response tokens of a batch, ready for the LM head.

    hidden: (N, H) final hidden states at the positions that predicted the tokens.
    tokens: (N) int64, the response tokens, in row-major order of the (B, T) batch.
    sequence: (N) int64, the sequence (batch row) each token belongs to.
    head: the LM head (an nn.Linear-like module with weight (V, H) and maybe a bias).
    predicting: (B, T - 1) bool, the positions that predicted the tokens.
    """

    hidden: torch.Tensor
    tokens: torch.Tensor
    sequence: torch.Tensor
    head: nn.Module
    predicting: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.predicting.shape[0]

    @property
    def head_bias(self) -> torch.Tensor | None:
        return getattr(self.head, "bias", None)

    @property
    def backend(self) -> str:
        """The em_kernels backend for these rows: "auto", or "torch" for a float64 model (the
        only one that runs float64)."""
        return "torch" if self.hidden.dtype == torch.float64 else "auto"


def response_rows(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  response_mask: torch.Tensor) -> ResponseRows:
    """One forward pass of ``model``, and the final hidden states of its response tokens.

    The model (plain, DDP-wrapped or FSDP2-sharded: it is called, never bypassed, so the wrapper's
    hooks run) yields its final hidden states (B, T, H) and logits for the last position only.
    The N response positions (shifted one to the left) are gathered into (N, H), for the
    em_kernels op that applies the LM head. Gradients flow to the model unless the caller runs
    this under torch.no_grad().
    """
    if response_mask is None:
        raise TypeError("response_mask must be a (batch, seq_len) tensor marking the response "
                        "tokens to score, got None")
    head = _check_supported_head(model)
    check_sequence_batch(input_ids, attention_mask, response_mask,
                         vocab_size=input_vocab_size(model))
    hidden, last_logits = _final_hidden_states(model, input_ids, attention_mask)
    check_head_reproduces_logits(head, hidden[:, -1].detach(), last_logits.detach(),
                                 collective=runs_collectives(model))
    predicting = response_mask[:, 1:].bool()
    return ResponseRows(hidden[:, :-1][predicting], input_ids[:, 1:][predicting],
                        predicting.nonzero()[:, 0], head, predicting)


def response_token_stats(model: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
                         with_logprobs: bool, temperature: float = 1.0) -> ResponseTokens:
    """Entropy (and log-prob) of every response token from one forward pass of ``model``
    (`response_rows`), without gradients: the statistics of `em_kernels.linear_entropy_loss`
    under no_grad (one matmul per row chunk). Its logits are rounded as the trainers' losses
    round them (in the model's dtype, as its own LM head does), so that old and reference
    log-probs scored here equal the loss's at equal weights, in bf16 too."""
    with torch.no_grad():
        rows = response_rows(model, input_ids, attention_mask, response_mask)
        result = em_kernels.linear_entropy_loss(
            rows.hidden, rows.head.weight, bias=rows.head_bias,
            tokens=rows.tokens if with_logprobs else None, entropy_weight=0.0,
            temperature=temperature, backend=rows.backend)
    return ResponseTokens(result.entropy, result.logprobs, rows.sequence, rows.predicting)


# ----------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """Sampled sequences: (B * n, P + L) ids, attention and response masks; the samples of one
    prompt are consecutive rows (the group layout the advantages expect)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def _generation_defaults_set_aside(generator: nn.Module):
    """generate() fills every field that its generation_config leaves None from the model's own
    generation_config (a Hub repetition_penalty, min_p, no_repeat_ngram_size, EOS ...); with a
    bare one in its place, only what sample_responses asks for applies."""
    from transformers import GenerationConfig

    saved = generator.generation_config
    generator.generation_config = GenerationConfig()
    try:
        yield
    finally:
        generator.generation_config = saved


@torch.no_grad()
def sample_responses(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                     num_samples: int, max_new_tokens: int, pad_token_id: int,
                     eos_token_id: int | list[int] | None, temperature: float = 1.0,
                     logits_processor=None) -> Rollout:
    """``num_samples`` responses per left-padded prompt by pure sampling (no top-k / top-p, and
    none of the model's own generation settings), so that the samples come from the
    distribution the losses and rewards score.

    The response of a row runs up to and including its first EOS (any of ``eos_token_id`` when
    it is a list; with None, generation runs to max_new_tokens); what follows is padding.
    Under torch.distributed every rank keeps stepping until all are done (``synced_gpus``), which
    FSDP needs (each forward all-gathers) and DDP tolerates. The model generates in eval mode.

    Prompts that are not left-padded (tokenizer.padding_side = "left") are refused before
    anything is generated."""
    from transformers import GenerationConfig

    vocab_size = input_vocab_size(model)
    check_token_ids("pad_token_id", pad_token_id, allow_none=False, allow_list=False,
                    vocab_size=vocab_size)
    eos_ids = check_token_ids("eos_token_id", eos_token_id, allow_none=True, allow_list=True,
                              vocab_size=vocab_size)
    _check_supported_head(model)
    check_sequence_batch(prompt_ids, prompt_mask, vocab_size=vocab_size, prompts=True)
    prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                              eos_token_id=None if eos_ids is None else list(eos_ids))
    generator = unwrap_model(model)
    with (_generation_defaults_set_aside(generator), eval_mode(model),
          _returning_model_outputs(model)):
        sequences = generator.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask.long(), generation_config=config,
            logits_processor=logits_processor, synced_gpus=is_distributed())
    generated = sequences[:, prompt_ids.shape[1]:]
    if eos_ids is None:
        response = torch.ones_like(generated, dtype=torch.bool)
    else:
        eos = torch.isin(generated, torch.tensor(eos_ids, device=generated.device))
        response = (eos.long().cumsum(-1) - eos.long()) == 0
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), response], 1)
    attention_mask = torch.cat([prompt_mask.bool(), response], 1)
    return Rollout(sequences, attention_mask.long(), response_mask)


# ----------------------------------------------------------------------------- training loop

# Bound on |ref - lp| in k3_kl: a token whose probability drifted e^20 (5e8) times from the
# reference's would otherwise give exp(ref - lp) = inf (from a gap of 89 in float32) and a NaN
# loss; the estimate is taken at the bound there (and passes no gradient), as recent verl does.
# verl's low_var_kl also clamps the estimate itself to [-10, 10] (the only clamp in the verl of
# the paper's released code), which stops the KL gradient where ref - lp passes about 2.6 (or
# falls below -11); here the estimate is not clamped, as in TRL's GRPO.
K3_MAX_LOG_RATIO = 20.0


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The low-variance estimate of KL(pi || pi_ref) per sampled token (Schulman's k3):
    exp(ref - lp) - (ref - lp) - 1, >= 0, unbiased under samples of pi; ref - lp is clamped to
    +-K3_MAX_LOG_RATIO, so the estimate stays finite."""
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO)
    return log_ratio.exp() - log_ratio - 1


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the model's current weights, to serve as KL reference."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        raise ValueError("cannot copy an FSDP2-sharded model as the KL reference: pass "
                         "reference_model (e.g. a second fully_shard-ed copy of the initial "
                         "weights) or set the KL weight to 0")
    reference = copy.deepcopy(unwrap_model(model))
    reference.requires_grad_(False)
    return reference.eval()


def save_checkpoint(model: nn.Module, directory: str | os.PathLike) -> None:
    """save_pretrained of the full (unsharded) weights, written by rank 0 only. Every rank must
    call it: under FSDP the state dict is gathered collectively."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=is_distributed())
    state = get_model_state_dict(model, options=options)
    if is_main_process():
        unwrap_model(model).save_pretrained(directory, state_dict=state)
    if is_distributed():
        dist.barrier()


def save_if_due(model: nn.Module, save_dir, save_every: int, global_step: int) -> None:
    """Checkpoint to save_dir/step-<global_step> every ``save_every`` steps (0: never)."""
    if save_every and global_step % save_every == 0:
        save_checkpoint(model, os.path.join(save_dir, f"step-{global_step}"))


def trainer_optimizer(model: nn.Module, optimizer, lr: float,
                      weight_decay: float) -> torch.optim.Optimizer:
    """``optimizer`` if given (anything with step() and zero_grad(), such as a
    torch.optim.Optimizer or a wrapper of one; checked before any rollout is spent on it), else
    AdamW(lr, weight_decay) over the model's trainable parameters, with a warning when some of
    them are 16-bit: AdamW then updates them in place in their dtype, and a step of ~lr (1e-6,
    verl's and the paper's) is far below bf16's spacing at a weight's size (~1e-4 at 0.02), so
    most weights round back to where they were and the model barely trains."""
    if optimizer is None:
        weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        low_precision = sorted({str(p.dtype) for p in trainable
                                if p.dtype in (torch.bfloat16, torch.float16)})
        if low_precision:
            warnings.warn(
                f"the default AdamW will update {'/'.join(low_precision)} parameters in place, "
                f"where steps of lr={lr:g} mostly round away: load the model in float32 (and "
                "compute in bf16 with torch.autocast, or FSDP2's MixedPrecisionPolicy), or "
                "pass an optimizer that keeps float32 master weights", stacklevel=3)
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    if not all(callable(getattr(optimizer, name, None)) for name in ("step", "zero_grad")):
        raise TypeError(f"optimizer must be an optimizer over the model's parameters, with step() "
                        f"and zero_grad() (a torch.optim.Optimizer or a wrapper of one), or None "
                        f"for AdamW; got {type(optimizer).__name__}")
    return optimizer


def training_loop(step, prompt_batches, num_steps: int | None, description: str,
                  progress: bool, shown: tuple[str, ...]) -> list[dict[str, float]]:
    """Call ``step(prompt_ids, prompt_mask)`` per batch (dicts with input_ids and
    attention_mask, or pairs), at most ``num_steps`` times (None: every batch; else an int >= 0);
    a tqdm bar on rank 0 shows the ``shown`` statistics. Returns every step's statistics."""
    from tqdm.auto import tqdm

    if num_steps is not None:
        num_steps = check_positive("num_steps", num_steps, integer=True, allow_zero=True)
    if isinstance(prompt_batches, (list, tuple)):  # a sequence: every batch checked up front,
        for index, batch in enumerate(prompt_batches[:num_steps]):  # before any rollout
            _prompt_pair(batch, index)

    total = num_steps if num_steps is not None else (
        len(prompt_batches) if hasattr(prompt_batches, "__len__") else None)
    history = []
    with tqdm(total=total, desc=description, dynamic_ncols=True,
              disable=not (progress and is_main_process())) as bar:
        for batch in prompt_batches:
            if num_steps is not None and len(history) >= num_steps:
                break
            stats = step(*_prompt_pair(batch, len(history)))
            history.append(stats)
            bar.update(1)
            bar.set_postfix({key: f"{stats[key]:.4f}" for key in shown})
    return history


def _prompt_pair(batch, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of one element of a trainer's prompt batches: a mapping with
    those keys (a dict, a tokenizer's BatchEncoding) or a pair; anything else is a TypeError that
    says so (not a KeyError or an argument-count error from deep inside)."""
    if isinstance(batch, collections.abc.Mapping):
        missing = [key for key in ("input_ids", "attention_mask") if key not in batch]
        if missing:
            raise TypeError(f"prompt batch {index} is a mapping without {', '.join(missing)} "
                            f"(it has {', '.join(map(str, batch)) or 'no keys'})")
        return batch["input_ids"], batch["attention_mask"]
    stacked = isinstance(batch, torch.Tensor) and batch.dim() == 3  # (2, B, L): a pair too
    if (isinstance(batch, (tuple, list)) or stacked) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"prompt batch {index} is a {type(batch).__name__}: each element of prompt_batches must "
        "be a dict with input_ids and attention_mask (as a tokenizer returns) or an "
        "(input_ids, attention_mask) pair; pass a list of batches, not one batch")


def _is_dropout_rate(name: str, value) -> bool:
    """A float attribute that Hugging Face code reads as a dropout or layer-drop probability:
    attention_dropout, hidden_dropout, dropout, resid_pdrop, layerdrop, ..."""
    return (isinstance(value, float) and value != 0.0
            and ("dropout" in name or name.endswith("pdrop") or name == "layerdrop"))


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """Every dropout probability set to 0 for the duration and restored after: nn.Dropout's p,
    the float dropout-rate attributes (`_is_dropout_rate`) of the modules, which Hugging Face
    modules read in train mode (OPT's decoder layers drop out in their own forward with their
    `dropout`, its decoder skips layers with `layerdrop`, Doge's layers read `hidden_dropout`),
    and those of the modules' configs and the configs nested in them (Falcon's layers read
    config.hidden_dropout and config.attention_dropout in every forward). The modules stay in
    their mode. Within `scoring_mode`, this is what turns dropout off in the modules that keep
    train mode for gradient checkpointing."""
    saved = []

    def zero_rates(owner) -> None:
        for name, value in list(vars(owner).items()):
            if _is_dropout_rate(name, value):
                saved.append((owner, name, value))
                setattr(owner, name, 0.0)

    configs, seen = [], set()  # the modules share their configs: each is walked once
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            saved.append((module, "p", module.p))
            module.p = 0.0
        zero_rates(module)
        configs += [config for _, config in _configs_of(module.__dict__.get("config"), seen=seen)]
    for config in configs:
        zero_rates(config)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, keep_checkpointing: bool = False):
    """Every module in eval mode for the duration, each one's own mode restored after: no
    dropout, no router jitter (Mixtral's router_jitter_noise), none of the randomness a module
    adds in train mode. What generate() wants, too (with gradient checkpointing in train mode,
    transformers 4 would turn the KV cache off and generate in quadratic time).

    keep_checkpointing: the modules whose ``gradient_checkpointing`` flag is set (by
    gradient_checkpointing_enable: the decoder layers, and the decoder that transformers 4
    checks) keep their own mode, because transformers checkpoints only in train mode; their
    submodules (attention, MLP, router) still go to eval mode. The flags are set directly, not
    through eval() / train(), which in a model with use_kernels would swap its hub kernels for
    inference-only ones (and restoring flags would not swap them back)."""
    modes = [(module, module.training) for module in model.modules()]
    for module in model.modules():
        if not (keep_checkpointing and getattr(module, "gradient_checkpointing", False) is True):
            module.training = False
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def scoring_mode(model: nn.Module):
    """How the trainers run their policy, the rewards and the reference model: as the
    deterministic network that generate() sampled from, for every pass, with or without
    gradient. A step compares passes (old and new log-probs: the first update's ratio is exactly
    1; policy and reference: the KL at equal weights is exactly 0), so train-mode randomness
    (dropout, router jitter, ...) would make them disagree, as TRL and verl avoid by turning
    dropout off. The gradient pass is then the gradient of the function that was sampled.
    Gradient checkpointing keeps working: the checkpointed modules keep their train mode
    (`eval_mode` with keep_checkpointing), with their own dropout off (`dropout_off`). Every
    module's mode and dropout rate are restored after."""
    with eval_mode(model, keep_checkpointing=True), dropout_off(model):
        yield


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                  max_grad_norm: float | None) -> float:
    """backward, the global gradient norm (DTensor-aware under FSDP2; clipped to max_grad_norm
    unless None), then one optimiser step, skipped when the norm is not finite (an inf or NaN
    gradient would corrupt the weights and the optimiser's moments for good; every rank sees
    the same reduced norm, so all skip together). Returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not parameters:
        optimizer.step()
        return 0.0
    limit = math.inf if max_grad_norm is None else max_grad_norm
    norm = float(torch.nn.utils.clip_grad_norm_(parameters, limit))
    if math.isfinite(norm):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return norm
