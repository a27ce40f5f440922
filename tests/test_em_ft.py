"""EM-FT: em_ft_loss against full-logit float64 references (values and gradients), bad input,
and EMFTTrainer lowering the entropy of a tiny model, with its KL and checkpoint options."""

from unittest import mock

import pytest
import torch
from algos_support import (EOS, PAD, assert_same_weights, per_token_reference,
                           policy_replica_and_reference, random_batch, tiny_causal_lm)
from hypothesis import given
from hypothesis import strategies as st
from oracle import assert_matches_oracle

from em_algos import EMFTTrainer, em_ft_loss


@pytest.fixture(scope="module")
def qwen():
    return tiny_causal_lm(seed=0, family="qwen2")


def reference_loss(model, batch, normalize, dtype):
    entropy, _, predicts_response = per_token_reference(model, *batch, dtype=dtype)
    total = (entropy * predicts_response).sum()
    if normalize == "sequence":
        return total / batch[0].shape[0]
    return total / predicts_response.sum().clamp(min=1)


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), prompt=st.integers(1, 6),
       response=st.integers(0, 7), normalize=st.sampled_from(["sequence", "token"]))
def test_loss_matches_full_logit_reference(qwen, seed, batch, prompt, response, normalize):
    inputs = random_batch(torch.Generator().manual_seed(seed), batch, prompt, response)
    with torch.no_grad():
        loss = em_ft_loss(qwen, *inputs, normalize=normalize)
        oracle = reference_loss(qwen, inputs, normalize, torch.float64)
        baseline = reference_loss(qwen, inputs, normalize, torch.float32)
    assert loss.dtype == torch.float32 and loss.shape == ()
    # The floor allows a few fp32 ulps of the loss itself: summed over a sequence's tokens it
    # reaches ~20 (ulp 1.9e-6), and another summation order than plain PyTorch's may round it
    # one ulp away (seed 181 of the dev profile: 2.6e-6, 2026-11-27).
    floor = 1e-6 + 4 * torch.finfo(torch.float32).eps * float(oracle.abs())
    assert_matches_oracle(loss, oracle, baseline, floor, f"em_ft_loss ({normalize})")


