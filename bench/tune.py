"""Sweeps the tuning constants of the Triton kernels (and the linear-entropy ops' chunks) and
prints each candidate's time, to choose (or re-check on new hardware) the constants in
em_kernels/triton/*.py and em_kernels/_ops/linear_entropy*.py, which say there why they are what
they are.

    python -m bench.tune [--ops entropy linear_entropy em_inf linear_entropy_loss
                                linear_entropy_bwd_chunk linear_entropy_bwd] [--json FILE]

A candidate is a set of module constants that the launchers read at call time: the sweep sets
them, runs the op (Triton compiles one variant per candidate), checks the result against the
current constants' (the same math in another reduction order: a close match, else the candidate
is marked wrong) and times it as em-bench does (harness.cuda_timing: the median GPU time), then
restores the module.
Shapes are the issues' headline cells. Needs a CUDA device; `--device cpu` runs the same
plumbing on tiny shapes under TRITON_INTERPRET=1 (a test, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import em_kernels
from em_kernels._ops import linear_entropy as linear_ops
from em_kernels._ops import linear_entropy_loss as loss_ops
from em_kernels.triton import em_inf as triton_em_inf
from em_kernels.triton import entropy as triton_entropy
from em_kernels.triton import linear_entropy as triton_linear_entropy

from .harness import cuda_timing

TileConfig = triton_linear_entropy.TileConfig


@dataclass(frozen=True)
class Sweep:
    module: object
    candidates: list[dict]  # constant name -> value; the first is the current setting
    cases: list[tuple[str, Callable[[torch.device], Callable[[], torch.Tensor]]]]  # name, build
    tolerance: float


def _entropy_case(rows: int, vocab: int, backward: bool, logprobs: bool = False):
    """entropy (or, with logprobs, logprobs_and_entropy: the RL path) of bf16 logits."""
    def build(device):
        generator = torch.Generator(device).manual_seed(0)
        logits = (3 * torch.randn(rows, vocab, device=device, generator=generator)).bfloat16()
        tokens = torch.randint(0, vocab, (rows,), device=device, generator=generator)

        def loss():
            if not logprobs:
                return em_kernels.entropy(logits, backend="triton")
            token_logprobs, entropy = em_kernels.logprobs_and_entropy(
                logits, tokens, backend="triton")
            return torch.cat([token_logprobs, entropy])
        if not backward:
            return loss
        logits.requires_grad_(True)

        def run():
            logits.grad = None
            loss().sum().backward()
            return logits.grad
        return run
    return build


def _linear_case(rows: int, features: int, vocab: int, backward: bool = False,
                 tokens: bool = False):
    """linear_entropy's entropy from bf16 operands; with tokens also the log-probs (EM-RL's
    path: the one-hot in both kernels), summed into the loss. backward: d_hidden of a
    forward+backward, divided by its largest entry so that the sweep's absolute tolerance is a
    relative one."""
    def build(device):
        generator = torch.Generator(device).manual_seed(0)
        hidden = torch.randn(rows, features, device=device, generator=generator).bfloat16()
        weight = (torch.randn(vocab, features, device=device, generator=generator)
                  / math.sqrt(features)).bfloat16()
        ids = (torch.randint(0, vocab, (rows,), device=device, generator=generator) if tokens
               else None)

        def loss():
            out = em_kernels.linear_entropy(hidden, weight, tokens=ids, backend="triton")
            return out.entropy if ids is None else out.entropy + out.logprobs
        if not backward:
            return loss
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def run():
            hidden.grad = weight.grad = None
            loss().sum().backward()
            return hidden.grad.float() / hidden.grad.abs().amax().float()
        return run
    return build


def _loss_case(rows: int, features: int, vocab: int, backend: str):
    """linear_entropy_loss forward+backward (its gradients come from the forward) of the mean
    entropy and log-prob from bf16 operands on the entropy kernels of ``backend``; d_hidden,
    divided by its largest entry, is the result compared."""
    def build(device):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        generator = torch.Generator(device).manual_seed(0)
        hidden = torch.randn(rows, features, device=device, generator=generator).to(dtype)
        weight = (torch.randn(vocab, features, device=device, generator=generator)
                  / math.sqrt(features)).to(dtype)
        ids = torch.randint(0, vocab, (rows,), device=device, generator=generator)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def run():
            hidden.grad = weight.grad = None
            em_kernels.linear_entropy_loss(
                hidden, weight, tokens=ids, entropy_weight=1.0 / rows,
                logprob_weight=-1.0 / rows, backend=backend).loss.backward()
            return hidden.grad.float() / hidden.grad.abs().amax().float()
        return run
    return build


def _em_inf_case(rows: int, vocab: int):
    def build(device):
        generator = torch.Generator(device).manual_seed(0)
        logits = 3 * torch.randn(rows, vocab, device=device, generator=generator)
        return lambda: em_kernels.em_inf_adjust(logits, threshold=-math.inf, backend="triton")
    return build


def sweeps(device: torch.device) -> dict[str, Sweep]:
    """The candidates per op, and its cases at the headline shapes (tiny ones on CPU)."""
    gpu = device.type == "cuda"
    entropy_names = ("MAX_BLOCK", "ELEMENTS_PER_THREAD")
    entropy_current = tuple(getattr(triton_entropy, name) for name in entropy_names)
    entropy_candidates = [dict(zip(entropy_names, values)) for values in [entropy_current] + [
        values for values in [(8192, 32), (4096, 32), (4096, 64), (16384, 64)]
        if values != entropy_current]]
    current = triton_linear_entropy._FWD_GPU_16BIT
    linear_candidates = [dict(_FWD_GPU_16BIT=current)] + [
        dict(_FWD_GPU_16BIT=config) for config in dict.fromkeys(
            TileConfig(n, v, h, num_warps=w, num_stages=s, tiles_per_split=t, group_n=g, tma=tma)
            for n, v, h, w, s, t, g, tma in [
            (128, 256, 64, 8, 3, 16, 8, False), (128, 256, 64, 8, 4, 16, 8, False),
            (128, 128, 64, 4, 4, 32, 8, False),
            (128, 128, 64, 8, 4, 32, 8, False), (256, 128, 64, 8, 3, 32, 8, False),
            (64, 256, 64, 4, 4, 16, 8, False), (128, 256, 32, 8, 5, 16, 8, False),
            (128, 256, 64, 8, 3, 16, 16, False), (128, 256, 64, 8, 3, 8, 8, False),
            (128, 256, 64, 8, 3, 16, 8, True), (128, 256, 64, 8, 4, 16, 8, True),
            (128, 128, 64, 8, 4, 32, 8, True), (128, 256, 64, 8, 3, 16, 16, True),
            (256, 128, 64, 8, 3, 32, 8, True)])
        if config != current]
    backward_current = triton_linear_entropy._BWD_GPU_16BIT
    backward_candidates = [dict(_BWD_GPU_16BIT=backward_current)] + [
        dict(_BWD_GPU_16BIT=config) for config in dict.fromkeys(
            TileConfig(n, 256, h, num_warps=w, num_stages=s, tiles_per_split=1, group_n=g,
                       tma=tma)
            for n, h, w, s, g, tma in [
            (128, 64, 8, 3, 8, True), (128, 64, 8, 4, 16, True), (128, 64, 8, 3, 16, False),
            (64, 64, 4, 4, 16, True), (128, 32, 8, 5, 16, True)])
        if config != backward_current]
    em_inf_candidates = [dict(BLOCK=block) for block in dict.fromkeys(
        (triton_em_inf.BLOCK, 512, 1024, 2048, 4096))]
    # The backward's vocab chunk: wider halves the fp32 d_hidden accumulator's passes (about
    # 1.1 ms at 19 chunks by estimate) for twice the workspace.
    chunk_candidates = [dict(BWD_CHUNK_BYTES=size) for size in dict.fromkeys(
        (linear_ops.BWD_CHUNK_BYTES, 64 << 20, 256 << 20))]
    # The loss's chunk trades its buffer for d_weight's accumulation passes (one per chunk).
    loss_candidates = [dict(LOSS_CHUNK_BYTES=size, ROW_ALIGN=align) for size, align in
                       dict.fromkeys([(loss_ops.LOSS_CHUNK_BYTES, loss_ops.ROW_ALIGN),
                                      (128 << 20, 128), (512 << 20, 128), (1 << 30, 128),
                                      (256 << 20, 256), (256 << 20, 1)])]
    if gpu:
        entropy_cases = [("fwd N8192-V151936", _entropy_case(8192, 151936, False)),
                         ("fwd N64-V151936", _entropy_case(64, 151936, False)),
                         ("fwd+bwd N8192-V151936", _entropy_case(8192, 151936, True)),
                         ("logprobs fwd+bwd N8192-V151936",
                          _entropy_case(8192, 151936, True, logprobs=True))]
        linear_cases = [("fwd M8192-H3584-V152064", _linear_case(8192, 3584, 152064)),
                        ("fwd M8192-H896-V151936", _linear_case(8192, 896, 151936))]
        backward_cases = [
            ("fwd+bwd M8192-H3584-V152064", _linear_case(8192, 3584, 152064, backward=True)),
            ("fwd+bwd logprobs M8192-H3584-V152064",
             _linear_case(8192, 3584, 152064, backward=True, tokens=True))]
        # batch 8 is where backend="auto" hands EM-INF from the CUDA kernel to Triton
        em_inf_cases = [(f"B{rows}-V151936", _em_inf_case(rows, 151936))
                        for rows in (1, 8, 16, 32, 64)]
        loss_cases = [(f"{backend} fwd+bwd M8192-H{features}-V{vocab}",
                       _loss_case(8192, features, vocab, backend))
                      for backend in ("triton", "cuda")
                      if em_kernels.available_backends()[backend] == "available"
                      for features, vocab in ((3584, 152064), (896, 151936))]
    else:  # the plumbing only: one tiny case each, two candidates
        entropy_cases = [("fwd N3-V3000", _entropy_case(3, 3000, False))]
        linear_cases = [("fwd M5-H16-V40", _linear_case(5, 16, 40))]
        backward_cases = [("fwd+bwd logprobs M5-H16-V40",
                           _linear_case(5, 16, 40, backward=True, tokens=True))]
        em_inf_cases = [("B2-V3000", _em_inf_case(2, 3000))]
        entropy_candidates = [dict(MAX_BLOCK=triton_entropy.MAX_BLOCK), dict(MAX_BLOCK=2048)]
        linear_candidates = [dict(_INTERPRETER=triton_linear_entropy._INTERPRETER),
                             dict(_INTERPRETER=TileConfig(16, 32, 16, num_warps=1, num_stages=1,
                                                          tiles_per_split=1, group_n=1,
                                                          tma=True))]
        backward_candidates = linear_candidates  # the interpreter's tiles serve both passes
        em_inf_candidates = em_inf_candidates[:2]
        loss_cases = [("triton fwd+bwd M5-H16-V40", _loss_case(5, 16, 40, "triton"))]
        chunk_candidates = [chunk_candidates[0], dict(BWD_CHUNK_BYTES=1)]  # the narrowest chunks
        loss_candidates = [loss_candidates[0], dict(LOSS_CHUNK_BYTES=2 * 40 * 4, ROW_ALIGN=1)]
    return {
        "entropy": Sweep(triton_entropy, entropy_candidates, entropy_cases, 1e-3),
        "linear_entropy": Sweep(triton_linear_entropy, linear_candidates, linear_cases, 1e-3),
        "linear_entropy_bwd": Sweep(triton_linear_entropy, backward_candidates, backward_cases,
                                    1e-2),
        "em_inf": Sweep(triton_em_inf, em_inf_candidates, em_inf_cases, 1e-3),
        "linear_entropy_bwd_chunk": Sweep(linear_ops, chunk_candidates, backward_cases, 1e-2),
        # bf16 d_hidden: another chunk's M may take another cuBLAS kernel, so an entry may round
        # one bf16 ulp (2^-8 of the largest) apart, as in linear_entropy_bwd
        "linear_entropy_loss": Sweep(loss_ops, loss_candidates, loss_cases, 1e-2),
    }


@contextlib.contextmanager
def patched(module, constants: dict):
    saved = {name: getattr(module, name) for name in constants}
    try:
        for name, value in constants.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def time_ms(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":  # as em-bench times: at least 10 calls even for a 58 ms case
        return cuda_timing(run).ms
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def run_sweep(sweep: Sweep, device: torch.device, report: Callable[[dict], None]) -> list[dict]:
    """One row per (case, candidate): its time, and its largest difference from the current
    constants' result (NaN positions must agree); report(row) as soon as it is measured."""
    rows = []
    for case_name, build in sweep.cases:
        run = build(device)
        baseline = run().detach().float().clone()
        for index, constants in enumerate(sweep.candidates):
            with patched(sweep.module, constants):
                try:
                    result = run().detach().float()
                    same_nans = torch.equal(result.isnan(), baseline.isnan())
                    finite = ~baseline.isnan()
                    difference = float((result[finite] - baseline[finite]).abs().max()) \
                        if bool(finite.any()) else 0.0
                    ok = same_nans and difference <= sweep.tolerance
                    ms = time_ms(run, device) if ok else float("nan")
                    status = "ok" if ok else f"wrong (max difference {difference:.2e})"
                except Exception as exc:  # a candidate that does not compile or fit
                    ms, difference, status = float("nan"), float("nan"), \
                        f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(dict(case=case_name, current=index == 0, ms=ms, difference=difference,
                             status=status, constants={k: repr(v) for k, v in constants.items()}))
            report(rows[-1])
    return rows


