"""Smoke tests of em-bench (one op, a tiny shape, the CPU providers: the outputs exist and say
what was measured, a wrong provider fails its check and the run, a missing kernel is an error,
--resume and --shapes refuse what they cannot use, the CPU memory peak sees every live tensor),
of gpu_check.sh's exit status, and of the tuning sweep's plumbing (bench/tune.py)."""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import triton_older_than

import em_kernels
from bench.__main__ import main, parse_args, select_shapes
from bench.harness import (ERROR_FACTOR, NORM_ERROR_FACTOR, Context, Provider, Skip, Timing,
                           check_errors, make_case, measure, parse_shape_label)
from bench.ops import OPS

REPO = Path(__file__).resolve().parent.parent


def _frozen_after_a_collection() -> int:
    """Objects in the collector's permanent generation after a full collection: 0 on Python
    3.11, a few hundred of the interpreter's own on 3.12, which a collection puts back there."""
    gc.collect()
    return gc.get_freeze_count()


def _run(tmp_path, *extra):
    frozen = _frozen_after_a_collection()
    code = main(["--ops", "entropy", "--shapes", "N8-V1000", "--providers", "eager,chunked,cpu",
                 "--modes", "fwd", "fwd+bwd", "--dtypes", "fp32,bf16", "--device", "cpu",
                 "--out", str(tmp_path), *extra])
    assert code == 0
    # run_cells freezes the garbage collector's survivors per case (harness.py); it must thaw
    # them on the way out, or the calling process would never collect them again
    assert _frozen_after_a_collection() == frozen
    with (tmp_path / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def _cpu_context():
    """A run's context on CPU, as `em-bench --device cpu` builds it (it measures the ceilings)."""
    return Context(torch.device("cpu"), full=False, requested_providers=None, deadline=None)


def _read_csv(path):
    """(field names, rows) of a results CSV."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def _write_csv(path, fields, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)


@contextlib.contextmanager
def _counting_cells():
    """Yields the list of (provider, mode) of every cell measured inside the block."""
    measured = []

    def counting_measure(ctx, case, provider, mode, timed=True):
        if timed:  # eager's untimed run for the other providers' checks is not a cell
            measured.append((provider.name, mode))
        return measure(ctx, case, provider, mode, timed)

    with mock.patch("bench.harness.measure", counting_measure):
        yield measured


def test_outputs_and_error_column(tmp_path, capsys):
    rows = _run(tmp_path)
    # 2 dtypes x 2 modes x 3 providers, one row per cell, measured or skipped with a reason.
    assert len(rows) == 12
    assert {(r["dtype"], r["mode"], r["provider"]) for r in rows} == {
        (d, m, p) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")
        for p in ("eager", "chunked", "cpu")}
    cpu_runs = em_kernels.available_backends()["cpu"] == "available"
    for row in rows:
        assert row["device"] and row["torch"] == torch.__version__ and row["commit"]
        assert row["status"] in ("ok", "skipped"), row
        # eager and chunked always run here, and cpu whenever the extension is built: a
        # provider silently turned into skips must not pass
        if row["provider"] != "cpu" or cpu_runs:
            assert row["status"] == "ok", row
        if row["status"] == "skipped":
            assert row["reason"], row
            continue
        assert row["check"] == ("ref" if row["provider"] == "eager" else "ok"), row
        assert float(row["time_ms"]) > 0 and float(row["gbps"]) > 0
        assert float(row["peak_extra_mib"]) >= 0
        error = float(row["err_out"])
        # Against float64: fp32 eager is good to ~1e-6, bf16 logits are exact in fp32 math.
        assert 0 <= error < 1e-4, row
        if row["mode"] == "fwd+bwd":
            assert 0 <= float(row["err_grad"]) < (1e-5 if row["dtype"] == "fp32" else 1e-2), row
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

    ctx = _cpu_context()
    case = make_case(ctx, OPS["entropy"], {"N": 8, "V": 257}, torch.float32, seed=0)
    off_by_one = Provider("wrong", lambda c: lambda: (eager_entropy(c.inputs["logits"])[0] + 1,))
    assert abs(measure(ctx, case, off_by_one, "fwd")["err_out"] - 1.0) < 1e-4


def _entropy_cpu_backend_returning(make):
    """em_kernels.entropy with backend="cpu" replaced by make(logits) (or its exception)."""
    original = em_kernels.entropy

    def patched(logits, **kwargs):
        if kwargs.get("backend") == "cpu":
            return make(logits)
        return original(logits, **kwargs)

    return mock.patch.object(em_kernels, "entropy", patched)


@pytest.mark.parametrize("wrong", ["zeros", "nan", "slightly off"])
@pytest.mark.parametrize("providers", ["eager,cpu", "cpu"])
def test_a_wrong_provider_fails_its_check_and_the_run(wrong, providers, tmp_path, capsys):
    """A fast wrong result is flagged in the CSV, the terminal table and the markdown, and the run
    exits 1, also when eager is not among the providers (it then runs untimed for the check)."""
    results = {"zeros": lambda logits: torch.zeros(logits.shape[0]),
               "nan": lambda logits: torch.full((logits.shape[0],), float("nan")),
               "slightly off": lambda logits: em_kernels.entropy(
                   logits.double(), backend="torch").float() + 1e-3}
    with _entropy_cpu_backend_returning(results[wrong]):
        code = main(["--ops", "entropy", "--shapes", "N8-V1000", "--providers", providers,
                     "--modes", "fwd", "--dtypes", "fp32", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert code == 1
    with (tmp_path / "results.csv").open() as handle:
        cpu = next(row for row in csv.DictReader(handle) if row["provider"] == "cpu")
    assert cpu["status"] == "ok" and cpu["check"] == "FAIL", cpu
    assert "err_out" in cpu["reason"] and float(cpu["tol_out"]) < 1e-3, cpu
    out = capsys.readouterr().out
    assert "FAIL" in out and "WRONG RESULTS" in out
    markdown = (tmp_path / "results.md").read_text()
    assert "## Wrong results" in markdown and "| FAIL |" in markdown


def test_check_rule():
    """ERROR_FACTOR x eager's error, at least eager's floor; NORM_ERROR_FACTOR x its normwise
    error, at least that floor; non-finite errors always fail; no baseline, no verdict."""
    eager = {"err_out": 1e-7, "floor_out": 5e-6, "err_grad": 1e-3, "floor_grad": 2e-3}
    normwise = {**eager, "rel_out": 1e-6, "rel_floor_out": 5e-7}
    assert check_errors({"err_out": 4e-6, "rel_out": 0.99 * NORM_ERROR_FACTOR * 1e-6},
                        normwise)["check"] == "ok"
    failed = check_errors({"err_out": 4e-6, "rel_out": 1.01 * NORM_ERROR_FACTOR * 1e-6}, normwise)
    assert failed["check"] == "FAIL" and "normwise rel_out" in failed["reason"]
    assert check_errors({"err_out": 4e-6, "rel_out": float("nan")}, normwise)["check"] == "FAIL"
    assert check_errors({"err_out": 4e-6}, eager) == {"check": "ok", "tol_out": 5e-6}
    assert check_errors({"err_out": 6e-6}, eager)["check"] == "FAIL"
    within = {"err_out": 1e-6, "err_grad": 0.99 * ERROR_FACTOR * 1e-3}
    assert check_errors(within, eager)["check"] == "ok"
    assert check_errors({**within, "err_grad": 1.01 * ERROR_FACTOR * 1e-3},
                        eager)["check"] == "FAIL"
    for bad in (float("inf"), float("nan")):
        assert check_errors({"err_out": bad}, eager)["check"] == "FAIL"
    unchecked = check_errors({"err_out": 1.0}, "eager failed on this cell (RuntimeError: x)")
    assert unchecked["check"] == "unchecked" and "eager failed" in unchecked["reason"]


def test_a_missing_kernel_is_an_error_not_a_skip(tmp_path, capsys):
    """torch raises NotImplementedError for an op with no kernel for the device (a broken
    extension): that is an error cell and exit 1, not a skip."""
    def no_kernel(logits):
        raise NotImplementedError("Could not run 'em_C::entropy' with arguments from the 'CPU' "
                                  "backend")

    with _entropy_cpu_backend_returning(no_kernel):
        code = main(["--ops", "entropy", "--shapes", "N8-V1000", "--providers", "eager,cpu",
                     "--modes", "fwd", "--dtypes", "fp32", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert code == 1
    with (tmp_path / "results.csv").open() as handle:
        cpu = next(row for row in csv.DictReader(handle) if row["provider"] == "cpu")
    assert cpu["status"] == "error" and "NotImplementedError" in cpu["reason"], cpu


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

    ctx = _cpu_context()
    op = OPS["linear_entropy"]
    case = make_case(ctx, op, {"M": 16, "H": 32, "V": 3000}, torch.float32, seed=0)
    eager = next(p for p in op.providers() if p.name == "eager")
    doubled = Provider("doubled", lambda c: lambda: eager_linear_entropy(
        c.inputs["hidden"], DoubleGradient.apply(c.inputs["weight"])))
    right = measure(ctx, case, eager, "fwd+bwd")["err_grad"]
    wrong = measure(ctx, case, doubled, "fwd+bwd")["err_grad"]
    assert right < 1e-6 and wrong > 100 * right, (right, wrong)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_slightly_wrong_gradient_fails_the_normwise_check(dtype):
    """An entropy backward with its H term 2% off hides, in bf16, under the rounding of the
    largest gradient entry (the largest-error check passed it); normwise it is ~10x eager's
    error and fails, in fp32 too."""
    from bench.ops.entropy import eager_entropy

    class HTermOff(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits):
            z = logits.float()
            log_p = torch.log_softmax(z, -1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            ctx.save_for_backward(log_p, entropy)
            return entropy

        @staticmethod
        def backward(ctx, grad):
            log_p, entropy = ctx.saved_tensors
            wrong = -grad[:, None] * log_p.exp() * (log_p + 0.98 * entropy[:, None])
            return wrong.to(dtype)

    ctx = _cpu_context()
    op = OPS["entropy"]
    case = make_case(ctx, op, {"N": 8, "V": 4096}, dtype, seed=0)
    eager = measure(ctx, case, Provider("eager", lambda c: lambda: eager_entropy(
        c.inputs["logits"])), "fwd+bwd", timed=False)
    wrong = measure(ctx, case, Provider("wrong", lambda c: lambda: (
        HTermOff.apply(c.inputs["logits"]),)), "fwd+bwd", timed=False)
    verdict = check_errors(wrong, eager)
    assert verdict["check"] == "FAIL" and "normwise rel_grad" in verdict["reason"], verdict


def test_each_output_is_held_to_eagers_error_on_that_output():
    """At V 151936 eager's entropy is ~1e-4 off (a long float32 sum) while its log-probs are
    ~1e-6 off: log-probs 1e-4 off are wrong, though within ten times eager's largest error over
    both outputs, which set the tolerance of both before (and 1e-4 / 12 is under the normwise
    floor)."""
    ctx = _cpu_context()
    op = OPS["logprobs_and_entropy"]
    case = make_case(ctx, op, {"N": 16, "V": 151936}, torch.float32, seed=0)
    providers = {provider.name: provider for provider in op.providers()}
    eager = measure(ctx, case, providers["eager"], "fwd", timed=False)
    original = em_kernels.logprobs_and_entropy

    def shifted_logprobs(c):
        def forward():
            logprobs, entropy = original(c.inputs["logits"], c.inputs["tokens"], backend="cpu")
            return logprobs + 1e-4, entropy
        return forward

    ours = measure(ctx, case, Provider("cpu", shifted_logprobs), "fwd", timed=False)
    assert ours["err_out"] < ERROR_FACTOR * eager["err_out"]  # the maxima alone would pass it
    verdict = check_errors(ours, eager)
    assert verdict["check"] == "FAIL" and "err_out[0]" in verdict["reason"], verdict
    assert "out[1]" not in verdict["reason"]


def test_a_correct_provider_that_sums_in_another_order_passes():
    """torch.compile's fp32 entropy, correct, sums V 32000 terms in another order than eager,
    whose cascaded CPU sum is sometimes 5x more accurate: the normwise floor for sums of V terms
    (NORM_ERROR_FACTOR) passes it on every seed; 3x eager's error alone failed it on 2 of 3."""
    ctx = Context(torch.device("cpu"), full=False, requested_providers=["eager", "compile"],
                  deadline=None)
    op = OPS["entropy"]
    providers = {provider.name: provider for provider in op.providers()}
    for seed in range(3):
        case = make_case(ctx, op, {"N": 8, "V": 32000}, torch.float32, seed=seed)
        eager = measure(ctx, case, providers["eager"], "fwd", timed=False)
        compiled = measure(ctx, case, providers["compile"], "fwd", timed=False)
        assert check_errors(compiled, eager)["check"] == "ok", (seed, compiled, eager)


@pytest.mark.skipif(em_kernels.available_backends()["cpu"] != "available",
                    reason="the compiled extension is not built")
def test_the_policy_loss_of_a_correct_provider_passes_on_every_seed():
    """linear_policy_loss's loss is a small mean of terms of size ~1 with the advantages' signs:
    its normwise error is taken against the terms' magnitudes (`Summed`), so the cpu backend,
    correct, passes on every seed (against the loss itself it failed on 4 of 40)."""
    ctx = _cpu_context()
    op = OPS["linear_policy_loss"]
    providers = {provider.name: provider for provider in op.providers()}
    for seed in range(40):
        case = make_case(ctx, op, {"M": 16, "H": 32, "V": 3000}, torch.float32, seed=seed)
        eager = measure(ctx, case, providers["eager"], "fwd", timed=False)
        ours = measure(ctx, case, providers["cpu"], "fwd", timed=False)
        assert check_errors(ours, eager)["check"] == "ok", (seed, ours, eager)


def test_case_inputs_do_not_depend_on_the_other_cells(tmp_path):
    """A case's seed comes from its op, shape and dtype, not from its place in the plan: the
    same cell measured alone and beside others sees the same inputs (the same errors)."""
    def errors(directory, *shapes):
        code = main(["--ops", "entropy", "--shapes", *shapes, "--providers", "eager",
                     "--modes", "fwd", "--dtypes", "fp32", "--device", "cpu",
                     "--out", str(directory)])
        assert code == 0
        _, rows = _read_csv(directory / "results.csv")
        return {row["shape"]: row["rel_out"] for row in rows}

    alone = errors(tmp_path / "alone", "N8-V1000")
    beside = errors(tmp_path / "beside", "N4-V1000", "N8-V1000")
    assert alone["N8-V1000"] == beside["N8-V1000"] and beside["N4-V1000"] != alone["N8-V1000"]


def _policy_loss_run(tmp_path, providers, *modes):
    """em-bench on linear_policy_loss at a tiny CPU shape with more rows than the oracle checks;
    (exit status, {(mode, provider): CSV row})."""
    code = main(["--ops", "linear_policy_loss", "--shapes", "M80-H32-V3000", "--providers",
                 providers, "--modes", *modes, "--dtypes", "fp32", "--device", "cpu",
                 "--out", str(tmp_path)])
    with (tmp_path / "results.csv").open() as handle:
        return code, {(row["mode"], row["provider"]): row for row in csv.DictReader(handle)}


def test_policy_loss_cells_are_measured_and_checked(tmp_path):
    code, rows = _policy_loss_run(tmp_path, "eager,chunked,cpu", "fwd+bwd")
    assert code == 0 and len(rows) == 3
    for (_, provider), row in rows.items():
        assert row["status"] == "ok", row
        assert row["check"] == ("ref" if provider == "eager" else "ok"), row
        assert float(row["time_ms"]) > 0 and float(row["tflops"]) > 0
        # the loss and log-probs (~10 in size), the gradients, against float64 in fp32
        assert 0 <= float(row["err_out"]) < 1e-4 and 0 <= float(row["err_grad"]) < 1e-5, row


def test_policy_loss_inputs_clip_on_both_sides():
    """The old log-probs put some rows' ratios past each clip bound, on the side where the clip
    takes effect (a zero policy gradient), so that a provider without the clip fails."""
    from bench.ops.linear_policy_loss import CLIP_RANGE, eager_logprobs

    ctx = _cpu_context()
    case = make_case(ctx, OPS["linear_policy_loss"], {"M": 80, "H": 32, "V": 3000},
                     torch.float32, seed=0)
    inputs = case.inputs
    (logprobs,) = eager_logprobs(inputs["hidden"], inputs["tokens"], inputs["weight"])
    ratio, advantages = torch.exp(logprobs - inputs["old_logprobs"]), inputs["advantages"]
    assert bool(((ratio < 1 - CLIP_RANGE[0]) & (advantages < 0)).any())
    assert bool(((ratio > 1 + CLIP_RANGE[1]) & (advantages > 0)).any())


@pytest.mark.parametrize("wrong, failing", [("no clip", {"fwd": "err_out", "fwd+bwd": "err_out"}),
                                            ("gradient negated", {"fwd+bwd": "err_grad"})])
def test_a_wrong_policy_loss_fails_its_check(wrong, failing, tmp_path):
    """linear_policy_loss's cpu provider without the clip fails on its loss (and log-probs)
    output; one whose loss is right but whose gradient has the wrong sign passes fwd and fails
    fwd+bwd on its gradients."""
    original = em_kernels.linear_policy_loss

    def patched(hidden, weight, **kwargs):
        if kwargs["backend"] != "cpu":
            return original(hidden, weight, **kwargs)
        if wrong == "no clip":  # a ratio in (0, 1e6] is never clipped
            return original(hidden, weight, **{**kwargs, "clip_range": (1.0, 1e6)})
        out = original(hidden, weight, **kwargs)
        return out._replace(loss=2 * out.loss.detach() - out.loss)

    with mock.patch.object(em_kernels, "linear_policy_loss", patched):
        code, rows = _policy_loss_run(tmp_path, "eager,cpu", "fwd", "fwd+bwd")
    assert code == 1
    for mode in ("fwd", "fwd+bwd"):
        cpu = rows[(mode, "cpu")]
        assert cpu["status"] == "ok", cpu
        if mode in failing:
            assert cpu["check"] == "FAIL" and failing[mode] in cpu["reason"], cpu
        else:
            assert cpu["check"] == "ok", cpu


def test_resume_measures_only_the_missing_cells(tmp_path, capsys):
    """--resume keeps the measured cells of an earlier run's CSV (rows unchanged, also those
    outside the new run's filters), measures only the others, and reports both; resuming from
    the CSV being rewritten works; a row cut short by a killed run is measured again; a CSV from
    another device or a file that is not em-bench's is refused before anything is measured."""
    first = _run(tmp_path / "first", "--providers", "eager")
    earlier = str(tmp_path / "first" / "results.csv")
    with _counting_cells() as measured:
        rows = _run(tmp_path / "second", "--resume", earlier)
        providers = {provider for provider, _ in measured}
        assert "eager" not in providers and "chunked" in providers
        assert len(rows) == 12
        assert {row["check"] for row in rows
                if row["status"] == "ok" and row["provider"] != "eager"} == {"ok"}
        eager_rows = [row for row in rows if row["provider"] == "eager"]
        for before, after in zip(first, eager_rows):
            assert {k: before[k] for k in ("shape", "dtype", "mode", "time_ms", "date")} == {
                k: after[k] for k in ("shape", "dtype", "mode", "time_ms", "date")}
        markdown = (tmp_path / "second" / "results.md").read_text()
        assert "4 cells resumed from" in markdown and "Rows marked * were resumed" in markdown
        marked = [line for line in markdown.splitlines() if line.startswith("| N")]
        assert sum("| eager * |" in line for line in marked) == 4
        assert sum("| chunked |" in line for line in marked) == 4
        measured.clear()
        again = _run(tmp_path / "second", "--resume", str(tmp_path / "second" / "results.csv"))
        assert not measured and len(again) == 12
        # A narrower run into the same file keeps the other cells; a cut last row is redone.
        second = tmp_path / "second" / "results.csv"
        header, *lines = second.read_text().splitlines(keepends=True)
        victim = next(i for i, line in enumerate(lines) if ",fwd,chunked,ok," in line)
        cut = ",".join(lines.pop(victim).split(",")[:8])  # up to time_ms, no device or date
        second.write_text(header + "".join(lines) + cut)
        measured.clear()
        narrow = _run(tmp_path / "second", "--resume", str(second), "--modes", "fwd")
        assert measured == [("chunked", "fwd")]
        # every cell of the plan, and the measured ones outside it
        assert len(narrow) == sum(row["mode"] == "fwd" or row["status"] == "ok" for row in again)
        assert {row["op"] for row in narrow} == {"entropy"}
        modes = [row["mode"] for row in narrow]  # this run's cells first, the others after
        assert modes == sorted(modes, key=lambda mode: mode != "fwd")
        # A cell of this run whose check failed is measured again.
        fields, records = _read_csv(second)
        failed = next(r for r in records if r["provider"] == "chunked" and r["mode"] == "fwd")
        failed["check"] = "FAIL"
        _write_csv(second, fields, records)
        measured.clear()
        _run(tmp_path / "second", "--resume", str(second), "--modes", "fwd")
        assert measured == [("chunked", "fwd")]
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


def test_resume_leaves_out_rows_the_reports_cannot_use(tmp_path, capsys):
    """A measured row without a dim its shape names (the plot's V), with dims that disagree with
    its shape, or of an unknown op is left out with its line and reason, and its cell measured
    again; a file the csv module cannot parse is refused with exit 2, not a traceback."""
    _run(tmp_path / "first", "--providers", "eager", "--dtypes", "fp32")
    fields, rows = _read_csv(tmp_path / "first" / "results.csv")
    assert [row["status"] for row in rows] == ["ok", "ok"]
    rows[0]["dim_V"] = ""
    rows[1]["dim_N"] = "9"
    rows.append({**rows[1], "op": "softmax", "dim_N": "8"})
    bad = tmp_path / "bad.csv"
    _write_csv(bad, fields, rows)
    capsys.readouterr()
    with _counting_cells() as measured:
        rows = _run(tmp_path / "second", "--providers", "eager", "--dtypes", "fp32",
                    "--resume", str(bad))
    err = capsys.readouterr().err
    assert "3 rows of" in err and "line 2:" in err and "line 4: unknown op 'softmax'" in err
    assert "disagree with shape N8-V1000" in err
    assert sorted(measured) == [("eager", "fwd"), ("eager", "fwd+bwd")]
    assert all(row["dim_V"] == "1000" for row in rows)
    unreadable = tmp_path / "unreadable.csv"
    unreadable.write_text(bad.read_text() + 'entropy,"' + "x" * (csv.field_size_limit() + 1))
    code = main(["--ops", "entropy", "--shapes", "N8-V1000", "--providers", "eager",
                 "--device", "cpu", "--out", str(tmp_path / "third"), "--resume", str(unreadable)])
    assert code == 2 and "cannot resume from" in capsys.readouterr().err


def test_plot_panels_draw_lm_head_sweeps_per_shape():
    """A panel plots against V at the other dims with the most values of V (entropy's N x V
    grid); a sweep whose shapes each have their own V (linear_entropy's (M, H) pairs) would give
    a line of one or two points there, so its panel shows every shape, in the order measured."""
    from bench.report import plot_panels

    def row(op, shape, provider, value, metric):
        dims = {f"dim_{name}": size for name, size in parse_shape_label(shape).items()}
        return dict(op=op, shape=shape, dtype="bf16", mode="fwd", provider=provider,
                    status="ok", **{metric: value}, **dims)

    grid = [row("entropy", f"N{n}-V{v}", provider, n + v / 1e6, "gbps")
            for n in (1, 4096) for v in (32000, 151936, 262144) for provider in ("eager", "triton")]
    grid.append(row("entropy", "N16-V32000", "eager", 5.0, "gbps"))
    heads = ["M8192-H3584-V152064", "M8192-H896-V151936", "M4096-H4096-V128256",
             "M4096-H4096-V32000"]
    sweep = [row("linear_entropy", shape, provider, 100.0 + index, "tflops")
             for index, shape in enumerate(heads) for provider in ("matmul", "triton")]
    sweep.append(dict(sweep[0], provider="liger", status="skipped"))
    entropy, linear = plot_panels(grid + sweep)
    assert (entropy.metric, entropy.where, entropy.shapes) == ("gbps", "N=4096", None)
    assert entropy.series == {p: [(v, 4096 + v / 1e6) for v in (32000, 151936, 262144)]
                              for p in ("eager", "triton")}
    assert (linear.metric, linear.where, linear.shapes) == ("tflops", "", heads)
    assert linear.series == {p: [(i, 100.0 + i) for i in range(4)] for p in ("matmul", "triton")}
    (one_shape,) = plot_panels(sweep[:2])  # the quick CPU run's single shape: against V
    assert (one_shape.where, one_shape.shapes) == ("M=8192, H=3584", None)


def test_speedups_pair_rows_of_one_run_only():
    """A resumed sweep mixes runs: a provider's row is compared with the eager row of its own
    run (commit and start time), never with another run's."""
    from bench.report import add_speedups

    def row(provider, time_ms, run):
        return dict(op="entropy", shape="N8-V32000", dtype="bf16", mode="fwd",
                    provider=provider, status="ok", time_ms=time_ms, commit=run[0], date=run[1])

    first, second = ("abc", "2026-11-27 10:00 UTC"), ("def", "2026-11-28 09:00 UTC")
    rows = [row("eager", 2.0, first), row("triton", 1.0, first), row("cuda", 0.5, second)]
    add_speedups(rows)
    assert rows[1]["speedup_vs_eager"] == 2.0 and "speedup_vs_eager" not in rows[2]


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
    (["--max-seconds", "nan"], "--max-seconds must be a number of seconds"),
])
def test_bad_arguments_are_reported(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_partial_shape_that_selects_nothing_is_reported(tmp_path, capsys):
    """A --shapes entry naming some dims (V99999, or N4096, which only --full declares on CPU)
    that matches none of the selected ops' shapes exits 2 naming it, not silently dropped."""
    argv = ["--ops", "entropy", "--device", "cpu", "--out", str(tmp_path), "--list"]
    assert main([*argv, "--shapes", "N64-V151936", "V99999", "N4096"]) == 2
    error = capsys.readouterr().err
    assert "--shapes V99999 N4096 selects none" in error and "--full declares more" in error
    assert main([*argv, "--shapes", "V151936"]) == 0
    assert main([*argv, "--full", "--shapes", "N4096"]) == 0
    # B-V names every dim of the decode ops, some of logprobs_and_entropy_shifted's (B-T-V)
    assert main(["--device", "cpu", "--out", str(tmp_path), "--list", "--shapes",
                 "B1-V151936"]) == 0


def test_logprobs_traffic_counts_int64_tokens():
    """O(N) bytes of logprobs_and_entropy's forward: an int64 token read, two fp32 written."""
    nbytes, _ = OPS["logprobs_and_entropy"].traffic({"N": 8, "V": 1000}, torch.float32, "fwd")
    assert nbytes == 8 * 1000 * 4 + 8 * 16


def test_cpu_cases_eager_cannot_hold_are_skipped():
    """On CPU a case whose eager working set would not fit is skipped, not killed: for
    linear_entropy that is the [M, V] fp32 logits, far larger than the inputs at a small H."""
    from bench import harness

    ctx = mock.Mock(is_cuda=False)
    dims = {"M": 8192, "H": 896, "V": 152064}  # inputs 0.6 GiB in fp32, logits 4.6 GiB
    with mock.patch.object(harness, "_available_host_bytes", return_value=16 << 30):
        reason = harness._case_fits(ctx, OPS["linear_entropy"], dims, torch.float32)
        assert reason is not None and "out of host memory" in reason
        small = {"M": 64, "H": 896, "V": 152064}
        assert harness._case_fits(ctx, OPS["linear_entropy"], small, torch.float32) is None
        logits = {"N": 256, "V": 151936}
        assert harness._case_fits(ctx, OPS["entropy"], logits, torch.bfloat16) is None


def _gpu_check_tree(tmp_path) -> Path:
    """A copy of what gpu_check.sh reads (bench/, csrc/, setup.py) and an empty em_kernels/: the
    script works on the tree it sits in (its build step removes extensions there), so the tests
    run it on a copy, never on this checkout."""
    import shutil

    repo = tmp_path / "repo"
    for part in ("csrc", "bench"):
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", repo)
    (repo / "em_kernels").mkdir()
    return repo


def _gpu_check_call(tmp_path, repo: Path, fake_python: str,
                    **settings: str) -> tuple[list[str], dict[str, str]]:
    """(the command, its environment) that runs the tree's gpu_check.sh into tmp_path/out with
    the bash script `fake_python` as its interpreter and the environment settings given (a
    budget of 300 s, every step and no PYTHONPATH unless given)."""
    fake = tmp_path / "fake_python"
    fake.write_text(fake_python)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "GPU_CHECK_SECONDS": "300",
           "EM_KERNELS_COMMIT": "test", **settings}
    for name in ("GPU_CHECK_STEPS", "PYTHONPATH"):
        if name not in settings:
            env.pop(name, None)
    return ["bash", str(repo / "bench" / "gpu_check.sh"), str(tmp_path / "out")], env


