"""Smoke tests of em-bench (one op, a tiny shape, the CPU providers: the outputs exist and say
what was measured, the error column tells a correct provider from a wrong one, the CPU memory
peak sees every live tensor) and of the tuning sweep's plumbing (bench/tune.py)."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch

import em_kernels
from bench.__main__ import main, parse_args, select_shapes
from bench.harness import Context, Provider, make_case, measure
from bench.ops import OPS

REPO = Path(__file__).resolve().parent.parent

REPO = Path(__file__).resolve().parent.parent


def _run(tmp_path, *extra):
    code = main(["--ops", "entropy", "--shapes", "N8-V1000", "--providers", "eager,chunked,cpu",
                 "--modes", "fwd", "fwd+bwd", "--dtypes", "fp32,bf16", "--device", "cpu",
                 "--out", str(tmp_path), *extra])
    assert code == 0
    with (tmp_path / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_outputs_and_error_column(tmp_path, capsys):
    rows = _run(tmp_path)
    # 2 dtypes x 2 modes x 3 providers, one row per cell, measured or skipped with a reason.
    assert len(rows) == 12
    assert {(r["dtype"], r["mode"], r["provider"]) for r in rows} == {
        (d, m, p) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")
        for p in ("eager", "chunked", "cpu")}
    for row in rows:
        assert row["device"] and row["torch"] == torch.__version__ and row["commit"]
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"], row
            continue
        assert float(row["time_ms"]) > 0 and float(row["gbps"]) > 0
        assert float(row["peak_extra_mib"]) >= 0
        error = float(row["err_out"])
        # Against float64: fp32 eager is good to ~1e-6, bf16 logits are exact in fp32 math.
        assert 0 <= error < 1e-4, row
        if row["mode"] == "fwd+bwd":
            assert 0 <= float(row["err_grad"]) < (1e-5 if row["dtype"] == "fp32" else 1e-2), row
    assert any(r["status"] == "ok" and r["provider"] == "eager" for r in rows)
    markdown = (tmp_path / "results.md").read_text()
    assert "## entropy" in markdown and torch.__version__ in markdown
    assert (tmp_path / "bandwidth.png").read_bytes()[:4] == b"\x89PNG"
    assert "eager" in capsys.readouterr().out


def test_exit_status_and_no_stale_plot(tmp_path):
    """A run that measures nothing exits 1 and leaves no plot of an earlier run beside its
    tables; an --out that cannot be a folder fails before anything is measured."""
    _run(tmp_path)
    assert (tmp_path / "bandwidth.png").exists()
    code = main(["--ops", "entropy", "--shapes", "N8-V1000", "--providers", "eager",
                 "--device", "cpu", "--max-seconds", "-1", "--out", str(tmp_path)])
    assert code == 1
    assert not (tmp_path / "bandwidth.png").exists()
    a_file = tmp_path / "results.md"
    assert main(["--ops", "entropy", "--device", "cpu", "--out", str(a_file)]) == 2


def test_wrong_provider_shows_in_error_column():
    from bench.ops.entropy import eager_entropy

    ctx = Context(torch.device("cpu"), full=False, requested_providers=None, deadline=None)
    case = make_case(ctx, OPS["entropy"], {"N": 8, "V": 257}, torch.float32, seed=0)
    off_by_one = Provider("wrong", lambda c: lambda: (eager_entropy(c.inputs["logits"])[0] + 1,))
    assert abs(measure(ctx, case, off_by_one, "fwd")["err_out"] - 1.0) < 1e-4


def test_a_wrong_weight_gradient_shows_in_error_column():
    """linear_entropy's d(weight) (most of its backward's work) is checked on vocabulary rows
    against float64, not only d(hidden): a doubled d(weight) must show."""
    from bench.ops.linear_entropy import eager_linear_entropy

    class DoubleGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight):
            return weight.view_as(weight)

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    ctx = Context(torch.device("cpu"), full=False, requested_providers=None, deadline=None)
    op = OPS["linear_entropy"]
    case = make_case(ctx, op, {"M": 16, "H": 32, "V": 3000}, torch.float32, seed=0)
    eager = next(p for p in op.providers() if p.name == "eager")
    doubled = Provider("doubled", lambda c: lambda: eager_linear_entropy(
        c.inputs["hidden"], DoubleGradient.apply(c.inputs["weight"])))
    right = measure(ctx, case, eager, "fwd+bwd")["err_grad"]
    wrong = measure(ctx, case, doubled, "fwd+bwd")["err_grad"]
    assert right < 1e-6 and wrong > 100 * right, (right, wrong)


def test_resume_measures_only_the_missing_cells(tmp_path, capsys):
    """--resume keeps the measured cells of an earlier run's CSV (rows unchanged, also those
    outside the new run's filters), measures only the others, and reports both; resuming from
    the CSV being rewritten works; a row cut short by a killed run is measured again; a CSV from
    another device or a file that is not em-bench's is refused before anything is measured."""
    first = _run(tmp_path / "first", "--providers", "eager")
    measured = []

    def counting_measure(ctx, case, provider, mode):
        measured.append(provider.name)
        return measure(ctx, case, provider, mode)

    earlier = str(tmp_path / "first" / "results.csv")
    with mock.patch("bench.harness.measure", counting_measure):
        rows = _run(tmp_path / "second", "--resume", earlier)
        assert "eager" not in measured and "chunked" in measured
        assert len(rows) == 12
        eager_rows = [row for row in rows if row["provider"] == "eager"]
        for before, after in zip(first, eager_rows):
            assert {k: before[k] for k in ("shape", "dtype", "mode", "time_ms", "date")} == {
                k: after[k] for k in ("shape", "dtype", "mode", "time_ms", "date")}
        assert "4 cells resumed from" in (tmp_path / "second" / "results.md").read_text()
        measured.clear()
        again = _run(tmp_path / "second", "--resume", str(tmp_path / "second" / "results.csv"))
        assert not {"eager", "chunked"} & set(measured) and len(again) == 12
        # A narrower run into the same file keeps the other cells; a cut last row is redone.
        second = tmp_path / "second" / "results.csv"
        header, *lines = second.read_text().splitlines(keepends=True)
        victim = next(i for i, line in enumerate(lines) if ",fwd,chunked,ok," in line)
        cut = ",".join(lines.pop(victim).split(",")[:8])  # up to time_ms, no device or date
        second.write_text(header + "".join(lines) + cut)
        measured.clear()
        narrow = _run(tmp_path / "second", "--resume", str(second), "--modes", "fwd")
        assert measured == ["chunked"]
        # every cell of the plan, and the measured ones outside it
        assert len(narrow) == sum(row["mode"] == "fwd" or row["status"] == "ok" for row in again)
        assert {row["op"] for row in narrow} == {"entropy"}
        modes = [row["mode"] for row in narrow]  # this run's cells first, the others after
        assert modes == sorted(modes, key=lambda mode: mode != "fwd")
    with open(earlier) as handle:
        text = handle.read()
    other = tmp_path / "other.csv"
    other.write_text(text.replace(first[0]["device"], "Some Other GPU"))
    not_csv = tmp_path / "notes.txt"
    not_csv.write_text("hello\n")
    capsys.readouterr()
    for path, message in [(other, "was measured on Some Other GPU"),
                          (not_csv, "not an em-bench results.csv"),
                          (tmp_path / "missing.csv", "cannot resume from")]:
        code = main(["--ops", "entropy", "--shapes", "N8-V1000", "--providers", "eager",
                     "--device", "cpu", "--out", str(tmp_path / "third"), "--resume", str(path)])
        assert code == 2 and message in capsys.readouterr().err


