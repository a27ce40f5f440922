"""The README's Python examples run as written (on CPU), so the README stays true: the ops'
example, the custom training loop (each of its three steps on a tiny random model), the causal
LM's shifted logits and EM-INF in generate(). The verl snippets on logits edit verl's methods
and are not run here; the swap of verl's fused LM head runs against a stand-in for verl's module,
and, where verl is installed, against verl's signature and inside verl's own model forward; the
TRL ones run against TRL's own code where a TRL that they are for is installed (CI has none)."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from algos_support import EOS, PAD, random_batch, tiny_causal_lm

import em_kernels
from em_kernels import reference

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example(anchor: str) -> str:
    """The first ```python block after the README text ``anchor``."""
    text = README.read_text()
    start = text.index(anchor)
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(text, start)
    assert match is not None, f"no python example after {anchor!r}"
    return match.group(1)


def _trl_version(low: str | None = None, high: str | None = None) -> str:
    """The installed TRL's version, after skipping where TRL is absent or outside [low, high)."""
    pytest.importorskip("trl")
    import importlib.metadata

    version = importlib.metadata.version("trl")
    if low is not None and torch.torch_version.TorchVersion(version) < low:
        pytest.skip(f"the example is for TRL >= {low}, not {version}")
    if high is not None and torch.torch_version.TorchVersion(version) >= high:
        pytest.skip(f"the example is for TRL < {high}, not {version}")
    return version


def _readme_block_from(first_line: str) -> str:
    """The code of the README block that begins with ``first_line``, to its end."""
    text = README.read_text()
    start = text.index(first_line)
    return text[start:text.index("```", start)]


def test_ops_example(capsys):
    exec(readme_example("## The ops (`em_kernels`)"), {})
    assert "'cpu': 'available'" in capsys.readouterr().out


def test_custom_training_loop():
    """Each of the three steps runs after the one before it (none reuses a freed graph) and
    moves the weights."""
    pytest.importorskip("transformers")
    model = tiny_causal_lm(family="llama")
    ids, mask, response_mask = random_batch(torch.Generator().manual_seed(0), 3, 5, 6)
    response_mask[0, 5] = True  # at least one response token
    ids[0, 5], mask[0, 5] = 2, 1
    rows = int(response_mask[:, 1:].sum())
    generator = torch.Generator().manual_seed(1)
    namespace = dict(
        em_kernels=em_kernels, model=model, ids=ids, mask=mask,
        response_mask=response_mask, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        adv=torch.randn(rows, generator=generator),
        old_lp=-torch.rand(rows, generator=generator) - 2.0,
        ref_lp=-torch.rand(rows, generator=generator) - 2.0)
    before = model.lm_head.weight.detach().clone()
    exec(readme_example("### In a custom training loop"), namespace)
    assert torch.isfinite(namespace["out"].loss)
    assert not torch.equal(model.lm_head.weight, before)


def test_shifted_logits_example():
    """The causal LM's logits with shift=1: (B, T - 1) results, those of logits[:, :-1] with
    ids[:, 1:], and a gradient that reaches the model."""
    pytest.importorskip("transformers")
    model = tiny_causal_lm(family="llama")
    ids, mask, _ = random_batch(torch.Generator().manual_seed(2), 3, 5, 6)
    namespace = dict(em_kernels=em_kernels, model=model, ids=ids, mask=mask)
    exec(readme_example("### Replacing verl's or TRL's entropy from logits"), namespace)
    log_probs, entropy, logits = (namespace[name] for name in ("log_probs", "entropy", "logits"))
    assert log_probs.shape == entropy.shape == (ids.shape[0], ids.shape[1] - 1)
    for mine, sliced in zip((log_probs, entropy), em_kernels.logprobs_and_entropy(
            logits[:, :-1], ids[:, 1:])):
        torch.testing.assert_close(mine, sliced, rtol=0, atol=0)
    (entropy.sum() - log_probs.sum()).backward()
    assert model.lm_head.weight.grad is not None


VERL_LM_HEAD = "verl.utils.kernel.linear_cross_entropy"


def _verl_lm_head_swap(monkeypatch) -> tuple[types.ModuleType, list]:
    """The README's swap of verl's fused LM head, run on a stand-in for verl's module (CI has no
    verl) whose own function records its calls: (that module, the calls)."""
    calls = []
    modules = {}
    for name in ("verl", "verl.utils", "verl.utils.kernel", VERL_LM_HEAD):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, modules[name])
    modules[VERL_LM_HEAD].linear_cross_entropy = lambda *args: calls.append(args) or "verl's"
    exec(_readme_block_from("# verl's fused LM head"), {})
    return modules[VERL_LM_HEAD], calls


