"""em-demo end to end on its smallest configuration (seconds): the table, the plot, the fixed
seed, the task's encoding and the command line; and its parts on their own: pre-training,
evaluation (on scores that know the answers), the trained methods' set-up, the table."""

import copy
import dataclasses
import math
import types
from unittest import mock

import pytest
import torch
from algos_support import assert_same_weights
from transformers import LogitsProcessor

import em_kernels
from em_algos import demo

METHODS = ["pre-trained", "EM-INF", "adaptive temp.", "EM-FT", "EM-RL (sequence)",
           "EM-RL (token)"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """run_demo(TINY): its result, plot path and log; every evaluate() call's (model, prompts,
    seed, processors), every _train() call's (method, model, history), every prompt the task
    sampled (pre-training's and the methods'); the thread count before and after (set to 3
    first, so that the demo's 1 cannot pass for it)."""
    plot = tmp_path_factory.mktemp("demo") / "demo.png"
    lines, evaluated, trained, sampled = [], [], [], []
    evaluate, train, sample = demo.evaluate, demo._train, demo.AdditionTask.sample

    def recording_sample(task, count, generator):
        prompts, answers = sample(task, count, generator)
        sampled.append(prompts)
        return prompts, answers

    def recording_evaluate(model, task, prompts, answers, *, seed, logits_processor=None):
        evaluated.append((model, prompts, seed, logits_processor))
        return evaluate(model, task, prompts, answers, seed=seed,
                        logits_processor=logits_processor)

    def recording_train(method, *args):
        model, history = train(method, *args)
        trained.append((method, model, history))
        return model, history

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with mock.patch.object(demo, "evaluate", recording_evaluate), \
                mock.patch.object(demo, "_train", recording_train), \
                mock.patch.object(demo.AdditionTask, "sample", recording_sample):
            run = demo.run_demo(demo.TINY, plot_path=str(plot), log=lines.append)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(run=run, plot=plot, output="\n".join(lines),
                                 evaluated=evaluated, trained=trained, sampled=sampled,
                                 threads=(3, threads_after))


def test_pipeline_runs_end_to_end(tiny_run):
    run, plot, output = tiny_run.run, tiny_run.plot, tiny_run.output
    assert list(run["results"]) == METHODS
    for method, metrics in run["results"].items():
        assert 0 <= metrics["greedy_accuracy"] <= 1 and 0 <= metrics["sampled_accuracy"] <= 1
        assert 0 <= metrics["entropy"] <= math.log(len(demo.VOCAB)), method
        assert method in output
    for method in demo.TRAINED_METHODS:
        assert len(run["curves"][method]) == demo.TINY.em_steps
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_em_inf_lowers_the_sampling_entropy(tiny_run):
    results = tiny_run.run["results"]
    assert results["EM-INF"]["entropy"] < results["pre-trained"]["entropy"]


def test_every_method_is_evaluated_alike(tiny_run):
    """The comparison is fair: every row is evaluated on the same held-out prompts with the same
    sampling seed; the decode-time methods on the pre-trained model with their processors, the
    trained ones (each on its own copy) without; each curve is its trainer's step entropies;
    the caller's thread count is back afterwards."""
    evaluated, trained = tiny_run.evaluated, tiny_run.trained
    assert len(evaluated) == len(METHODS)
    base, prompts, seed, _ = evaluated[0]
    for _, other_prompts, other_seed, _ in evaluated:
        assert other_prompts is prompts and other_seed == seed
    processors = [processors for *_, processors in evaluated]
    assert processors[0] is None and all(processors[1:3]) and not any(processors[3:])
    assert all(model is base for model, *_ in evaluated[:3])
    assert [method for method, *_ in trained] == list(demo.TRAINED_METHODS)
    for (method, model, history), (evaluated_model, *_) in zip(trained, evaluated[3:]):
        assert evaluated_model is model and model is not base, method
        assert tiny_run.run["curves"][method] == [step["entropy"] for step in history]
    assert tiny_run.threads[1] == tiny_run.threads[0]


def _rows(prompts: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in prompts.tolist()}


def test_nothing_trains_on_the_evaluation_problems(tiny_run):
    """The table's accuracy is on held-out problems: no prompt that pre-training or a method's
    unlabelled batches drew is among those evaluated (2-digit addition has 10,000 problems,
    and the full run's pre-training alone draws 51,200)."""
    (_, evaluated_prompts, *_), *_ = tiny_run.evaluated
    config = demo.TINY
    trained_on = torch.cat(tiny_run.sampled)
    assert len(trained_on) >= config.pretrain_steps * config.pretrain_batch
    assert not _rows(evaluated_prompts) & _rows(trained_on)


def test_held_out_problems_never_come_back():
    """hold_out(): its problems are never sampled again, whatever else is; holding out more
    than half of all problems is refused, saying what to change, and holds out nothing."""
    task = demo.AdditionTask(2)
    held_prompts, held_answers = task.hold_out(600, torch.Generator().manual_seed(1))
    assert held_prompts.shape == (600, task.prompt_length)
    assert held_answers.shape == (600, task.answer_length)
    assert len(task.held_out_ids) == len(_rows(held_prompts))
    drawn, _ = task.sample(50_000, torch.Generator().manual_seed(2))
    assert not _rows(held_prompts) & _rows(drawn)
    # 50,000 draws over 10,000 problems: all but a few of the others come up
    assert len(_rows(drawn)) > 0.99 * (task.problems - len(task.held_out_ids))

    small = demo.AdditionTask(1)
    with pytest.raises(ValueError, match="fewer evaluation prompts"):
        small.hold_out(1000, torch.Generator().manual_seed(0))
    assert len(small.held_out_ids) == 0


def test_fixed_seed_gives_the_same_numbers(tiny_run):
    again = demo.run_demo(dataclasses.replace(demo.TINY, em_steps=1), log=lambda line: None)
    for method in ("pre-trained", "EM-INF", "adaptive temp."):
        assert again["results"][method] == tiny_run.run["results"][method]


def test_task_encodes_sums_least_significant_digit_first():
    task = demo.AdditionTask(3)
    prompts, answers = task.sample(64, torch.Generator().manual_seed(0))
    assert prompts.shape == (64, task.prompt_length) and answers.shape == (64, task.answer_length)
    for prompt, answer in zip(prompts, answers):
        text = task.decode(prompt)
        a, b = (int(number[::-1]) for number in text[len("<bos>"):-1].split("+"))
        assert task.decode(answer) == str(a + b).zfill(4)[::-1] + "<eos>"


def test_command_line(monkeypatch, tmp_path, capsys):
    """--quick runs QUICK (FULL stood in for by another tiny config, so a mix-up fails fast),
    with --seed's seed, plotting to --plot."""
    quick = dataclasses.replace(demo.TINY, em_steps=1)
    monkeypatch.setattr(demo, "QUICK", quick)
    monkeypatch.setattr(demo, "FULL", dataclasses.replace(quick, em_steps=2))
    configs = []
    run_demo = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", lambda config, **kwargs: configs.append(config) or (
        run_demo(config, **kwargs)))
    plot = tmp_path / "cli.png"
    assert demo.main(["--quick", "--plot", str(plot), "--seed", "3"]) == 0
    assert configs == [dataclasses.replace(quick, seed=3)]
    out = capsys.readouterr().out
    assert "greedy acc" in out and "EM-RL (token)" in out
    assert plot.exists()


