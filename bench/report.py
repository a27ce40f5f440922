"""What em-bench writes: a CSV row per cell as it is measured, then a terminal table, a markdown
summary and a PNG plot of achieved bandwidth (or TFLOP/s) against V (or per shape), one line per
provider."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .harness import DTYPES, ERROR_FACTOR, LATE_LIMIT, NORM_ERROR_FACTOR, parse_shape_label

# time_ms: the median of the timed calls (on CUDA, GPU time between two events); spread: their
# interquartile range over that median; host_ms (CUDA): the host time of one call, what a call
# costs where it exceeds time_ms; late (CUDA): the fraction of samples that hold host time all
# the same (a call that waits for the GPU; above LATE_LIMIT the tables mark the time "h"). All
# three are absent before 2026-11-29, whose CUDA times came from do_bench and held part of the
# host time where it exceeded ~0.08 ms (harness.cuda_timing).
# ceiling: what frac_ceiling divides by, measured in the cell's run (the copy bandwidth in GB/s
# for the memory-bound ops, the matmul rate in the cell's dtype in TFLOP/s for the LM-head ops).
# check: the correctness verdict (harness.check_errors): "ok", "FAIL" (the reason says which error
# exceeded which tolerance), "ref" (eager, the baseline), "unchecked" (the reason says why), or
# empty for a provider with nothing to compare (a bare matmul, a peer's cross-entropy);
# tol_out and tol_grad: the tolerances the verdict applied to the largest errors (per tensor
# since 2026-11-29: those of the tensor nearest to, or furthest past, its own); rel_out and
# rel_grad: the normwise errors ||value - oracle|| / ||oracle|| (a loss's: over the magnitude of
# its terms, harness.Summed; that and the floor's sqrt(K) since 2026-11-28), with tol_rel_out and
# tol_rel_grad (absent from runs before 2026-11-28). cell_s: the wall-clock seconds the cell
# took in all (warm-up and compiles, the oracle check, the timed repeats; eager's untimed
# baseline when this cell ran it), to see where a sweep's time goes (absent before 2026-11-28).
MEASURED = ("time_ms", "spread", "host_ms", "late", "gbps", "tflops", "frac_ceiling", "ceiling", "peak_extra_mib", "err_out",
            "err_grad", "tol_out", "tol_grad", "rel_out", "rel_grad", "tol_rel_out",
            "tol_rel_grad", "cell_s")
# One per dim any op declares (tests/test_bench.py checks): a dim without a column would be
# dropped from the CSV, and --resume would then refuse every row of that op.
DIM_COLUMNS = ("dim_N", "dim_M", "dim_H", "dim_B", "dim_T", "dim_V")
CSV_COLUMNS = ("op", "shape", "dtype", "mode", "provider", "status", "check", "reason", *MEASURED,
               "speedup_vs_eager", *DIM_COLUMNS, "device", "torch", "triton", "python", "commit",
               "date", "copy_gbps")
TABLE_COLUMNS = ("op", "shape", "dtype", "mode", "provider", "ms", "spread", "host ms", "GB/s",
                 "TFLOP/s", "% ceil", "extra MiB", "max err", "check", "x eager")
# Marks a row resumed from an earlier run's CSV in the tables (explained under them).
RESUMED_MARK = " *"
# Marks a GPU time that holds host time (`_host_inclusive`).
HOST_INCLUSIVE_MARK = " h"


class CsvLog:
    """The CSV, one row appended (and flushed) per cell, so an interrupted run keeps its rows."""

    def __init__(self, path: Path, info: dict):
        self.path = path
        self.info = info
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, CSV_COLUMNS, extrasaction="ignore")
        self._writer.writeheader()
        self._file.flush()

    def append(self, row: dict) -> None:
        self._writer.writerow({**self.info, **row})
        self._file.flush()

    def rewrite(self, rows: list[dict]) -> None:
        """Rewrite the whole file at the end, now with each row's speedup over eager."""
        self._file.close()
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**self.info, **row})


