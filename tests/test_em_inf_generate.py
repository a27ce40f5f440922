"""EM-INF and adaptive temperature inside transformers' generate(), on a tiny randomly initialised
Llama built from a config (no download): the processors see the raw next-token logits and hand
back exactly what the ops compute, ahead of temperature / top-k / top-p; greedy decoding follows
the adjusted logits; EM-INF lowers the entropy of the distributions that are sampled; batched
generation treats every row on its own."""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor

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


class _FinishRowZero(LogitsProcessor):
    """Leaves row 0 only EOS at the second step, so that it finishes while the others go on."""

    def __init__(self):
        self.step = 0

    def __call__(self, input_ids, scores):
        self.step += 1
        if self.step == 2:
            scores = scores.clone()
            scores[0] = -math.inf
            scores[0, EOS] = 0.0
        return scores


@pytest.mark.parametrize("early_exit", ["row", "batch"])
def test_em_inf_keeps_running_on_a_finished_row(model, early_exit):
    """generate() keeps scoring a row after its EOS (then pads it): EM-INF runs on every row at
    every step, the finished one included (its one-hot step too: only EOS is finite), and each
    step's scores are em_inf_adjust of the batch it was given. In batch mode the finished row
    counts in the summed entropy and the KL's mean, as in the released code."""
    finish = _FinishRowZero()
    processor = EMInfLogitsProcessor(threshold=1.0, early_exit=early_exit)
    with torch.no_grad():
        out = model.generate(
            prompts(3), attention_mask=torch.ones(3, 5, dtype=torch.long),
            logits_processor=[finish, processor], max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=PAD, eos_token_id=EOS, output_scores=True, output_logits=True,
            return_dict_in_generate=True)
    new_tokens = out.sequences[:, -NEW_TOKENS:]
    assert new_tokens[0, 1] == EOS and bool((new_tokens[0, 2:] == PAD).all())
    assert new_tokens.shape == (3, NEW_TOKENS)
    for step, (raw, processed) in enumerate(zip(out.logits, out.scores)):
        given = raw.clone()
        if step == 1:
            given[0] = -math.inf
            given[0, EOS] = 0.0
        expected = em_kernels.em_inf_adjust(given, threshold=1.0, early_exit=early_exit)
        assert torch.equal(processed, expected), step
        assert bool(torch.isfinite(processed[1:]).any(-1).all())


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
    (AdaptiveTemperatureLogitsProcessor, dict(delta=1e39), ValueError),  # beyond float32
    (EMInfLogitsProcessor, dict(steps=2**31), ValueError),
])
def test_bad_options_fail_at_construction(cls, kwargs, error):
    with pytest.raises(error):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [EMInfLogitsProcessor, AdaptiveTemperatureLogitsProcessor])
def test_backends_that_cannot_run_fail_at_construction(cls):
    """An explicit backend that cannot run in this process, and Triton with more EM-INF steps
    than it takes, raise when the processor is built; large step counts are checked, not run
    (the probe takes one step)."""
    for backend, status in em_kernels.available_backends().items():
        if status != "available":
            with pytest.raises(em_kernels.BackendUnavailableError, match=re.escape(status)):
                cls(backend=backend)
    if cls is EMInfLogitsProcessor:
        if em_kernels.available_backends()["triton"] == "available":
            with pytest.raises(ValueError, match="at most"):
                cls(steps=300, backend="triton")
        started = time.perf_counter()
        cls(steps=10**7, lr=0.0)
        assert time.perf_counter() - started < 5  # ~23 minutes if the probe ran them


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
    (dict(temperature=1e-300), ValueError),  # scores / T overflow float32
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


