#!/usr/bin/env bash
# The one script to run on a GPU machine (H100 / H200): records the machine, builds the compiled
# extension, runs the GPU tests, then the headline benchmarks of the issues, and writes what it
# found to an output folder. Each step runs under `timeout` within a total budget
# (GPU_CHECK_SECONDS, default 470 s), so one hang or a slow build cannot eat the machine's lease;
# so do the probes before them (nvidia-smi, torch, the backends: PROBE_SECONDS each), so a wedged
# GPU cannot hang an unattended run. A failed step is logged and the next one runs (no `set -e`);
# the script exits 1 at the end if any step failed or was not run because the budget was spent
# (both listed on the last lines of run.log), and at once if torch sees no GPU.
#
# A tree copied without .git cannot name its commit: set EM_KERNELS_COMMIT (every step and every
# benchmark row records it), e.g. EM_KERNELS_COMMIT=$(git rev-parse --short=12 HEAD) before copying.
#
# The build step takes a minute or more of the lease; bench/prebuild_for_gpu.sh makes the same
# build on a machine without a GPU, into .gpu_prebuilt/, which this script then uses where it
# fits this machine (step 1). Send .gpu_prebuilt along with the tree, and peers' wheels in .whl/
# (TRL, verl: installed for this run, without their dependencies).
#
#   bench/gpu_check.sh [OUT_DIR]        OUT_DIR defaults to $OUT, else bench_out/gpu_check/
#
# A rerun on the same machine can pick steps, for example after a timed-out step:
#   GPU_CHECK_STEPS="bench_headline_compile decode bench_sweep" bench/gpu_check.sh
# Steps: build timing tests bench_headline bench_linear bench_policy bench_decode_ops
# bench_headline_compile decode bench_sweep, and only when named: tune (bench/tune.py) and
# bench_full (the whole --full sweep).
# PYTHON overrides the interpreter (default python3).
#
# Writes at most 8 files, flat, into OUT_DIR (rewritten after every step, so a run killed
# midway still leaves its results):
#   run.log          machine, versions, backends, and one line per step (exit code, seconds)
#   build.log        the extension build          tests.log     the GPU tests
#   bench.md         every benchmark's markdown summary, concatenated
#   bench.csv        every benchmark cell, one CSV (device, versions, commit on each row)
#   bandwidth.png    achieved bandwidth vs V of the entropy sweep
#   tune.json        the tuning sweep's rows (step tune only)
#   logs.tar.gz      everything else: each step's full output, per-step CSVs and plots
set -u

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/bench_out/gpu_check}}"
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$REPO" || exit 1
WORK="$(mktemp -d)"
PEERS="$WORK-peers"  # carried peers, installed after the build (outside logs.tar.gz)
# Bash runs this on every exit, a TERM or INT included (not a KILL): no temporary folder is left.
trap 'rm -rf "$WORK" "$PEERS"' EXIT
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# Every step imports the tree from here: installed by the build step (editable, this folder) or
# with a prebuilt extension copied into it (step 1), and in the subprocesses the tests start.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BUDGET="${GPU_CHECK_SECONDS:-470}"
START=$(date +%s)
LOG="$OUT_DIR/run.log"
: > "$LOG"
FAILED=""
NOT_RUN=""
# A probe answers in seconds on a healthy machine (torch's CUDA init included); longer is a hang.
PROBE_SECONDS=60

say() { echo "$*" | tee -a "$LOG"; }

# Bundle what exists so far into OUT_DIR (called after every step).
collect() {
    cp -f "$WORK/build.log" "$OUT_DIR/build.log" 2>/dev/null
    cp -f "$WORK/tests.log" "$OUT_DIR/tests.log" 2>/dev/null
    : > "$OUT_DIR/bench.md"
    rm -f "$OUT_DIR/bench.csv"
    for dir in "$WORK"/bench_*/; do
        [ -d "$dir" ] || continue
        if [ -f "$dir/results.md" ]; then
            { echo "<!-- $(basename "$dir") -->"; cat "$dir/results.md"; echo; } >> "$OUT_DIR/bench.md"
        fi
        # -s: em-bench creates an empty results.csv before it measures (to fail early on an
        # unwritable --out); a step that stopped there has no header to copy.
        if [ -s "$dir/results.csv" ]; then
            if [ -f "$OUT_DIR/bench.csv" ]; then
                tail -n +2 "$dir/results.csv" >> "$OUT_DIR/bench.csv"
            else
                cp "$dir/results.csv" "$OUT_DIR/bench.csv"
            fi
        fi
    done
    cp -f "$WORK/bench_sweep/bandwidth.png" "$OUT_DIR/bandwidth.png" 2>/dev/null
    cp -f "$WORK/tune.json" "$OUT_DIR/tune.json" 2>/dev/null
    tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" . 2>/dev/null
}