def _run_gpu_check(tmp_path, repo: Path, fake_python: str, **settings: str) -> tuple[int, str]:
    """Run gpu_check.sh as `_gpu_check_call` says: (its exit status, its run.log)."""
    command, env = _gpu_check_call(tmp_path, repo, fake_python, **settings)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, (tmp_path / "out" / "run.log").read_text()


def test_gpu_check_fails_when_the_budget_leaves_steps_unrun(tmp_path):
    """gpu_check.sh with a stand-in interpreter (torch 'sees a GPU', every step succeeds at once)
    and a budget too small for any step: every step is listed as not run and the exit status is
    1, not 0; an extension in the tree stays (the build step that would replace it never ran)."""
    repo = _gpu_check_tree(tmp_path)
    library = repo / "em_kernels" / "_C.cpython-312-x86_64-linux-gnu.so"
    library.write_bytes(b"a built library")
    returncode, log = _run_gpu_check(
        tmp_path, repo, '#!/bin/bash\ncase "$*" in -) cat > /dev/null;; esac\nexit 0\n',
        GPU_CHECK_SECONDS="25")
    assert library.exists()
    assert returncode == 1, log
    assert "# NOT RUN steps (the 25s budget was spent): build timing tests bench_headline" in log


def test_gpu_check_skips_an_empty_results_csv(tmp_path):
    """em-bench creates an empty results.csv before it measures; a bench step that stops there
    (exit 2 on a bad --resume) must not leave gpu_check's bench.csv without its header, which
    the later steps' rows are appended under."""
    fake_python = """#!/bin/bash
case "$*" in -) cat > /dev/null; exit 0;; esac
out=""; prev=""
for arg in "$@"; do [ "$prev" = "--out" ] && out=$arg; prev=$arg; done
[ -n "$out" ] || exit 0
mkdir -p "$out"
case "$out" in *bench_headline) : > "$out/results.csv"; exit 2;; esac
printf 'op,shape\nentropy,N1-V2\n' > "$out/results.csv"
"""
    returncode, log = _run_gpu_check(tmp_path, _gpu_check_tree(tmp_path), fake_python,
                                     GPU_CHECK_STEPS="bench_headline bench_linear")
    assert returncode == 1 and "FAILED steps: bench_headline" in log, log
    assert (tmp_path / "out" / "bench.csv").read_text() == "op,shape\nentropy,N1-V2\n"


