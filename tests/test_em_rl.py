"""EM-RL: rewards against full-logit float64 references, the advantage formulas, bad input, and
EMRLTrainer lowering the entropy of a tiny model."""

import math

import pytest
import torch
from algos_support import (EOS, PAD, assert_same_weights, per_token_reference,
                           policy_replica_and_reference, random_batch, tiny_causal_lm)
from hypothesis import given
from hypothesis import strategies as st
from oracle import assert_matches_oracle

from em_algos import (
    EMRLTrainer,
    em_ft_loss,
    grpo_advantages,
    rloo_advantages,
    sequence_reward,
    token_reward,
)


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm(seed=0, family="llama")


def reference_rewards(model, batch, kind, reduce, dtype, temperature=1.0):
    entropy, logprob, predicts_response = per_token_reference(model, *batch, dtype=dtype,
                                                              temperature=temperature)
    values = logprob if kind == "sequence" else -entropy
    sums = (values * predicts_response).sum(-1)
    if reduce == "sum":
        return sums
    return sums / predicts_response.sum(-1).clamp(min=1)


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), prompt=st.integers(1, 5),
       response=st.integers(0, 6), kind=st.sampled_from(["sequence", "token"]),
       reduce=st.sampled_from(["mean", "sum"]), temperature=st.sampled_from([1.0, 0.6]))
def test_rewards_match_full_logit_reference(llama, seed, batch, prompt, response, kind, reduce,
                                            temperature):
    inputs = random_batch(torch.Generator().manual_seed(seed), batch, prompt, response)
    reward_fn = sequence_reward if kind == "sequence" else token_reward
    rewards = reward_fn(llama, *inputs, reduce=reduce, temperature=temperature)
    assert rewards.shape == (batch,) and rewards.dtype == torch.float32
    assert not rewards.requires_grad
    with torch.no_grad():
        oracle = reference_rewards(llama, inputs, kind, reduce, torch.float64, temperature)
        baseline = reference_rewards(llama, inputs, kind, reduce, torch.float32, temperature)
    # A few fp32 ulps of the reward itself, as in test_em_ft: summed over a response it reaches
    # ~19 (ulp 1.9e-6), and a summation order other than plain PyTorch's may round it one ulp
    # away (seed 32000, batch 1, prompt 1, response 6, token sum: 2.0e-6, 2026-11-28).
    floor = 1e-6 + 4 * torch.finfo(torch.float32).eps * float(oracle.abs().max())
    assert_matches_oracle(rewards, oracle, baseline, floor, f"{kind}_reward ({reduce})")


def test_rewards_signs_and_empty_responses(llama):
    input_ids, attention, response = random_batch(torch.Generator().manual_seed(1), 4, 3, 5)
    response[0] = False
    attention[0, 3:] = 0
    sequence = sequence_reward(llama, input_ids, attention, response, reduce="sum")
    tokens = token_reward(llama, input_ids, attention, response, reduce="sum")
    assert sequence[0] == 0 and tokens[0] == 0
    assert (sequence <= 0).all() and (tokens <= 0).all()
    assert (tokens >= -response[:, 1:].sum(-1) * math.log(llama.config.vocab_size) - 1e-4).all()


def loop_rloo(rewards, group_size):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size].tolist()
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1:]
            out.append(r - sum(others) / len(others))
    return torch.tensor(out, dtype=rewards.dtype)


def loop_grpo(rewards, group_size, eps):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size].tolist()
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out.extend((r - mean) / (std + eps) for r in group)
    return torch.tensor(out, dtype=rewards.dtype)


@given(groups=st.integers(1, 6), group_size=st.integers(2, 6), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 100.0]))
def test_advantages_match_their_formulas(groups, group_size, seed, scale):
    rewards = scale * torch.randn(groups * group_size, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(seed))
    rloo = rloo_advantages(rewards, group_size)
    grpo = grpo_advantages(rewards, group_size, eps=1e-6)
    torch.testing.assert_close(rloo, loop_rloo(rewards, group_size))
    torch.testing.assert_close(grpo, loop_grpo(rewards, group_size, 1e-6))
    # RLOO sums to zero per group and equals G / (G - 1) times (r - group mean).
    grouped = rloo.reshape(groups, group_size)
    torch.testing.assert_close(grouped.sum(-1), torch.zeros(groups, dtype=torch.float64),
                               atol=1e-9 * scale, rtol=0)
    centred = rewards.reshape(groups, group_size)
    centred = centred - centred.mean(-1, keepdim=True)
    torch.testing.assert_close(grouped, centred * group_size / (group_size - 1))