@pytest.mark.parametrize("normalize", ["sequence", "token"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_loss_gradient_matches_full_logit_gradient(family, normalize):
    """The gradient reaches every parameter (the tied or untied head included) and equals the
    gradient of the same loss computed from the full logits by autograd (float32 both)."""
    model = tiny_causal_lm(seed=1, family=family)
    inputs = random_batch(torch.Generator().manual_seed(3), 4, 5, 6)
    em_ft_loss(model, *inputs, normalize=normalize).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    reference_loss(model, inputs, normalize, torch.float32).backward()
    for name, p in model.named_parameters():
        assert ours[name] is not None, f"no gradient reached {name}"
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_sequence_normalisation_is_token_mean_times_tokens_per_sequence(qwen):
    inputs = random_batch(torch.Generator().manual_seed(5), 4, 3, 6)
    tokens = inputs[2][:, 1:].sum()
    with torch.no_grad():
        by_sequence = em_ft_loss(qwen, *inputs, normalize="sequence")
        by_token = em_ft_loss(qwen, *inputs, normalize="token")
    torch.testing.assert_close(by_sequence, by_token * tokens / 4)


def test_empty_responses_give_zero_loss_and_zero_gradient(qwen):
    input_ids, attention, response = random_batch(torch.Generator().manual_seed(7), 3, 4, 3)
    loss = em_ft_loss(qwen, input_ids, attention, torch.zeros_like(response))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in qwen.parameters())
    qwen.zero_grad(set_to_none=True)


def test_loss_is_between_zero_and_log_vocab_per_token(qwen):
    inputs = random_batch(torch.Generator().manual_seed(9), 6, 4, 8)
    with torch.no_grad():
        loss = em_ft_loss(qwen, *inputs, normalize="token")
    assert 0 <= loss.item() <= torch.log(torch.tensor(float(qwen.config.vocab_size))).item()


@pytest.mark.parametrize("change, error", [
    (lambda ids, att, resp: (ids, att, resp[:, :-1]), ValueError),
    (lambda ids, att, resp: (ids, att[:1], resp), ValueError),
    (lambda ids, att, resp: (ids, att, resp.float()), TypeError),
    (lambda ids, att, resp: (ids.int(), att, resp), TypeError),
    (lambda ids, att, resp: (ids[0], att[0], resp[0]), ValueError),
    (lambda ids, att, resp: (ids, att, torch.ones_like(resp)), ValueError),  # first token
    (lambda ids, att, resp: (ids, torch.zeros_like(att), resp), ValueError),  # unattended
])
def test_bad_batches_raise(qwen, change, error):
    inputs = random_batch(torch.Generator().manual_seed(11), 2, 3, 4)
    inputs[2][:, -1] = True
    inputs[1][:, -1] = 1
    with pytest.raises(error):
        em_ft_loss(qwen, *change(*inputs))


def test_integer_masks_of_other_values_than_0_and_1_raise(qwen):
    """An attention mask of 2s would count twice in the position ids (its cumsum) and shift
    every later position: the batch that runs with 0/1 masks is refused with 2s."""
    ids, att, resp = random_batch(torch.Generator().manual_seed(11), 2, 3, 4)
    em_ft_loss(qwen, ids, att, resp)
    with pytest.raises(ValueError, match="attention_mask holds values other than 0 and 1"):
        em_ft_loss(qwen, ids, att * 2, resp)
    with pytest.raises(ValueError, match="response_mask holds values other than 0 and 1"):
        em_ft_loss(qwen, ids, att, resp.long() * 2)


def test_missing_response_mask_empty_batch_and_unknown_ids_raise(qwen):
    ids, att, resp = random_batch(torch.Generator().manual_seed(11), 2, 3, 4)
    with pytest.raises(TypeError, match="response_mask must be"):
        em_ft_loss(qwen, ids, att, None)
    with pytest.raises(ValueError, match="input_ids is empty"):
        em_ft_loss(qwen, ids[:0], att[:0], resp[:0])
    vocab = qwen.get_input_embeddings().num_embeddings
    too_large = ids.clone()
    too_large[0, 0] = vocab
    with pytest.raises(ValueError, match=rf"token id {vocab}, outside .*\[0, {vocab}\)"):
        em_ft_loss(qwen, too_large, att, resp)
    with pytest.raises(ValueError, match="token id -1"):
        em_ft_loss(qwen, ids - ids - 1, att, resp)


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_accumulated_micro_batches_with_num_items_give_the_whole_batch(normalize):
    """Gradient accumulation: two micro-batches of unequal sizes and token counts, each divided
    by the whole batch's count (num_items), add up to the whole batch's loss and gradient."""
    model = tiny_causal_lm(seed=1, family="llama")
    inputs = random_batch(torch.Generator().manual_seed(13), 5, 4, 6)
    inputs[2][0, 4:] = True  # a long first response, so the two halves' token counts differ
    inputs[1][0, 4:] = True
    whole = em_ft_loss(model, *inputs, normalize=normalize)
    whole.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    halves = [tuple(tensor[rows] for tensor in inputs) for rows in (slice(0, 2), slice(2, 5))]
    count = 5 if normalize == "sequence" else int(inputs[2][:, 1:].sum())
    accumulated = 0.0
    for half in halves:
        loss = em_ft_loss(model, *half, normalize=normalize, num_items=count)
        loss.backward()
        accumulated += loss.detach()
    torch.testing.assert_close(accumulated, whole.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bad_normalize_raises(qwen):
    inputs = random_batch(torch.Generator().manual_seed(11), 2, 3, 4)
    with pytest.raises(ValueError, match="normalize"):
        em_ft_loss(qwen, *inputs, normalize="batch")
    for bad, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_items"):
            em_ft_loss(qwen, *inputs, num_items=bad)


def _prompts(seed, batch=8, length=4):
    prompts = torch.randint(2, 23, (batch, length), generator=torch.Generator().manual_seed(seed))
    return prompts, torch.ones_like(prompts)


def test_trainer_lowers_entropy():
    model = tiny_causal_lm(seed=2, family="llama")
    held_out = random_batch(torch.Generator().manual_seed(13), 8, 4, 6)
    with torch.no_grad():
        before = em_ft_loss(model, *held_out, normalize="token").item()
    trainer = EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=6,
                          num_samples=2, lr=1e-2, progress=False)
    history = trainer.train([_prompts(seed) for seed in range(6)])
    with torch.no_grad():
        after = em_ft_loss(model, *held_out, normalize="token").item()
    assert len(history) == 6 and trainer.global_step == 6
    assert after < before - 0.1, (before, after)
    assert history[-1]["entropy"] < history[0]["entropy"]


def test_trainer_kl_starts_at_zero_and_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(seed=3, family="qwen2")
    trainer = EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5,
                          lr=1e-2, kl_coef=0.5, save_dir=tmp_path, save_every=2, progress=False)
    history = trainer.train(iter([_prompts(seed) for seed in range(4)]), num_steps=3)
    assert len(history) == 3
    assert history[0]["kl"] == 0.0  # the policy is still the reference model
    assert history[2]["kl"] > 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "step-2")
    assert reloaded.config.vocab_size == model.config.vocab_size


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_kl_loss_matches_full_logit_pytorch(normalize):
    """The trainer's loss with a KL term (entropy + kl_coef k3, through linear_policy_loss with
    zero advantages) has the value and parameter gradients of the same loss on full logits."""
    from em_algos.em_ft import _entropy_loss

    model = tiny_causal_lm(seed=8, family="llama")
    generator = torch.Generator().manual_seed(4)
    batch = random_batch(generator, 3, 4, 6)
    with torch.no_grad():
        _, current, predicts = per_token_reference(model, *batch, dtype=torch.float32)
    reference = current[predicts] + torch.randn(int(predicts.sum()), generator=generator) * 0.3
    out = _entropy_loss(model, batch, normalize, reference, 0.5)
    out.loss.backward()
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    entropy, logprob, predicts = per_token_reference(model, *batch, dtype=torch.float32)
    log_ratio = (reference - logprob[predicts]).clamp(-20, 20)
    per_token = entropy[predicts] + 0.5 * (log_ratio.exp() - log_ratio - 1)
    divisor = 3 if normalize == "sequence" else int(predicts.sum())
    expected = per_token.sum() / divisor
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(fused[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("options, error", [
    (dict(num_samples=0), ValueError), (dict(lr=-1.0), ValueError),
    (dict(normalize="mean"), ValueError), (dict(save_every=5), ValueError),
    (dict(max_new_tokens=2.5), TypeError), (dict(kl_coef=-0.1), ValueError),
    (dict(temperature=float("inf")), ValueError), (dict(lr=float("nan")), ValueError),
    (dict(temperature=1e-40), ValueError),  # logits / T would overflow inside generate()
    (dict(optimizer="adam"), TypeError),
    # beyond float32: each would fail inside the first step
    (dict(lr=1e300), ValueError), (dict(weight_decay=1e300), ValueError),
])
def test_trainer_bad_arguments_raise(qwen, options, error):
    with pytest.raises(error):
        EMFTTrainer(qwen, pad_token_id=PAD, eos_token_id=EOS, **options)


def test_full_logits_are_never_formed(qwen):
    """The LM head module itself only ever sees the last position (logits_to_keep=1); the
    response positions go through linear_entropy_loss instead."""
    seen = []
    handle = qwen.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(tuple(output.shape)))
    try:
        inputs = random_batch(torch.Generator().manual_seed(17), 3, 4, 6)
        em_ft_loss(qwen, *inputs).backward()
    finally:
        handle.remove()
        qwen.zero_grad(set_to_none=True)
    assert seen == [(3, 1, qwen.config.vocab_size)]


def test_loss_takes_its_gradients_from_the_forward(qwen):
    """em_ft_loss is linear_entropy_loss's weighted sum (three matmuls), never linear_entropy
    (whose backward recomputes the logits); with a KL term the trainer runs linear_policy_loss,
    also three matmuls."""
    inputs = random_batch(torch.Generator().manual_seed(23), 3, 4, 5)
    expected = em_ft_loss(qwen, *inputs)
    with mock.patch("em_kernels.linear_entropy", side_effect=AssertionError("not this op")):
        loss = em_ft_loss(qwen, *inputs)
        loss.backward()
    qwen.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss, expected)


