"""The guards em_algos puts around a Hugging Face model (em_algos/_common.py): heads that do not
reproduce the model's logits, rollouts that must ignore the model's own generation settings, EOS
lists, token ids outside the vocabulary, tokenizer batches, prompts that are not left-padded,
responses without an attended predictor, configs with return_dict=False, bad step counts, and
the mode a step runs in: no dropout or router jitter in any pass (the policy's, the rewards',
a user's reference model's), gradient checkpointing kept, every module's mode restored."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from algos_support import EOS, PAD, VOCAB, random_batch, tiny_causal_lm

from em_algos import EMFTTrainer, EMRLTrainer, em_ft_loss, sequence_reward
from em_algos._common import (K3_MAX_LOG_RATIO, dropout_off, k3_kl, sample_responses,
                               training_loop)


def _prompts(seed: int, batch: int = 3, length: int = 4):
    prompts = torch.randint(2, VOCAB, (batch, length),
                            generator=torch.Generator().manual_seed(seed))
    return prompts, torch.ones_like(prompts)


@pytest.mark.parametrize("factor, refused", [(1.0, False), (1 + 1e-3, False), (2.0, True)])
def test_a_head_that_does_not_reproduce_the_logits_is_refused(factor, refused):
    """A model whose logits are its head's output times 2 (as Granite divides by logits_scaling,
    under another name) would be scored as the unscaled distribution: refused instead. The
    roundings of another GEMM (here x(1 + 1e-3)) pass. Each head is checked on first use."""
    model = tiny_causal_lm(seed=1, family="llama")
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: out * factor)
    batch = random_batch(torch.Generator().manual_seed(0), 2, 3, 4)
    if refused:
        with pytest.raises(ValueError, match="not its LM head applied"):
            em_ft_loss(model, *batch)
    else:
        em_ft_loss(model, *batch)


class _LoraHead(torch.nn.Linear):
    """A LoRA adapter on the LM head, as PEFT builds one: weight + B A, B zero at the start."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features, bias=False)
        self.weight = base.weight
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, hidden):
        return super().forward(hidden) + hidden @ self.lora_a.T @ self.lora_b.T


class _ScaledHead(torch.nn.Linear):
    def forward(self, hidden):
        return 2 * super().forward(hidden)


@pytest.mark.parametrize("head_type", [_LoraHead, _ScaledHead])
def test_a_head_that_is_not_a_plain_linear_is_refused(head_type):
    """The fused ops apply weight and bias themselves. A LoRA head matches its weight while B is
    zero, so the logit check alone would pass it and then score and train the weight alone as B
    moves; any head that is not nn.Linear's forward on weight and bias is refused up front."""
    model = tiny_causal_lm(seed=1, family="llama")
    base = model.get_output_embeddings()
    if head_type is _LoraHead:
        head = _LoraHead(base)
    else:
        head = _ScaledHead(base.in_features, base.out_features, bias=False)
        head.weight = base.weight
    model.set_output_embeddings(head)
    batch = random_batch(torch.Generator().manual_seed(0), 2, 3, 4)
    for score in (em_ft_loss, sequence_reward):
        with pytest.raises(TypeError, match="not a plain nn.Linear"):
            score(model, *batch)


class _ModulesToSaveHead(torch.nn.Module):
    """What PEFT's modules_to_save=["lm_head"] puts in the head's place: the frozen original and
    a trainable copy per adapter, forward and weight passing through to the active copy."""

    def __init__(self, original: torch.nn.Linear):
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.modules_to_save = torch.nn.ModuleDict({"default": copy.deepcopy(original)})
        self.modules_to_save["default"].requires_grad_(True)
        self.active_adapters = ["default"]
        self.disable_adapters = False

    @property
    def weight(self):
        return self.modules_to_save["default"].weight

    def forward(self, hidden):
        return self.modules_to_save["default"](hidden)


