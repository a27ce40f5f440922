"""em-demo: the paper's story end to end on a CPU in a few minutes.

1. Build a tiny Llama from a config (random init, nothing downloaded) and a synthetic reasoning
   task with checkable answers: multi-digit addition over a character vocabulary, every number
   written least significant digit first (the order in which the sum is computed), the sum
   zero-padded to digits + 1 characters, then EOS. Example with 2 digits, 45 + 39 = 84:
   prompt "<bos>54+93=", answer "480<eos>".
2. Pre-train it briefly with labels, to a model that is right often but not always.
3. Without labels, apply EM-INF (logit adjustment in generate(); the paper's adaptive-temperature
   baseline beside it), EM-FT (entropy of its own samples) and EM-RL (negative entropy or
   log-probability as the only reward), each from the same pre-trained weights.
4. Print accuracy (greedy, and sampled at temperature 1) and the mean token entropy of sampled
   answers before and after each method, and save a PNG plot.

Whatever the numbers show is what the methods do on this toy; nothing is tuned per method
beyond one learning rate shared by the training methods.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import torch

import em_kernels

from .em_ft import EMFTTrainer
from .em_rl import EMRLTrainer

DIGIT_CHARS = "0123456789"
PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 3, 4
SPECIAL = ["<pad>", "<bos>", "<eos>", "+", "="]
VOCAB = SPECIAL + list(DIGIT_CHARS)
FIRST_DIGIT = len(SPECIAL)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    digits: int = 2
    hidden_size: int = 64
    layers: int = 3
    heads: int = 4
    # Just past the jump from ~0% to ~70% greedy accuracy on the held-out problems (seed 0;
    # seeds 1 and 2 reach ~75% at 600 and 450 steps).
    pretrain_steps: int = 500
    pretrain_batch: int = 128
    pretrain_lr: float = 3e-3
    eval_prompts: int = 512
    em_steps: int = 60
    em_prompts_per_step: int = 32
    em_lr: float = 1e-4
    rl_rollouts: int = 4
    em_inf_steps: int = 5
    em_inf_lr: float = 0.1
    seed: int = 0


# The full run (~40 s on 2 cores), --quick (~30 s: fewer EM steps) and the tests' run (seconds).
FULL = DemoConfig()
QUICK = dataclasses.replace(FULL, em_steps=24)  # the same pre-trained model and problems
TINY = dataclasses.replace(FULL, hidden_size=32, layers=2, pretrain_steps=60, pretrain_batch=64,
                           eval_prompts=32, em_steps=3, em_prompts_per_step=8)


# ----------------------------------------------------------------------------- the task

class AdditionTask:
    """Random a + b with ``digits``-digit operands, encoded as described in the module doc.

    Problems are ids a * 10**digits + b. `hold_out` draws the evaluation problems and keeps
    them out of every later `sample`, so that nothing trains on them: 2-digit addition has only
    10,000 problems, which the full run's pre-training batches (51,200 draws) would otherwise
    nearly exhaust."""

    def __init__(self, digits: int):
        self.digits = digits
        self.prompt_length = 2 * digits + 3
        self.answer_length = digits + 2  # digits + 1 sum characters, then EOS
        self.problems = 10 ** (2 * digits)
        self.held_out_ids = torch.empty(0, dtype=torch.long)

    def _encode_number(self, values: torch.Tensor, width: int) -> torch.Tensor:
        """(B) non-negative ints -> (B, width) digit tokens, least significant first."""
        powers = 10 ** torch.arange(width)
        return (values[:, None] // powers) % 10 + FIRST_DIGIT

    def _encode(self, ids: torch.Tensor):
        """(prompts (B, P), answers (B, A)) of the problems ``ids``."""
        a, b = ids // 10 ** self.digits, ids % 10 ** self.digits
        column = torch.full((len(ids), 1), 0)
        prompts = torch.cat([
            column + BOS, self._encode_number(a, self.digits), column + PLUS,
            self._encode_number(b, self.digits), column + EQUALS], 1)
        answers = torch.cat([self._encode_number(a + b, self.digits + 1), column + EOS], 1)
        return prompts, answers

    def _draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` random problem ids, none held out (those drawn are drawn again)."""
        ids = torch.randint(0, self.problems, (count,), generator=generator)
        redraw = torch.isin(ids, self.held_out_ids)
        while bool(redraw.any()):
            ids[redraw] = torch.randint(0, self.problems, (int(redraw.sum()),),
                                        generator=generator)
            redraw = torch.isin(ids, self.held_out_ids)
        return ids

    def hold_out(self, count: int, generator: torch.Generator):
        """(prompts, answers) of ``count`` random problems (repeats possible), from now on
        never returned by `sample`. At most half of all problems may be held out."""
        ids = self._draw(count, generator)
        held_out = torch.unique(torch.cat([self.held_out_ids, ids]))
        if 2 * len(held_out) > self.problems:
            raise ValueError(
                f"holding out {count} problems would leave fewer than half of the "
                f"{self.problems} {self.digits}-digit problems to train on: use more digits "
                f"or fewer evaluation prompts")
        self.held_out_ids = held_out
        return self._encode(ids)

    def sample(self, count: int, generator: torch.Generator):
        """(prompts (B, P), answers (B, A)) for ``count`` random problems, none held out."""
        return self._encode(self._draw(count, generator))

    @staticmethod
    def decode(tokens) -> str:
        return "".join(VOCAB[int(t)] for t in tokens)