def test_float64_model():
    """A float64 model runs the fused loss on the "torch" backend, the one that takes float64
    (em_algos has no backend argument): the float64 oracle's loss, and its gradients."""
    model = tiny_causal_lm(seed=6, family="llama").to(torch.float64)
    inputs = random_batch(torch.Generator().manual_seed(19), 3, 4, 5)
    loss = em_ft_loss(model, *inputs, normalize="token")
    fused = torch.autograd.grad(loss, list(model.parameters()))
    oracle = reference_loss(model, inputs, "token", torch.float64)
    expected = torch.autograd.grad(oracle, list(model.parameters()))
    torch.testing.assert_close(loss, oracle, rtol=1e-10, atol=1e-12)
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_bfloat16_model():
    """A bf16 model goes through linear_entropy_loss in bf16: the loss stays within the error of
    the same computation done by plain PyTorch in bf16, against the float64 oracle."""
    model = tiny_causal_lm(seed=6, family="llama").to(torch.bfloat16)
    inputs = random_batch(torch.Generator().manual_seed(19), 4, 4, 6)
    with torch.no_grad():
        loss = em_ft_loss(model, *inputs, normalize="token")
        oracle = reference_loss(model, inputs, "token", torch.float64)
        baseline = reference_loss(model, inputs, "token", torch.bfloat16)
    assert loss.dtype == torch.float32
    assert_matches_oracle(loss, oracle, baseline, 1e-3, "em_ft_loss (bf16 model)")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda(dtype):
    """The GPU path (linear_entropy_loss and linear_entropy inside a real model): the loss and the
    rewards against the float64 oracle, then one trainer step that lowers nothing to NaN."""
    from em_algos import sequence_reward

    model = tiny_causal_lm(seed=7, family="qwen2", hidden=64).to("cuda", dtype)
    inputs = tuple(t.cuda() for t in random_batch(torch.Generator().manual_seed(23), 6, 5, 9))
    with torch.no_grad():
        loss = em_ft_loss(model, *inputs)
        oracle = reference_loss(model, inputs, "sequence", torch.float64)
        baseline = reference_loss(model, inputs, "sequence", dtype)
        rewards = sequence_reward(model, *inputs, reduce="sum")
        _, logprob, predicts = per_token_reference(model, *inputs)
    assert_matches_oracle(loss, oracle, baseline, 1e-4, f"em_ft_loss on cuda ({dtype})")
    torch.testing.assert_close(rewards.double(), (logprob * predicts).sum(-1),
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)
    trainer = EMFTTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=6,
                          lr=1e-3, progress=False)
    prompts, mask = _prompts(0)
    stats = trainer.step(prompts.cuda(), mask.cuda())
    assert all(torch.isfinite(p).all() for p in model.parameters()) and stats["loss"] > 0