def test_a_head_trained_through_peft_modules_to_save_is_its_active_copy():
    """PEFT's wrapper of a fully trained head is not an nn.Linear, but computes the logits with
    one (the active adapter's copy): that copy is scored and gets the gradient, the frozen
    original none; with several active adapters the head is ambiguous and refused."""
    model = tiny_causal_lm(seed=1, family="llama")
    model.config.tie_word_embeddings = False
    wrapper = _ModulesToSaveHead(copy.deepcopy(model.get_output_embeddings()))
    model.set_output_embeddings(wrapper)
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.mul_(1.5)  # trained away from the original
    batch = random_batch(torch.Generator().manual_seed(0), 2, 3, 4)
    em_ft_loss(model, *batch).backward()
    assert wrapper.modules_to_save["default"].weight.grad is not None
    assert wrapper.original_module.weight.grad is None
    with torch.no_grad():
        expected = em_ft_loss(model, *batch)
        plain = tiny_causal_lm(seed=1, family="llama")
        plain.config.tie_word_embeddings = False
        plain.set_output_embeddings(copy.deepcopy(wrapper.modules_to_save["default"]))
        torch.testing.assert_close(expected, em_ft_loss(plain, *batch))
    wrapper.active_adapters = ["default", "other"]
    wrapper.modules_to_save["other"] = copy.deepcopy(wrapper.original_module)
    with pytest.raises(TypeError, match="several active adapters"):
        em_ft_loss(model, *batch)


@pytest.mark.parametrize("attribute", ["logits_scaling", "lm_head_multiplier",
                                       "final_logit_softcapping"])
def test_configs_that_transform_logits_are_refused(attribute):
    model = tiny_causal_lm(seed=1)
    setattr(model.config, attribute, 4.0)
    with pytest.raises(ValueError, match=attribute):
        em_ft_loss(model, *random_batch(torch.Generator().manual_seed(0), 2, 3, 4))


def test_numpy_scalar_arguments_become_python_numbers():
    """Arguments from a NumPy sweep (np.int64 rollouts, np.float32 rates) are checked and kept
    as the Python numbers they hold, so that nothing downstream (generate(), the optimiser)
    sees a NumPy scalar."""
    np = pytest.importorskip("numpy")
    trainer = EMRLTrainer(tiny_causal_lm(seed=1), pad_token_id=PAD, eos_token_id=EOS,
                          num_rollouts=np.int64(2), max_new_tokens=np.int32(3),
                          temperature=np.float32(0.5), beta=np.float64(0.0),
                          lr=np.float32(1e-3), progress=False)
    for name, kind in (("num_rollouts", int), ("max_new_tokens", int), ("temperature", float),
                       ("beta", float)):
        assert type(getattr(trainer, name)) is kind, name
    with pytest.raises(TypeError, match="num_rollouts must be an int, got bool"):
        EMRLTrainer(tiny_causal_lm(seed=1), pad_token_id=PAD, eos_token_id=EOS,
                    num_rollouts=np.bool_(True), progress=False)


def test_a_cap_in_a_nested_text_config_is_refused():
    """Multimodal wrappers (PaliGemma 2, Gemma 3) keep the text model's config, soft cap
    included, in config.text_config: refused too, with where it was found. The check of the
    head's logits alone would pass a cap of 30 while the logits are small, once per head."""
    from transformers import LlamaConfig

    model = tiny_causal_lm(seed=1)
    model.config.text_config = LlamaConfig(final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match=r"config\.text_config sets final_logit_softcapping"):
        em_ft_loss(model, *random_batch(torch.Generator().manual_seed(0), 2, 3, 4))


def test_rollouts_ignore_the_models_generation_config():
    """Hub checkpoints carry generation settings (EOS ids, repetition_penalty, min_p, ...) that
    generate() would apply to every field our config leaves None. Here the model's config would
    stop every row at its first token (every id is an EOS) and forbid any repeated token: the
    rollout must run all max_new_tokens with eos_token_id=None, and the settings come back."""
    model = tiny_causal_lm(seed=2)
    config = model.generation_config
    config.eos_token_id = list(range(VOCAB))
    config.repetition_penalty = 50.0
    prompts, mask = _prompts(0)
    torch.manual_seed(0)
    rollout = sample_responses(model, prompts, mask, num_samples=4, max_new_tokens=12,
                               pad_token_id=PAD, eos_token_id=None)
    assert rollout.response_mask[:, prompts.shape[1]:].all()
    assert rollout.input_ids.shape[1] == prompts.shape[1] + 12
    generated = rollout.input_ids[:, prompts.shape[1]:]
    repeats = sum(len(row) - len(set(row)) for row in generated.tolist())
    assert repeats > 0  # 12 draws from 23 ids repeat; a penalty of 50 would all but forbid it
    assert model.generation_config is config and config.repetition_penalty == 50.0