def test_pretraining_learns_the_answer_only():
    """pretrain(): each step a fresh batch from the generator, the loss on the answer's tokens
    only (the prompt's digits are random: nothing to learn there), AdamW at pretrain_lr, the
    gradient clipped to norm 1 and cleared every step; replayed here by hand for two steps."""
    config = dataclasses.replace(demo.TINY, pretrain_steps=2, pretrain_batch=8)
    task = demo.AdditionTask(config.digits)
    torch.manual_seed(0)
    model = demo.build_model(config)
    replica = copy.deepcopy(model)
    demo.pretrain(model, task, config, torch.Generator().manual_seed(5), log=lambda line: None)
    generator = torch.Generator().manual_seed(5)
    optimizer = torch.optim.AdamW(replica.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    replica.train()
    for _ in range(2):
        prompts, answers = task.sample(config.pretrain_batch, generator)
        logits = replica(input_ids=torch.cat([prompts, answers], 1)).logits
        predicting_answers = logits[:, task.prompt_length - 1:-1]
        loss = torch.nn.functional.cross_entropy(predicting_answers.flatten(0, 1),
                                                 answers.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(replica.parameters(), 1.0)
        optimizer.step()
    assert_same_weights(model, replica)


class _AnswerKey(LogitsProcessor):
    """Scores that know the answers, in place of the model's: even rows put ``strength`` on the
    right answer's next token (0 elsewhere, EOS -inf before the answer's end), so that greedy
    decoding is always right and sampling sometimes; odd rows stop at once with an all but
    certain EOS, and score every entry alike after it (where the entropy must not count)."""

    def __init__(self, answers, prompt_length, strength):
        self.answers, self.prompt_length, self.strength = answers, prompt_length, strength

    def __call__(self, input_ids, scores):
        position = input_ids.shape[1] - self.prompt_length
        keyed = torch.zeros_like(scores)
        even = torch.arange(len(scores)) % 2 == 0
        if position < self.answers.shape[1] - 1:
            keyed[even, demo.EOS] = -math.inf
        keyed[even, self.answers[even, position]] = self.strength
        if position == 0:
            keyed[~even, demo.EOS] = 50.0
        return keyed


def test_evaluate_scores_answers_and_entropy_of_what_is_sampled():
    """evaluate() on scores that know the answers: greedy accuracy is exactly the share of rows
    that answer; sampling (temperature 1, nothing cut) gets some of them; the entropy is that
    of the processed scores over each sampled answer up to and including its EOS (the odd
    rows' one EOS, not the uniform scores after it); and a second call with the global RNG
    elsewhere gives the same numbers (the sampling seed is evaluate's own)."""
    task = demo.AdditionTask(2)
    prompts, answers = task.sample(16, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = demo.build_model(dataclasses.replace(demo.TINY, layers=1))
    strength = 4.0
    key = [_AnswerKey(answers, task.prompt_length, strength)]
    first = demo.evaluate(model, task, prompts, answers, seed=1, logits_processor=key)
    torch.manual_seed(123)
    again = demo.evaluate(model, task, prompts, answers, seed=1, logits_processor=key)
    assert again == first

    def entropy(*logits):
        return float(em_kernels.entropy(torch.tensor(logits), backend="torch"))

    vocab = len(demo.VOCAB)
    digit = entropy(strength, *[0.0] * (vocab - 2), -math.inf)  # EOS shut out
    last = entropy(strength, *[0.0] * (vocab - 1))  # EOS the right token
    stop = entropy(50.0, *[0.0] * (vocab - 1))
    assert first["greedy_accuracy"] == 0.5
    assert 0 < first["sampled_accuracy"] < 0.5
    # per even row: its answer's digits + 1 and its EOS; per odd row: its EOS
    expected = ((task.answer_length - 1) * digit + last + stop) / (task.answer_length + 1)
    assert first["entropy"] == pytest.approx(expected, rel=1e-5)


def test_answer_mask_and_exact_match():
    """What a sampled answer is: its tokens up to and including the first EOS (the entropy's
    mask); right only when every character and the EOS are, in place (after EOS, nothing
    counts; an answer cut short is wrong)."""
    eos, pad, d = demo.EOS, demo.PAD, demo.FIRST_DIGIT
    answers = torch.tensor([[d + 1, d + 2, eos]] * 4)
    generated = torch.tensor([[d + 1, d + 2, eos, pad], [d + 1, d + 2, d + 3, eos],
                              [d + 1, d + 5, eos, pad], [eos, pad, pad, pad]])
    assert demo._answer_mask(generated).int().tolist() == [
        [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert demo._correct(generated, answers).tolist() == [True, False, False, False]
    assert not demo._correct(generated[:, :2], answers).any()


def test_trained_methods_start_from_a_copy_with_their_options(monkeypatch):
    """_train() gives each method's trainer a copy of the base model (every method starts from
    the same pre-trained weights), the shared lr, the answer's length, the special tokens, the
    method's reward and rollouts, and em_steps batches of em_prompts_per_step prompts drawn
    from the method's seed; inference_methods() builds EM-INF from the config's options."""
    made = []

    class Recording:
        def __init__(self, model, **kwargs):
            self.model, self.kwargs = model, kwargs
            made.append(self)

        def train(self, batches, num_steps):
            self.batches, self.num_steps = list(batches), num_steps
            return [{"entropy": float(step)} for step in range(num_steps)]

    class FT(Recording):
        pass

    class RL(Recording):
        pass

    monkeypatch.setattr(demo, "EMFTTrainer", FT)
    monkeypatch.setattr(demo, "EMRLTrainer", RL)
    config = dataclasses.replace(demo.TINY, em_steps=2, em_prompts_per_step=3, em_lr=2e-4,
                                 rl_rollouts=5, em_inf_steps=2, em_inf_lr=0.3)
    task = demo.AdditionTask(config.digits)
    base = torch.nn.Linear(2, 2)
    common = dict(pad_token_id=demo.PAD, eos_token_id=demo.EOS,
                  max_new_tokens=task.answer_length, lr=2e-4, progress=False)
    expected = {"EM-FT": (FT, common),
                "EM-RL (sequence)": (RL, dict(common, reward="sequence", num_rollouts=5)),
                "EM-RL (token)": (RL, dict(common, reward="token", num_rollouts=5))}
    for method in demo.TRAINED_METHODS:
        model, history = demo._train(method, base, task, config, 7, False)
        trainer = made[-1]
        assert (type(trainer), trainer.kwargs) == expected[method]
        assert trainer.model is model and model is not base
        assert trainer.num_steps == 2 and history == [{"entropy": 0.0}, {"entropy": 1.0}]
        assert len(trainer.batches) == 2
        for prompts, attention in trainer.batches:
            assert prompts.shape == (3, task.prompt_length) and bool((attention == 1).all())
    demo._train("EM-FT", base, task, config, 8, False)
    same_seed, other_seed = made[-2], made[-1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(made[0].batches, same_seed.batches))
    assert not torch.equal(made[0].batches[0][0], other_seed.batches[0][0])
    em_inf = demo.inference_methods(config)["EM-INF"][0]
    assert (em_inf.options["steps"], em_inf.options["lr"]) == (2, 0.3)


def test_plot_shows_the_numbers_of_the_table(tmp_path, monkeypatch):
    """save_plot: the accuracy panel's bars are each method's greedy then sampled accuracy, the
    entropy panel's its entropy, the curves each trained method's step entropies (read off
    the figure before it is closed)."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: figures.append(figure) or close(figure))
    results = {"pre-trained": dict(greedy_accuracy=0.5, sampled_accuracy=0.25, entropy=0.75),
               "EM-FT": dict(greedy_accuracy=0.625, sampled_accuracy=0.375, entropy=0.125)}
    demo.save_plot(results, {"EM-FT": [0.5, 0.25, 0.125]}, str(tmp_path / "plot.png"))
    accuracy, entropy, curves = figures[0].axes
    assert [bar.get_height() for bar in accuracy.patches] == [0.5, 0.625, 0.25, 0.375]
    assert [bar.get_height() for bar in entropy.patches] == [0.75, 0.125]
    (curve,) = curves.get_lines()
    assert list(curve.get_xdata()) == [1, 2, 3]
    assert list(curve.get_ydata()) == [0.5, 0.25, 0.125]


def test_table_columns():
    """format_table: each row's greedy accuracy, sampled accuracy and entropy under their own
    headers."""
    table = demo.format_table({"EM-FT": dict(greedy_accuracy=0.25, sampled_accuracy=0.5,
                                             entropy=0.123456)})
    header, _, row = table.splitlines()
    assert header.split() == ["method", "greedy", "acc", "sampled", "acc", "entropy"]
    assert row.split() == ["EM-FT", "25.0%", "50.0%", "0.1235"]