# What a row read back must have: the cell's name and where and when it was measured.
REQUIRED_COLUMNS = ("op", "shape", "dtype", "mode", "provider", "status", "device", "commit",
                    "date")
STATUSES = ("ok", "skipped", "error")


def read_csv(path: Path, ops: dict) -> tuple[list[dict], list[str]]:
    """(the usable rows of an earlier run's results.csv as `measure` gives them: numbers as
    numbers, the fields left empty absent; one line per row left out, saying why).

    ops maps an op's name to its OpBench. A measured row is usable when the reports can show it
    and this version can run its cell: a known op, mode, dtype and provider of that op, a shape
    whose dims are the op's, with the dim_ columns agreeing, and a time; every row needs
    REQUIRED_COLUMNS (a run killed while writing its last line leaves one without). ValueError
    if the file is not em-bench's CSV or cannot be parsed as CSV at all."""
    rows, left_out = [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path} is not an em-bench results.csv (no column "
                                 f"{', '.join(sorted(missing))})")
            for record in reader:
                try:
                    rows.append(_read_row(record, ops))
                except ValueError as exc:
                    left_out.append(f"line {reader.line_num}: {exc}")
        except csv.Error as exc:
            raise ValueError(f"{path} line {reader.line_num}: not readable as CSV: {exc}") from exc
    return rows, left_out


def _read_row(record: dict, ops: dict) -> dict:
    """One CSV record as a row; ValueError saying what it lacks."""
    absent = [name for name in REQUIRED_COLUMNS if not record.get(name)]
    if absent:
        raise ValueError(f"no {', '.join(absent)} (a line cut short?)")
    if record["status"] not in STATUSES:
        raise ValueError(f"unknown status {record['status']!r}")
    row = {}
    for name, text in record.items():
        if text in ("", None) or name is None:  # None: a surplus field's key
            continue
        try:
            if name in DIM_COLUMNS:
                row[name] = int(text)
            elif name in (*MEASURED, "speedup_vs_eager", "copy_gbps"):
                row[name] = float(text)
            else:
                row[name] = text
        except ValueError:
            raise ValueError(f"{name} is {text!r}, not a number") from None
    if row["status"] != "ok":
        return row
    op = ops.get(row["op"])
    if op is None:
        raise ValueError(f"unknown op {row['op']!r}")
    providers = [provider.name for provider in op.providers()]
    for name, value, known in (("mode", row["mode"], op.modes), ("dtype", row["dtype"], DTYPES),
                               ("provider", row["provider"], providers)):
        if value not in known:
            raise ValueError(f"{row['op']} has no {name} {value!r}")
    dims = parse_shape_label(row["shape"])
    if sorted(dims) != sorted(op.dims):
        raise ValueError(f"shape {row['shape']} does not give {row['op']}'s dims "
                         f"{', '.join(op.dims)}")
    stated = {column[4:]: row[column] for column in DIM_COLUMNS if column in row}
    if stated != dims:
        raise ValueError(f"the dim_ columns ({stated}) disagree with shape {row['shape']}")
    if "time_ms" not in row:
        raise ValueError("measured, but no time_ms (a line cut short?)")
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager = eager's time / this time, within the same op, shape, dtype and mode,
    and the same run (commit and start time): rows resumed from another run are compared only
    with that run's eager (another lease's clocks, driver or commit would make the ratio
    meaningless)."""
    def key(row):
        return (row["op"], row["shape"], row["dtype"], row["mode"], row.get("commit"),
                row.get("date"))

    eager = {key(r): r["time_ms"] for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for row in rows:
        base = eager.get(key(row))
        if row["status"] == "ok" and base:
            row["speedup_vs_eager"] = base / row["time_ms"]


def _fmt(value, kind: str) -> str:
    if value is None or value == "":
        return "-"
    if kind == "err":
        return "inf" if math.isinf(value) else f"{value:.1e}"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _host_inclusive(row: dict) -> bool:
    """Whether the row's GPU time holds host time (more than LATE_LIMIT of its samples late)."""
    return (row.get("late") or 0.0) > LATE_LIMIT