def build_model(config: DemoConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=config.hidden_size,
        intermediate_size=2 * config.hidden_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=False)
    return LlamaForCausalLM(model_config)


def pretrain(model, task: AdditionTask, config: DemoConfig, generator: torch.Generator, log):
    """Supervised next-token training on prompt + answer, loss on the answer only. Stopped
    early on purpose: the model should be right often, not always."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    model.train()
    for step in range(config.pretrain_steps):
        prompts, answers = task.sample(config.pretrain_batch, generator)
        input_ids = torch.cat([prompts, answers], 1)
        labels = input_ids.clone()
        labels[:, :task.prompt_length] = -100
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % max(config.pretrain_steps // 4, 1) == 0:
            log(f"  pre-training step {step + 1:4d}/{config.pretrain_steps}: "
                f"loss {loss.item():.3f}")


# ----------------------------------------------------------------------------- evaluation

def _answer_mask(generated: torch.Tensor) -> torch.Tensor:
    """Generated positions up to and including the first EOS."""
    eos = (generated == EOS).long()
    return (eos.cumsum(-1) - eos) == 0


def _correct(generated: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Exact match of the whole answer, EOS included (anything after EOS is ignored)."""
    length = answers.shape[1]
    if generated.shape[1] < length:
        return torch.zeros(generated.shape[0], dtype=torch.bool)
    return (generated[:, :length] == answers).all(1)


@torch.no_grad()
def evaluate(model, task: AdditionTask, prompts, answers, *, seed: int,
             logits_processor=None) -> dict[str, float]:
    """Greedy accuracy, sampled accuracy (temperature 1, no top-k / top-p) and the mean entropy
    of the (processed) next-token distributions over the sampled answers' tokens."""
    from transformers import GenerationConfig, LogitsProcessorList

    model.eval()
    processors = LogitsProcessorList(logits_processor or [])
    common = dict(max_new_tokens=task.answer_length, pad_token_id=PAD, eos_token_id=EOS)
    attention = torch.ones_like(prompts)
    greedy = model.generate(input_ids=prompts, attention_mask=attention,
                            generation_config=GenerationConfig(do_sample=False, **common),
                            logits_processor=processors)
    torch.manual_seed(seed)
    sampled = model.generate(
        input_ids=prompts, attention_mask=attention, logits_processor=processors,
        generation_config=GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                           output_scores=True, return_dict_in_generate=True,
                                           **common))
    generated = sampled.sequences[:, prompts.shape[1]:]
    entropies = em_kernels.entropy(torch.stack(sampled.scores, 1))
    mask = _answer_mask(generated)
    return {
        "greedy_accuracy": float(_correct(greedy[:, prompts.shape[1]:], answers).float().mean()),
        "sampled_accuracy": float(_correct(generated, answers).float().mean()),
        "entropy": float(entropies[mask].mean()),
    }


def inference_methods(config: DemoConfig) -> dict:
    """The decode-time methods, as logits processor lists for generate(): EM-INF, and the
    paper's adaptive-temperature baseline for comparison."""
    from .em_inf import AdaptiveTemperatureLogitsProcessor, EMInfLogitsProcessor, em_inf_processors

    return {
        "EM-INF": em_inf_processors(
            EMInfLogitsProcessor(steps=config.em_inf_steps, lr=config.em_inf_lr)),
        "adaptive temp.": em_inf_processors(AdaptiveTemperatureLogitsProcessor()),
    }


# ----------------------------------------------------------------------------- the methods

def _prompt_batches(task: AdditionTask, config: DemoConfig, generator: torch.Generator):
    for _ in range(config.em_steps):
        prompts, _ = task.sample(config.em_prompts_per_step, generator)
        yield prompts, torch.ones_like(prompts)


def _train(method: str, base, task: AdditionTask, config: DemoConfig, seed: int,
           progress: bool):
    """A copy of the base model trained by ``method`` on unlabelled prompts; its step history."""
    model = copy.deepcopy(base)
    model.train()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    common = dict(pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=task.answer_length,
                  lr=config.em_lr, progress=progress)
    if method == "EM-FT":
        trainer = EMFTTrainer(model, **common)
    else:
        reward = "sequence" if method == "EM-RL (sequence)" else "token"
        trainer = EMRLTrainer(model, reward=reward, num_rollouts=config.rl_rollouts, **common)
    history = trainer.train(_prompt_batches(task, config, generator), num_steps=config.em_steps)
    return model, history