@pytest.mark.parametrize("case", ["its own id", "another id", "no cuda backend"])
def test_gpu_check_uses_a_prebuilt_extension_only_for_its_own_build_id(tmp_path, case):
    """gpu_check.sh's build step copies .gpu_prebuilt's extension beside the sources, without
    compiling, where the build id there is the one bench/prebuilt.py gives for this interpreter
    and these sources and the copy gives the cuda backend; otherwise it says why and builds,
    after removing any extension an earlier call left in the tree (a failed build must not run
    a stale one). Every step imports the tree through PYTHONPATH. (The stand-in interpreter
    answers bench.prebuilt with the real one and succeeds at everything else, the CUDA probe
    of the copied extension too unless the case says otherwise.)"""
    import sys

    repo = _gpu_check_tree(tmp_path)
    library = repo / "em_kernels" / "_C.cpython-312-x86_64-linux-gnu.so"
    library.write_bytes(b"an earlier call's library")
    prebuilt = repo / ".gpu_prebuilt"
    prebuilt.mkdir()
    (prebuilt / library.name).write_bytes(b"the prebuilt library")
    build_id = subprocess.run([sys.executable, "-m", "bench.prebuilt"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()
    (prebuilt / "build-id").write_text(
        ("sources 0 python x" if case == "another id" else build_id) + "\n")
    calls = tmp_path / "calls"
    # the probe of the copied extension: available_backends()['cuda'] in its code
    fails = """*"['cuda']"*""" if case == "no cuda backend" else "no-such-call"
    returncode, log = _run_gpu_check(tmp_path, repo, f"""#!/bin/bash
case "$*" in "-m bench.prebuilt"*) exec {sys.executable} "$@";; -) cat > /dev/null;; esac
echo "PYTHONPATH=$PYTHONPATH $*" >> {calls}
case "$*" in {fails}) exit 1;; esac
""", GPU_CHECK_STEPS="build timing")
    assert returncode == 0, log
    timing = [line for line in calls.read_text().splitlines() if "test_cuda_timing" in line]
    assert len(timing) == 1 and timing[0].startswith(f"PYTHONPATH={repo} "), timing
    installs = "pip install --no-build-isolation" in calls.read_text()
    if case == "its own id":
        assert "== build: the prebuilt extension of .gpu_prebuilt" in log, log
        assert library.read_bytes() == b"the prebuilt library" and not installs
    else:
        reason = ("this machine wants: " + build_id + ": building instead" if case == "another id"
                  else "does not give the cuda backend here: building instead")
        assert reason in log and "== build: rc=0" in log and installs, log
        assert not library.exists()  # the stand-in pip builds nothing


@pytest.mark.parametrize("installs", [True, False])
def test_gpu_check_installs_carried_peer_wheels(tmp_path, installs):
    """Wheels carried in .whl/ (TRL, verl) are installed without dependencies into a folder of
    the run beside its work folder (not inside it: that one becomes the results'
    logs.tar.gz), put on every later step's PYTHONPATH after the tree and before what was there,
    and removed at the end; where pip fails, run.log says so and the steps go on without them."""
    repo = _gpu_check_tree(tmp_path)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "peer-1.0-py3-none-any.whl").write_bytes(b"a wheel")
    temporary = tmp_path / "tmp"  # where gpu_check.sh's mktemp makes its folders
    temporary.mkdir()
    calls = tmp_path / "calls"
    returncode, log = _run_gpu_check(tmp_path, repo, f"""#!/bin/bash
case "$*" in -) cat > /dev/null;; esac
echo "PYTHONPATH=$PYTHONPATH $*" >> {calls}
case "$*" in *"pip install -q --no-index --no-deps"*)
    target=""; prev=""
    for arg in "$@"; do [ "$prev" = "--target" ] && target=$arg; prev=$arg; done
    mkdir -p "$target/peer"; exit {0 if installs else 1};;
esac
exit 0
""", GPU_CHECK_STEPS="timing", PYTHONPATH="/set/before", TMPDIR=str(temporary))
    assert returncode == 0, log
    lines = calls.read_text().splitlines()
    (pip,) = [line for line in lines if "pip install -q --no-index --no-deps" in line]
    target = Path(pip.split("--target ")[1].split()[0])
    assert pip.endswith(".whl/peer-1.0-py3-none-any.whl") and target.parent == temporary, pip
    assert list(temporary.iterdir()) == []  # the work and peers folders are gone
    (timing,) = [line for line in lines if "test_cuda_timing" in line]
    expected = f"{repo}:{target}:/set/before" if installs else f"{repo}:/set/before"
    assert timing.startswith(f"PYTHONPATH={expected} "), timing
    assert ("# peers from .whl: .whl/peer-1.0-py3-none-any.whl" in log) == installs, log
    assert ("the wheels in .whl did not install" in log) != installs, log


@pytest.mark.parametrize("how", ["no GPU", "stopped by TERM"])
def test_gpu_check_leaves_no_temporary_folder(tmp_path, how):
    """gpu_check.sh removes its work and peers folders however it ends: on its early exit where
    torch sees no GPU, and when its process group is sent a TERM in the middle of a step (as a
    lease's time limit may)."""
    import signal
    import time

    repo = _gpu_check_tree(tmp_path)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    started = tmp_path / "started"
    # The CUDA probe fails ("no GPU") or succeeds; every step's command sleeps (TERM case).
    command, env = _gpu_check_call(tmp_path, repo, f"""#!/bin/bash
case "$*" in -) cat > /dev/null; exit 0;; *is_available*) exit {1 if how == "no GPU" else 0};; esac
touch {started}; sleep 60
""", GPU_CHECK_STEPS="timing", TMPDIR=str(temporary))
    script = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if how == "stopped by TERM":
            deadline = time.monotonic() + 60
            while not started.exists() and script.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert started.exists(), (tmp_path / "out" / "run.log").read_text()
            assert len(list(temporary.iterdir())) == 1  # the work folder, while the step runs
            os.killpg(script.pid, signal.SIGTERM)
        returncode = script.wait(timeout=60)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    assert returncode != 0
    assert list(temporary.iterdir()) == []


def test_prebuilt_build_id_follows_the_sources_and_torch(tmp_path, monkeypatch):
    """The id changes with the content or name of any file under csrc/ and with setup.py, not
    with other files; it names this interpreter's extension suffix and the torch it would
    import (version, commit, CUDA release)."""
    import sysconfig

    from bench import prebuilt

    tree = _gpu_check_tree(tmp_path)
    monkeypatch.setattr(prebuilt, "REPO", tree)
    ids = [prebuilt.build_id()]
    assert sysconfig.get_config_var("EXT_SUFFIX") in ids[0]
    assert (f"torch {torch.__version__}@{torch.version.git_version[:12]} "
            f"cuda {torch.version.cuda or 'none'} ") in ids[0]
    (tree / "README.md").write_text("not a source")
    assert prebuilt.build_id() == ids[0]
    header = tree / "csrc" / "include" / "em" / "common.h"
    header.write_text(header.read_text() + "\n")
    ids.append(prebuilt.build_id())
    header.rename(header.with_name("common2.h"))
    ids.append(prebuilt.build_id())
    (tree / "csrc" / "flags.inl").write_text("// a new kind of file")
    ids.append(prebuilt.build_id())
    (tree / "setup.py").write_text((tree / "setup.py").read_text() + "\n")
    ids.append(prebuilt.build_id())
    assert len(set(ids)) == len(ids)


def test_peer_availability_says_why(monkeypatch):
    """A peer is skipped with its reason: not installed, a release before the op it offers (the
    installed version named), a CPU run of a CUDA-only peer (always, or before the release that
    runs CPU tensors), or no version to compare; torch stands in for an installed package."""
    import importlib.metadata

    from bench.ops.common import package_unavailable

    cpu, cuda = mock.Mock(is_cuda=False), mock.Mock(is_cuda=True)
    trl = package_unavailable("torch", "trl", since="1.14", cpu_since="1.16")
    assert package_unavailable("no_such_peer", "no-such-peer")(cuda) == (
        "no-such-peer is not installed (pip install no-such-peer)")
    assert package_unavailable("torch", "trl")(cpu) == "trl runs CUDA tensors only"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.13.2")
    assert trl(cuda) == "trl 1.13.2 predates the op (trl >= 1.14)"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.15.0")
    assert trl(cuda) is None
    assert trl(cpu) == "trl 1.15.0 runs CUDA tensors only (CPU ones from trl 1.16)"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.16.0")
    assert trl(cpu) is None

    def unknown(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", unknown)
    assert "its version is unknown" in trl(cuda)


@pytest.mark.parametrize("datasets", ["importable", "missing"])
def test_trl_fused_lm_head_row_on_cpu(tmp_path, monkeypatch, datasets):
    """Where a TRL whose fused LM head runs CPU tensors is installed (CI has none), its entropy
    and gradients pass the same check as em-kernels' rows. Its backward imports
    trl.trainer.utils, whose imports need datasets, for a null ZeRO-3 context alone: where
    datasets is missing (as on the lent GPU machine), em-bench's stand-in for that context
    keeps the row running."""
    pytest.importorskip("trl")
    trl = next(provider for provider in OPS["linear_entropy"].providers()
               if provider.name == "trl")
    reason = trl.unavailable(_cpu_context())
    if reason is not None:
        pytest.skip(reason)
    missing = datasets == "missing"
    if missing:
        monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises
        monkeypatch.delitem(sys.modules, "trl.trainer.utils", raising=False)  # restored later
    else:
        try:
            import trl.trainer.utils  # noqa: F401
        except Exception as exc:  # TRL installed without its trainers' dependencies
            pytest.skip(f"trl.trainer.utils does not import here: {exc}")
    try:
        assert main(["--ops", "linear_entropy", "--providers", "eager", "trl", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
        assert hasattr(sys.modules["trl.trainer.utils"], "__file__") != missing
    finally:
        if not hasattr(sys.modules.get("trl.trainer.utils"), "__file__"):
            sys.modules.pop("trl.trainer.utils", None)  # em-bench's stand-in
    _, rows = _read_csv(tmp_path / "results.csv")
    checks = {(row["provider"], row["mode"]): row["check"] for row in rows}
    assert checks == {("eager", "fwd"): "ref", ("eager", "fwd+bwd"): "ref",
                      ("trl", "fwd"): "ok", ("trl", "fwd+bwd"): "ok"}, rows


def test_verl_fused_lm_head_imports_without_verls_package_init(tmp_path, monkeypatch,
                                                               without_verl_modules):
    """verl's package inits import Ray and more that its kernel does not need: the loader runs
    the kernel's modules without them (the kernel's lazy `from . import kernels` included),
    returns verl's own autograd Function whatever a swap put in the module, and leaves no
    stand-in behind, so that `import verl` afterwards runs verl's own init. A fake verl whose
    package inits raise stands in for the real one (CI has none)."""
    from bench.ops.linear_entropy import VERL_FUSED_LM_HEAD, import_verl_fused_lm_head

    fake = {"__init__.py": "raise ImportError('verl.__init__ needs Ray')",
            "utils/__init__.py": "raise ImportError('verl.utils.__init__ needs omegaconf')",
            "utils/device.py": "DEVICE = 'from verl.utils.device'",
            "utils/kernel/__init__.py": "",
            "utils/kernel/kernels.py": "from verl.utils.device import DEVICE",
            "utils/kernel/linear_cross_entropy.py": (
                "class LinearCrossEntropy:\n"
                "    @staticmethod\n"
                "    def apply():\n"
                "        from . import kernels\n"
                "        return kernels.DEVICE\n"
                "linear_cross_entropy = 'replaced by a swap'")}
    for relative, text in fake.items():
        (tmp_path / "verl" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "verl" / relative).write_text(text + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    linear_cross_entropy = import_verl_fused_lm_head()
    assert linear_cross_entropy() == "from verl.utils.device"
    assert "verl" not in sys.modules and "verl.utils" not in sys.modules
    assert VERL_FUSED_LM_HEAD in sys.modules
    assert import_verl_fused_lm_head() is linear_cross_entropy
    with pytest.raises(ImportError, match="needs Ray"):
        import verl  # noqa: F401


def test_verl_row_skips_hidden_sizes_its_kernels_refuse():
    """verl's kernels assert H % 128 == 0: such a cell is skipped with the reason, not an
    error, before verl is imported."""
    verl = next(provider for provider in OPS["linear_entropy"].providers()
                if provider.name == "verl")
    case = types.SimpleNamespace(dims={"M": 4, "H": 192, "V": 300})
    with pytest.raises(Skip, match="multiple of 128"):
        verl.build(case)


def test_cpu_peak_memory_sees_every_live_tensor():
    """Eager linear+entropy fwd+bwd at M 64, H 256, V 32000 (fp32) must hold dlogits [M, V] while
    it forms d_weight [V, H] = dlogits^T hidden: the peak is at least their sum (39 MiB). Summing
    each op's self memory in start order reported 31 MiB, d_weight alone, because autograd
    attributes frees to a parent op that starts before the allocations of its children."""
    ctx = _cpu_context()
    op = OPS["linear_entropy"]
    case = make_case(ctx, op, {"M": 64, "H": 256, "V": 32000}, torch.float32, seed=0)
    eager = next(p for p in op.providers() if p.name == "eager")
    logits_mib, weight_mib = 64 * 32000 * 4 / 2**20, 32000 * 256 * 4 / 2**20
    peak_mib = measure(ctx, case, eager, "fwd+bwd")["peak_extra_mib"]
    assert logits_mib + weight_mib <= peak_mib <= 8 * logits_mib + weight_mib, peak_mib


def _tune_module():
    """bench/tune.py, or a skip where Triton is not available (it imports the Triton kernels'
    modules to sweep their constants)."""
    if em_kernels.available_backends()["triton"] != "available":
        pytest.skip(em_kernels.available_backends()["triton"])
    from bench import tune

    return tune


def test_tuning_sweep_plumbing(capsys):
    """bench/tune.py on CPU (Triton's interpreter, tiny shapes): every candidate runs, matches the
    current constants' result, and the module constants are restored afterwards."""
    tune = _tune_module()
    if triton_older_than((3, 6)):  # the sweep has TMA candidates
        pytest.skip("Triton 3.4-3.5's interpreter checks descriptor strides in elements, not bytes")
    from em_kernels.triton import entropy as triton_entropy

    before = triton_entropy.MAX_BLOCK
    results = tune.main(["--device", "cpu", "--ops", "entropy", "linear_entropy",
                         "linear_entropy_bwd", "linear_entropy_bwd_chunk",
                         "linear_entropy_loss"])
    assert triton_entropy.MAX_BLOCK == before
    for op, rows in results.items():
        assert len(rows) == 2 and sum(row["current"] for row in rows) == 1, op
        assert all(row["status"] == "ok" and row["ms"] > 0 for row in rows), rows
    assert "* the constants in the source now" in capsys.readouterr().out


def _stand_in_case(values, module):
    """A tuning case that needs no kernel: ``values`` times module.SCALE, their NaNs replaced by
    module.FILL, both read when the case runs (as the launchers read their constants); and the
    list of (device, SCALE, FILL is NaN) at each build."""
    built = []

    def build(device):
        built.append((device, module.SCALE, math.isnan(module.FILL)))
        base = torch.tensor(values)
        return lambda: torch.where(base.isnan(), module.FILL, base * module.SCALE)

    return build, built


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def test_tuning_sweep_judges_and_reports_every_candidate(monkeypatch, tmp_path, capsys):
    """tune.main's bookkeeping on a stand-in module (no kernels, milliseconds): a candidate is in
    place while it is checked and timed, and gone before the next case is built; it is compared
    with the current constants' result of the same case (the largest difference, and the NaN
    positions), and a wrong or failing one is not timed; the first row is the current setting;
    only the ops asked for run, on the device asked for; the JSON holds every row (NaN as
    null); the summary lists each case fastest first, untimed rows last, the current one
    starred. On a GPU lease a slip in any of these picks the wrong constants from a run that
    looked fine."""
    tune = _tune_module()
    module = types.SimpleNamespace(SCALE=1.0, FILL=math.nan)
    close = 1.0 + 2**-12  # within the tolerance; every difference below is exact
    candidates = [dict(SCALE=1.0, FILL=math.nan), dict(SCALE=close, FILL=math.nan),
                  dict(SCALE="x", FILL=math.nan), dict(SCALE=2.0, FILL=math.nan),
                  dict(SCALE=1.0, FILL=0.0)]
    with_nan, with_nan_built = _stand_in_case([1.0, 2.0, math.nan], module)
    finite, finite_built = _stand_in_case([0.5, 0.25], module)
    sweep = tune.Sweep(module, candidates, [("a", with_nan), ("b", finite)], 1e-3)
    swept_on = []

    def fake_sweeps(device):
        swept_on.append(device)
        return {"entropy": sweep, "em_inf": sweep, "linear_entropy": sweep}

    monkeypatch.setattr(tune, "sweeps", fake_sweeps)
    timings = {(1.0, True): 3.0, (close, True): 1.0, (1.0, False): 2.0}
    timed = []

    def fake_time_ms(run, device):
        key = (module.SCALE, math.isnan(module.FILL))
        timed.append((device, *key))
        return timings[key]

    monkeypatch.setattr(tune, "time_ms", fake_time_ms)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda, the default
    out = tmp_path / "tune.json"
    results = tune.main(["--ops", "em_inf", "entropy", "--json", str(out)])

    cuda = torch.device("cuda")
    assert swept_on == [cuda]  # the headline shapes, not the interpreter's
    assert (module.SCALE, math.isnan(module.FILL)) == (1.0, True)
    assert with_nan_built == finite_built == [(cuda, 1.0, True)] * 2  # once per op
    assert timed == [(cuda, 1.0, True), (cuda, close, True),
                     (cuda, 1.0, True), (cuda, close, True), (cuda, 1.0, False)] * 2
    expected = [  # case, current, ms, difference, status (its start)
        ("a", True, 3.0, 0.0, "ok"), ("a", False, 1.0, 2**-11, "ok"),
        ("a", False, None, None, "error: TypeError: "),
        ("a", False, None, 2.0, "wrong (max difference 2.00e+00)"),
        ("a", False, None, 0.0, "wrong (max difference 0.00e+00)"),  # fills in a NaN
        ("b", True, 3.0, 0.0, "ok"), ("b", False, 1.0, 2**-13, "ok"),
        ("b", False, None, None, "error: TypeError: "),
        ("b", False, None, 0.5, "wrong (max difference 5.00e-01)"),
        ("b", False, 2.0, 0.0, "ok")]  # no NaN to fill in
    assert list(results) == ["em_inf", "entropy"]
    for rows in results.values():
        assert len(rows) == len(expected)
        assert [(row["case"], row["current"], _nan_to_none(row["ms"]),
                 _nan_to_none(row["difference"]), row["status"][:len(status)])
                for row, (*_, status) in zip(rows, expected)] == expected
        assert [row["constants"] for row in rows] == [
            {name: repr(value) for name, value in constants.items()}
            for constants in candidates] * 2
    assert json.loads(out.read_text()) == {
        op: [{key: _nan_to_none(value) for key, value in row.items()} for row in rows]
        for op, rows in results.items()}

    rows = results["entropy"]
    summary = capsys.readouterr().out.split("\n## entropy\n")[1].split("\n\n")[0]
    assert summary.splitlines() == ["a:", *(tune._line(rows[i]) for i in (1, 0, 2, 3, 4)),
                                    "b:", *(tune._line(rows[i]) for i in (6, 9, 5, 7, 8))]
    assert [tune._line(row)[:3] for row in rows] == [" * ", *["   "] * 4] * 2


def test_tuning_cases_run_the_paths_they_sweep():
    """Each case of the CPU sweeps (the GPU's are built by the same functions) runs the path its
    constants steer: on the Triton backend; "fwd+bwd" exactly in the backward sweeps, whose
    cases return d_hidden over its largest entry (so the sweep's tolerance is relative); a
    "logprobs" case hands the op its tokens; EM-INF's case takes its steps (no early exit). A
    case on another path would time candidates that change nothing there: a lease spent on a
    tie."""
    tune = _tune_module()
    ops = ("entropy", "linear_entropy", "linear_entropy_loss", "em_inf_adjust")
    cpu = torch.device("cpu")
    for sweep_name, sweep in tune.sweeps(cpu).items():
        backward = sweep_name in ("linear_entropy_bwd", "linear_entropy_bwd_chunk",
                                  "linear_entropy_loss")
        for case, build in sweep.cases:
            assert ("fwd+bwd" in case) == backward, (sweep_name, case)
            with contextlib.ExitStack() as stack:
                spies = {op: stack.enter_context(mock.patch.object(
                    em_kernels, op, wraps=getattr(em_kernels, op))) for op in ops}
                result = build(cpu)()
            (op, spy), = [(op, spy) for op, spy in spies.items() if spy.called]
            args, kwargs = spy.call_args
            assert kwargs["backend"] == "triton", case
            if backward:
                assert result.shape == args[0].shape, case
                assert float(result.abs().amax()) == 1.0, case
            if "logprobs" in case:
                assert kwargs["tokens"] is not None, case
            if op == "em_inf_adjust":
                assert bool((em_kernels.entropy(result) < em_kernels.entropy(args[0])).all())


class _SimulatedGpu:
    """A CUDA stream and the host's clock in simulated milliseconds, standing in for
    harness.CudaTimeline: work queued at host time t starts when the stream is free, but not
    before t; an event's time is when the stream reaches it. run() spends host_ms on the host,
    then queues a kernel of kernel_ms."""

    def __init__(self, host_ms: float, kernel_ms: float, flush_ms: float = 0.08, *,
                 hold_shortfall: float = 1.0, syncs: bool = False):
        self.host = self.free_at = 0.0
        self.host_ms, self.kernel_ms, self.flush_ms = host_ms, kernel_ms, flush_ms
        self.hold_shortfall = hold_shortfall  # a hold lasts 1 / this of what was asked
        self.syncs = syncs  # run() waits for its kernel (an .item())
        self.asked = []  # each hold's length as asked

    def _queue(self, ms: float) -> None:
        self.free_at = max(self.free_at, self.host) + ms

    def run(self) -> None:
        self.host += self.host_ms
        self._queue(self.kernel_ms)
        if self.syncs:
            self.synchronize()

    def event(self):
        gpu = self

        class Event:
            def record(self):
                gpu._queue(0.0)
                self.at = gpu.free_at

        return Event()

    def elapsed_ms(self, start, end) -> float:
        return end.at - start.at

    def reached(self, event) -> bool:
        return event.at <= self.host

    def on_device(self):
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        self.host = max(self.host, self.free_at)

    def flush_l2(self) -> None:
        self._queue(self.flush_ms)

    def hold(self, ms: float) -> None:
        self._queue(ms / self.hold_shortfall)
        self.asked.append(ms)

    def perf_counter(self) -> float:
        return self.host / 1e3

    def timing(self):
        """harness.cuda_timing of run() on this GPU, the host's clock its own."""
        from bench import harness

        with mock.patch.object(harness.time, "perf_counter", self.perf_counter):
            return harness.cuda_timing(self.run, timeline=self)


def test_a_cpu_run_on_shared_cores_says_so():
    """On CPU, a load average at or above torch's threads at the start or the end puts a warning
    first in the report's header; an idle machine gets none, and a GPU run never does."""
    from bench import harness
    from bench.report import header_lines

    threads = torch.get_num_threads()
    with mock.patch.object(harness, "_load_average", return_value=0.0):
        ctx = _cpu_context()
        assert ctx.load_warning() is None
    with mock.patch.object(harness, "_load_average", return_value=threads + 0.5):
        warning = ctx.load_warning()
    assert warning.startswith("WARNING: the 1-minute load average was 0.0 at the start and "
                              f"{threads + 0.5:.1f} at the end")
    assert header_lines(ctx.info, 1.0, {}, warning)[0] == warning
    ctx.is_cuda = True
    with mock.patch.object(harness, "_load_average", return_value=99.0):
        assert ctx.load_warning() is None


@pytest.mark.parametrize("host_ms, kernel_ms", [(0.1, 0.01), (0.1, 58.0), (0.02, 0.5)])
def test_gpu_time_keeps_the_hosts_part_of_the_call_out(host_ms, kernel_ms):
    """cuda_timing on a simulated GPU: the median sample is the kernel's time alone, and host_ms
    the host's time per call, whether the call is host-bound (a Triton launch at decode size,
    0.1 ms of host time against a 0.01 ms kernel) or GPU-bound; a 58 ms cell still gets
    GPU_MIN_REPEATS timed calls. Without the hold (do_bench's order), the host-bound samples
    hold part of the host time: 2-3x the kernel's here, as in two H200 runs of the same cell."""
    from bench import harness

    gpu = _SimulatedGpu(host_ms, kernel_ms)
    timing = gpu.timing()
    assert timing.ms == pytest.approx(kernel_ms) and timing.spread == pytest.approx(0, abs=1e-9)
    assert timing.host_ms == pytest.approx(host_ms) and timing.late == 0
    # one hold a timed call: at least GPU_MIN_REPEATS, as many as fit in GPU_REPEAT_MS
    assert len(gpu.asked) == max(harness.GPU_MIN_REPEATS, min(harness.GPU_MAX_REPEATS, int(
        harness.GPU_REPEAT_MS / max(host_ms, gpu.flush_ms + kernel_ms))))

    gpu = _SimulatedGpu(host_ms, kernel_ms)
    with mock.patch.multiple(harness, HOLD_FACTOR=0.0, HOLD_MARGIN_MS=0.0):
        unheld = gpu.timing()
    if host_ms > gpu.flush_ms + kernel_ms:  # host-bound: the samples hold host time, and say so
        assert unheld.ms > 1.9 * kernel_ms and unheld.late == 1
    else:
        assert unheld.ms == pytest.approx(kernel_ms)
        assert unheld.late <= harness.LATE_LIMIT  # the first call only, from an idle GPU


def test_gpu_time_catches_a_short_hold_and_a_host_sync():
    """A hold that lasts a third of what was asked (an SM clock below the calibration's) lets
    the start event fire before the call's kernels are queued: cuda_timing sees the late starts
    and times again with a longer hold, which gives the kernel's time. A call that waits for
    the GPU (an .item()) is late whatever the hold, and its time is marked host-inclusive."""
    from bench import harness
    from bench.report import _cells

    gpu = _SimulatedGpu(1.0, 0.05, hold_shortfall=3.0)
    timing = gpu.timing()
    first, second = sorted(set(gpu.asked))  # timed twice, with a 4x hold the second time
    assert second == pytest.approx(harness.LATE_RETRY_FACTOR * first)
    assert gpu.asked.count(first) == gpu.asked.count(second) >= harness.GPU_MIN_REPEATS
    assert timing.ms == pytest.approx(0.05) and timing.late == 0

    gpu = _SimulatedGpu(0.02, 0.05, syncs=True)
    timing = gpu.timing()
    assert timing.late == 1
    row = dict(op="em_inf_adjust", shape="B1-V1000", dtype="fp32", mode="fwd", provider="eager",
               time_ms=timing.ms, late=timing.late)
    assert _cells(row)[5].endswith(" h")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_timing_on_a_real_gpu():
    """The real CudaTimeline (gpu_check.sh runs this first, ~10 s): a calibrated hold of 1 ms
    takes about that; a call that spends 0.3 ms on the host before a tiny kernel is timed as
    the kernel alone (do_bench's order would give ~0.2 ms more), with its host time beside it,
    also through autograd's backward (launched from the autograd engine's thread); a call that
    waits for the GPU is marked late."""
    import time

    from bench import harness

    device = torch.device("cuda")
    timeline = harness._timeline(device)
    assert 5e5 < timeline.cycles_per_ms < 5e6, timeline.cycles_per_ms  # 0.5 to 5 GHz
    start, end = timeline.event(), timeline.event()
    start.record()
    timeline.hold(1.0)
    end.record()
    timeline.synchronize()
    assert 0.7 < timeline.elapsed_ms(start, end) < 3.0
    x = torch.zeros(1024, device=device)

    def busy_then_tiny():
        begun = time.perf_counter()
        while time.perf_counter() - begun < 3e-4:
            pass
        x.add_(1)

    timing = harness.cuda_timing(busy_then_tiny, device)
    assert timing.ms < 0.05 and timing.late <= harness.LATE_LIMIT, timing
    assert 0.25 < timing.host_ms < 2.0, timing
    weight = torch.ones(1024, device=device, requires_grad=True)

    def backward():
        weight.grad = None
        (weight * 2).sum().backward()

    timing = harness.cuda_timing(backward, device)
    assert timing.late <= harness.LATE_LIMIT and timing.ms < 0.1, timing
    timing = harness.cuda_timing(lambda: x.sum().item(), device)
    assert timing.late > harness.LATE_LIMIT, timing


def test_tuning_time_on_a_gpu_is_em_benchs():
    """bench.tune times a candidate on a GPU as em-bench times a cell: the median of
    cuda_timing (the median the module doc promises; a mean lets one stall pick the
    constants). Checked with cuda_timing stood in for, so it runs without a GPU."""
    from bench.harness import Timing

    tune = _tune_module()
    run = mock.Mock()
    with mock.patch.object(tune, "cuda_timing", return_value=Timing(0.25, 0.1, 0.02)) as timing:
        assert tune.time_ms(run, torch.device("cuda")) == 0.25
    assert timing.call_args.args == (run,)


# ---- Every number of a cell, pinned exactly (a wrong median, count or ceiling once passed) ----


def _scripted_clock(durations, reset_cost):
    """A fake perf_counter, advanced by each step's scripted duration and by each reset()."""
    now = [0.0]
    calls = iter(durations)

    def step():
        now[0] += next(calls)

    def reset():
        now[0] += reset_cost

    return (lambda: now[0]), step, reset


def test_cpu_time_is_the_median_of_the_step_alone():
    """Context.time on CPU: the median of at least CPU_MIN_REPEATS timed calls of step()
    (not their min or mean), with reset() outside the timed region, and their spread, the
    interquartile range over the median (quartiles 1.5 and 5.5 s of 1, 2 and 9 s)."""
    from bench import harness

    ctx = _cpu_context()
    # each call past the repeat budget: exactly CPU_MIN_REPEATS samples
    durations = [1.0, 2.0, 9.0] + [0.5] * harness.CPU_MAX_REPEATS
    clock, step, reset = _scripted_clock(durations, reset_cost=100.0)
    with mock.patch.object(harness.time, "perf_counter", clock):
        timing = ctx.time(step, reset)
    assert timing.ms == pytest.approx(2000.0) and timing.spread == pytest.approx(2.0)
    assert timing.host_ms is None


def test_cell_numbers_follow_from_time_and_counts():
    """measure()'s GB/s, TFLOP/s, ceiling and fraction: the op's counts over the timed median,
    against the copy bandwidth (memory-bound op) or the matmul rate in the cell's own dtype
    (compute-bound op); the memory-measuring call is not part of the time."""
    ctx = _cpu_context()
    ctx.copy_gbps = 50.0
    ctx._matmul_tflops = {torch.float32: 0.5, torch.bfloat16: 2.0}
    def two_ms(self, step, reset, warmed_up=False):
        step()
        return Timing(2.0, 0.1)

    with mock.patch.object(Context, "time", two_ms):
        op = OPS["entropy"]
        case = make_case(ctx, op, {"N": 8, "V": 1000}, torch.bfloat16, seed=0)
        eager = next(p for p in op.providers() if p.name == "eager")
        cell = measure(ctx, case, eager, "fwd+bwd")
        nbytes = 3 * 8 * 1000 * 2 + 3 * 4 * 8
        assert cell["time_ms"] == 2.0 and cell["tflops"] is None and cell["spread"] == 0.1
        assert cell["gbps"] == pytest.approx(nbytes / 2e-3 / 1e9)
        assert cell["ceiling"] == 50.0 and cell["frac_ceiling"] == pytest.approx(cell["gbps"] / 50)
        op = OPS["linear_entropy"]
        case = make_case(ctx, op, {"M": 8, "H": 16, "V": 300}, torch.bfloat16, seed=0)
        matmul = next(p for p in op.providers() if p.name == "matmul")
        cell = measure(ctx, case, matmul, "fwd")
        assert cell["gbps"] is None
        assert cell["tflops"] == pytest.approx(2 * 8 * 16 * 300 / 2e-3 / 1e12)
        assert cell["ceiling"] == 2.0 and cell["frac_ceiling"] == pytest.approx(cell["tflops"] / 2)


def test_ceilings_count_bytes_and_flops():
    """The copy ceiling counts the bytes read and written; the matmul ceiling 2 n^3 FLOPs."""
    with mock.patch.object(Context, "time",
                           lambda self, step, reset, warmed_up=False: Timing(1.0, 0.0)):
        ctx = _cpu_context()
        assert ctx.copy_gbps == pytest.approx(2 * 2**26 / 1e-3 / 1e9)
        assert ctx.matmul_tflops(torch.float32) == pytest.approx(2 * 1024**3 / 1e-3 / 1e12)


@pytest.mark.parametrize("name, dims, dtype, expected", [
    ("entropy", {"N": 8, "V": 1000}, torch.bfloat16,
     {"fwd": 8000 * 2 + 32, "bwd": 2 * 8000 * 2 + 64, "fwd+bwd": 3 * 8000 * 2 + 96}),
    ("entropy", {"N": 8, "V": 1000}, torch.float32,
     {"fwd": 8000 * 4 + 32, "bwd": 2 * 8000 * 4 + 64, "fwd+bwd": 3 * 8000 * 4 + 96}),
    ("logprobs_and_entropy", {"N": 8, "V": 1000}, torch.bfloat16,
     {"fwd": 8000 * 2 + 128, "bwd": 2 * 8000 * 2 + 256, "fwd+bwd": 3 * 8000 * 2 + 384}),
    ("logprobs_and_entropy_shifted", {"B": 2, "T": 4, "V": 1000}, torch.bfloat16,
     {"fwd": 8000 * 2 + 128, "bwd": 2 * 8000 * 2 + 256, "fwd+bwd": 3 * 8000 * 2 + 384}),
    ("em_inf_adjust", {"B": 2, "V": 1000}, torch.bfloat16, {"fwd": 2000 * (2 + 4)}),
    ("adaptive_temperature", {"B": 2, "V": 1000}, torch.float32, {"fwd": 2000 * (4 + 4)}),
])
def test_traffic_counts(name, dims, dtype, expected):
    """The least bytes each memory-bound op moves: the logits in their own dtype once per read
    or gradient write, plus the O(N) statistics."""
    for mode, nbytes in expected.items():
        assert OPS[name].traffic(dims, dtype, mode) == (nbytes, None), mode


def test_every_dim_has_a_csv_column():
    from bench.report import DIM_COLUMNS

    assert {f"dim_{dim}" for op in OPS.values() for dim in op.dims} <= set(DIM_COLUMNS)


def test_shifted_positions_are_measured_and_checked(tmp_path):
    """logprobs_and_entropy on the positions of a (B, T + 1, V) batch that predict a token:
    eager on logits[:, :-1], the cpu backend on the whole batch with shift=1, each checked
    against the float64 oracle of the view (whole sequences, the gradient w.r.t. the whole
    batch, zero at the last position); the cpu backend's forward+backward holds the batch's
    gradient alone (slicing first would add the slice's gradient, before torch copies it)."""
    rows = _run(tmp_path, "--ops", "logprobs_and_entropy_shifted", "--shapes", "B2-T5-V300",
                "--providers", "eager", "cpu")
    cpu_runs = em_kernels.available_backends()["cpu"] == "available"
    measured = [row for row in rows if row["status"] == "ok"]
    assert len(measured) == (8 if cpu_runs else 4), rows
    for row in measured:
        assert row["check"] == ("ref" if row["provider"] == "eager" else "ok"), row
        assert (row["dim_B"], row["dim_T"], row["dim_V"]) == ("2", "5", "300")
        if row["mode"] != "fwd":
            assert 0 <= float(row["err_grad"]) < 1e-2, row
        if row["mode"] == "fwd+bwd" and row["provider"] == "cpu":
            gradient_mib = 2 * 6 * 300 * {"fp32": 4, "bf16": 2}[row["dtype"]] / 2**20
            assert float(row["peak_extra_mib"]) < 1.2 * gradient_mib, row
    # and its rows resume: none is measured again
    with _counting_cells() as again:
        _run(tmp_path / "resumed", "--ops", "logprobs_and_entropy_shifted", "--shapes",
             "B2-T5-V300", "--providers", "eager", "cpu", "--resume",
             str(tmp_path / "results.csv"))
    assert not again


@pytest.mark.parametrize("name", ["linear_entropy", "linear_policy_loss"])
def test_lm_head_flop_counts(name):
    """2 MHV forward, 4 MHV backward, 6 MHV both; no byte count (compute-bound)."""
    dims = {"M": 8, "H": 16, "V": 300}
    for mode, factor in (("fwd", 2), ("bwd", 4), ("fwd+bwd", 6)):
        assert OPS[name].traffic(dims, torch.bfloat16, mode) == (None, factor * 8 * 16 * 300)


def test_cpu_peak_memory_is_a_running_peak():
    """Two 8 MiB tensors made and freed one after the other peak at 8 MiB, not 16; one kept
    alive under another that is freed peaks at 16, and 8 stay held."""
    ctx = _cpu_context()
    numel = 2**21  # 8 MiB in fp32

    def one_after_another():
        for _ in range(2):
            torch.ones(numel).sum()

    def nested():
        kept = torch.ones(numel)
        torch.ones(numel).sum()
        return kept

    assert ctx.run_measuring_memory(one_after_another)[1] == pytest.approx(8, abs=0.1)
    assert ctx.run_measuring_memory(nested)[1] == pytest.approx(16, abs=0.1)


def test_upstream_gradients_are_not_the_providers_memory():
    """fwd+bwd's first call makes the random upstream gradients: they stand for an input, so the
    cell's peak leaves them out and equals that of a call given them (same provider name)."""
    ctx = _cpu_context()
    op = OPS["entropy"]
    case = make_case(ctx, op, {"N": 64, "V": 16384}, torch.float32, seed=0)
    # an output as large as the logits, so that its upstream gradient (4 MiB) shows
    scaled = Provider("scaled", lambda c: lambda: (2 * c.inputs["logits"],), compares=False)
    first = measure(ctx, case, scaled, "fwd+bwd")["peak_extra_mib"]
    assert "scaled" in case.upstream_cache
    again = measure(ctx, case, scaled, "fwd+bwd")["peak_extra_mib"]
    assert first == pytest.approx(again, abs=0.5), (first, again)


def test_bwd_mode_times_the_backward_alone():
    """In bwd mode the forward runs once, outside the memory and timed calls."""
    ctx = _cpu_context()
    op = OPS["entropy"]
    case = make_case(ctx, op, {"N": 8, "V": 1000}, torch.float32, seed=0)
    calls = []

    def build(c):
        def forward():
            calls.append(1)
            return (2 * c.inputs["logits"],)
        return forward

    measure(ctx, case, Provider("counted", build, compares=False), "bwd")
    assert len(calls) == 1


def test_grad_rows_spread_over_every_row():
    """The rows whose gradients are checked span the batch, first and last row included, not
    its first rows."""
    ctx = _cpu_context()
    case = make_case(ctx, OPS["entropy"], {"N": 200, "V": 10}, torch.float32, seed=0)
    rows = case.grad_rows.tolist()
    assert len(rows) == 64 and rows[0] == 0 and rows[-1] == 199 and rows == sorted(set(rows))


def test_outputs_are_checked_on_every_row():
    """A result wrong on one row only, between the rows whose gradients are checked, fails; the
    float64 oracle of the outputs runs in chunks of rows (here of 3 rows) and still covers
    every one."""
    from bench import harness
    from bench.ops.entropy import eager_entropy

    ctx = _cpu_context()
    case = make_case(ctx, OPS["entropy"], {"N": 256, "V": 100}, torch.float32, seed=0)
    assert 1 not in case.grad_rows.tolist()

    def one_wrong_row(c):
        def forward():
            (entropy,) = eager_entropy(c.inputs["logits"])
            return (entropy + torch.nn.functional.one_hot(torch.tensor(1), 256),)
        return forward

    with mock.patch.object(harness, "ORACLE_CHUNK_BYTES", 3 * 100 * 8):
        chunks = list(harness.row_chunks(case.inputs["logits"]))
        errors = measure(ctx, case, Provider("wrong", one_wrong_row), "fwd")
    assert len(chunks) == 86 and chunks[-1] == slice(255, 258)
    assert abs(errors["err_out"] - 1.0) < 1e-4, errors


@pytest.mark.parametrize("returned", ["fewer", "more", "reshaped"])
def test_a_provider_must_return_the_ops_outputs(returned, tmp_path):
    """A provider that drops an output (or adds one, or returns one in another shape) is an
    error cell with the reason, not an "ok" verdict on the outputs it did return."""
    original = em_kernels.logprobs_and_entropy

    def patched(logits, tokens, **kwargs):
        logprobs, entropy = original(logits, tokens, **kwargs)
        if kwargs.get("backend") != "cpu":
            return logprobs, entropy
        return {"fewer": (logprobs,), "more": (logprobs, entropy, entropy),
                "reshaped": (logprobs, entropy[None])}[returned]

    with mock.patch.object(em_kernels, "logprobs_and_entropy", patched):
        code = main(["--ops", "logprobs_and_entropy", "--shapes", "N8-V1000", "--providers",
                     "eager,cpu", "--modes", "fwd", "--dtypes", "fp32", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert code == 1
    with (tmp_path / "results.csv").open() as handle:
        cpu = next(row for row in csv.DictReader(handle) if row["provider"] == "cpu")
    expected = {"fewer": "returned 1 output(s), logprobs_and_entropy has 2",
                "more": "returned 3 output(s)", "reshaped": "output 1 has shape (1, 8)"}
    assert cpu["status"] == "error" and expected[returned] in cpu["reason"], cpu


def test_reports_keep_every_cell_reason_and_speedup(tmp_path, capsys):
    """Every measured cell has its row in the markdown and the terminal table, in the plan's
    order; an unavailable provider's cells are skipped with their reason, in the CSV and under
    "Not measured"; the final CSV has each row's speedup over eager and the run's copy
    bandwidth."""
    rows = _run(tmp_path, "--providers", "eager,chunked,triton")
    triton = [row for row in rows if row["provider"] == "triton"]
    assert triton and all(row["status"] == "skipped" and "Triton" in row["reason"]
                          for row in triton), triton
    measured = [row for row in rows if row["status"] == "ok"]
    assert len(measured) == 8
    for row in measured:
        assert float(row["copy_gbps"]) > 0 and float(row["cell_s"]) > 0, row
        speedup = float(row["speedup_vs_eager"])
        assert speedup == 1.0 if row["provider"] == "eager" else speedup > 0, row
    # the CSV's order: per case (dtype), mode by mode, the providers in their order
    assert [(r["mode"], r["provider"]) for r in rows[:6]] == [
        (m, p) for m in ("fwd", "fwd+bwd") for p in ("eager", "chunked", "triton")]
    markdown = (tmp_path / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| N8-V1000 ")]
    assert len(table) == len(measured)
    assert "## Not measured" in markdown and triton[0]["reason"] in markdown
    out = capsys.readouterr().out
    assert sum(line.startswith("entropy ") and "N8-V1000" in line
               for line in out.splitlines()) == len(measured)
    spent = next(line for line in out.splitlines() if line.startswith("Time spent: "))
    assert f" in {len(measured)} cells of " in spent and "; entropy / eager " in spent, spent


def test_cell_reports_show_percent_and_largest_error():
    from bench.report import TABLE_COLUMNS, _cells

    row = dict(op="entropy", shape="N8-V1000", dtype="fp32", mode="fwd+bwd", provider="cpu",
               time_ms=1.0, gbps=10.0, frac_ceiling=0.25, peak_extra_mib=1.0, err_out=1e-6,
               err_grad=2e-3, check="ok", speedup_vs_eager=2.0)
    cells = dict(zip(TABLE_COLUMNS, _cells(row)))
    assert cells["% ceil"] == "25%" and cells["max err"] == "2.0e-03"
    assert cells["x eager"] == "2.00x" and cells["TFLOP/s"] == "-"
    assert cells["spread"] == "-" and cells["host ms"] == "-" and cells["provider"] == "cpu"
    cells = dict(zip(TABLE_COLUMNS, _cells({**row, "spread": 0.031, "host_ms": 0.1,
                                            "resumed": True})))
    assert cells["spread"] == "3%" and cells["host ms"] == "0.1" and cells["provider"] == "cpu *"


def test_each_cell_records_the_seconds_it_took(monkeypatch):
    """cell_s is each cell's wall-clock time in all (here a measurement that takes 0.2 s, and a
    skip that takes none), and the run's "Time spent" line sums it, in all against the run's
    wall time and per op and provider, largest first, leaving out skipped cells and rows
    without it."""
    import time as clock

    from bench import harness
    from bench.__main__ import _NoProgress
    from bench.report import time_spent

    def slow_measure(ctx, case, provider, mode, timed=True):
        clock.sleep(0.2)
        return {"time_ms": 1.0}

    monkeypatch.setattr(harness, "measure", slow_measure)
    never = Provider("never", lambda case: None, unavailable=lambda ctx: "not here")
    slow = Provider("slow", lambda case: None, compares=False)
    rows = harness.run_cells(_cpu_context(), [(OPS["entropy"], {"N": 8, "V": 100}, torch.float32,
                                               ["fwd", "fwd+bwd"], [never, slow])],
                             lambda row: None, _NoProgress())
    seconds = {(row["mode"], row["provider"]): row["cell_s"] for row in rows}
    assert all(0.2 <= seconds[(mode, "slow")] < 1.0 for mode in ("fwd", "fwd+bwd")), seconds
    assert all(seconds[(mode, "never")] < 0.05 for mode in ("fwd", "fwd+bwd")), seconds

    def row(op, provider, cell_s=None, status="ok"):
        return dict(op=op, provider=provider, status=status,
                    **({} if cell_s is None else {"cell_s": cell_s}))

    assert time_spent([row("entropy", "eager", 2.0), row("entropy", "compile", 7.0),
                       row("entropy", "eager", 2.5), row("entropy", "cce", 0.01, "skipped"),
                       row("linear_entropy", "eager"), row("entropy", "compile", 1.0),
                       row("entropy", "cpu", 0.04, "error")], 20.0) == (
        "12.5 s in 5 cells of 20.0 s; entropy / compile 8.0 s (2 cells); "
        "entropy / eager 4.5 s (2 cells); entropy / cpu 0.0 s (1 cell)")


def test_a_provider_skip_keeps_its_reason():
    """A provider that raises Skip while building gives a skipped row with that reason."""
    from bench.__main__ import _NoProgress
    from bench.harness import run_cells

    def refuse(case):
        raise Skip("no such kernel at this shape")

    ctx = _cpu_context()
    rows = run_cells(ctx, [(OPS["entropy"], {"N": 8, "V": 100}, torch.float32, ["fwd"],
                            [Provider("refuses", refuse)])], lambda row: None, _NoProgress())
    assert [(row["status"], row["reason"]) for row in rows] == [
        ("skipped", "no such kernel at this shape")]


def test_resume_measures_cells_an_earlier_run_skipped(tmp_path):
    """A sweep split over runs: a cell the earlier run skipped (its time budget spent) is
    measured by the resumed run, not kept as done."""
    _run(tmp_path / "first", "--providers", "eager", "--dtypes", "fp32")
    path = tmp_path / "first" / "results.csv"
    fields, records = _read_csv(path)
    skipped = next(r for r in records if r["mode"] == "fwd")
    for name in ("check", "time_ms", "gbps", "frac_ceiling", "ceiling", "peak_extra_mib",
                 "err_out", "rel_out", "speedup_vs_eager"):
        skipped[name] = ""
    skipped.update(status="skipped", reason="the run's time budget (--max-seconds) was spent")
    _write_csv(path, fields, records)
    with _counting_cells() as measured:
        rows = _run(tmp_path / "second", "--providers", "eager", "--dtypes", "fp32",
                    "--resume", str(path))
    assert measured == [("eager", "fwd")]
    assert [row["status"] for row in rows] == ["ok", "ok"]


def test_speedups_pair_by_commit_and_by_date():
    """Same date, other commit, or same commit, other date: another run, no speedup."""
    from bench.report import add_speedups

    def row(provider, time_ms, commit, date):
        return dict(op="entropy", shape="N8-V32000", dtype="bf16", mode="fwd",
                    provider=provider, status="ok", time_ms=time_ms, commit=commit, date=date)

    rows = [row("eager", 2.0, "abc", "d1"), row("cpu", 1.0, "def", "d1"),
            row("cuda", 1.0, "abc", "d2")]
    add_speedups(rows)
    assert rows[0]["speedup_vs_eager"] == 1.0
    assert "speedup_vs_eager" not in rows[1] and "speedup_vs_eager" not in rows[2]
