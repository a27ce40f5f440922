"""em-bench (also `python -m bench`): every em-kernels op against eager PyTorch, torch.compile,
chunked PyTorch, peer libraries and the device's ceilings.

    em-bench                          the default run: a small CPU subset (< 3 minutes on 2 cores),
                                      or the headline shapes on a GPU
    em-bench --full                   the whole sweep (V 32000..262144, N 1..16384, bf16 and fp32)
    em-bench --ops entropy --providers eager,triton --modes fwd --shapes N8192-V151936
    em-bench --shapes V151936         every declared shape with V = 151936
    em-bench --list                   print the cells that would run, and exit
    em-bench --full --resume OLD.csv  measure only the cells that OLD.csv (an earlier run's
                                      results.csv on the same device) did not, and report both:
                                      a sweep longer than one machine lease, in several runs

Writes results.csv, results.md and bandwidth.png under --out (default bench_out/); when stopped
(Ctrl-C, SIGTERM from a timeout), writes them for the cells measured so far. Every provider's
error against float64 is checked against eager's on the same cell (the check column). Exits 1
when a cell raised an error, when a cell's result is wrong (check FAIL), when no cell was
measured, or when stopped early; 2 on bad arguments or an unusable --resume file.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

from . import report
from .harness import (DTYPE_NAMES, DTYPES, MODES, Context, cell_key, parse_shape_label,
                      run_cells, shape_label)
from .ops import OPS

# The quick CPU run stops starting cells after this long: it finishes within 3 minutes even when
# other jobs share the two cores (the reports take a few seconds more).
CPU_DEFAULT_MAX_SECONDS = 120.0


def _split(values: list[str] | None) -> list[str] | None:
    """["a,b", "c"] -> ["a", "b", "c"]; None stays None (no filter)."""
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="em-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", metavar="OP", help=f"of: {', '.join(OPS)}")
    providers = dict.fromkeys(p.name for op in OPS.values() for p in op.providers())
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help=f"of: {', '.join(providers)}")
    parser.add_argument("--modes", nargs="+", metavar="MODE", help=f"of: {', '.join(MODES)}")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help="a full shape (N8192-V151936, M8192-H3584-V152064, B1-V151936) runs "
                             "that shape; a partial one (V151936, N1) keeps the declared shapes "
                             "that match it; ops that no SHAPE names are not run")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE", help=f"of: {', '.join(DTYPES)}")
    parser.add_argument("--full", action="store_true", help="the whole sweep (meant for a GPU)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new cell after this many seconds; the rest are skipped "
                             f"(default: {CPU_DEFAULT_MAX_SECONDS:.0f} for the quick CPU run, so "
                             "that it ends within 3 minutes on a busy machine; 0: no limit)")
    parser.add_argument("--list", action="store_true", help="print the planned cells and exit")
    parser.add_argument("--resume", type=Path, metavar="CSV",
                        help="an earlier run's results.csv on this same device: its measured "
                             "cells of this run's plan are kept (with their own commit and "
                             "date), only the others are measured, and the reports cover both")
    args = parser.parse_args(argv)
    for name in ("ops", "providers", "modes", "shapes", "dtypes"):
        setattr(args, name, _split(getattr(args, name)))
    _check_choices(parser, "--ops", args.ops, OPS)
    _check_choices(parser, "--modes", args.modes, MODES)
    _check_choices(parser, "--dtypes", args.dtypes, DTYPES)
    _check_choices(parser, "--providers", args.providers, list(providers))
    try:
        args.shape_dims = [parse_shape_label(s) for s in args.shapes] if args.shapes else None
    except ValueError as exc:
        parser.error(str(exc))
    _check_shape_dims(parser, args)
    if args.max_seconds is not None and args.max_seconds != args.max_seconds:
        parser.error("--max-seconds must be a number of seconds (0: no limit), got nan")
    return args


def _selected_ops(args) -> list:
    """The op modules --ops selects (all without it)."""
    return [op for name, op in OPS.items() if args.ops is None or name in args.ops]


def _check_shape_dims(parser, args) -> None:
    """Every --shapes entry must fit at least one selected op: a dim no op has, or a mix of
    dims no single op has, is a typo that would otherwise drop the entry (or the dim) silently."""
    selected = _selected_ops(args)
    valid = "; ".join(f"{op.name} {'-'.join(op.dims)}" for op in selected)
    for label, dims in zip(args.shapes or (), args.shape_dims or ()):
        unknown = sorted(set(dims) - {dim for op in selected for dim in op.dims})
        if unknown:
            parser.error(f"--shapes {label}: no selected op has dimension {', '.join(unknown)} "
                         f"(their dims: {valid})")
        if not any(set(dims) <= set(op.dims) for op in selected):
            parser.error(f"--shapes {label}: no selected op has all of {', '.join(dims)} "
                         f"(their dims: {valid})")


def _check_choices(parser, flag, values, choices) -> None:
    unknown = [v for v in values or () if v not in choices]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(choices)}")


def select_shapes(op, shape_dims: list[dict] | None, device_type: str, full: bool) -> list[dict]:
    declared = op.shapes(device_type, full)
    if shape_dims is None:
        return declared
    chosen = []
    for dims in shape_dims:
        if set(dims) == set(op.dims):
            chosen.append({name: dims[name] for name in op.dims})
        elif set(dims) < set(op.dims):
            chosen += [d for d in declared if all(d[k] == v for k, v in dims.items())]
    return list({tuple(d.items()): d for d in chosen}.values())


def unmatched_shapes(args, device_type: str) -> list[str]:
    """The --shapes entries that select no shape of any selected op on this device: one naming
    only some of an op's dims (N4096, V99999) that none of its declared shapes has (a typo, or a
    shape only --full or another device declares). An entry naming all of an op's dims always
    selects that shape."""
    selected = _selected_ops(args)
    return [label for label, dims in zip(args.shapes or (), args.shape_dims or ())
            if not any(select_shapes(op, [dims], device_type, args.full) for op in selected)]


def build_plan(args, device_type: str) -> list[tuple]:
    """[(op, dims, dtype, modes, providers)], smallest inputs first, so that a run cut short by
    --max-seconds has measured as many cases, and of as many ops, as it could."""
    plan = []
    for op in _selected_ops(args):
        modes = (op.default_modes(device_type, args.full) if args.modes is None
                 else [m for m in op.modes if m in args.modes])
        providers = [p for p in op.providers()
                     if args.providers is None or p.name in args.providers]
        dtypes = ([DTYPES[d] for d in args.dtypes] if args.dtypes
                  else op.dtypes(device_type, args.full))
        if not modes or not providers:
            continue
        plan += [(op, dims, dtype, modes, providers)
                 for dims in select_shapes(op, args.shape_dims, device_type, args.full)
                 for dtype in dtypes]
    return sorted(plan, key=lambda case: case[0].input_numel(case[1]) * case[2].itemsize)


def planned_cells(plan: list[tuple]) -> list[tuple[str, str, str, str, str]]:
    """The `cell_key` of every cell of the plan, in the order run_cells runs them."""
    return [(op.name, shape_label(dims), DTYPE_NAMES[dtype], mode, provider.name)
            for op, dims, dtype, modes, providers in plan
            for mode in modes for provider in providers]


class _NoProgress:
    """Stands in for tqdm where it is not installed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, count):
        pass


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        print("em-bench: tqdm is not installed: no progress bar", file=sys.stderr)
        return _NoProgress()
    return tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("em-bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    unmatched = unmatched_shapes(args, args.device)
    if unmatched:
        print(f"em-bench: --shapes {' '.join(unmatched)} selects none of the shapes the selected "
              f"ops declare on {args.device}" + ("" if args.full else " (--full declares more)")
              + "; see them with --list, or name every dim (N64-V32000) for any shape",
              file=sys.stderr)
        return 2
    plan = build_plan(args, args.device)
    order = {cell: index for index, cell in enumerate(planned_cells(plan))}
    total = len(order)
    if args.list or not plan:
        for op, dims, dtype, modes, providers in plan:
            print(f"{op.name} {'-'.join(f'{k}{v}' for k, v in dims.items())} "
                  f"{DTYPE_NAMES[dtype]} modes={','.join(modes)} "
                  f"providers={','.join(p.name for p in providers)}")
        print(f"{total} cells" if plan else "no cell matches the filters")
        return 0 if plan or args.list else 1

    earlier = []
    if args.resume:  # read before --out/results.csv is rewritten: it may be the same file
        try:
            earlier, left_out = report.read_csv(args.resume, OPS)
        except (OSError, ValueError) as exc:  # read_csv turns csv.Error into ValueError
            print(f"em-bench: cannot resume from {args.resume}: {exc}", file=sys.stderr)
            return 2
        if left_out:  # their cells are measured again where this run's plan has them
            print(f"em-bench: {len(left_out)} rows of {args.resume} left out:\n  "
                  + "\n  ".join(left_out), file=sys.stderr)
    try:  # before measuring anything: a bad --out fails at once
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.csv").touch()
    except OSError as exc:
        print(f"em-bench: cannot write to --out {args.out}: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    if args.max_seconds is None and args.device == "cpu" and not args.full:
        args.max_seconds = CPU_DEFAULT_MAX_SECONDS
    deadline = started + args.max_seconds if args.max_seconds else None
    device = torch.device(args.device)
    ctx = Context(device, args.full, set(args.providers) if args.providers else None, deadline)
    info = {**ctx.info, "copy_gbps": f"{ctx.copy_gbps:.1f}"}
    other_devices = sorted({row["device"] for row in earlier} - {ctx.device_name})
    if other_devices:
        print(f"em-bench: {args.resume} was measured on {', '.join(other_devices)}, this run is "
              f"on {ctx.device_name}: resume only on the same kind of device", file=sys.stderr)
        return 2
    # Every measured cell of the earlier run is kept, also those outside this run's filters (so
    # that --resume and --out may name the same file without losing any), except that a cell of
    # this run whose result failed its check is measured again (the kernel may be fixed now).
    planned = frozenset(order)
    resumed = {cell_key(row): {**row, "resumed": True} for row in earlier
               if row["status"] == "ok" and not (
                   row.get("check") == "FAIL" and cell_key(row) in planned)}
    done = frozenset(resumed) & planned
    csv_log = report.CsvLog(args.out / "results.csv", info)
    rows = list(resumed.values())
    for row in rows:  # first, so that a run stopped early still has them
        csv_log.append(row)
    print(f"em-bench: {total - len(done)} cells on {ctx.device_name}"
          + (f" ({len(resumed)} more resumed from {args.resume}, {len(resumed) - len(done)} of "
             "them outside this run's filters)" if args.resume else "")
          + f"; copy bandwidth {ctx.copy_gbps:.0f} GB/s; writing {args.out}/", file=sys.stderr)

    def on_row(row: dict) -> None:
        rows.append(row)
        csv_log.append(row)

    stopped = False
    default_sigterm = signal.signal(signal.SIGTERM, _stop)
    try:
        with _progress_bar(total - len(done)) as progress:
            run_cells(ctx, plan, on_row, progress, done=done)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through _stop
        stopped = True
        print(f"\nem-bench: stopped after {len(rows) - len(resumed)} of {total - len(done)} "
              "cells; writing their reports", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, default_sigterm)
    op_order = {name: index for index, name in enumerate(OPS)}
    # One op's cells together, in the plan's order, then (resumed) cells outside the plan.
    rows.sort(key=lambda row: (op_order.get(row["op"], len(op_order)),
                               order.get(cell_key(row), len(order))))
    report.add_speedups(rows)
    csv_log.rewrite(rows)
    matmul = ctx.matmul_ceilings()
    header = report.header_lines(ctx.info, ctx.copy_gbps, matmul, ctx.load_warning())
    if resumed:
        commits = sorted({row["commit"] for row in resumed.values()})
        header.append(f"{len(resumed)} cells resumed from {args.resume}, measured on this device "
                      f"kind at commit {', '.join(commits)} (each CSV row has its own commit, "
                      "date and copy bandwidth)")
    notes = {name: op.provider_notes for name, op in OPS.items()}
    (args.out / "results.md").write_text(report.markdown(rows, header, notes))
    plotted = report.plot(rows, args.out / "bandwidth.png", ctx.copy_gbps, matmul)
    if not plotted:  # no stale plot of an earlier run beside this run's tables
        (args.out / "bandwidth.png").unlink(missing_ok=True)
    print("\n".join(header))
    print(report.terminal_table(rows))
    skipped = report.not_measured(rows)
    if skipped:
        print("\nNot measured:\n  " + "\n  ".join(skipped))
    wrong = report.wrong_results(rows)
    if wrong:
        print("\nWRONG RESULTS (check FAIL: the error exceeds the tolerance):\n  "
              + "\n  ".join(wrong))
    this_run = [row for row in rows if cell_key(row) not in resumed]
    print("\nTime spent: " + report.time_spent(this_run, time.monotonic() - started))
    written = ["results.csv", "results.md"] + (["bandwidth.png"] if plotted else [])
    print(f"\n{len(rows)} cells in {time.monotonic() - started:.0f} s; wrote "
          + ", ".join(f"{args.out}/{name}" for name in written))
    errors = sum(row["status"] == "error" for row in rows)
    measured = sum(row["status"] == "ok" for row in rows)
    if errors or wrong or not measured or stopped:
        print(f"em-bench: {errors} cells raised errors, {len(wrong)} gave wrong results, "
              f"{measured} were measured" + (", stopped early" if stopped else ""),
              file=sys.stderr)
        return 1
    return 0


def _stop(signum, frame):
    """SIGTERM (what `timeout` sends) ends the run like Ctrl-C: the reports still get written."""
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