def _line(row: dict) -> str:
    mark = "*" if row["current"] else " "
    constants = ", ".join(f"{k}={v}" for k, v in row["constants"].items())
    return f" {mark} {row['ms']:9.4f} ms  {row['status']:<10s}  {constants}"


def _json_safe(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ops = ["entropy", "linear_entropy", "em_inf", "linear_entropy_loss",
           "linear_entropy_bwd_chunk", "linear_entropy_bwd"]  # the longest last
    parser.add_argument("--ops", nargs="+", default=ops, choices=ops)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("the sweep times GPU kernels: it needs a CUDA device (--device cpu only "
                     "checks the plumbing under TRITON_INTERPRET=1)")
    device = torch.device(args.device)
    results: dict[str, list[dict]] = {}
    all_sweeps = sweeps(device)

    def report(op: str, row: dict) -> None:  # as measured, so a killed run keeps what it did
        print(f"{op} {row['case']}:{_line(row)}", flush=True)
        results.setdefault(op, []).append(row)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({name: [{k: _json_safe(v) for k, v in r.items()} for r in rows]
                           for name, rows in results.items()}, handle, indent=1)

    for op in args.ops:
        run_sweep(all_sweeps[op], device, lambda row, op=op: report(op, row))
    for op, rows in results.items():  # then sorted, fastest first
        print(f"\n## {op}")
        for case in dict.fromkeys(row["case"] for row in rows):
            print(f"{case}:")
            for row in sorted((r for r in rows if r["case"] == case),
                              key=lambda r: (math.isnan(r["ms"]), r["ms"])):
                print(_line(row))
    print("\n(* the constants in the source now)")
    return results


if __name__ == "__main__":
    main()