# clip LIMIT: LIMIT, or the seconds left of the budget (less 10 for the last collect) if fewer.
clip() {
    local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
    if [ "$1" -gt "$left" ]; then echo "$left"; else echo "$1"; fi
}

# step NAME LIMIT_SECONDS COMMAND...: run under timeout, never past the total budget.
step() {
    local name=$1 limit
    limit=$(clip "$2")
    shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        say "== $name: not selected (GPU_CHECK_STEPS)"
        return
    fi
    if [ "$limit" -lt 20 ]; then
        say "== $name: not run (the ${BUDGET}s budget is spent)"
        NOT_RUN="$NOT_RUN $name"
        return
    fi
    say "== $name: start $(date -u +%H:%M:%S), limit ${limit}s"
    local t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    local verdict="rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="rc=$rc (timed out)"
    say "== $name: $verdict after $(( $(date +%s) - t0 ))s"
    if [ "$rc" -ne 0 ]; then
        FAILED="$FAILED $name"
        tail -n 15 "$WORK/$name.log" | sed 's/^/   | /' >> "$LOG"
    fi
    collect
}

bench() {  # bench NAME LIMIT em-bench-arguments...
    local name=$1 limit
    limit=$(clip "$2")
    shift 2
    # em-bench stops starting cells this long before the step's limit and still writes its
    # reports: a cell started just before then, and the exit, must fit (the exit after torch.compile
    # cells took over 6 s on the H200 on 2026-11-28, and a compile cell compiles first).
    local margin=$(( limit >= 120 ? 30 : 15 ))
    [[ "$name" == *compile* ]] && margin=30
    step "bench_$name" "$limit" "$PY" -m bench --device cuda --out "$WORK/bench_$name" \
        --max-seconds $(( limit - margin )) "$@"
}

COMMIT="${EM_KERNELS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)}"
say "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') commit ${COMMIT:-unknown}"
[ -n "$COMMIT" ] || say "# WARNING: no .git and no EM_KERNELS_COMMIT: results will say commit unknown"
export EM_KERNELS_COMMIT="${COMMIT:-unknown}"
probe() {  # probe COMMAND...: run it for at most PROBE_SECONDS, its output into run.log
    timeout --kill-after=10 "$PROBE_SECONDS" "$@" >> "$LOG" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && say "# probe timed out after ${PROBE_SECONDS}s: $*"
    return "$rc"
}
if ! probe "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "# FAILED: torch sees no CUDA device (or hung looking for one); nothing to check here"
    exit 1
fi
probe nvidia-smi
probe nvidia-smi --format=csv \
    --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version
probe "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
print("nproc", __import__("os").cpu_count())
EOF

# 1. The compiled extension (CUDA part for sm_90a only: the build time is the budget's largest
#    item), required: a machine without nvcc fails the step instead of building the CPU part
#    only. Without ninja, torch compiles file by file (slow): logged. If the build fails, the run
#    goes on with the Triton kernels.
#    A build carried in .gpu_prebuilt/ (bench/prebuild_for_gpu.sh, made on a machine without a
#    GPU) is used instead where its id (bench/prebuilt.py) is this machine's and it loads with
#    its CUDA ops: copied beside the sources (nothing is installed). Otherwise, say why and build.
use_prebuilt() {
    [ -f .gpu_prebuilt/build-id ] || return 1  # none carried
    local want have
    if ! want="$(timeout "$PROBE_SECONDS" "$PY" -m bench.prebuilt)"; then
        say "# bench.prebuilt could not name this machine's build: building instead"
        return 1
    fi
    have="$(cat .gpu_prebuilt/build-id)"
    if [ "$have" != "$want" ]; then
        say "# .gpu_prebuilt is for: $have; this machine wants: $want: building instead"
        return 1
    fi
    if ! cp -f .gpu_prebuilt/_C*.so em_kernels/ 2>> "$LOG"; then
        say "# could not copy .gpu_prebuilt's extension: building instead"
        return 1
    fi
    probe "$PY" -c "import sys, em_kernels
sys.exit(em_kernels.available_backends()['cuda'] != 'available')" && return 0
    say "# the extension in .gpu_prebuilt does not give the cuda backend here: building instead"
    return 1
}
probe bash -c 'command -v nvcc && nvcc --version | tail -n 1
               "$0" -m ninja --version || echo "no ninja"' "$PY"