def test_trainer_step_is_the_documented_recipe():
    """One EMFTTrainer step, replayed by hand on a copy of the model: num_samples rollouts per
    prompt at the trainer's temperature, the user's reference model (not a copy of the policy)
    for the KL, the token-normalised entropy + kl_coef k3 loss, its gradient clipped to
    max_grad_norm, one SGD step; the logged kl is the same token mean of k3."""
    from em_algos._common import k3_kl, response_token_stats, sample_responses
    from em_algos.em_ft import _entropy_loss

    model, replica, reference = policy_replica_and_reference()
    options = dict(pad_token_id=PAD, eos_token_id=EOS, num_samples=2, max_new_tokens=6,
                   temperature=0.7, kl_coef=0.5, reference_model=reference, normalize="token",
                   max_grad_norm=0.05, progress=False)
    prompts = _prompts(21, batch=3)
    trainer = EMFTTrainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                          **options)
    torch.manual_seed(0)
    stats = trainer.step(*prompts)

    torch.manual_seed(0)
    rollout = sample_responses(replica.eval(), *prompts, num_samples=2, max_new_tokens=6,
                               pad_token_id=PAD, eos_token_id=EOS, temperature=0.7)
    batch = (rollout.input_ids, rollout.attention_mask, rollout.response_mask)
    assert rollout.input_ids.shape[0] == 6
    ref = response_token_stats(reference.eval(), *batch, with_logprobs=True)
    out = _entropy_loss(replica, batch, "token", ref.logprobs, 0.5)
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(replica.parameters(), 0.05)
    torch.optim.SGD(replica.parameters(), lr=0.5).step()
    assert norm > 0.05  # the clip acts
    kl = k3_kl(out.logprobs, ref.logprobs).mean()
    assert float(kl) > 0
    assert stats["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert stats["response_tokens"] == out.entropy.numel()
    assert_same_weights(model, replica)
