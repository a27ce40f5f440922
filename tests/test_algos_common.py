"""The guards em_algos puts around a Hugging Face model (em_algos/_common.py): heads that do not
reproduce the model's logits, rollouts that must ignore the model's own generation settings, EOS
lists, tokenizer batches, responses without an attended predictor, and dropout during a step."""

from __future__ import annotations

import pytest
import torch
from algos_support import EOS, PAD, VOCAB, random_batch, tiny_causal_lm

from em_algos import EMFTTrainer, EMRLTrainer, em_ft_loss
from em_algos._common import dropout_off, sample_responses


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


@pytest.mark.parametrize("attribute", ["logits_scaling", "lm_head_multiplier",
                                       "final_logit_softcapping"])
def test_configs_that_transform_logits_are_refused(attribute):
    model = tiny_causal_lm(seed=1)
    setattr(model.config, attribute, 4.0)
    with pytest.raises(ValueError, match=attribute):
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
    networks: the ratio would not be 1. The modules keep their train mode (gradient
    checkpointing runs in train mode only); the dropout rates come back afterwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5,
        pad_token_id=PAD, eos_token_id=EOS)).train()
    model.model.layers[0].eval()  # a mode of its own, to be restored as it was
    trainer = EMRLTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5,
                          lr=1e-2, beta=0.0, progress=False)
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
