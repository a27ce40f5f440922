"""Shared by the em_algos tests: tiny causal LMs built from a config (nothing downloaded), random
(prompt + response) batches, and full-logit references in float64."""

from __future__ import annotations

import copy

import torch

VOCAB = 23  # prime, so no vocabulary dimension is a tile multiple by accident
PAD, EOS = 0, 1


def tiny_causal_lm(seed: int = 0, family: str = "qwen2", hidden: int = 32,
                   max_positions: int = 64):
    """A 2-layer Qwen2 (tied embeddings) or Llama (untied) with random weights, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_positions, pad_token_id=PAD,
                  eos_token_id=EOS)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    return model.train()


def random_batch(generator: torch.Generator, batch: int, prompt_length: int,
                 response_length: int):
    """Left-padded prompts followed by responses that end early (trailing padding): input_ids,
    attention_mask, response_mask, each (batch, prompt_length + response_length)."""
    total = prompt_length + response_length
    input_ids = torch.randint(2, VOCAB, (batch, total), generator=generator)
    positions = torch.arange(total)
    pad_left = torch.randint(0, prompt_length, (batch, 1), generator=generator)
    response_end = prompt_length + torch.randint(
        0, response_length + 1, (batch, 1), generator=generator)
    attention = (positions >= pad_left) & (positions < response_end)
    response = (positions >= prompt_length) & (positions < response_end)
    input_ids = torch.where(attention, input_ids, torch.full_like(input_ids, PAD))
    return input_ids, attention.long(), response


def full_logits(model, input_ids, attention_mask, dtype=torch.float64):
    """(B, T, V) logits of the whole batch, from hidden states and head cast to ``dtype``: the
    materialising computation em_algos avoids. Position ids as in generate()."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True)
    head = model.get_output_embeddings()
    logits = outputs.hidden_states[-1].to(dtype) @ head.weight.to(dtype).T
    if head.bias is not None:
        logits = logits + head.bias.to(dtype)
    return logits


def per_token_reference(model, input_ids, attention_mask, response_mask, dtype=torch.float64,
                        temperature=1.0):
    """(entropy, logprob) of every position's prediction of the next token under
    softmax(logits / temperature), (B, T - 1) each, and the (B, T - 1) mask of those that
    predict a response token."""
    logits = full_logits(model, input_ids, attention_mask, dtype)[:, :-1] / temperature
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    logprob = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return entropy, logprob, response_mask[:, 1:].bool()


def policy_replica_and_reference():
    """(policy, its deep copy, a different reference model) for replaying a trainer step by
    hand: the policy's logits are scaled far from uniform, so that a sampling temperature
    changes the samples, and the reference differs, so that the KL is not 0."""
    policy = tiny_causal_lm(seed=11, family="llama")
    with torch.no_grad():
        policy.lm_head.weight.mul_(10)
    return policy, copy.deepcopy(policy), tiny_causal_lm(seed=12, family="llama")


def assert_same_weights(model, replica):
    for (name, ours), expected in zip(model.named_parameters(), replica.parameters()):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6, msg=name)