def test_eos_lists_end_a_response_at_the_first_of_them():
    model = tiny_causal_lm(seed=3)
    prompts, mask = _prompts(1, batch=4)
    eos_ids = [5, 9, 13]
    torch.manual_seed(0)
    rollout = sample_responses(model, prompts, mask, num_samples=3, max_new_tokens=16,
                               pad_token_id=PAD, eos_token_id=eos_ids)
    generated = rollout.input_ids[:, prompts.shape[1]:]
    is_eos = torch.isin(generated, torch.tensor(eos_ids))
    assert is_eos.any()  # the test means something: some row did stop
    before_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    assert torch.equal(rollout.response_mask[:, prompts.shape[1]:], before_first_eos)


@pytest.mark.parametrize("name, value", [("eos_token_id", "1"), ("eos_token_id", []),
                                         ("eos_token_id", [1, -2]), ("pad_token_id", None),
                                         ("pad_token_id", True), ("eos_token_id", 1.0),
                                         ("pad_token_id", [0, 1])])
def test_bad_token_ids_raise_before_any_generation(name, value):
    model = tiny_causal_lm(seed=0)
    ids = {"pad_token_id": PAD, "eos_token_id": EOS, name: value}
    for trainer in (EMFTTrainer, EMRLTrainer):
        with pytest.raises(TypeError, match=name):
            trainer(model, progress=False, **ids)
    with pytest.raises(TypeError, match=name):
        sample_responses(model, *_prompts(0), num_samples=1, max_new_tokens=2, **ids)


def test_train_accepts_a_tokenizer_batch():
    """tokenizer(...) returns a BatchEncoding, a Mapping but not a dict."""
    from transformers import BatchEncoding

    model = tiny_causal_lm(seed=4)
    prompts, mask = _prompts(2)
    trainer = EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=3,
                          progress=False)
    history = trainer.train([BatchEncoding({"input_ids": prompts, "attention_mask": mask})])
    assert len(history) == 1 and history[0]["response_tokens"] > 0