def test_verl_fused_lm_head_swap(monkeypatch):
    """After the README's swap, verl's call (hidden (B, T, H), labels (B, T), a float
    temperature, reduction "none") gets flat log-probs and entropies, and d(hidden) and
    d(weight), matching float64; a reduction or a process group goes to verl's own function with
    the arguments as given."""
    lm_head, calls = _verl_lm_head_swap(monkeypatch)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator).requires_grad_()
    labels = torch.randint(0, 40, (2, 5), generator=generator)
    log_probs, entropy = lm_head.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    entropy64, log_probs64 = reference.linear_entropy_ref(
        hidden64.reshape(-1, 16), weight64, tokens=labels.reshape(-1), temperature=0.7)
    assert log_probs.shape == entropy.shape == (10,)
    torch.testing.assert_close(log_probs.double(), log_probs64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), entropy64, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(2, 10, generator=generator)
    (upstream[0] * log_probs + upstream[1] * entropy).sum().backward()
    (upstream[0].double() * log_probs64 + upstream[1].double() * entropy64).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-5, atol=1e-5)
    assert not calls
    group = object()
    assert lm_head.linear_cross_entropy(hidden, weight, labels, 0.7, "mean") == "verl's"
    assert lm_head.linear_cross_entropy(hidden, weight, labels, 0.7, "none", group) == "verl's"
    assert calls == [(hidden, weight, labels, 0.7, "mean", None),
                     (hidden, weight, labels, 0.7, "none", group)]


def test_verl_fused_lm_head_swap_takes_verls_signature(monkeypatch, without_verl_modules):
    """Where verl is installed (CI has none; em-bench's loader imports its kernel module without
    verl's own dependencies), the swap's parameters are those of verl's function: names, order
    and defaults."""
    import importlib.util

    if importlib.util.find_spec("verl") is None:
        pytest.skip("verl is not installed")
    from bench.ops.linear_entropy import import_verl_fused_lm_head

    import_verl_fused_lm_head()
    verls = sys.modules[VERL_LM_HEAD].LinearCrossEntropy.forward
    lm_head, _ = _verl_lm_head_swap(monkeypatch)
    theirs = [(parameter.name, parameter.default)
              for parameter in inspect.signature(verls).parameters.values()][1:]  # after ctx
    ours = [(parameter.name, parameter.default)
            for parameter in inspect.signature(lm_head.linear_cross_entropy).parameters.values()]
    assert ours == theirs


def test_verl_fused_lm_head_swap_in_verls_model_forward(monkeypatch, without_verl_modules):
    """Where verl is installed (CI has none), verl's own model forward for fused kernels with
    the triton backend (verl.models.transformers.dense_common.forward_with_triton_backend) runs
    the README's swap on a tiny Llama: its log-probs and entropies are em-kernels' on the
    model's logits over T with verl's rolled ids, and its backward reaches the LM head. Bare
    stand-ins keep the package inits that need Ray and more from running."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("verl") is None:
        pytest.skip("verl is not installed")
    pytest.importorskip("transformers")
    from bench.ops.linear_entropy import bare_verl_packages

    with bare_verl_packages("verl", "verl.utils", "verl.models.transformers"):
        dense_common = importlib.import_module("verl.models.transformers.dense_common")
        exec(_readme_block_from("# verl's fused LM head"), {})
        model = tiny_causal_lm(family="llama")
        ids, mask, _ = random_batch(torch.Generator().manual_seed(4), 3, 5, 6)
        out = dense_common.forward_with_triton_backend(
            model, input_ids=ids, attention_mask=mask, temperature=0.7, return_dict=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    log_probs, entropy = em_kernels.logprobs_and_entropy(
        logits, torch.roll(ids, shifts=-1, dims=-1), temperature=0.7)
    torch.testing.assert_close(out.log_probs, log_probs.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, entropy.reshape(-1), rtol=1e-5, atol=1e-5)
    (out.entropy.sum() - out.log_probs.sum()).backward()
    assert model.lm_head.weight.grad is not None


def _grpo_trainer(cls, model, temperature=0.7):
    """A GRPO trainer of class ``cls`` as TRL builds one (its constructor, on CPU) around
    ``model``, with a word-level tokenizer over the model's vocabulary and a length reward."""
    import tempfile

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig

    words = Tokenizer(models.WordLevel(
        vocab={f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t3"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t3",
                                        pad_token=f"t{PAD}", eos_token=f"t{EOS}")
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[],
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                      max_steps=1, save_strategy="no", temperature=temperature)
    return cls(model=model, args=args, processing_class=tokenizer,
               reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
               train_dataset=Dataset.from_dict({"prompt": ["t4 t5 t6", "t7 t8"] * 4}))


def test_trl_override_matches_trls_own_method():
    """On a GRPO trainer built by TRL's own constructor, the TRL override gives the log-probs and
    entropies of the method it replaces, in TRL's return convention (two values up to 1.6, three
    from 1.7), batch by batch; gradients reach the LM head, and a training step runs with it."""
    pytest.importorskip("transformers")
    _trl_version(high="1.14")  # 1.14 dropped _get_last_hidden_state
    from trl import GRPOTrainer

    namespace = {}
    exec(_readme_block_from("# TRL up to 1.13"), namespace)  # with its own imports
    model = tiny_causal_lm(family="llama")
    trainer = _grpo_trainer(namespace["FusedEntropyGRPOTrainer"], model)

    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt
    arguments = (model, ids, mask, 5)
    ours = trainer._get_per_token_logps_and_entropies(*arguments, batch_size=3,
                                                      compute_entropy=True)
    with torch.no_grad():
        theirs = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, *arguments, batch_size=3, compute_entropy=True)
    assert len(ours) == len(theirs) and ours[2:] == theirs[2:] == (None,) * (len(ours) - 2)
    for mine, trls in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(mine, trls, rtol=1e-5, atol=1e-5)
    (ours[0].sum() + ours[1].sum()).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    before = model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.lm_head.weight, before)


