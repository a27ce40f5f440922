"""EM-INF and adaptive temperature inside transformers' generate(), on a tiny randomly initialised
Llama built from a config (no download): the processors see the raw next-token logits and hand
back exactly what the ops compute, ahead of temperature / top-k / top-p; greedy decoding follows
the adjusted logits; EM-INF lowers the entropy of the distributions that are sampled; batched
generation treats every row on its own."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import em_kernels
from em_algos.em_inf import (
    NEUTRAL_SAMPLING,
    AdaptiveTemperatureLogitsProcessor,
    EMInfLogitsProcessor,
    em_inf_processors,
)

VOCAB = 199
PAD, EOS = 0, 1
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a random init is nearly uniform: spread the logits out
        model.lm_head.weight.mul_(30.0)
    return model


def prompts(batch: int, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, input_ids, processors, attention_mask=None, **kwargs):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return model.generate(
            input_ids, attention_mask=attention_mask, logits_processor=processors,
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=PAD,
            eos_token_id=EOS, output_scores=True, output_logits=True,
            return_dict_in_generate=True, **kwargs)


def entropy(scores: torch.Tensor) -> torch.Tensor:
    return em_kernels.reference.entropy_ref(scores.double())


@pytest.mark.parametrize("early_exit", ["row", "batch"])
def test_greedy_follows_adjusted_logits(model, early_exit):
    processor = EMInfLogitsProcessor(threshold=1.0, early_exit=early_exit)
    out = generate(model, prompts(3), [processor], do_sample=False)
    new_tokens = out.sequences[:, -NEW_TOKENS:]
    lowered = 0
    for step, (raw, processed) in enumerate(zip(out.logits, out.scores)):
        # min_new_tokens masks EOS (-inf) before EM-INF sees the scores.
        masked = raw.clone()
        masked[:, EOS] = -math.inf
        expected = em_kernels.em_inf_adjust(masked, threshold=1.0, early_exit=early_exit)
        assert torch.equal(processed, expected)
        assert bool(torch.isneginf(processed[:, EOS]).all())
        assert torch.equal(new_tokens[:, step], processed.argmax(-1))
        h_raw, h_adjusted = entropy(masked), entropy(processed)
        assert bool((h_adjusted <= h_raw + 1e-6).all())
        lowered += int((h_adjusted < h_raw - 1e-3).sum())
    assert lowered > 0, "EM-INF never lowered an entropy: the test model is too peaked"


def test_sampling_order_and_entropy(model):
    """The helper's list: EM-INF, then temperature, then top-k, then top-p; with generate()'s
    own warpers neutralised, the scores are exactly that composition of the raw logits."""
    processors = em_inf_processors(EMInfLogitsProcessor(threshold=-math.inf), temperature=0.7,
                                   top_k=50, top_p=0.9)
    assert [type(p).__name__ for p in processors] == [
        "EMInfLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
        "TopPLogitsWarper"]
    torch.manual_seed(1)
    out = generate(model, prompts(4, seed=1), processors, do_sample=True, **NEUTRAL_SAMPLING)
    h_raw, h_adjusted = [], []
    for raw, processed in zip(out.logits, out.scores):
        raw = raw.clone()
        raw[:, EOS] = -math.inf
        adjusted = em_kernels.em_inf_adjust(raw, threshold=-math.inf)
        expected = processors[1](None, adjusted.clone())
        expected = processors[3](None, processors[2](None, expected))
        assert torch.equal(processed, expected)
        h_raw.append(entropy(raw))
        h_adjusted.append(entropy(adjusted))
    assert float(torch.cat(h_adjusted).mean()) < float(torch.cat(h_raw).mean()) - 0.05


def test_batched_rows_are_independent(model):
    """Left-padded prompts of different lengths: each row's scores are EM-INF of that row alone
    (row mode), whatever the other rows do."""
    ids = prompts(3, length=6, seed=2)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 2, 4)):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    processor = EMInfLogitsProcessor(threshold=1.5)
    out = generate(model, ids, [processor], attention_mask=mask, do_sample=False)
    for raw, processed in zip(out.logits, out.scores):
        raw = raw.clone()
        raw[:, EOS] = -math.inf
        for row in range(ids.shape[0]):
            alone = em_kernels.em_inf_adjust(raw[row:row + 1], threshold=1.5)
            assert torch.equal(processed[row:row + 1], alone)


def test_adaptive_temperature_in_generate(model):
    processor = AdaptiveTemperatureLogitsProcessor(alpha=0.5, delta=0.1)
    out = generate(model, prompts(2, seed=3), [processor], do_sample=False)
    for raw, processed in zip(out.logits, out.scores):
        raw = raw.clone()
        raw[:, EOS] = -math.inf
        assert torch.equal(processed, em_kernels.adaptive_temperature(raw))
        h_raw, h_scaled = entropy(raw), entropy(processed)
        assert bool((h_scaled <= h_raw + 1e-6).all())


@pytest.mark.parametrize("cls, options, op", [
    (EMInfLogitsProcessor, dict(steps=3, lr=0.3, kl_weight=0.05, threshold=0.1,
                                optimizer="sgd", early_exit="batch"), em_kernels.em_inf_adjust),
    (AdaptiveTemperatureLogitsProcessor, dict(alpha=0.3, delta=0.5, max_iters=7, tol=1e-3),
     em_kernels.adaptive_temperature),
])
def test_processors_pass_their_options_on(cls, options, op):
    """Every option reaches the op: the processor built with non-default values gives exactly
    the op called with them, which differs from the op at its defaults on these scores."""
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)) * 3
    expected = op(scores, **options)
    assert torch.equal(cls(**options)(None, scores.clone()), expected)
    assert not torch.equal(expected, op(scores))


@pytest.mark.parametrize("cls, op_name", [(EMInfLogitsProcessor, "em_inf_adjust"),
                                          (AdaptiveTemperatureLogitsProcessor,
                                           "adaptive_temperature")])
def test_processors_pass_their_backend_on(cls, op_name, monkeypatch):
    """The processor's backend reaches the op (not "auto"): a user who picks "torch" (the
    float64-capable oracle) or "triton" gets it."""
    processor = cls(backend="torch")  # its constructor probes the op with backend="torch"
    calls = []
    op = getattr(em_kernels, op_name)
    monkeypatch.setattr(em_kernels, op_name,
                        lambda scores, **kwargs: calls.append(kwargs["backend"]) or op(
                            scores, **kwargs))
    processor(None, torch.randn(2, 30, generator=torch.Generator().manual_seed(6)))
    assert calls == ["torch"]


def test_scores_keep_their_dtype():
    scores = torch.randn(2, 30, dtype=torch.bfloat16)
    for processor in (EMInfLogitsProcessor(), AdaptiveTemperatureLogitsProcessor()):
        assert processor(None, scores).dtype == torch.bfloat16


@pytest.mark.parametrize("cls,kwargs,error", [
    (EMInfLogitsProcessor, dict(steps=-1), ValueError),
    (EMInfLogitsProcessor, dict(lr=float("nan")), ValueError),
    (EMInfLogitsProcessor, dict(early_exit="token"), ValueError),
    (EMInfLogitsProcessor, dict(optimizer="adamw"), ValueError),
    (EMInfLogitsProcessor, dict(backend="tpu"), ValueError),
    (EMInfLogitsProcessor, dict(backend=None), TypeError),
    (AdaptiveTemperatureLogitsProcessor, dict(alpha=2.0), ValueError),
    (AdaptiveTemperatureLogitsProcessor, dict(tol=0.0), ValueError),
    (AdaptiveTemperatureLogitsProcessor, dict(max_iters=1.5), TypeError),
])
def test_bad_options_fail_at_construction(cls, kwargs, error):
    with pytest.raises(error):
        cls(**kwargs)


@pytest.mark.parametrize("adjust", ["x", torch.nn.Identity(), EMInfLogitsProcessor])
def test_adjust_that_is_not_a_logits_processor_raises(adjust):
    with pytest.raises(TypeError, match="adjust must be None or a transformers LogitsProcessor"):
        em_inf_processors(adjust)


@pytest.mark.parametrize("kwargs, error", [
    (dict(top_p=1.5), ValueError), (dict(top_p=-0.1), ValueError),
    (dict(top_p=float("nan")), ValueError), (dict(top_p="0.9"), TypeError),
    (dict(top_k=True), TypeError), (dict(top_k=2.5), TypeError), (dict(top_k=-3), ValueError),
    (dict(temperature=0), ValueError), (dict(temperature=float("inf")), ValueError),
    (dict(temperature="0.7"), TypeError), (dict(top_k=3, min_tokens_to_keep=0), ValueError),
])
def test_em_inf_processors_bad_options_raise(kwargs, error):
    """Each error names the bad option (the last one given): a top_p above 1 would otherwise
    be dropped silently, and top_k=True would be top-1."""
    with pytest.raises(error, match=list(kwargs)[-1]):
        em_inf_processors(**kwargs)


def test_em_inf_processors_take_int_temperatures(model):
    """The trainers take temperature=2; transformers' warper refuses an int, so the helper
    hands it a float."""
    processors = em_inf_processors(temperature=2, top_k=5, top_p=1)
    assert [type(p).__name__ for p in processors] == [
        "EMInfLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper"]
    assert processors[1].temperature == 2.0
    generate(model, prompts(2), processors, do_sample=True, **NEUTRAL_SAMPLING)


def test_em_inf_processors_zero_top_k_and_min_tokens_to_keep():
    """top_k=0 means no top-k (transformers' warper refuses 0); min_tokens_to_keep reaches both
    warpers: a row with one dominant token keeps that many under top-1 and under top-p 0.5."""
    processors = em_inf_processors(temperature=1.0, top_k=0, top_p=1.0)
    assert [type(p).__name__ for p in processors] == ["EMInfLogitsProcessor"]
    scores = torch.tensor([[9.0, 1.0, 0.5, 0.0, -1.0]])
    for options in (dict(top_k=1), dict(top_p=0.5)):
        processors = em_inf_processors(AdaptiveTemperatureLogitsProcessor(delta=10.0),
                                       min_tokens_to_keep=3, **options)
        assert len(processors) == 2
        kept = torch.isfinite(processors(None, scores.clone()))
        assert int(kept.sum()) == 3, options


def test_decode_benchmark_runs_and_reports_both_measures(tmp_path, capsys):
    """bench/decode.py end to end on a tiny model: every provider timed in generate() and, but
    plain, alone per call; the JSON holds both."""
    import json

    from bench.decode import main

    out = tmp_path / "decode.json"
    result = main(["--vocab", "300", "--prompt", "4", "--new-tokens", "3", "--repeats", "2",
                   "--calls", "3", "--backend", "auto",
                   "--json", str(out)])
    assert set(result["ms_per_token"]) == {"plain", "em-inf", "released"}
    assert set(result["ms_per_call"]) == {"em-inf", "released"}
    assert all(ms > 0 for ms in [*result["ms_per_token"].values(), *result["ms_per_call"].values()])
    assert json.loads(out.read_text())["ms_per_call"] == result["ms_per_call"]
    # The backend that ran, not only the one asked for: "auto" on CPU tensors is the C++ kernel.
    ran = "cpu" if em_kernels.available_backends()["cpu"] == "available" else "torch"
    assert (result["backend"], result["backend_asked"]) == (ran, "auto")
    printed = capsys.readouterr().out
    assert "us/call" in printed and f"em-inf backend {ran} (asked: auto)" in printed
    for bad in (["--prompt", "0"], ["--new-tokens", "-1"], ["--calls", "0"]):
        with pytest.raises(SystemExit):
            main(bad)
        assert "must be >= 1" in capsys.readouterr().err