def _cells(row: dict) -> list[str]:
    errors = [e for e in (row.get("err_out"), row.get("err_grad")) if e is not None]
    provider = row["provider"] + (RESUMED_MARK if row.get("resumed") else "")
    ms = _fmt(row.get("time_ms"), "num") + (HOST_INCLUSIVE_MARK if _host_inclusive(row) else "")
    return [row["op"], row["shape"], row["dtype"], row["mode"], provider, ms,
            _fmt(row.get("spread"), "pct"),
            _fmt(row.get("host_ms"), "num"), _fmt(row.get("gbps"), "num"),
            _fmt(row.get("tflops"), "num"), _fmt(row.get("frac_ceiling"), "pct"),
            _fmt(row.get("peak_extra_mib"), "num"), _fmt(max(errors) if errors else None, "err"),
            row.get("check") or "-", _fmt(row.get("speedup_vs_eager"), "x")]


def wrong_results(rows: list[dict]) -> list[str]:
    """One line per measured cell whose check failed: its name and which error was too large."""
    return [f"{row['op']} {row['shape']} {row['dtype']} {row['mode']} {row['provider']}: "
            f"{row.get('reason', 'no reason recorded')}" for row in rows
            if row["status"] == "ok" and row.get("check") == "FAIL"]


def not_measured(rows: list[dict]) -> list[str]:
    """One line per distinct (op, provider, status, reason) among the cells not measured."""
    seen = defaultdict(int)
    for row in rows:
        if row["status"] != "ok":
            seen[(row["op"], row["provider"], row["status"], row["reason"])] += 1
    return [f"{op} / {provider}: {status} ({_cells_count(count)}): {reason}"
            for (op, provider, status, reason), count in seen.items()]


def time_spent(rows: list[dict], wall_seconds: float) -> str:
    """Where a run's wall-clock time went: the seconds its cells took in all against the run's
    wall_seconds (the rest: building inputs, collecting memory between cases, measuring the
    ceilings), then cell_s summed per (op, provider), largest first, with the number of cells.
    Skipped cells and rows without cell_s (resumed from an older run) are left out. A case's
    float64 oracle of the outputs and that of the gradients are each computed once, in the
    first cell that checks them (usually eager's), and count there."""
    seconds, cells = defaultdict(float), defaultdict(int)
    for row in rows:
        if row["status"] != "skipped" and row.get("cell_s") is not None:
            seconds[(row["op"], row["provider"])] += row["cell_s"]
            cells[(row["op"], row["provider"])] += 1
    ranked = sorted(seconds, key=seconds.get, reverse=True)
    return (f"{sum(seconds.values()):.1f} s in {_cells_count(sum(cells.values()))} of "
            f"{wall_seconds:.1f} s" + "".join(
                f"; {op} / {provider} {seconds[(op, provider)]:.1f} s "
                f"({_cells_count(cells[(op, provider)])})" for op, provider in ranked))


def _cells_count(count: int) -> str:
    return f"{count} cell{'s' * (count != 1)}"


def header_lines(info: dict, copy_gbps: float, matmul: dict,
                 warning: str | None = None) -> list[str]:
    """The report's first lines: a warning on how far to trust it (`Context.load_warning`),
    then where and when it ran and the ceilings it measured."""
    lines = ([warning] if warning else []) + [
        f"device: {info['device']}",
        f"torch {info['torch']}, triton {info['triton']}, python {info['python']}, "
        f"commit {info['commit']}, {info['date']}",
        f"copy bandwidth measured in this run: {copy_gbps:.0f} GB/s"]
    if matmul:
        lines.append("matmul ceiling measured in this run: " + ", ".join(
            f"{name} {tflops:.3g} TFLOP/s" for name, tflops in matmul.items()))
    return lines