def test_trl_fused_lm_head_swap_matches_trls_own(monkeypatch):
    """With the README's swap, TRL's fused LM head (add_fused_lm_head, as GRPOTrainer sets it up)
    gives the log-probs, entropies and head gradient of TRL's own kernel, at a temperature and
    with a logit scale, and still hands what em-kernels does not offer (a softcapped model) to
    TRL's own; a GRPO training step goes through it."""
    pytest.importorskip("transformers")
    _trl_version(low="1.15")
    import trl
    import trl.trainer.utils
    from trl.trainer.utils import add_fused_lm_head

    original = trl.trainer.utils._ChunkedLogProbFunction
    ids, mask, response = random_batch(torch.Generator().manual_seed(4), 3, 4, 5)
    labels = ids.masked_fill(~response, -100)  # the responses are scored

    def run(softcapping=None, logit_scale=None):
        model = tiny_causal_lm(family="llama")
        model.config.final_logit_softcapping = softcapping
        model.config.logit_scale = logit_scale  # read by add_fused_lm_head (Cohere's)
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
        return out.log_probs, out.entropy, model.lm_head.weight.grad

    calls = []
    linear_entropy = em_kernels.linear_entropy

    def counting_linear_entropy(*args, **kwargs):  # the swap's calls
        calls.append(kwargs["temperature"])
        return linear_entropy(*args, **kwargs)

    settings = [{}, {"logit_scale": 2.5}, {"softcapping": 5.0}]
    theirs = [run(**setting) for setting in settings]
    ours, ours_calls = [], []
    try:
        exec(_readme_block_from("# TRL >= 1.15"), {})  # with its own imports
        monkeypatch.setattr(em_kernels, "linear_entropy", counting_linear_entropy)
        for setting in settings:
            before = len(calls)
            ours.append(run(**setting))
            ours_calls.append(calls[before:])
        before = len(calls)
        _grpo_trainer(trl.GRPOTrainer, tiny_causal_lm(family="llama")).train()
        assert len(calls) > before  # a training step of TRL's GRPO goes through the swap
    finally:
        trl.trainer.utils._ChunkedLogProbFunction = original
    # one call per forward, at T / logit_scale; none for the softcapped model
    assert ours_calls == [[0.7], [0.7 / 2.5], []]
    for mine, trls in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        torch.testing.assert_close(mine, trls, rtol=1e-5, atol=1e-5)
    for mine, trls in zip(ours[2], theirs[2]):  # softcapped: TRL's own kernel, bit for bit
        assert torch.equal(mine, trls)


def test_em_inf_in_generate():
    pytest.importorskip("transformers")
    model = tiny_causal_lm(family="llama", max_positions=512).eval()
    prompt = torch.tensor([[2, 5, 7, 11]])
    namespace = dict(model=model, inputs=dict(input_ids=prompt,
                                              attention_mask=torch.ones_like(prompt)))
    exec(readme_example("EM-INF in `generate()`"), namespace)
    out = namespace["out"]
    assert torch.equal(out[:, :4], prompt) and out.shape[1] > 4