if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" build "* ]]; then
    say "== build: not selected (GPU_CHECK_STEPS)"
elif use_prebuilt; then
    say "== build: the prebuilt extension of .gpu_prebuilt ($(cat .gpu_prebuilt/build-id))"
else
    ARCHS="$(timeout "$PROBE_SECONDS" "$PY" -m bench.prebuilt --archs)" \
        || say "# bench.prebuilt --archs failed: building for setup.py's default architectures"
    # The step first removes any extension an earlier call left in the tree (a prebuilt one, or
    # another commit's): if the build fails, the later steps run without one, never a stale one.
    step build 200 bash -c 'rm -f em_kernels/_C*.so && exec "$@"' fresh-build \
        env MAX_JOBS=16 ${ARCHS:+TORCH_CUDA_ARCH_LIST=$ARCHS} EM_KERNELS_REQUIRE_CUDA=1 \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
probe "$PY" -c "import em_kernels, json
print('backends:', json.dumps(em_kernels.available_backends(), indent=1))"
# Peers the machine lacks (TRL, verl), sent along as wheels in .whl/ (ignored by git): installed
# without their dependencies into this run's own folder, ahead of the machine's packages, for
# em-bench's trl and verl rows (bench/ops/linear_entropy.py loads verl's kernel without verl's
# dependencies and stands in for the one context TRL's fused backward takes from its trainers').
if compgen -G ".whl/*.whl" > /dev/null; then
    if probe "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$PEERS" .whl/*.whl; then
        export PYTHONPATH="$REPO:$PEERS${PYTHONPATH#"$REPO"}"
        say "# peers from .whl:" .whl/*.whl
    else
        say "# the wheels in .whl did not install (above): their rows will say not installed"
    fi
fi
# 1b. em-bench's GPU timing (harness.cuda_timing, new on 2026-11-29 and tested only against a
#     simulated GPU before): its hold, and a host-heavy call timed as its kernel alone (~10 s).
#     If it fails, the benchmark steps still run, but read their times with its log.
step timing 60 "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_bench.py \
    -k test_cuda_timing_on_a_real_gpu

# 2. The GPU tests (313 ids at 29c60f5; 261 took 105 s in run C, ~110 s in run E): every test
#    whose id names cuda (the CPU ones ran in CI), on 8 workers when pytest-xdist is installed
#    (most of their time is Triton compiling, one process each), each test capped at 60 s when
#    pytest-timeout is (a hang shows as one failure, not a lost step). 240 s since the
#    linear_entropy backward became a matmul kernel (6141ba8), whose variants compile slower
#    than the elementwise kernel's did; 270 s since linear_entropy_loss's tests (~25 ids).
WORKERS=""
timeout "$PROBE_SECONDS" "$PY" -c "import xdist" 2>/dev/null && WORKERS="-n 8"
timeout "$PROBE_SECONDS" "$PY" -c "import pytest_timeout" 2>/dev/null \
    && WORKERS="$WORKERS --timeout 60"
# shellcheck disable=SC2086
step tests 270 "$PY" -m pytest -q -rfE --tb=short $WORKERS -m 'not distributed' -k cuda \
    -p no:cacheprovider tests/

# 3. The headline cells: entropy and logprobs_and_entropy, bf16 [8192, 151936], and the same
#    8192 rows as an RL trainer passes them, logits[:, :-1] of [8, 1025, 151936] (read in place
#    since f9d27b7: +8 cells, ~10 s). torch.compile runs in its own step (step 6): its
#    compilations must not starve our kernels' cells. TRL's kernel on logits (trl, where TRL is
#    installed, e.g. from carried wheels: 4 cells, an estimated 15 s) is the nearest peer.
HEADLINE=(--ops entropy logprobs_and_entropy logprobs_and_entropy_shifted
          --shapes N8192-V151936 B8-T1024-V151936 --dtypes bf16 --modes fwd fwd+bwd)
bench headline 90 "${HEADLINE[@]}" --providers triton cuda eager chunked trl
# 4. The fused LM head at the issue's two shapes (H 3584 and H 896), every provider but
#    torch.compile (its compiles would take the step's budget; bench_full has it), with
#    linear_entropy_loss on both entropy backends (8 cells more: +25 s), and TRL's and verl's
#    fused LM heads where installed (4 cells each, an estimated 25 s each; verl's kernel loads
#    without verl's dependencies, so its wheel alone, installed --no-deps, is enough).
bench linear 145 --ops linear_entropy --dtypes bf16 --modes fwd fwd+bwd \
    --providers matmul eager chunked triton triton-loss cuda-loss liger cce trl verl
# 4b. The fused PPO/GRPO loss (linear_policy_loss) at the same shapes beside eager, chunked and
#    Liger's fused linear GRPO loss: fwd+bwd only (the loss computes its gradients in the
#    forward; 2 shapes x 6 providers, ~40 s with eager's two [M, V] passes).
bench policy 45 --ops linear_policy_loss --dtypes bf16 --modes fwd+bwd \
    --providers matmul eager chunked triton cuda liger
# 5. EM-INF (5 steps, never exiting early) and adaptive temperature at B 1, 16, 64 (V 151936).
bench decode_ops 35 --ops em_inf_adjust adaptive_temperature --shapes V151936
# 6. torch.compile at the headline cells: the yardstick of issue 2's goals, from the same device
#    (6 cells with the shifted op's 2, the largest input, which runs last: 85 s, not 60).
bench headline_compile 85 "${HEADLINE[@]}" --providers compile
# 7. generate() on a Qwen2.5-7B-shaped model: plain, with our EM-INF processor, with the
#    released code's loop (end to end, and each processor alone per call), and em_inf_adjust
#    alone per call, host included (issue 6's batch-1 goal is per call).
if [ -f bench/decode.py ]; then
    step decode 70 "$PY" -m bench.decode --qwen7b --json "$WORK/decode.json"
fi
# 8. A V / N sweep of entropy forward for the plot (our kernels and eager; compile compiles
#    once per shape, too slow for this budget). V 50257 (GPT-2's) is odd: its bf16 rows start
#    at every offset from a 16-byte boundary, which the CUDA forward reads through `realign`.
bench sweep 30 --full --ops entropy --dtypes bf16 --modes fwd --providers eager triton cuda \
    --shapes N1-V151936 N64-V151936 N4096-V32000 N4096-V50257 N4096-V128256 N4096-V151936 \
    N4096-V262144 N16384-V151936
# 9. Only when named in GPU_CHECK_STEPS: the tuning sweep of the Triton kernels' constants
#    (bench/tune.py: entropy, linear_entropy's forward, em_inf, linear_entropy_loss's row
#    chunk, linear_entropy's backward chunk, then its backward tiles at the headline shapes,
#    ~5 minutes; tune.json keeps every row measured before a cut).
#    GPU_CHECK_TUNE_OPS picks its sweeps (bench.tune's --ops), e.g. "em_inf linear_entropy_bwd".
if [[ " ${GPU_CHECK_STEPS:-} " == *" tune "* ]]; then
    # shellcheck disable=SC2086
    step tune 300 "$PY" -m bench.tune --json "$WORK/tune.json" \
        ${GPU_CHECK_TUNE_OPS:+--ops $GPU_CHECK_TUNE_OPS}
fi
# 10. Only when named in GPU_CHECK_STEPS (it wants a run of its own): the whole `em-bench --full`
#    sweep, every op, shape, dtype, mode and provider, for as long as the budget lasts (the
#    cells it could not start are listed in its report), e.g.
#    GPU_CHECK_STEPS="build timing bench_full" GPU_CHECK_SECONDS=560 bench/gpu_check.sh
#    It takes longer than one lease: GPU_CHECK_RESUME=CSV (an earlier run's bench.csv of this
#    step, on the same device kind, e.g. committed as bench/sweeps/h200-full.csv) keeps that
#    run's measured cells and measures the rest; its bench.csv then replaces CSV.
if [[ " ${GPU_CHECK_STEPS:-} " == *" bench_full "* ]]; then
    bench full 2000 --full ${GPU_CHECK_RESUME:+--resume "$GPU_CHECK_RESUME"}
fi

collect
say "# done in $(( $(date +%s) - START ))s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
[ -z "$FAILED" ] || say "# FAILED steps:$FAILED"
[ -z "$NOT_RUN" ] || say "# NOT RUN steps (the ${BUDGET}s budget was spent):$NOT_RUN"
if [ -n "$FAILED$NOT_RUN" ]; then
    exit 1
fi