def test_decode_benchmark_runs_and_reports_both_measures(tmp_path, capsys, monkeypatch):
    """bench/decode.py end to end on a tiny model: every provider timed in generate() and, but
    plain, alone per call; the JSON holds both. Each timing is the real call with its seconds
    then replaced by scripted ones, so that every number can be pinned: one warm-up per
    provider, then --repeats rounds in which who goes first rotates; each provider timed with
    its own processors, on --prompt tokens making --new-tokens tokens and on --vocab fp32
    scores --calls times; the processors run on every token and call; ms/token is the median
    round over the new tokens (warm-up left out), per call in ms, the overheads over plain as
    printed; the JSON is the result."""
    import json

    from bench import decode

    generate_seconds = {"plain": [50.0, 0.030, 0.012, 0.020],  # warm-up, then the 3 rounds
                        "em-inf": [50.0, 0.060, 0.033, 0.036],
                        # faster than plain: the overhead is printed with its sign
                        "released": [50.0, 0.009, 0.012, 0.015]}
    call_seconds = {"em-inf": 0.0004, "released": 0.002, "em_inf_adjust": 0.00025}
    kinds = {(): "plain", (EMInfLogitsProcessor,): "em-inf",
             (decode.ReleasedEMInfProcessor,): "released",
             (decode.EMInfAdjustAlone,): "em_inf_adjust"}
    generated, timed_alone = [], []
    real_generate, real_call = decode.time_generate, decode.time_processor_call

    def scripted_generate(model, input_ids, processors, new_tokens, device):
        real_generate(model, input_ids, processors, new_tokens, device)
        name = kinds[tuple(type(p) for p in processors)]
        generated.append((name, tuple(input_ids.shape), new_tokens))
        return generate_seconds[name][sum(run[0] == name for run in generated) - 1]

    def scripted_call(processors, input_ids, scores, calls, device):
        real_call(processors, input_ids, scores, calls, device)
        name = kinds[tuple(type(p) for p in processors)]
        timed_alone.append((name, tuple(scores.shape), scores.dtype, calls))
        return call_seconds[name]

    processor_calls = {"em-inf": 0, "released": 0}

    def count_calls(name, cls):  # generate() reads __call__'s signature: (input_ids, scores)
        call = cls.__call__

        def counted(self, input_ids, scores):
            processor_calls[name] += 1
            return call(self, input_ids, scores)
        monkeypatch.setattr(cls, "__call__", counted)

    count_calls("em-inf", EMInfLogitsProcessor)
    count_calls("released", decode.ReleasedEMInfProcessor)
    monkeypatch.setattr(decode, "time_generate", scripted_generate)
    monkeypatch.setattr(decode, "time_processor_call", scripted_call)
    out = tmp_path / "decode.json"
    result = decode.main(["--vocab", "300", "--prompt", "4", "--new-tokens", "3", "--repeats",
                          "3", "--calls", "3", "--backend", "auto", "--json", str(out)])
    assert set(result["ms_per_token"]) == {"plain", "em-inf", "released"}
    assert set(result["ms_per_call"]) == {"em-inf", "released", "em_inf_adjust"}
    order = ["plain", "em-inf", "released"]
    rounds = [order[(start + i) % 3] for start in range(3) for i in range(3)]
    assert generated == [(name, (1, 4), 3) for name in order + rounds]
    assert timed_alone == [(name, (1, 300), torch.float32, 3)
                           for name in ("em-inf", "released", "em_inf_adjust")]
    assert processor_calls == {"em-inf": 4 * 3 + 3 + 3, "released": 4 * 3 + 3 + 3}
    assert result["ms_per_token"] == pytest.approx(
        {"plain": 20.0 / 3, "em-inf": 36.0 / 3, "released": 12.0 / 3})
    assert result["ms_per_call"] == pytest.approx(
        {"em-inf": 0.4, "released": 2.0, "em_inf_adjust": 0.25})
    assert (result["vocab"], result["batch"], result["prompt"], result["new_tokens"]) == (
        300, 1, 4, 3)
    assert json.loads(out.read_text()) == result
    # The backend that ran, not only the one asked for: "auto" on CPU tensors is the C++ kernel.
    ran = "cpu" if em_kernels.available_backends()["cpu"] == "available" else "torch"
    assert (result["backend"], result["backend_asked"]) == (ran, "auto")
    printed = capsys.readouterr().out
    assert f"em-inf backend {ran} (asked: auto)" in printed
    assert "(+80.0% over plain);  alone    400.0 us/call = 6.00% of plain's token" in printed
    assert "(-40.0% over plain);  alone   2000.0 us/call = 30.00% of plain's token" in printed
    assert "em_inf_adjust alone (the op, without the processor):    250.0 us/call" in printed
    monkeypatch.undo()
    for bad, message in ((["--prompt", "0"], "--prompt must be >= 1"),
                         (["--new-tokens", "-1"], "--new-tokens must be >= 1"),
                         (["--calls", "0"], "--calls must be >= 1"),
                         (["--vocab", "2"], "--vocab must be >= 3")):
        with pytest.raises(SystemExit):
            decode.main(bad)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decode.main(["--vocab", "300", "--providers", "plain,bogus"])
    assert "unknown providers ['bogus']" in capsys.readouterr().err