TRAINED_METHODS = ("EM-FT", "EM-RL (sequence)", "EM-RL (token)")


def run_demo(config: DemoConfig, plot_path: str | None = None, log=print,
             progress: bool = False) -> dict:
    """The whole story; returns {"results": {method: metrics}, "curves": {method: entropies}}.

    ``progress`` shows the trainers' progress bars. Runs on one CPU thread: matrices this small
    gain nothing from more, and lose a lot to spinning threads when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(config, plot_path, log, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig, plot_path: str | None, log, progress: bool) -> dict:
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    task = AdditionTask(config.digits)
    generator = torch.Generator().manual_seed(config.seed)
    base = build_model(config)
    # Drawn first: neither pre-training nor the methods' unlabelled prompts see these.
    eval_prompts, eval_answers = task.hold_out(
        config.eval_prompts, torch.Generator().manual_seed(config.seed + 1))
    log(f"Task: {config.digits}-digit addition, digits least significant first, e.g. "
        f"{task.decode(torch.cat(task.sample(1, torch.Generator().manual_seed(1)), 1)[0])}")
    log(f"Model: Llama, {config.layers} layers, hidden {config.hidden_size}, vocab {len(VOCAB)}, "
        f"{sum(p.numel() for p in base.parameters()) / 1e3:.0f}k parameters")
    pretrain(base, task, config, generator, log)
    evaluation_seed = config.seed + 2

    results = {"pre-trained": evaluate(base, task, eval_prompts, eval_answers,
                                       seed=evaluation_seed)}
    for method, processors in inference_methods(config).items():
        results[method] = evaluate(base, task, eval_prompts, eval_answers, seed=evaluation_seed,
                                   logits_processor=processors)
    curves = {}
    for offset, method in enumerate(TRAINED_METHODS):
        log(f"  {method}: {config.em_steps} steps on unlabelled prompts")
        model, history = _train(method, base, task, config, config.seed + 10 + offset, progress)
        curves[method] = [stats["entropy"] for stats in history]
        results[method] = evaluate(model, task, eval_prompts, eval_answers, seed=evaluation_seed)

    log("")
    log(format_table(results))
    log(f"(accuracy on {config.eval_prompts} held-out problems; entropy in nats per answer "
        f"token, of sampled answers; {time.perf_counter() - started:.0f} s in all)")
    if plot_path:
        save_plot(results, curves, plot_path)
        log(f"plot saved to {plot_path}")
    return {"results": results, "curves": curves}


def format_table(results: dict[str, dict[str, float]]) -> str:
    header = f"{'method':<20}{'greedy acc':>12}{'sampled acc':>13}{'entropy':>10}"
    lines = [header, "-" * len(header)]
    for method, metrics in results.items():
        lines.append(f"{method:<20}{metrics['greedy_accuracy']:>12.1%}"
                     f"{metrics['sampled_accuracy']:>13.1%}{metrics['entropy']:>10.4f}")
    return "\n".join(lines)


def save_plot(results: dict, curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    positions = range(len(methods))
    figure, (accuracy_axes, entropy_axes, curve_axes) = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.38
    accuracy_axes.bar([x - width / 2 for x in positions],
                      [results[m]["greedy_accuracy"] for m in methods], width, label="greedy")
    accuracy_axes.bar([x + width / 2 for x in positions],
                      [results[m]["sampled_accuracy"] for m in methods], width,
                      label="sampled (T = 1)")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.legend()
    entropy_axes.bar(list(positions), [results[m]["entropy"] for m in methods], color="tab:gray")
    entropy_axes.set_ylabel("mean token entropy of sampled answers (nats)")
    for axes in (accuracy_axes, entropy_axes):
        axes.set_xticks(list(positions))
        axes.set_xticklabels(methods, rotation=25, ha="right")
    for method, entropies in curves.items():
        curve_axes.plot(range(1, len(entropies) + 1), entropies, label=method)
    curve_axes.set_xlabel("training step")
    curve_axes.set_ylabel("mean entropy of the step's samples (nats)")
    curve_axes.legend()
    figure.suptitle("Entropy minimisation without labels on a tiny Llama (addition)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="em-demo", description="EM-INF, EM-FT and EM-RL on a tiny model, on CPU.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer EM steps (24 instead of 60); the same pre-trained model "
                             "and problems")
    parser.add_argument("--plot", default="em_demo.png", help="PNG path ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    run_demo(config, plot_path=args.plot or None, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