def terminal_table(rows: list[dict]) -> str:
    body = [_cells(r) for r in rows if r["status"] == "ok"]
    widths = [max(len(c) for c in column) for column in zip(TABLE_COLUMNS, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths)),
             "  ".join("-" * w for w in widths)]
    previous = None
    for cells in body:
        group = tuple(cells[:4])
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def markdown(rows: list[dict], header: list[str],
             provider_notes: dict[str, dict[str, str]]) -> str:
    """The report: header lines, then per op its measured cells and the notes
    (provider_notes[op][provider]) of the providers in them, then what was not measured."""
    out = ["# em-bench results", ""] + [f"- {line}" for line in header] + [
        "",
        "ms is the median of the timed calls (on a GPU, GPU time between two CUDA events, the "
        "host's part of the call held out), spread their interquartile range over it, host ms "
        "(GPU) the host time of one call (Python, dispatch, launches), which is what a call "
        "costs where it exceeds ms; GB/s and TFLOP/s count the least traffic and work the op "
        "needs; "
        "% ceil is the fraction of the copy bandwidth (memory-bound ops) or of the matmul rate in "
        "the same dtype (the LM-head ops) measured in the cell's run; extra MiB is the peak memory "
        "allocated during the call above what was allocated before it (the input gradients "
        "included; in bwd the backward alone, what the forward saved being allocated before it; "
        "on CPU only what torch's allocator hands out, not the C++ kernels' own scratch); max "
        "err is the largest absolute error against float64 of the outputs, every row, and of "
        "the input gradients, on a subset of rows; "
        "check is FAIL where an output's or input gradient's largest error exceeds the larger of "
        f"{ERROR_FACTOR}x eager's on the same tensor of the same cell and a few units in the last "
        "place of its largest reference value, or where its normwise error "
        "(||value - float64|| / ||float64||) "
        f"exceeds the larger of {NORM_ERROR_FACTOR}x eager's and what any float32 "
        "summation order may cost, sqrt(K) + 4 float32 ulps for sums of K terms "
        "(ok: within both; ref: eager, the baseline; unchecked: eager has no result there); "
        "x eager is eager's time over this provider's."
        + (f" Times marked{HOST_INCLUSIVE_MARK} hold host time: the call waits for the GPU (a "
           "host sync, such as eager EM-INF's per-step check) or its host part outlasted the "
           "hold; compare them with care." if any(_host_inclusive(r) for r in rows) else "")
        + (f" Rows marked{RESUMED_MARK} were resumed from an earlier run's CSV, which gives "
           "their commit, date and ceilings." if any(r.get("resumed") for r in rows) else ""),
        ""]
    wrong = wrong_results(rows)
    if wrong:
        out += ["## Wrong results", "",
                "These cells were measured, but their results are wrong: their times mean "
                "nothing.", ""] + [f"- **FAIL** {line}" for line in wrong] + [""]
    for op in dict.fromkeys(r["op"] for r in rows):
        measured = [r for r in rows if r["op"] == op and r["status"] == "ok"]
        out += [f"## {op}", ""]
        if not measured:
            out += ["No cell measured.", ""]
            continue
        out.append("| " + " | ".join(TABLE_COLUMNS[1:]) + " |")
        out.append("|" + "---|" * (len(TABLE_COLUMNS) - 1))
        out += ["| " + " | ".join(_cells(r)[1:]) + " |" for r in measured]
        out.append("")
        notes = provider_notes.get(op, {})
        shown = [name for name in dict.fromkeys(r["provider"] for r in measured) if name in notes]
        if shown:
            out += [f"- {name}: {notes[name]}" for name in shown] + [""]
    skipped = not_measured(rows)
    if skipped:
        out += ["## Not measured", ""] + [f"- {line}" for line in skipped] + [""]
    return "\n".join(out)


# A panel plots against V where its widest shape family (the other dims fixed) has at least this
# many values of V; fewer make no line (an LM-head sweep has one V per (M, H)), so such a panel
# shows every shape instead, one tick each.
PLOT_MIN_V_POINTS = 3