def test_decode_benchmark_runs_em_inf_as_asked(monkeypatch):
    """--backend, --providers and --batch are obeyed, and em-inf runs the anchors' setting on
    the fp32 (batch, vocab) scores generate() hands it: 5 steps, lr 0.1, KL weight 0.001,
    threshold -inf (no row exits early, so every step is paid for)."""
    from bench.decode import main

    calls = []
    op = em_kernels.em_inf_adjust
    monkeypatch.setattr(em_kernels, "em_inf_adjust", lambda scores, **kwargs: calls.append(
        (scores.shape, scores.dtype, kwargs)) or op(scores, **kwargs))
    result = main(["--vocab", "50", "--batch", "2", "--prompt", "3", "--new-tokens", "1",
                   "--repeats", "1", "--calls", "1", "--providers", "em-inf",
                   "--backend", "torch"])
    assert set(result["ms_per_token"]) == {"em-inf"}
    assert set(result["ms_per_call"]) == {"em-inf", "em_inf_adjust"}
    assert (result["backend"], result["backend_asked"]) == ("torch", "torch")
    options = dict(backend="torch", steps=5, lr=0.1, kl_weight=0.001, threshold=-math.inf,
                   early_exit="row", optimizer="adam")
    assert calls[0][2] == {**options, "steps": 1}  # the constructor's probe: one step
    # two generate() runs of one token, then 3 warm-up calls and 1 timed of the processor and
    # as many of the op alone
    assert calls[1:] == [((2, 50), torch.float32, options)] * (2 + 4 + 4)


def test_decode_benchmark_released_processor_is_em_inf():
    """The "released" provider (the paper's loop: torch.optim.Adam on an fp32 leaf, autograd)
    does em-inf's work: at batch 1, the anchors' setting, its scores are em_inf_adjust's with 5
    steps, lr 0.1, KL weight 0.001 and no early exit (against the float64 oracle). The scores
    are near uniform, as a random model's, where the KL term is not lost in rounding."""
    from bench.decode import ReleasedEMInfProcessor

    scores = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    expected = em_kernels.em_inf_adjust(scores.double(), steps=5, lr=0.1, kl_weight=0.001,
                                        threshold=-math.inf, backend="torch")
    adjusted = ReleasedEMInfProcessor()(None, scores.clone())
    assert adjusted.dtype == torch.float32
    torch.testing.assert_close(adjusted.double(), expected, rtol=0, atol=1e-4)


def test_decode_benchmark_qwen7b_shapes():
    """--qwen7b's model, built on the meta device (no memory, under a second): Qwen2.5-7B's
    7,615,616,512 parameters (28 layers, hidden 3584, GQA 28/4, untied head) in bf16, no EOS
    (every run makes its tokens), and the default dtype put back (else the per-call scores
    would be bf16, not the fp32 that generate() hands the processors)."""
    from bench.decode import qwen7b_model

    model = qwen7b_model("meta")
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512
    assert model.config.eos_token_id is None