def test_advantages_of_equal_rewards_are_zero():
    rewards = torch.tensor([0.5, 0.5, 0.5, -2.0, -2.0, -2.0])
    assert not rloo_advantages(rewards, 3).any()
    assert not grpo_advantages(rewards, 3).any()


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
@pytest.mark.parametrize("rewards, group_size, error", [
    (torch.zeros(7), 2, ValueError),              # not a whole number of groups
    (torch.zeros(6), 4, ValueError),
    (torch.zeros(6), 1, ValueError),              # no baseline
    (torch.zeros(6), 0, ValueError),
    (torch.zeros(6), 2.0, TypeError),
    (torch.zeros(2, 3), 3, ValueError),           # one reward per response
    (torch.zeros(6, dtype=torch.int64), 3, TypeError),
])
def test_advantages_bad_input_raises(fn, rewards, group_size, error):
    with pytest.raises(error, match=">= 2" if group_size in (0, 1) else ""):
        fn(rewards, group_size)


@pytest.mark.parametrize("eps, error", [
    (-1e-6, ValueError), (0.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
    ("1e-6", TypeError),
])
def test_grpo_bad_eps_raises(eps, error):
    with pytest.raises(error, match="eps"):
        grpo_advantages(torch.zeros(6), 3, eps=eps)


def test_grpo_eps_the_rewards_dtype_cannot_hold_raises():
    """An eps that rounds to 0 in the rewards' dtype would give equal rewards 0 / 0 = NaN, one
    that overflows it every advantage 0; a subnormal one still works."""
    with pytest.raises(ValueError, match="rounds to 0.0"):
        grpo_advantages(torch.ones(4), 2, eps=1e-300)
    with pytest.raises(ValueError, match="rounds to 0.0"):
        grpo_advantages(torch.ones(4, dtype=torch.float16), 2, eps=1e-8)
    with pytest.raises(ValueError, match="rounds to inf"):  # every advantage would be 0
        grpo_advantages(torch.arange(4.0, dtype=torch.float16), 2, eps=1e5)
    assert torch.equal(grpo_advantages(torch.ones(4, dtype=torch.float16), 2, eps=1e-7),
                       torch.zeros(4, dtype=torch.float16))


@pytest.mark.parametrize("fn", [sequence_reward, token_reward])
def test_rewards_bad_input_raises(llama, fn):
    inputs = random_batch(torch.Generator().manual_seed(2), 2, 3, 3)
    with pytest.raises(ValueError, match="reduce"):
        fn(llama, *inputs, reduce="max")
    with pytest.raises(ValueError, match="shape"):
        fn(llama, inputs[0], inputs[1], inputs[2][:, 1:])


def _prompts(seed, batch=4, length=4):
    prompts = torch.randint(2, 23, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}


@pytest.mark.parametrize("reward, advantage", [("token", "rloo"), ("sequence", "grpo")])
def test_trainer_lowers_entropy(reward, advantage):
    model = tiny_causal_lm(seed=4, family="qwen2")
    held_out = random_batch(torch.Generator().manual_seed(13), 8, 4, 6)
    with torch.no_grad():
        before = em_ft_loss(model, *held_out, normalize="token").item()
    trainer = EMRLTrainer(model, pad_token_id=PAD, eos_token_id=EOS, reward=reward,
                          advantage=advantage, max_new_tokens=6, lr=1e-2, minibatch_size=8,
                          progress=False)
    history = trainer.train([_prompts(seed) for seed in range(8)])
    with torch.no_grad():
        after = em_ft_loss(model, *held_out, normalize="token").item()
    assert len(history) == 8
    assert after < before - 0.1, (before, after)


@pytest.mark.parametrize("entropy_coeff", [0.0, 0.3])
def test_policy_loss_matches_full_logit_pytorch(entropy_coeff):
    """The trainer's fused policy loss (PPO-clip + beta k3 - entropy_coeff H through
    linear_policy_loss) has the value and parameter gradients of the same loss on full logits
    in PyTorch, off-policy (some tokens clipped) and with a temperature."""
    from algos_support import full_logits

    model = tiny_causal_lm(seed=6, family="llama")
    trainer = EMRLTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5, beta=0.1,
                          clip_range=0.1, temperature=0.7, entropy_coeff=entropy_coeff,
                          progress=False)
    generator = torch.Generator().manual_seed(3)
    batch = random_batch(generator, 3, 4, 6)
    predicts = batch[2][:, 1:].bool()

    def response_logprobs(with_entropy=False):
        logits = full_logits(model, batch[0], batch[1], torch.float32)[:, :-1] / 0.7
        log_softmax = torch.log_softmax(logits, -1)
        logprobs = log_softmax.gather(-1, batch[0][:, 1:, None]).squeeze(-1)[predicts]
        if not with_entropy:
            return logprobs
        return logprobs, -(log_softmax.exp() * log_softmax).sum(-1)[predicts]

    with torch.no_grad():  # old and reference policies near the current one
        current = response_logprobs()
    old = current + torch.randn(current.shape, generator=generator) * 0.2
    ref = current + torch.randn(current.shape, generator=generator) * 0.3
    advantages = torch.randn(3, generator=generator)
    loss, kl, clip_fraction = trainer._policy_loss(batch, old, ref, advantages)
    loss.backward()
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    logprobs, entropy = response_logprobs(with_entropy=True)
    ratio = torch.exp(logprobs - old)
    clipped = ratio.clamp(0.9, 1.1)
    token_advantages = advantages[:, None].expand_as(predicts)[predicts]
    surrogate = -torch.minimum(ratio * token_advantages, clipped * token_advantages)
    log_ratio = (ref - logprobs).clamp(-20, 20)
    expected = (surrogate + 0.1 * (log_ratio.exp() - log_ratio - 1)
                - entropy_coeff * entropy).mean()
    expected.backward()
    assert 0 < float(clip_fraction) < 1
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # The logged statistics: the new policy's mean k3, and the fraction of tokens whose
    # clipped surrogate is the one taken (verl's pg_clipfrac), which leaves out some of the
    # ratios outside the range here.
    torch.testing.assert_close(kl, (log_ratio.exp() - log_ratio - 1).mean().detach())
    clipped_taken = -clipped * token_advantages > -ratio * token_advantages
    torch.testing.assert_close(clip_fraction, clipped_taken.float().mean())
    assert int(clipped_taken.sum()) < int((ratio != clipped).sum())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(fused[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_update_is_on_policy_with_zero_kl(dtype):
    """Rollouts scored by the policy that sampled them: the first minibatch's ratio is exactly 1
    (nothing clipped even with a clip range of 1e-6) and the k3 KL to the reference (the initial
    model) is 0, in bf16 too (old log-probs and loss round the logits alike)."""
    model = tiny_causal_lm(seed=5, family="llama").to(dtype)
    trainer = EMRLTrainer(model, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5,
                          optimizer=torch.optim.SGD(model.parameters(), lr=1e-2), beta=0.1,
                          clip_range=1e-6, progress=False)
    stats = trainer.step(**{"prompt_ids": _prompts(0)["input_ids"],
                            "prompt_mask": _prompts(0)["attention_mask"]})
    assert stats["clip_fraction"] == 0.0 and stats["kl"] == 0.0
    assert stats["response_tokens"] > 0 and stats["reward"] < 0


@pytest.mark.parametrize("options, error", [
    (dict(num_rollouts=1), ValueError), (dict(reward="accuracy"), ValueError),
    (dict(reward_reduce="max"), ValueError), (dict(advantage="ppo"), ValueError),
    (dict(clip_range=0), ValueError), (dict(beta=-1.0), ValueError),
    (dict(minibatch_size=0), ValueError), (dict(ppo_epochs=1.5), TypeError),
    (dict(entropy_coeff=-0.001), ValueError),
    (dict(temperature=float("inf")), ValueError), (dict(clip_range=float("inf")), ValueError),
    (dict(temperature=1e-40), ValueError),  # logits / T would overflow inside generate()
    (dict(optimizer="adam"), TypeError),
    # beyond float32: each would fail only inside the first step, after its rollouts
    (dict(entropy_coeff=1e300), ValueError), (dict(clip_range=1e300), ValueError),
])
def test_trainer_bad_arguments_raise(llama, options, error):
    with pytest.raises(error):
        EMRLTrainer(llama, pad_token_id=PAD, eos_token_id=EOS, **options)


def test_rollouts_are_scored_by_the_distribution_that_sampled_them(llama):
    """Left-padded prompts: the log-probs computed from the rollout equal those of generate()'s
    own next-token distributions, and the response runs up to and including the first EOS."""
    from transformers import LogitsProcessor

    from em_algos._common import response_token_stats, sample_responses

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.logprobs = []

        def __call__(self, input_ids, scores):
            self.logprobs.append(torch.log_softmax(scores.float(), -1))
            return scores

    prompts, prompt_mask, _ = random_batch(torch.Generator().manual_seed(3), 3, 5, 0)
    recorder = Recorder()
    torch.manual_seed(0)
    rollout = sample_responses(llama, prompts, prompt_mask, num_samples=2, max_new_tokens=8,
                               pad_token_id=PAD, eos_token_id=EOS, logits_processor=[recorder])
    assert torch.equal(rollout.input_ids[::2, :5], prompts)
    assert torch.equal(rollout.input_ids[1::2, :5], prompts)
    generated = rollout.input_ids[:, 5:]
    response = rollout.response_mask[:, 5:]
    eos_seen_before = (generated == EOS).long().cumsum(-1) - (generated == EOS).long()
    assert torch.equal(response, eos_seen_before == 0)
    assert torch.equal(rollout.attention_mask[:, 5:].bool(), response)
    sampled = torch.stack(recorder.logprobs, 1).gather(-1, generated[..., None]).squeeze(-1)
    with torch.no_grad():
        scored = response_token_stats(llama, rollout.input_ids, rollout.attention_mask,
                                      rollout.response_mask, with_logprobs=True)
    torch.testing.assert_close(scored.logprobs, sampled[response], rtol=0, atol=1e-5)


def test_trainer_step_is_the_documented_recipe(tmp_path):
    """One EMRLTrainer step, replayed by hand from the public pieces on a copy of the model:
    rollouts at the trainer's temperature, old and reference log-probs at that temperature,
    token rewards summed (reward / reward_reduce), GRPO advantages sliced per minibatch, two
    PPO epochs over an uneven split (4 + 2 sequences), each a fresh gradient clipped to
    max_grad_norm and one SGD step; the checkpoint is named after the finished step. Every
    option the trainer takes must reach the update."""
    from em_algos._common import response_token_stats, sample_responses

    model, replica, reference = policy_replica_and_reference()
    options = dict(pad_token_id=PAD, eos_token_id=[EOS, 7], reward="token", reward_reduce="sum",
                   advantage="grpo", num_rollouts=3, max_new_tokens=6, temperature=0.7,
                   clip_range=0.1, beta=0.2, reference_model=reference, ppo_epochs=2,
                   minibatch_size=4, max_grad_norm=0.05, progress=False)
    prompts = _prompts(21, batch=2)
    trainer = EMRLTrainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                          save_dir=tmp_path, save_every=1, **options)
    torch.manual_seed(0)
    stats = trainer.step(prompts["input_ids"], prompts["attention_mask"])

    by_hand = EMRLTrainer(replica, optimizer=torch.optim.SGD(replica.parameters(), lr=0.5),
                          **options)  # its _policy_loss only (tested on its own above)
    torch.manual_seed(0)
    rollout = sample_responses(replica, prompts["input_ids"], prompts["attention_mask"],
                               num_samples=3, max_new_tokens=6, pad_token_id=PAD,
                               eos_token_id=[EOS, 7], temperature=0.7)
    batch = (rollout.input_ids, rollout.attention_mask, rollout.response_mask)
    lengths = rollout.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # a sum and a mean give different GRPO advantages
    old = response_token_stats(replica.eval(), *batch, with_logprobs=True, temperature=0.7)
    ref = response_token_stats(reference.eval(), *batch, with_logprobs=True, temperature=0.7)
    rewards = -old.per_sequence_sum(old.entropy)
    advantages = grpo_advantages(rewards, 3)
    norms = []
    for _ in range(2):
        for start in (0, 4):
            rows = slice(start, start + 4)
            selected = (old.sequence >= start) & (old.sequence < start + 4)
            loss, _, _ = by_hand._policy_loss(tuple(t[rows] for t in batch),
                                              old.logprobs[selected], ref.logprobs[selected],
                                              advantages[rows])
            replica.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(replica.parameters(), 0.05))
            by_hand.optimizer.step()
    assert min(norms) > 0.05  # the clip acts on every step
    assert stats["reward"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert trainer.global_step == 1 and [p.name for p in tmp_path.iterdir()] == ["step-1"]
    assert_same_weights(model, replica)
