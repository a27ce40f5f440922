"""The measurement loop of em-bench: what one benchmark cell is and how it is measured.

A cell is (op, shape, dtype, mode, provider). For each cell the harness

1. builds the op's inputs once per (op, shape, dtype) from a seeded generator (random normal
   values, never zeros), shared by every provider and mode of that case;
2. runs the provider once untimed (on CUDA after a separate warm-up call: Triton JIT,
   autotuning, torch.compile): this yields the outputs and gradients for the error check, and
   measures the peak extra memory:
   on CUDA `torch.cuda.max_memory_allocated()` minus the allocation before the call; on CPU the
   peak of the running sum of the allocations and frees that torch's profiler records, in time
   order. In the backward modes this includes the input gradients themselves;
3. times it: on CUDA the median of `cuda_timing`'s samples (CUDA events, warm-up, an L2 flush
   before every call, so even inputs that fit in L2 are read from HBM, which is what rotating
   inputs achieves, and a hold of the GPU that keeps the host's part of the call out of the
   sample), with the host time of one call beside it; on CPU the median of wall-clock repeats
   after the warm-up call; both with the spread (interquartile range over median);
4. reports bytes / time and FLOPs / time from the op's counts of the least traffic and work the
   computation needs (not what the provider happens to move), and the fraction of the device's
   ceiling measured at the start of the same run: the copy bandwidth for memory-bound ops, the
   matmul rate in the cell's dtype for compute-bound ones. The flush precedes the call only:
   within one call (fwd+bwd's backward re-reading the logits, EM-INF's later steps) inputs
   smaller than the L2 (50-60 MB on an H100 / H200) come from L2, so such cells can pass 100%
   of the copy ceiling, and their fraction does not count passes. On CPU nothing is flushed:
   a cell that fits in cache (N 1, or N 64 in bf16) runs cache-warm against a DRAM copy
   ceiling, and that ceiling moves by 2x between runs on a shared machine;
5. compares the outputs, every row of them, with the op's float64 oracle (computed a chunk of
   rows at a time), and in the backward modes the input gradients on an evenly spaced subset of
   rows when the whole float64 gradient would be too big (every op here is row-wise, so a row's
   gradient does not depend on the other rows; d(weight) of the LM-head ops sums over every row
   and has an oracle of its own); a provider must return exactly the op's outputs, in their
   shapes, or its cell is an error. It gives every
   provider but eager a verdict (`check_errors`): its largest error and its normwise error
   must each stay within what eager, the fp32-upcast PyTorch every trainer runs, achieves on
   the same cell. A fast wrong result is a "FAIL" cell, which makes em-bench exit 1.

The CPU peak memory counts what torch's allocator hands out (tensors, autograd's saved
tensors, the outputs), not what the C++ kernels allocate themselves: their per-chunk scratch
(std::vector, a few KiB to MiB) is not in the cpu provider's column. On CUDA every kernel
allocates through torch, so the column is complete there.

Modes: "fwd" runs the forward with inputs that do not require grad; "bwd" runs the forward once
with grad, then times only `autograd.backward` with fixed random upstream gradients
(retain_graph); "fwd+bwd" times both. A provider that cannot run a cell (not installed, backend
unavailable, out of memory, or the time budget spent) gives a "skipped" row with a one-line
reason; any other exception, NotImplementedError included (torch raises it for an op with no
kernel registered for the device: a broken build, not a choice), gives an "error" row; neither
stops the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from em_kernels import BackendUnavailableError

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Rows whose input gradients are compared with the float64 oracle: enough to catch a wrong block
# or tile anywhere, cheap at V = 262144 (every row of a [16384, 262144] gradient would be 32 GiB
# in float64). Outputs are compared on every row.
GRAD_ROWS = 64
# Bytes of float64 input per chunk of rows of the output oracle (`row_chunks`): the reference
# holds a few temporaries of that size, so its peak stays near 1 GiB whatever the shape.
ORACLE_CHUNK_BYTES = 2**28
# CPU timing: at least this many timed repeats, at most CPU_MAX_REPEATS, and no more repeats than
# fit in CPU_REPEAT_BUDGET_S; a median of 3 is already robust to one preempted run on a shared box.
CPU_MIN_REPEATS = 3
CPU_MAX_REPEATS = 15
CPU_REPEAT_BUDGET_S = 0.6
# CUDA timing (`cuda_timing`): milliseconds of warm-up and of timed repeats (do_bench's
# defaults), and the fewest and most timed calls a median is taken of: at least 10 even for a
# 58 ms cell (eager fwd+bwd, the matmul floor of linear_entropy), at most 200, plenty for a median
# and a bound on a decode-size cell, whose repeats each cost the hold below.
GPU_WARMUP_MS = 25
GPU_REPEAT_MS = 100
GPU_MIN_REPEATS = 10
GPU_MAX_REPEATS = 200
# The hold before each timed call keeps the GPU busy while the host prepares the call, so that the
# start event fires after the call's kernels are queued: HOLD_FACTOR x the call's median host time
# plus HOLD_MARGIN_MS (the host's jitter), at most HOLD_MAX_MS (a 20 ms host call is a provider
# with host syncs, which no hold can hide).
HOLD_FACTOR = 2.0
HOLD_MARGIN_MS = 0.05
HOLD_MAX_MS = 20.0
# Calls whose host time, each from an idle GPU, gives host_ms and the hold: a median of 5 is
# robust to one garbage collection (one call for calls over 1 ms, where the hold is cheap
# against the call and a late start is caught below).
HOST_SAMPLES = 5
# Cycles of the hold's calibration spin: ~10 ms at an H100 / H200's ~2 GHz, long enough for
# launch gaps to be noise.
CALIBRATION_CYCLES = 20_000_000
# The fraction of samples that may start late (cuda_timing) before the repeats run again with
# LATE_RETRY_FACTOR times the hold, and past which a cell's time is marked host-inclusive.
LATE_LIMIT = 0.1
LATE_RETRY_FACTOR = 4.0
# Bytes zeroed before each timed call to evict the inputs from L2 (50-60 MB on an H100 / H200),
# as do_bench's 256 MB buffer does.
L2_FLUSH_BYTES = 2**28
# The correctness verdict (check_errors). The baseline is eager, the fp32-upcast PyTorch every
# trainer runs: a provider's error may be up to ERROR_FACTOR times eager's on the same cell. Not
# 1 or 2: correct fp32 algorithms that merely sum in another order land up to 4x apart at the
# ill-conditioned entries of EM-INF (RESULTS.md, run E: 3.8e-4 to 1.6e-3 over 24 orders), and the
# largest ratio the recorded H200 runs show for a correct kernel is 3.8 (em_inf_adjust B16, cuda);
# a wrong result (a lost chunk, a wrong row, a dropped term) is off by the values' own size,
# orders of magnitude above eager's 1e-7 to 1e-4 on the outputs. Where eager happens to be
# nearly exact (a single row, in cache-sized sums), the tolerance is at least ERROR_FLOOR_ULPS
# units in the last place of the largest reference value, in the dtype eager returns it in:
# 5e-6 for an fp32 entropy near 11, 3e-2 for a bf16 gradient near 1 (where ERROR_FACTOR x
# eager's own bf16 rounding, half an ulp, is larger still).
ERROR_FACTOR = 10
ERROR_FLOOR_ULPS = 4
# The second verdict is normwise: ||value - oracle|| / ||oracle|| over each output's (each input
# gradient's) checked entries, which a few ill-conditioned entries cannot dominate, so that it
# can hold providers much closer to eager than the largest error can. The largest error alone
# let through, at the default CPU run's cells (2026-11-28): a bf16 entropy gradient with its H
# term 2% off or its entries with p < 1e-3 zeroed (hidden under the bf16 rounding of the
# largest entry), and at em_inf_adjust B 16 four Adam steps instead of five (hidden under the
# 0.46 tolerance that eager's sign-flipped entries set). Normwise, those are 15x to 3000x eager's
# error. But eager's own normwise error is luck of its summation order: torch's cascaded CPU sums
# are sometimes far better than a plain float32 sum, and a correct provider that sums in another
# order failed 3x eager (torch.compile's fp32 entropy at V 32000: 4.1e-6 against eager's 8.4e-7;
# linear_policy_loss's cpu backend on 1 seed in 10). So the floor is what any order may cost: a
# float32 sum of K terms is off by about sqrt(K) ulps of the sum of their magnitudes (its rounding
# errors a random walk), K the op's `summed_terms`, plus NORM_FLOOR_ULPS ulps of the rest of the
# computation and half a ulp of the value's own dtype (a 16-bit result's final rounding, ~0.2 ulp
# normwise); an output that is a sum of terms which cancel (a loss) is measured against the sum
# of their magnitudes (`Summed`). At V 151936 the floor is 4.7e-5; the bugs above stay over it.
NORM_ERROR_FACTOR = 3
NORM_FLOOR_ULPS = 4
# The provider whose error sets the other providers' tolerance.
BASELINE = "eager"
# The key of _errors' per-tensor errors, which check_errors reads and no report shows.
PER_TENSOR = "per_tensor"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Summed:
    """An oracle output that sums terms which may cancel (a loss): its value, and the same sum of
    the terms' absolute values, which a float32 sum's rounding error is relative to. (Not a
    tuple: a gradient oracle's tuple means (rows, gradient).)"""

    value: torch.Tensor
    magnitude: torch.Tensor


class Skip(Exception):
    """This provider cannot run this cell; the message is the one-line reason."""


@dataclasses.dataclass
class Case:
    """One (op, shape, dtype) on one device: the inputs every provider and mode of it share."""

    op: Any  # an OpBench
    dims: dict[str, int]
    dtype: torch.dtype
    device: torch.device
    inputs: dict[str, torch.Tensor]
    grad_rows: torch.Tensor  # indices (along dim 0 of the inputs) whose gradients are compared
    seed: int
    oracle_cache: dict = dataclasses.field(default_factory=dict)
    upstream_cache: dict = dataclasses.field(default_factory=dict)  # provider -> upstream grads

    @property
    def label(self) -> str:
        return shape_label(self.dims)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """make(), computed once per case (oracle parts that several modes share)."""
        if key not in self.oracle_cache:
            self.oracle_cache[key] = make()
        return self.oracle_cache[key]


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way of computing an op.

    build(case) returns a callable that runs the forward once on case.inputs and returns a tuple
    of output tensors (the op's outputs in the op's order when `compares` is true; anything
    differentiable otherwise, such as a bare matmul's logits or a peer's cross-entropy loss).
    unavailable(ctx) returns None when the provider can run here, else the one-line reason;
    modes_not_offered maps a mode to the reason the provider has no such cell.
    """

    name: str
    build: Callable[[Case], Callable[[], tuple[torch.Tensor, ...]]]
    compares: bool = True
    unavailable: Callable[["Context"], str | None] = lambda ctx: None
    modes_not_offered: dict[str, str] = dataclasses.field(default_factory=dict)


class OpBench:
    """What an op module declares. Subclasses set the class attributes and the methods."""

    name: str = ""
    dims: tuple[str, ...] = ()
    modes: tuple[str, ...] = MODES
    bound: str = "memory"  # "memory": GB/s vs copy bandwidth; "compute": TFLOP/s vs matmul
    grad_inputs: tuple[str, ...] = ()  # inputs that require grad in the backward modes
    grad_rows: int | None = GRAD_ROWS  # rows whose gradients are compared; None: every row
    # What a provider's name stands for in this op, where a reader could take it for something
    # else; printed under the op's table.
    provider_notes: dict[str, str] = {}

    def shapes(self, device_type: str, full: bool) -> list[dict[str, int]]:
        raise NotImplementedError

    def default_modes(self, device_type: str, full: bool) -> list[str]:
        """All modes, except "bwd" in the quick CPU run (fwd+bwd minus fwd gives it there)."""
        if device_type == "cpu" and not full:
            return [mode for mode in self.modes if mode != "bwd"]
        return list(self.modes)

    def dtypes(self, device_type: str, full: bool) -> list[torch.dtype]:
        raise NotImplementedError

    def make_inputs(self, dims, dtype, device, generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def input_numel(self, dims: dict[str, int]) -> int:
        """Elements of the largest inputs (the [rows, V] logits by default)."""
        return math.prod(dims.values())

    def eager_numel(self, dims: dict[str, int]) -> int:
        """Elements of the largest tensor eager PyTorch forms: the logits, which are the inputs
        by default."""
        return self.input_numel(dims)

    def traffic(self, dims, dtype, mode) -> tuple[float | None, float | None]:
        """(bytes, FLOPs) the computation needs at least; None where it does not apply."""
        raise NotImplementedError

    def summed_terms(self, dims: dict[str, int]) -> int:
        """The length of the longest float32 sum behind an output, which sets the normwise
        error floor (NORM_ERROR_FACTOR): the vocabulary by default."""
        return dims["V"]

    def output_oracle(self, case: Case) -> list[torch.Tensor | Summed]:
        """The outputs in float64, every row, each a tensor or a `Summed`, in the providers'
        order and shapes."""
        raise NotImplementedError

    def grad_oracle(self, case: Case, upstream: Sequence[torch.Tensor]) -> dict:
        """{input name: its gradient in float64 on case.grad_rows, or (indices, gradient on
        those indices of the input's dim 0)}, for upstream gradients of the full outputs."""
        raise NotImplementedError

    def providers(self) -> list[Provider]:
        raise NotImplementedError


def shape_label(dims: dict[str, int]) -> str:
    """{"N": 8192, "V": 151936} -> "N8192-V151936" (the form --shapes takes)."""
    return "-".join(f"{name}{size}" for name, size in dims.items())


def parse_shape_label(label: str) -> dict[str, int]:
    """The inverse of shape_label; ValueError on anything else, a dim named twice or a size
    below 1 included."""
    dims = {}
    for part in label.split("-"):
        name, digits = part[:1].upper(), part[1:]
        if not name.isalpha() or not digits.isdigit():
            raise ValueError(
                f'cannot read shape "{label}": write it as dims and sizes joined by "-", '
                'such as N8192-V151936 or V151936')
        if name in dims:
            raise ValueError(f'shape "{label}" names {name} twice')
        if int(digits) < 1:
            raise ValueError(f'shape "{label}": {name} must be at least 1')
        dims[name] = int(digits)
    return dims


# ----------------------------------------------------------------------------------------------
# The run's context: device, versions, ceilings


def git_commit() -> str:
    """The checkout's commit; EM_KERNELS_COMMIT names it where the tree travels without .git
    (a copy sent to a GPU machine)."""
    if os.environ.get("EM_KERNELS_COMMIT"):
        return os.environ["EM_KERNELS_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def _load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed, or broken
        return "not installed"
    return triton.__version__


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's lines on stderr (fd 2) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One cell's time: ms, the median of the timed calls (on CUDA the GPU time between two
    events, host excluded); spread, the interquartile range of those calls over their median;
    host_ms (CUDA only), the median host time of one call (Python, dispatch, launches), which
    is what a call costs when it exceeds ms, as at decode sizes; late (CUDA only), the fraction
    of samples that hold host time all the same (`cuda_timing`)."""

    ms: float
    spread: float
    host_ms: float | None = None
    late: float | None = None


def _timing(samples_ms: list[float], host_ms: float | None = None,
            late: float | None = None) -> Timing:
    median = statistics.median(samples_ms)
    if len(samples_ms) >= 2:
        low, _, high = statistics.quantiles(samples_ms, n=4, method="inclusive")
    else:
        low = high = median
    return Timing(median, (high - low) / median if median > 0 else 0.0, host_ms, late)


class Context:
    """Device, versions and ceilings of one run, and how each cell is timed there."""

    def __init__(self, device: torch.device, full: bool, requested_providers: set[str] | None,
                 deadline: float | None):
        self.device = device
        self.full = full
        self.requested_providers = requested_providers
        self.deadline = deadline
        self.is_cuda = device.type == "cuda"
        if self.is_cuda:
            self.device_name = torch.cuda.get_device_name(device)
        else:
            self.device_name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
        self.info = {
            "device": self.device_name,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "python": platform.python_version(),
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        self.load_at_start = _load_average()
        self.copy_gbps = self._copy_bandwidth()
        self._matmul_tflops: dict[torch.dtype, float] = {}

    def load_warning(self) -> str | None:
        """On CPU, a warning when other processes shared the cores at the start or now (the
        1-minute load average against the threads torch runs): the cells' times are then off by
        far more than their spread, and their ratios with them."""
        if self.is_cuda:
            return None
        threads = torch.get_num_threads()
        loads = [load for load in (self.load_at_start, _load_average()) if load is not None]
        if not loads or max(loads) < threads:
            return None
        return (f"WARNING: the 1-minute load average was {loads[0]:.1f} at the start and "
                f"{loads[-1]:.1f} at the end, for {threads} threads: other processes shared the "
                "cores, so these CPU times (and ratios) may be off by several times")

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def explicitly_requested(self, provider: str) -> bool:
        return self.requested_providers is not None and provider in self.requested_providers

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time(self, step: Callable[[], Any], reset: Callable[[], None],
             warmed_up: bool = False) -> Timing:
        """The Timing of step(); reset() runs before each call, untimed where possible;
        warmed_up: step() has run already (compiled, autotuned, allocated)."""
        if self.is_cuda:
            # Clearing gradients inside the timed call costs microseconds of Python, as
            # do_bench's own grad_to_none would.
            def timed():
                reset()
                step()

            return cuda_timing(timed, self.device, warmed_up=warmed_up)
        samples: list[float] = []
        spent = 0.0
        while len(samples) < CPU_MIN_REPEATS or (
                len(samples) < CPU_MAX_REPEATS and spent < CPU_REPEAT_BUDGET_S
                and not self.out_of_time()):
            reset()
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            samples.append(1e3 * elapsed)
            spent += elapsed
        return _timing(samples)

    def run_measuring_memory(self, step: Callable[[], Any]) -> tuple[Any, float | None]:
        """(step()'s result, peak extra MiB allocated during the call)."""
        if self.is_cuda:
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            result = step()
            torch.cuda.synchronize(self.device)
            return result, (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
        # The allocator's own records, one per allocation (+bytes) or free (-bytes) with its
        # time: their running sum is the memory held at each moment, its maximum the peak above
        # the start. (Per-op self memory would misplace a free that autograd attributes to a
        # parent op started before the child's allocations, and under-count the peak.)
        records = sorted(((event.start_ns(), event.nbytes())
                          for event in prof.profiler.kineto_results.events()
                          if event.name() == "[memory]"), key=lambda record: record[0])
        current = peak = 0
        for _, nbytes in records:
            current += nbytes
            peak = max(peak, current)
        return result, peak / 2**20

    def _copy_bandwidth(self) -> float:
        """GB/s of a device-to-device copy, counting the bytes read and written."""
        # 1 GiB on GPU (far beyond L2); 64 MiB on CPU (src + dst 4x a 32 MiB last-level cache).
        numel = (2**30 if self.is_cuda else 2**26) // 4
        src = torch.rand(numel, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time(lambda: dst.copy_(src), lambda: None).ms
        del src, dst
        return 2 * numel * 4 / (ms * 1e-3) / 1e9

    def matmul_ceilings(self) -> dict[str, float]:
        """{dtype name: TFLOP/s} of the matmul ceilings measured so far in this run."""
        return {DTYPE_NAMES[dtype]: tflops for dtype, tflops in self._matmul_tflops.items()}

    def matmul_tflops(self, dtype: torch.dtype) -> float:
        """TFLOP/s of a square matmul in `dtype`, measured once per run (the matrix ceiling)."""
        if dtype not in self._matmul_tflops:
            # 8192^3 saturates an H100/H200; 1024^3 takes ~0.1 s on two CPU cores.
            size = 8192 if self.is_cuda else 1024
            gen = torch.Generator(self.device).manual_seed(0)
            a = torch.randn(size, size, device=self.device, dtype=dtype, generator=gen)
            b = torch.randn(size, size, device=self.device, dtype=dtype, generator=gen)
            ms = self.time(lambda: a @ b, lambda: None).ms
            self._matmul_tflops[dtype] = 2 * size**3 / (ms * 1e-3) / 1e12
        return self._matmul_tflops[dtype]


# ----------------------------------------------------------------------------------------------
# One cell


class CudaTimeline:
    """The CUDA calls that `cuda_timing` makes, in one place (the tests stand a simulated GPU in
    for it): events, a synchronize, the L2 flush, and a hold of the GPU for a given time
    (torch.cuda._sleep, a one-thread kernel that spins for a number of SM clock cycles).

    The cycles per millisecond are calibrated by events over CALIBRATION_CYCLES, the largest
    of three spins after a first that loads the kernel, and at least the device's clock rate
    where torch reports a plausible one (at most 4x the measured rate): an SM clock below boost
    while calibrating would make every later hold short (a 3x lower clock let 1 ms of host time
    into a 0.05 ms sample, in simulation), while a count too high only makes holds longer."""

    def __init__(self, device: torch.device):
        self.device = device
        with torch.cuda.device(device):
            self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
            rates = []
            for _ in range(4):
                start, end = self.event(), self.event()
                start.record()
                torch.cuda._sleep(CALIBRATION_CYCLES)
                end.record()
                self.synchronize()
                rates.append(CALIBRATION_CYCLES / max(self.elapsed_ms(start, end), 1e-3))
        measured = max(rates[1:])
        # The reported clock in kHz is cycles per ms; a value outside 0.1-10 GHz is not that.
        clock_khz = float(getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 0)
        clock = clock_khz if 1e5 <= clock_khz <= 1e7 else 0.0
        self.cycles_per_ms = min(max(measured, clock), 4 * measured)

    def on_device(self):
        """A context in which the current device is the timeline's (events, the hold and the
        timed call's kernels then share its current stream)."""
        return torch.cuda.device(self.device)

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def reached(self, event) -> bool:
        """Whether the GPU has passed the event already."""
        return event.query()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        self._flush.zero_()

    def hold(self, ms: float) -> None:
        torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms)))


_timelines: dict[int, CudaTimeline] = {}


def _timeline(device: torch.device) -> CudaTimeline:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _timelines:
        _timelines[index] = CudaTimeline(torch.device("cuda", index))
    return _timelines[index]


def cuda_timing(run: Callable[[], Any], device: torch.device | None = None, *,
                warmed_up: bool = False, timeline: CudaTimeline | None = None) -> Timing:
    """The Timing of run() on a GPU (device, default the current one): the median of
    GPU_MIN_REPEATS to GPU_MAX_REPEATS calls (as many as fit in GPU_REPEAT_MS by a first
    estimate) after GPU_WARMUP_MS of warm-up (and a first call unless warmed_up), each timed by
    CUDA events after an L2 flush, so even inputs that fit in L2 are read from HBM, as rotating
    inputs would be.

    do_bench records the start event and then calls run(): when the host part of a call (Python,
    dispatch, Triton's launcher: ~0.1 ms) outlasts the flush (~0.08 ms), the GPU idles between
    the event and the first kernel, and the sample holds part of the host time, more or less
    from run to run (0.10 against 0.25 ms for one Triton cell at [1, 151936] in two H200 runs of
    the same commit). Here a hold (HOLD_FACTOR x the call's host time) is queued on the GPU
    before the start event, so the host has queued the call's kernels before the event fires,
    and a sample is GPU time alone. The host time of a call (host_ms) is the median of
    HOST_SAMPLES calls each made with the GPU idle (one for calls over 1 ms), so that a full
    launch queue (a GPU-bound cell's) cannot stretch it.

    A sample whose start event the GPU had passed before run() returned holds host time after
    all: the hold was too short, or run() waits for the GPU (a `.item()`, a host-side check).
    If more than LATE_LIMIT of the samples are so, the repeats run again with LATE_RETRY_FACTOR
    times the hold; the Timing's `late` is the fraction left, and above LATE_LIMIT the time is
    host-inclusive (the reports mark it)."""
    timeline = timeline or _timeline(device if device is not None else torch.device("cuda"))
    with timeline.on_device():
        return _timed_on(timeline, run, warmed_up)


def _timed_on(timeline: CudaTimeline, run: Callable[[], Any], warmed_up: bool) -> Timing:
    """cuda_timing's loop, on the timeline's device."""
    def host_ms_of_call() -> float:
        timeline.synchronize()
        start = time.perf_counter()
        run()
        return 1e3 * (time.perf_counter() - start)

    if not warmed_up:
        run()  # compiles, autotunes, allocates
    timeline.synchronize()
    start, end = timeline.event(), timeline.event()
    start.record()
    for _ in range(5):
        timeline.flush_l2()
        run()
    end.record()
    timeline.synchronize()
    estimate_ms = max(timeline.elapsed_ms(start, end) / 5, 1e-3)
    for _ in range(min(GPU_MAX_REPEATS, int(GPU_WARMUP_MS / estimate_ms))):
        run()
    host_ms = statistics.median(
        [host_ms_of_call() for _ in range(HOST_SAMPLES if estimate_ms < 1.0 else 1)])
    repeats = max(GPU_MIN_REPEATS, min(GPU_MAX_REPEATS, int(GPU_REPEAT_MS / estimate_ms)))
    hold_ms = min(HOLD_FACTOR * host_ms + HOLD_MARGIN_MS, HOLD_MAX_MS)
    for attempt in range(2):
        events = [(timeline.event(), timeline.event()) for _ in range(repeats)]
        late = 0
        timeline.synchronize()
        for start, end in events:
            timeline.flush_l2()
            timeline.hold(hold_ms)
            start.record()
            run()
            late += timeline.reached(start)
            end.record()
        timeline.synchronize()
        if late <= LATE_LIMIT * repeats or attempt == 1:
            break
        hold_ms = min(LATE_RETRY_FACTOR * hold_ms, HOLD_MAX_MS)
    return _timing([timeline.elapsed_ms(start, end) for start, end in events], host_ms,
                   late / repeats)


def make_case(ctx: Context, op: OpBench, dims: dict[str, int], dtype: torch.dtype,
              seed: int) -> Case:
    generator = torch.Generator(ctx.device).manual_seed(seed)
    inputs = op.make_inputs(dims, dtype, ctx.device, generator)
    rows = next(iter(inputs.values())).shape[0]
    if op.grad_rows is None or rows <= op.grad_rows:
        grad_rows = torch.arange(rows, device=ctx.device)
    else:
        grad_rows = torch.linspace(0, rows - 1, op.grad_rows, device=ctx.device).round().long()
    return Case(op, dims, dtype, ctx.device, inputs, grad_rows, seed)


def row_chunks(tensor: torch.Tensor):
    """Slices of dim 0 of tensor, each at most ORACLE_CHUNK_BYTES in float64 (at least one row
    each)."""
    row_bytes = 8 * max(1, tensor[:1].numel())
    step = max(1, ORACLE_CHUNK_BYTES // row_bytes)
    for start in range(0, tensor.shape[0], step):
        yield slice(start, start + step)


def _tensor_errors(value: torch.Tensor, oracle: torch.Tensor | Summed,
                   summed_terms: int) -> dict[str, float]:
    """Where the oracle is finite: err, the largest |value - oracle| (inf if value is not finite
    there), and floor, ERROR_FLOOR_ULPS ulps in value's dtype of the largest |oracle| (of the
    largest magnitude for a `Summed` oracle, as its rounding errors are); rel, the
    normwise ||value - oracle|| / ||oracle|| (||magnitude|| for a `Summed` oracle; inf likewise;
    0 / 0 is 0), and rel_floor for sums of summed_terms terms (see NORM_ERROR_FACTOR)."""
    eps = torch.finfo(value.dtype).eps
    rel_floor = ((NORM_FLOOR_ULPS + math.sqrt(summed_terms)) * torch.finfo(torch.float32).eps
                 + 0.5 * eps)
    oracle, scale = ((oracle.value, oracle.magnitude) if isinstance(oracle, Summed)
                     else (oracle, oracle))
    value = value.detach().double()
    finite = torch.isfinite(oracle)
    if not bool(finite.any()):
        return {"err": 0.0, "floor": 0.0, "rel": 0.0, "rel_floor": rel_floor}
    floor = ERROR_FLOOR_ULPS * eps * float(scale[finite].abs().max())
    diff = value[finite] - oracle[finite]
    if not bool(torch.isfinite(diff).all()):
        return {"err": math.inf, "floor": floor, "rel": math.inf, "rel_floor": rel_floor}
    norm, diff_norm = float(scale[finite].norm()), float(diff.norm())
    rel = diff_norm / norm if norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    return {"err": float(diff.abs().max()), "floor": floor, "rel": rel, "rel_floor": rel_floor}


def _errors(case: Case, mode: str, result: Sequence[torch.Tensor],
            upstream: Sequence[torch.Tensor] | None) -> dict[str, float]:
    """err_out and rel_out (and in the backward modes err_grad and rel_grad): the largest and
    the largest normwise error of the outputs (of the input gradients) against the op's float64
    oracle, over those tensors; floor_out, rel_floor_out (floor_grad, rel_floor_grad): the
    largest floors of those tensors (check_errors uses eager's); and under PER_TENSOR each
    tensor's own, {"out": [...], "grad": [...]}, for the verdict. ValueError when the provider
    returned other outputs than the op's (fewer, more, or of other shapes): no verdict could
    see what is missing."""
    outs64 = case.cached("outputs", lambda: case.op.output_oracle(case))
    if len(result) != len(outs64):
        raise ValueError(f"the provider returned {len(result)} output(s), "
                         f"{case.op.name} has {len(outs64)}")
    for index, (out, ref) in enumerate(zip(result, outs64)):
        expected = (ref.value if isinstance(ref, Summed) else ref).shape
        if out.shape != expected:
            raise ValueError(f"the provider's output {index} has shape {tuple(out.shape)}, "
                             f"{case.op.name}'s is {tuple(expected)}")
    terms = case.op.summed_terms(case.dims)
    found = {"out": [_tensor_errors(out, ref, terms) for out, ref in zip(result, outs64)]}
    if mode != "fwd":
        # Every provider gets the same upstream gradients (upstream_like: seeded, one shape).
        grads64 = case.cached("gradients", lambda: case.op.grad_oracle(case, upstream))
        found["grad"] = []
        for name, ref in grads64.items():
            rows, ref = ref if isinstance(ref, tuple) else (case.grad_rows, ref)
            found["grad"].append(
                _tensor_errors(case.inputs[name].grad.index_select(0, rows), ref, terms))
    fields = {PER_TENSOR: found}
    for quantity, per_tensor in found.items():
        for field in ("err", "floor", "rel", "rel_floor"):
            fields[f"{field}_{quantity}"] = max(errors[field] for errors in per_tensor)
    return fields


def _tensor_pairs(errors: dict, baseline: dict, quantity: str) -> list[tuple[str, dict, dict]]:
    """(label, this provider's errors, eager's errors and floors) per tensor of the quantity
    ("out" or "grad"), each as _tensor_errors gives them: tensor by tensor where both have
    PER_TENSOR lists of one length, else the maxima over the tensors (errors given without
    PER_TENSOR)."""
    mine, base = errors.get(PER_TENSOR, {}).get(quantity), baseline.get(PER_TENSOR, {}).get(
        quantity)
    if mine is not None and base is not None and len(mine) == len(base):
        if len(mine) == 1:
            return [(quantity, mine[0], base[0])]
        return [(f"{quantity}[{index}]", m, b) for index, (m, b) in enumerate(zip(mine, base))]

    def maxima(fields):
        return {field: fields.get(f"{field}_{quantity}")
                for field in ("err", "floor", "rel", "rel_floor")}

    return [(quantity, maxima(errors), maxima(baseline))]


def check_errors(errors: dict, baseline: dict | str) -> dict:
    """The verdict on a provider's errors given eager's on the same cell (with its floors) or why
    eager has none, output by output and input gradient by input gradient (`_tensor_pairs`):
    each tensor's largest error within max(ERROR_FACTOR x eager's on that tensor, eager's floor
    there) and its normwise error within max(NORM_ERROR_FACTOR x eager's, its floor), so that
    one output's larger errors (the log-probs') do not widen another's (the entropy's) tolerance.
    Returns check "ok" or "FAIL" with the tolerances of the tensor nearest to (or furthest past)
    its tolerance, tol_out and tol_grad, tol_rel_out and tol_rel_grad, and for a FAIL the
    reason; or check "unchecked" and why. A non-finite error always fails. (A baseline without
    normwise errors, from an older run, skips that verdict.)"""
    if isinstance(baseline, str):
        return {"check": "unchecked", "reason": f"not checked: {baseline}"}
    fields = {"check": "ok"}
    failures = []
    for quantity in ("out", "grad"):
        if errors.get(f"err_{quantity}") is None:
            continue
        pairs = _tensor_pairs(errors, baseline, quantity)
        if not all(math.isfinite(base["err"]) for _, _, base in pairs):
            return {"check": "unchecked",
                    "reason": f"not checked: eager's {quantity} is not finite on this cell"}
        for kind, factor, floor, name, prefix in (
                ("err", ERROR_FACTOR, "floor", "tol", ""),
                ("rel", NORM_ERROR_FACTOR, "rel_floor", "tol_rel", "normwise ")):
            binding = None  # (error / tolerance, tolerance) of the tensor nearest its tolerance
            for label, mine, base in pairs:
                error, base_error = mine.get(kind), base.get(kind)
                if error is None or base_error is None:
                    continue
                tolerance = max(factor * base_error, base.get(floor) or 0.0)
                ratio = error / tolerance if tolerance > 0 and error == error else math.inf
                if binding is None or ratio > binding[0]:
                    binding = (ratio, tolerance)
                if not error <= tolerance:  # NaN fails too
                    failures.append(f"{prefix}{kind}_{label} {error:.1e} > tolerance "
                                    f"{tolerance:.1e} (eager's {base_error:.1e})")
            if binding is not None:
                fields[f"{name}_{quantity}"] = binding[1]
    if failures:
        fields.update(check="FAIL", reason="wrong result: " + "; ".join(failures))
    return fields


def upstream_like(outputs: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Random upstream gradients, the same for every provider whose outputs have these shapes."""
    grads = []
    for index, out in enumerate(outputs):
        gen = torch.Generator(out.device).manual_seed(seed + 1000 + index)
        grads.append(torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=gen))
    return grads


def _set_requires_grad(case: Case, flag: bool) -> None:
    for name in case.op.grad_inputs:
        case.inputs[name].requires_grad_(flag)
        case.inputs[name].grad = None


def _clear_grads(case: Case) -> None:
    for name in case.op.grad_inputs:
        case.inputs[name].grad = None


def measure(ctx: Context, case: Case, provider: Provider, mode: str, timed: bool = True) -> dict:
    """Measure one cell. Returns the measured fields, with the floors of `_errors` for a provider
    that compares; raises Skip or any error. Untimed: only the errors and floors (run once)."""
    forward = provider.build(case)
    upstream = None
    outs = None
    if mode == "fwd":
        _set_requires_grad(case, False)

        def step():
            with torch.no_grad():
                return forward()
    else:
        _set_requires_grad(case, True)
        if mode == "bwd":
            outs = forward()
            if provider.name not in case.upstream_cache:
                case.upstream_cache[provider.name] = upstream_like(outs, case.seed)
            upstream = case.upstream_cache[provider.name]

            def step():
                torch.autograd.backward(outs, upstream, retain_graph=True)
                return outs
        else:
            # Made on the first call from the outputs' shapes, unless bwd already made them.
            upstream = case.upstream_cache.get(provider.name)

            def step():
                nonlocal upstream
                result = forward()
                if upstream is None:
                    upstream = upstream_like(result, case.seed)
                    case.upstream_cache[provider.name] = upstream
                torch.autograd.backward(result, upstream)
                return result

    if not timed:
        result = step()
        errors = _errors(case, mode, result, upstream) if provider.compares else {}
        _clear_grads(case)
        return errors
    if ctx.is_cuda:  # warm up apart: JIT compilation and autotuning allocate memory too
        step()
        ctx.synchronize()
        _clear_grads(case)
    made_upstream = mode == "fwd+bwd" and upstream is None
    result, peak_mib = ctx.run_measuring_memory(step)
    if made_upstream:  # the upstream gradients stand for an input: not the provider's memory
        peak_mib -= sum(u.numel() * u.element_size() for u in upstream) / 2**20
    ctx.synchronize()
    errors = _errors(case, mode, result, upstream) if provider.compares else {}
    del result
    timing = ctx.time(step, lambda: _clear_grads(case), warmed_up=True)
    ms = timing.ms
    _clear_grads(case)
    del outs, step
    nbytes, flops = case.op.traffic(case.dims, case.dtype, mode)
    gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
    tflops = flops / (ms * 1e-3) / 1e12 if flops else None
    if case.op.bound == "compute":
        ceiling = ctx.matmul_tflops(case.dtype)
        fraction = tflops / ceiling if tflops else None
    else:
        ceiling = ctx.copy_gbps
        fraction = gbps / ceiling if gbps else None
    return {"time_ms": ms, "spread": timing.spread, "host_ms": timing.host_ms,
            "late": timing.late, "gbps": gbps,
            "tflops": tflops, "frac_ceiling": fraction, "ceiling": ceiling,
            "peak_extra_mib": peak_mib, **errors}


def _release_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.is_cuda:
        torch.cuda.empty_cache()


def _collect_all_and_freeze() -> None:
    """A full collection, then gc.freeze(): what survives it (the imports, the caches of
    compiled kernels and graphs) is left out of later collections until the next call. The
    collections of every cell (two each) then scan only the objects made since, instead of every
    object of torch, Triton and Inductor: 0.14 s a collection otherwise on the 2-core
    development machine, over a third of a small CPU cell's time; unfreezing first lets a cache
    entry dropped since be collected too."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# Host memory a CPU case may need, in multiples of the largest tensor eager forms (the logits)
# in fp32 or its inputs, whichever is more: eager's fp32 copies of the logits, softmax,
# log-softmax and their product, and the gradient (a CPU run out of memory is killed, not
# skipped).
CPU_MEMORY_FACTOR = 8


def _available_host_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _case_fits(ctx: Context, op: OpBench, dims, dtype) -> str | None:
    """None, or why the inputs of this case (and what the providers build from them) would not
    fit in this device's free memory."""
    need = op.input_numel(dims) * dtype.itemsize
    if not ctx.is_cuda:
        available = _available_host_bytes()
        largest = max(need, op.eager_numel(dims) * 4)  # bytes: eager works in fp32
        if available is not None and CPU_MEMORY_FACTOR * largest > available:
            return (f"out of host memory: eager's largest tensor takes {largest / 2**30:.1f} GiB "
                    f"and eager about {CPU_MEMORY_FACTOR}x that, {available / 2**30:.1f} GiB "
                    "available")
        return None
    free, _ = torch.cuda.mem_get_info(ctx.device)
    # The inputs plus a gradient of the same size must fit, with a margin for the providers.
    if 2.5 * need > free:
        return f"out of GPU memory: inputs need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _baseline(ctx: Context, case: Case, mode: str, baselines: dict[str, dict | str]) -> dict | str:
    """Eager's errors and floors on this case and mode, or why there are none. Eager's own
    cell runs before the others of its mode and fills `baselines`; where this run does not
    measure it (filtered out by --providers, or kept from --resume), eager runs once here,
    untimed."""
    if mode not in baselines:
        eager = next(p for p in case.op.providers() if p.name == BASELINE)
        try:
            baselines[mode] = measure(ctx, case, eager, mode, timed=False)
        except Exception as exc:  # the provider's row stands; only its verdict is missing
            baselines[mode] = f"eager failed on this cell ({_one_line(exc)})"
        finally:
            _clear_grads(case)
            _release_memory(ctx)
    return baselines[mode]


def case_seed(row: dict) -> int:
    """The inputs' seed of a case (op, shape, dtype): the same whatever else the run measures
    (filters, --resume), and in every run."""
    return zlib.crc32(f"{row['op']} {row['shape']} {row['dtype']}".encode()) & 0x7FFFFFFF


def cell_key(row: dict) -> tuple[str, str, str, str, str]:
    """What names a cell: (op, shape, dtype, mode, provider)."""
    return row["op"], row["shape"], row["dtype"], row["mode"], row["provider"]


def run_cells(ctx: Context, plan: list[tuple[OpBench, dict, torch.dtype, list[str],
                                             list[Provider]]], on_row: Callable[[dict], None],
              progress, done: frozenset = frozenset()) -> list[dict]:
    """Run every cell of the plan: [(op, dims, dtype, modes, providers)], but those whose
    `cell_key` is in done (measured by an earlier run: no row for them). Returns the rows."""
    rows = []
    _collect_all_and_freeze()
    try:
        for op, dims, dtype, modes, providers in plan:
            base = {"op": op.name, "shape": shape_label(dims), "dtype": DTYPE_NAMES[dtype],
                    **{f"dim_{k}": v for k, v in dims.items()}}
            cells = [(mode, provider) for mode in modes for provider in providers
                     if cell_key({**base, "mode": mode, "provider": provider.name}) not in done]
            if not cells:
                continue
            case = None
            baselines: dict[str, dict | str] = {}  # mode -> eager's errors and floors, or why none
            case_skip = _case_fits(ctx, op, dims, dtype)
            if case_skip is None and not ctx.out_of_time():
                try:
                    case = make_case(ctx, op, dims, dtype, seed=case_seed(base))
                except torch.cuda.OutOfMemoryError:
                    case_skip = "out of GPU memory allocating the inputs"
            for mode, provider in cells:
                cell_started = time.perf_counter()
                row = {**base, "mode": mode, "provider": provider.name, "status": "ok",
                       "reason": ""}
                progress.set_postfix_str(f"{op.name} {base['shape']} {base['dtype']} {mode} "
                                         f"{provider.name}", refresh=False)
                reason = (case_skip or provider.modes_not_offered.get(mode)
                          or provider.unavailable(ctx))
                if reason is None and ctx.out_of_time():
                    reason = "the run's time budget (--max-seconds) was spent"
                if reason is None and case is None:
                    reason = "inputs were not built"
                if reason is not None:
                    row.update(status="skipped", reason=reason)
                else:
                    try:
                        fields = measure(ctx, case, provider, mode)
                        floors = {k: fields.pop(k) for k in (
                            "floor_out", "floor_grad", "rel_floor_out", "rel_floor_grad",
                            PER_TENSOR) if k in fields}
                        row.update(fields)
                        if provider.name == BASELINE:
                            baselines[mode] = {**fields, **floors}
                            row["check"] = "ref"
                        elif provider.compares:
                            row.update(check_errors({**fields, **floors},
                                                    _baseline(ctx, case, mode, baselines)))
                    except Skip as exc:
                        row.update(status="skipped", reason=str(exc))
                    except BackendUnavailableError as exc:
                        row.update(status="skipped", reason=str(exc))
                    except torch.cuda.OutOfMemoryError:
                        row.update(status="skipped", reason="out of GPU memory")
                    except Exception as exc:  # report it in the table; keep measuring the rest
                        row.update(status="error", reason=_one_line(exc))
                    finally:
                        if case is not None:
                            _set_requires_grad(case, False)
                        _release_memory(ctx)
                if provider.name == BASELINE and row["status"] != "ok":  # no second try per cell
                    baselines[mode] = f"eager's own cell was {row['status']} ({row['reason']})"
                row["cell_s"] = time.perf_counter() - cell_started
                rows.append(row)
                on_row(row)
                progress.update(1)
            del case
            _collect_all_and_freeze()
            _release_memory(ctx)
    finally:  # leave the process as it was (run_cells also runs inside the tests)
        gc.unfreeze()
    return rows