def test_a_response_predicted_from_padding_is_refused():
    """With left padding and an empty prompt, the first response token would be predicted by a
    masked-out position, whose hidden state depends on what id sits under the mask."""
    model = tiny_causal_lm(seed=0)
    input_ids = torch.tensor([[PAD, PAD, 7, 8, 9], [4, 5, 6, 7, 8]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="masked-out"):
        em_ft_loss(model, input_ids, attention, response)
    em_ft_loss(model, input_ids, torch.ones_like(attention), response)  # one real prompt token


def test_dropout_is_off_during_a_step_and_comes_back():
    """With dropout active, the old log-probs and the first update's would see different
    networks: the ratio would not be 1. Every module's mode (one of them its own) and the
    dropout rates come back afterwards; dropout_off alone changes no module's mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5,
        pad_token_id=PAD, eos_token_id=EOS)).train()
    model.model.layers[0].eval()  # a mode of its own, to be restored as it was
    trainer = EMRLTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5,
                          lr=1e-2, beta=0.0, clip_range=1e-6, progress=False)
    enable = getattr(model, "activation_checkpointing_enable",
                     getattr(model, "gradient_checkpointing_enable", None))
    enable()  # checkpointing only happens in train mode: the step must keep it
    stats = trainer.step(*_prompts(5, batch=4))
    assert stats["clip_fraction"] == 0.0
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training
    attention = model.model.layers[1].self_attn
    assert attention.attention_dropout == 0.5
    with dropout_off(model):
        assert attention.attention_dropout == 0.0 and attention.training
    assert attention.attention_dropout == 0.5


def test_scoring_mode_turns_off_dropout_in_modules_that_keep_train_mode():
    """A checkpointed module keeps train mode under scoring_mode (transformers checkpoints only
    in train mode), so eval mode cannot stop the dropout it applies in its own forward, as
    OPT's decoder layers do with their float `dropout`: dropout_off must. The output is then
    the input, every call; modes and rates come back after."""
    from em_algos._common import scoring_mode

    class CheckpointedLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gradient_checkpointing = True
            self.dropout = 0.5
            self.inner = torch.nn.Dropout(0.5)

        def forward(self, x):
            x = torch.nn.functional.dropout(x, p=self.dropout, training=self.training)
            return self.inner(x)

    model = torch.nn.Sequential(CheckpointedLayer()).train()
    layer = model[0]
    x = torch.ones(64, 64)
    with scoring_mode(model):
        assert layer.training and not layer.inner.training and layer.inner.p == 0.0
        for _ in range(3):
            assert torch.equal(model(x), x)
    assert layer.training and layer.inner.training
    assert layer.dropout == 0.5 and layer.inner.p == 0.5


def test_dropout_rates_read_from_the_config_are_off_under_checkpointing():
    """Falcon's decoder layers read config.hidden_dropout and config.attention_dropout in
    every forward, and keep train mode under gradient checkpointing: scoring twice must still
    give the same numbers, and the config's rates come back after."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        hidden_dropout=0.3, attention_dropout=0.3, new_decoder_architecture=False,
        parallel_attn=False, pad_token_id=PAD, eos_token_id=EOS)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = random_batch(torch.Generator().manual_seed(0), 3, 3, 5)
    first, second = sequence_reward(model, *batch), sequence_reward(model, *batch)
    assert torch.equal(first, second)
    assert model.config.hidden_dropout == 0.3 and model.config.attention_dropout == 0.3
    with dropout_off(model):
        assert model.config.hidden_dropout == 0.0
        assert model.transformer.h[0].config.attention_dropout == 0.0


def _tiny_llama_with_dropout(seed: int = 0, dropout: float = 0.5):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout,
        pad_token_id=PAD, eos_token_id=EOS)).train()