def test_shape_filters():
    op = OPS["entropy"]
    assert select_shapes(op, [{"N": 3, "V": 5}], "cpu", False) == [{"N": 3, "V": 5}]
    assert select_shapes(op, [{"V": 5, "N": 3}], "cpu", False) == [{"N": 3, "V": 5}]
    full = select_shapes(op, [{"V": 32000}], "cuda", True)
    assert full and all(d["V"] == 32000 for d in full)
    assert select_shapes(OPS["em_inf_adjust"], [{"N": 3, "V": 5}], "cpu", False) == []


@pytest.mark.parametrize("argv, message", [
    (["--ops", "nope"], "unknown nope; choose from"),
    (["--shapes", "8x1000"], "cannot read shape"),
    (["--modes", "sideways"], "unknown sideways; choose from"),
    (["--shapes", "N1-V151936", "X3"], "no selected op has dimension X"),
    (["--shapes", "Q5"], "no selected op has dimension Q"),
    (["--ops", "linear_entropy", "--shapes", "N8-V1000"], "(their dims: linear_entropy M-H-V)"),
    (["--shapes", "N1-H3"], "no selected op has all of N, H"),
    (["--shapes", "N8-N16"], "names N twice"),
    (["--shapes", "N0-V100"], "N must be at least 1"),
])
def test_bad_arguments_are_reported(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_logprobs_traffic_counts_int64_tokens():
    """O(N) bytes of logprobs_and_entropy's forward: an int64 token read, two fp32 written."""
    nbytes, _ = OPS["logprobs_and_entropy"].traffic({"N": 8, "V": 1000}, torch.float32, "fwd")
    assert nbytes == 8 * 1000 * 4 + 8 * 16


def test_gpu_check_fails_when_the_budget_leaves_steps_unrun(tmp_path):
    """gpu_check.sh with a stand-in interpreter (torch 'sees a GPU', every step succeeds at once)
    and a budget too small for any step: every step is listed as not run and the exit status is
    1, not 0."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/bash\ncase "$*" in -) cat > /dev/null;; esac\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "GPU_CHECK_SECONDS": "25",
           "EM_KERNELS_COMMIT": "test"}
    env.pop("GPU_CHECK_STEPS", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "out" / "run.log").read_text()
    assert done.returncode == 1, log
    assert "# NOT RUN steps (the 25s budget was spent): build tests bench_headline" in log


def test_cpu_peak_memory_sees_every_live_tensor():
    """Eager linear+entropy fwd+bwd at M 64, H 256, V 32000 (fp32) must hold dlogits [M, V] while
    it forms d_weight [V, H] = dlogits^T hidden: the peak is at least their sum (39 MiB). Summing
    each op's self memory in start order reported 31 MiB, d_weight alone, because autograd
    attributes frees to a parent op that starts before the allocations of its children."""
    ctx = Context(torch.device("cpu"), full=False, requested_providers=None, deadline=None)
    op = OPS["linear_entropy"]
    case = make_case(ctx, op, {"M": 64, "H": 256, "V": 32000}, torch.float32, seed=0)
    eager = next(p for p in op.providers() if p.name == "eager")
    logits_mib, weight_mib = 64 * 32000 * 4 / 2**20, 32000 * 256 * 4 / 2**20
    peak_mib = measure(ctx, case, eager, "fwd+bwd")["peak_extra_mib"]
    assert logits_mib + weight_mib <= peak_mib <= 8 * logits_mib + weight_mib, peak_mib


def test_tuning_sweep_plumbing(capsys):
    """bench/tune.py on CPU (Triton's interpreter, tiny shapes): every candidate runs, matches the
    current constants' result, and the module constants are restored afterwards."""
    from em_kernels.triton import entropy as triton_entropy

    from bench import tune

    if em_kernels.available_backends()["triton"] != "available":
        pytest.skip(em_kernels.available_backends()["triton"])
    before = triton_entropy.MAX_BLOCK
    results = tune.main(["--device", "cpu", "--ops", "entropy", "linear_entropy",
                         "linear_entropy_bwd"])
    assert triton_entropy.MAX_BLOCK == before
    for op, rows in results.items():
        assert len(rows) == 2 and sum(row["current"] for row in rows) == 1, op
        assert all(row["status"] == "ok" and row["ms"] > 0 for row in rows), rows
    assert "* the constants in the source now" in capsys.readouterr().out
