"""em-demo end to end on its smallest configuration (seconds): the table, the plot, the fixed
seed, the task's encoding and the command line."""

import dataclasses
import math

import pytest
import torch

from em_algos import demo

METHODS = ["pre-trained", "EM-INF", "adaptive temp.", "EM-FT", "EM-RL (sequence)",
           "EM-RL (token)"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    plot = tmp_path_factory.mktemp("demo") / "demo.png"
    lines = []
    run = demo.run_demo(demo.TINY, plot_path=str(plot), log=lines.append)
    return run, plot, "\n".join(lines)


def test_pipeline_runs_end_to_end(tiny_run):
    run, plot, output = tiny_run
    assert list(run["results"]) == METHODS
    for method, metrics in run["results"].items():
        assert 0 <= metrics["greedy_accuracy"] <= 1 and 0 <= metrics["sampled_accuracy"] <= 1
        assert 0 <= metrics["entropy"] <= math.log(len(demo.VOCAB)), method
        assert method in output
    for method in demo.TRAINED_METHODS:
        assert len(run["curves"][method]) == demo.TINY.em_steps
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_em_inf_lowers_the_sampling_entropy(tiny_run):
    results = tiny_run[0]["results"]
    assert results["EM-INF"]["entropy"] < results["pre-trained"]["entropy"]


def test_fixed_seed_gives_the_same_numbers(tiny_run):
    again = demo.run_demo(dataclasses.replace(demo.TINY, em_steps=1), log=lambda line: None)
    for method in ("pre-trained", "EM-INF", "adaptive temp."):
        assert again["results"][method] == tiny_run[0]["results"][method]


def test_task_encodes_sums_least_significant_digit_first():
    task = demo.AdditionTask(3)
    prompts, answers = task.sample(64, torch.Generator().manual_seed(0))
    assert prompts.shape == (64, task.prompt_length) and answers.shape == (64, task.answer_length)
    for prompt, answer in zip(prompts, answers):
        text = task.decode(prompt)
        a, b = (int(number[::-1]) for number in text[len("<bos>"):-1].split("+"))
        assert task.decode(answer) == str(a + b).zfill(4)[::-1] + "<eos>"


def test_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "QUICK", dataclasses.replace(demo.TINY, em_steps=1))
    plot = tmp_path / "cli.png"
    assert demo.main(["--quick", "--plot", str(plot), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "greedy acc" in out and "EM-RL (token)" in out
    assert plot.exists()