def _tiny_mixtral_with_router_jitter(seed: int = 0):
    """A 2-layer Mixtral whose router multiplies its inputs by random noise in train mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, router_jitter_noise=0.5, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False)).train()


def test_a_users_reference_model_is_scored_without_dropout():
    """FSDP2 users pass their own reference model, which may be in train mode with dropout:
    at the policy's weights its KL must still be exactly 0 in the first step, and the reference
    keeps its mode and dropout rate."""
    prompts = _prompts(6, batch=4)
    for make_trainer in (
            lambda model, reference: EMRLTrainer(
                model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5, beta=0.1,
                reference_model=reference, progress=False),
            lambda model, reference: EMFTTrainer(
                model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5, kl_coef=0.1,
                reference_model=reference, progress=False)):
        model = _tiny_llama_with_dropout()
        reference = copy.deepcopy(model)
        torch.manual_seed(0)
        stats = make_trainer(model, reference).step(*prompts)
        assert stats["response_tokens"] > 0 and stats["kl"] == 0.0
        attention = reference.model.layers[0].self_attn
        assert reference.training and attention.training and attention.attention_dropout == 0.5


def test_router_jitter_does_not_reach_any_pass():
    """Mixtral's router jitters its inputs in train mode, which dropout_off does not touch: the
    rewards, the old log-probs, the gradient pass and the reference must all score the network
    that sampled. Then a clip range of 1e-6 clips nothing in the first update (its ratio is
    exactly 1), the KL to the initial weights is exactly 0, and rewards are reproducible."""
    model = _tiny_mixtral_with_router_jitter()
    prompts = _prompts(7, batch=4)
    trainer = EMRLTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5,
                          beta=0.1, clip_range=1e-6, progress=False)
    torch.manual_seed(0)
    stats = trainer.step(*prompts)
    assert stats["response_tokens"] > 0
    assert stats["clip_fraction"] == 0.0 and stats["kl"] == 0.0
    assert model.training and model.model.layers[0].mlp.gate.training

    model = _tiny_mixtral_with_router_jitter()
    trainer = EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5,
                          kl_coef=0.1, progress=False)
    torch.manual_seed(0)
    assert trainer.step(*prompts)["kl"] == 0.0

    batch = random_batch(torch.Generator().manual_seed(0), 3, 3, 5)
    assert torch.equal(sequence_reward(model, *batch), sequence_reward(model, *batch))
    assert model.model.layers[0].mlp.gate.training


def _layer_calls_in_a_step(checkpointing: bool) -> int:
    """Calls of the first layer's attention in one EM-FT step. The attention, not the MLP: the
    recomputation of a checkpointed layer stops once it has rebuilt the last saved tensor, the
    input of the MLP's last projection, before the MLP's forward returns."""
    model = tiny_causal_lm(seed=6, family="llama")
    if checkpointing:
        getattr(model, "activation_checkpointing_enable",
                getattr(model, "gradient_checkpointing_enable", None))()
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    trainer = EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=4,
                          progress=False)
    torch.manual_seed(0)
    trainer.step(*_prompts(8))
    return len(calls)


def test_a_step_keeps_gradient_checkpointing():
    """transformers checkpoints a layer only in train mode: the step's gradient pass must leave
    the checkpointed layers in it, so that the backward recomputes each of them once."""
    assert _layer_calls_in_a_step(checkpointing=True) == _layer_calls_in_a_step(False) + 1


@pytest.mark.parametrize("num_steps, error", [(-1, ValueError), (1.5, TypeError),
                                              ("2", TypeError), (True, TypeError)])
def test_bad_num_steps_raise_before_any_step(num_steps, error):
    model = tiny_causal_lm(seed=0)
    for trainer in (EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, progress=False),
                    EMRLTrainer(model, pad_token_id=PAD, eos_token_id=EOS, progress=False)):
        with pytest.raises(error, match="num_steps"):
            trainer.train([_prompts(0)] * 3, num_steps=num_steps)
        assert trainer.global_step == 0
    assert EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS,
                       progress=False).train([_prompts(0)], num_steps=0) == []


@pytest.mark.parametrize("name, value", [("pad_token_id", VOCAB), ("eos_token_id", VOCAB + 5),
                                         ("eos_token_id", [EOS, VOCAB])])
def test_token_ids_outside_the_vocabulary_raise(name, value):
    """A pad id is embedded with the rollouts; an EOS id the model cannot produce would never
    end a response."""
    model = tiny_causal_lm(seed=0)
    ids = {"pad_token_id": PAD, "eos_token_id": EOS, name: value}
    for trainer in (EMFTTrainer, EMRLTrainer):
        with pytest.raises(ValueError, match=f"{name}.*outside the model's vocabulary"):
            trainer(model, progress=False, **ids)
    with pytest.raises(ValueError, match=f"{name}.*outside the model's vocabulary"):
        sample_responses(model, *_prompts(0), num_samples=1, max_new_tokens=2, **ids)


@pytest.mark.parametrize("mask, message", [
    ([[1, 1, 1, 0], [1, 1, 1, 1]], "must be left-padded.*padding_side"),
    ([[0, 1, 0, 1], [1, 1, 1, 1]], "must be left-padded"),
    ([[0, 0, 0, 0], [1, 1, 1, 1]], "no real token"),
])
def test_prompts_that_are_not_left_padded_raise_before_generation(mask, message):
    """generate() continues every row from its last column: a right-padded prompt would be
    continued from its padding."""
    model = tiny_causal_lm(seed=0)
    model.generate = None  # not to be reached
    mask = torch.tensor(mask)
    prompts = torch.where(mask.bool(), torch.tensor([[5, 6, 7, 8]]), PAD)
    with pytest.raises(ValueError, match=message):
        sample_responses(model, prompts, mask, num_samples=2, max_new_tokens=3,
                         pad_token_id=PAD, eos_token_id=EOS)
    trainer = EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, progress=False)
    with pytest.raises(ValueError, match=message):
        trainer.step(prompts, mask)


def test_a_config_with_return_dict_false_is_scored_and_sampled():
    """With config.return_dict=False the decoder hands transformers' causal LM a tuple; em_algos
    runs such a model with the setting on for the duration of each call, and puts it back."""
    model = tiny_causal_lm(seed=9, family="llama")
    batch = random_batch(torch.Generator().manual_seed(0), 3, 3, 5)
    with torch.no_grad():
        expected = em_ft_loss(model, *batch)
    model.config.return_dict = False
    with torch.no_grad():
        assert torch.equal(em_ft_loss(model, *batch), expected)
    rollout = sample_responses(model, *_prompts(1), num_samples=2, max_new_tokens=3,
                               pad_token_id=PAD, eos_token_id=EOS)
    assert rollout.input_ids.shape == (6, 7)
    assert model.config.return_dict is False


def test_k3_kl_stays_finite_far_from_the_reference():
    """k3 = exp(r) - r - 1 with r = ref - lp: exact within the clamp, finite beyond it (a gap
    of 100 nats would give exp(100) = inf in float32, and a NaN loss), with no gradient there."""
    logprobs = torch.tensor([-1.0, -120.0, -0.5, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -0.5, -110.0, float("-inf")])
    kl = k3_kl(logprobs, ref)
    assert bool(torch.isfinite(kl).all()) and bool((kl >= 0).all())
    r = torch.tensor(-0.5)
    torch.testing.assert_close(kl[0], r.exp() - r - 1)
    bound = torch.tensor(K3_MAX_LOG_RATIO)
    torch.testing.assert_close(kl[1], bound.exp() - bound - 1)
    kl.sum().backward()
    assert bool(torch.isfinite(logprobs.grad).all()) and logprobs.grad[1] == 0


def test_training_loop_says_what_a_prompt_batch_must_be():
    """A mapping without the keys, or one batch passed where a sequence of batches belongs,
    is a TypeError that names the expected form, raised before any step runs."""
    steps = []
    ids = torch.ones(2, 3, dtype=torch.long)

    def step(prompt_ids, prompt_mask):
        steps.append(prompt_ids)
        return {"loss": 0.0}

    for batches, message in (([{"ids": ids}], "without input_ids, attention_mask"),
                             (ids, "pass a list of batches"),
                             ([(ids,)], "an \\(input_ids, attention_mask\\) pair")):
        with pytest.raises(TypeError, match=message):
            training_loop(step, batches, None, "test", False, ("loss",))
    assert not steps
    with pytest.raises(TypeError, match="prompt batch 1"):  # a list is checked before step 0
        training_loop(step, [(ids, ids), {"ids": ids}], None, "test", False, ("loss",))
    assert not steps
    history = training_loop(step, [{"input_ids": ids, "attention_mask": ids}, (ids, ids),
                                   torch.stack([ids, ids])], None, "test", False, ("loss",))
    assert len(history) == 3 and len(steps) == 3


def test_rollouts_are_sampled_at_the_given_temperature_in_eval_mode():
    """temperature reaches generate(), and the model samples in eval mode (here it has
    attention dropout and is in train mode): near 0 every sampled token is the eval-mode
    network's argmax; at 1 the rollouts of a prompt differ. The model's mode comes back."""
    from algos_support import full_logits

    model = _tiny_llama_with_dropout(seed=5)
    prompts, mask = _prompts(3, batch=2)
    rollouts = {}
    for temperature in (1e-4, 1.0):
        torch.manual_seed(0)
        rollouts[temperature] = sample_responses(
            model, prompts, mask, num_samples=4, max_new_tokens=6, pad_token_id=PAD,
            eos_token_id=None, temperature=temperature)
    assert model.training and model.model.layers[0].self_attn.training
    cold = rollouts[1e-4]
    with torch.no_grad():
        argmax = full_logits(model.eval(), cold.input_ids, cold.attention_mask)[:, :-1].argmax(-1)
    predicts = cold.response_mask[:, 1:]
    assert torch.equal(argmax[predicts], cold.input_ids[:, 1:][predicts])
    assert len({tuple(row) for row in rollouts[1.0].input_ids.tolist()}) > 2


def test_a_response_token_under_padding_is_refused():
    """A response token that the attention mask marks as padding (its predictor attended) is
    refused, not scored as if it were real."""
    model = tiny_causal_lm(seed=0)
    input_ids = torch.tensor([[4, 5, 6, 7, PAD]])
    attention = torch.tensor([[1, 1, 1, 1, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask masks out"):
        em_ft_loss(model, input_ids, attention, response)
    with pytest.raises(ValueError, match="attention_mask masks out"):
        sequence_reward(model, input_ids, attention, response)


def test_left_padding_does_not_move_learned_positions():
    """Position ids count the real tokens (as generate() does): with learned absolute position
    embeddings (GPT-2), where RoPE's shift invariance would hide a wrong offset, a left-padded
    row scores as the same row unpadded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                       n_positions=64, pad_token_id=PAD, eos_token_id=EOS,
                                       bos_token_id=EOS))
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    padded = torch.cat([torch.full((1, 3), PAD), tokens], 1)
    padded_response = torch.cat([torch.zeros(1, 3, dtype=torch.bool), response], 1)
    alone = sequence_reward(model, tokens, torch.ones_like(tokens), response)
    in_batch = sequence_reward(model, padded, (padded != PAD).long(), padded_response)
    torch.testing.assert_close(in_batch, alone, rtol=0, atol=1e-5)