@dataclass
class Panel:
    """One panel of the plot: ``series`` maps each provider to its (x, value) points, x being V,
    or the shape's index in ``shapes`` where the panel is drawn per shape."""

    op: str
    mode: str
    dtype: str
    metric: str  # "tflops" (compute-bound ops) or "gbps"
    where: str  # the fixed dims of a panel against V; "" for one drawn per shape
    shapes: list[str] | None
    series: dict[str, list[tuple[float, float]]]


def plot_panels(rows: list[dict]) -> list[Panel]:
    """What `plot` draws: one panel per (op, mode, dtype) of the measured rows. Against V at the
    other dims with the most V points (the largest such shape on a tie), unless that family has
    fewer than PLOT_MIN_V_POINTS values of V while the panel holds other shapes: then every shape,
    in the order measured."""
    measured = [r for r in rows if r["status"] == "ok"]
    grouped: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in measured:
        others = tuple((c, row[c]) for c in DIM_COLUMNS if c != "dim_V" and row.get(c) is not None)
        grouped[(row["op"], row["mode"], row["dtype"])][others].append(row)
    panels = []
    for (op, mode, dtype), by_others in grouped.items():
        def points(key):
            return (len({r["dim_V"] for r in by_others[key]}), math.prod(v for _, v in key))

        others = max(by_others, key=points)
        per_shape = points(others)[0] < PLOT_MIN_V_POINTS and len(by_others) > 1
        chosen = ([r for group in by_others.values() for r in group] if per_shape
                  else by_others[others])
        metric = "tflops" if any(r.get("tflops") for r in chosen) else "gbps"
        shapes = list(dict.fromkeys(r["shape"] for r in chosen)) if per_shape else None
        series = {}
        for provider in dict.fromkeys(r["provider"] for r in chosen):
            series[provider] = sorted(
                (shapes.index(r["shape"]) if per_shape else r["dim_V"], r[metric])
                for r in chosen if r["provider"] == provider and r.get(metric))
        where = "" if per_shape else ", ".join(f"{c[4:]}={v}" for c, v in others)
        panels.append(Panel(op, mode, dtype, metric, where, shapes,
                            {name: line for name, line in series.items() if line}))
    return panels


def plot(rows: list[dict], path: Path, copy_gbps: float, matmul: dict) -> bool:
    """Achieved GB/s (TFLOP/s for compute-bound ops) against V, one line per provider, one panel
    per (op, mode, dtype) (`plot_panels`), with the run's ceiling. False if nothing to plot."""
    try:
        import matplotlib
    except ImportError:
        return False
    matmul_by_dtype = dict(matmul)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(rows)
    if not panels:
        return False
    count = len(panels)
    cols = min(3, count)
    nrows = math.ceil(count / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for provider, series in panel.series.items():
            # per shape, points only: a line between unrelated shapes would read as a trend
            ax.plot(*zip(*series), marker="o", linestyle="-" if panel.shapes is None else "none",
                    label=provider)
        compute = panel.metric == "tflops"
        ceiling = matmul_by_dtype.get(panel.dtype) if compute else copy_gbps
        if ceiling:  # resumed points were measured against their own run's ceiling
            ax.axhline(ceiling, color="grey", linestyle="--",
                       label=f"{'matmul ceiling' if compute else 'copy bandwidth'} (this run)")
        if panel.shapes is None:
            ax.set_xscale("log")
            ax.set_xlabel("V")
            title = f"{panel.op} {panel.mode} {panel.dtype} ({panel.where})"
        else:
            ax.set_xticks(range(len(panel.shapes)), panel.shapes, rotation=30, ha="right",
                          fontsize=7)
            ax.set_xlabel("shape")
            title = f"{panel.op} {panel.mode} {panel.dtype}"
        ax.set_ylabel("TFLOP/s" if compute else "GB/s")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