def test_per_sequence_sums_place_each_token_in_its_row():
    """Rewards sum a response's tokens in a fixed order (each value placed at its position, the
    rows summed; index_add's atomics on CUDA vary the order between runs): each sequence's sum
    is its own tokens', an empty one's is 0, and identical responses get equal sums bitwise."""
    from em_algos._common import ResponseTokens

    predicting = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0],
                               [0, 1, 1, 1, 0]], dtype=torch.bool)
    values = torch.tensor([0.1, 7.5, -3.25, 2.0, 3.0, 4.0, 0.1, 7.5, -3.25])
    tokens = ResponseTokens(values, None, predicting.nonzero()[:, 0], predicting)
    sums = tokens.per_sequence_sum(values)
    expected = [sum(values[predicting.nonzero()[:, 0] == row].double().tolist())
                for row in range(4)]
    torch.testing.assert_close(sums, torch.tensor(expected, dtype=torch.float32))
    assert sums[1] == 0 and sums[0].item() == sums[3].item()
    assert tokens.tokens_per_sequence().tolist() == [3.0, 0.0, 3.0, 3.0]
    assert tokens.batch_size == 4


@pytest.mark.parametrize("trainer_type", [EMFTTrainer, EMRLTrainer])
def test_the_default_optimizer_warns_on_16_bit_parameters(trainer_type, recwarn):
    """AdamW on bf16 weights rounds away steps of lr ~1e-6 (a review measured 2% of the weights
    moving in a step): the default optimizer says so. float32 weights, or an optimizer of the
    user's, get no warning."""
    common = dict(pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=2, progress=False)
    model = tiny_causal_lm(seed=1)
    trainer_type(model, **common)
    assert not [w for w in recwarn if "round away" in str(w.message)]
    model = model.to(torch.bfloat16)
    trainer_type(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **common)
    assert not [w for w in recwarn if "round away" in str(w.message)]
    with pytest.warns(UserWarning, match=r"torch.bfloat16 parameters in place.*round away"):
        trainer_type(model, **common)


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_clip_and_step_reports_the_norm_and_skips_a_non_finite_one(max_grad_norm):
    """The norm before clipping is reported with or without clipping; a NaN or inf gradient
    leaves the weights (and the optimiser's state) as they were instead of poisoning them."""
    from em_algos._common import clip_and_step

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    inputs = torch.tensor([[3.0, -4.0, 0.0]])
    before = [p.detach().clone() for p in model.parameters()]
    norm = clip_and_step(model, optimizer, model(inputs).sum(), max_grad_norm)
    # d/dweight: a row [3, -4, 0] per output (norm 5 each); d/dbias: [1, 1]
    assert norm == pytest.approx(math.sqrt(2 * 25 + 2), rel=1e-6)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for bad in (math.nan, math.inf):
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(optimizer.state_dict())
        norm = clip_and_step(model, optimizer, model(inputs).sum() * bad, max_grad_norm)
        assert not math.isfinite(norm)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert str(optimizer.state_dict()) == str(state)
