"""Public EM-INF ops: `em_inf_adjust` (the paper's decode-time logit optimisation) and
`adaptive_temperature` (the paper's baseline). See em_kernels/_ops/em_inf.py for the ops and
em_kernels/triton/em_inf.py for the kernels' design."""

from __future__ import annotations

import functools

import torch

from . import _checks
from ._backend import BackendUnavailableError, available_backends, resolve_backend
from ._ops.em_inf import (
    adaptive_temperature_impl,
    adaptive_temperature_op,
    em_inf_adjust_impl,
    em_inf_adjust_op,
)

_OPTIMIZERS = ("adam", "sgd")
# The compiled kernels' bound on steps and max_iters (em/em_inf_checks.h), checked here for every
# backend.
MAX_STEPS = 2**30
# The Triton kernel's bound on steps (em_kernels/triton/em_inf.py): its pass t replays t updates,
# so a call costs steps^2 / 2 updates per entry (2000x the work of 5 steps at 256), and each
# program holds the row's history as four vectors of next_power_of_2(steps) floats (8 registers
# a thread each at 256 with 4 warps; Triton caps a vector at 2^20 entries). The CUDA kernel keeps
# its history in memory, so it takes any count: linear in steps while the batch fits on chip
# (below), and replaying as Triton does beyond. The CPU kernel is linear in steps. The paper
# runs 3-5 steps.
TRITON_MAX_STEPS = 256
_EARLY_EXITS = ("row", "batch")


def _resolve(backend: str, device: torch.device, op_name: str) -> str:
    """Like resolve_backend, and the compiled backends must also carry this op's kernels (the
    extension may have been built before they existed): "auto" then falls back, an explicit
    "cpu"/"cuda" raises BackendUnavailableError."""
    resolved = resolve_backend(backend, device)
    if resolved not in ("cpu", "cuda"):
        return resolved
    return _compiled_or_fallback(backend, resolved, device.type, op_name)


# torch.compile bakes the answer into the graph (the dispatcher query is not traceable).
@torch.compiler.assume_constant_result
def _compiled_or_fallback(backend: str, resolved: str, device_type: str, op_name: str) -> str:
    return _compiled_or_fallback_cached(backend, resolved, device_type, op_name)


@functools.lru_cache(maxsize=64)
def _compiled_or_fallback_cached(backend: str, resolved: str, device_type: str, op_name: str) -> str:
    key = "CPU" if resolved == "cpu" else "CUDA"
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"em_C::{op_name}", key):
        return resolved
    if backend != "auto":
        raise BackendUnavailableError(
            f'backend="{backend}" is unavailable: the compiled extension has no {key} kernel for '
            f"{op_name} (rebuild it)")
    if device_type == "cuda" and available_backends()["triton"] == "available":
        return "triton"
    return "torch"


# backend="auto" on CUDA, em_inf_adjust only. Measured on an H200, V 151936, 5 steps, fp32 logits
# (2026-11-27, em-bench, run E of bench/RESULTS.md): cuda 0.035 ms at batch 1 (state on chip), but
# 0.22 ms at 16 and 0.70 ms at 64 rows (replay), where triton took 0.27 ms at 1, 0.20 ms at 16 and
# 0.29 ms at 64. So "auto" keeps the CUDA kernel while the batch fits its on-chip placement
# and takes Triton beyond. The fit is estimated conservatively, without asking the device for more
# than its SM count: 4 segments of 2048 entries (128 KB of state) per SM, i.e. 7 rows at V 151936
# on 132 SMs; the kernel itself holds up to 7 segments per SM (227 KB of shared memory on an
# H100/H200), 12 rows there. Both backends are batch-invariant on their own, but "auto" then picks
# by batch size: a row can differ in the last bits between batches on either side of the switch
# (each within the oracle tolerance). Pass backend="cuda" or "triton" for bitwise batch
# invariance across all batch sizes.
_ON_CHIP_SEGMENT = 2048
_ON_CHIP_SEGMENTS_PER_SM = 4


def em_inf_backend(logits: torch.Tensor, backend: str = "auto", steps: int = 5) -> str:
    """The backend that em_inf_adjust runs for ``logits`` ((..., V), read for its device and
    shape only) and ``steps`` when asked for ``backend``: "auto" on CUDA picks by batch size
    (see above), and for more steps than the Triton kernel takes (TRITON_MAX_STEPS) the CUDA
    kernel, or "torch" where the extension has none. Raises BackendUnavailableError where an
    explicit backend cannot run, ValueError where an explicit "triton" would get too many
    steps."""
    chosen = backend
    if backend == "auto" and logits.device.type == "cuda" and _has_cuda_kernel("em_inf_adjust"):
        device_index = logits.device.index
        if device_index is None:
            device_index = torch.cuda.current_device()
        vocab = int(logits.shape[-1])
        rows = logits.numel() // vocab if vocab else 0
        chosen = ("cuda" if steps > TRITON_MAX_STEPS
                  else _em_inf_cuda_backend(device_index, rows, vocab))
    resolved = _resolve(chosen, logits.device, "em_inf_adjust")
    if resolved == "triton" and steps > TRITON_MAX_STEPS:
        if backend == "auto":
            return "torch"  # no compiled CUDA kernel here: plain PyTorch takes any count
        raise ValueError(
            f"steps={steps}: the Triton EM-INF kernel takes at most {TRITON_MAX_STEPS} steps (it "
            "replays every earlier step in each pass, so its cost grows as steps^2); pass "
            'backend="auto", which picks a backend that takes them, "cuda" (CUDA tensors, with '
            'the compiled extension; it replays too once the batch outgrows the chip), "cpu" or '
            '"torch"')
    return resolved


@torch.compiler.assume_constant_result
def _em_inf_cuda_backend(device_index: int, rows: int, vocab: int) -> str:
    return _em_inf_cuda_backend_cached(device_index, rows, vocab)


@functools.lru_cache(maxsize=256)
def _em_inf_cuda_backend_cached(device_index: int, rows: int, vocab: int) -> str:
    if available_backends()["triton"] != "available":
        return "cuda"
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    segments = rows * -(-vocab // _ON_CHIP_SEGMENT)
    return "cuda" if segments <= _ON_CHIP_SEGMENTS_PER_SM * sms else "triton"


@torch.compiler.assume_constant_result
def _has_cuda_kernel(op_name: str) -> bool:
    return _has_cuda_kernel_cached(op_name)


@functools.lru_cache(maxsize=8)
def _has_cuda_kernel_cached(op_name: str) -> bool:
    return (available_backends()["cuda"] == "available"
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"em_C::{op_name}", "CUDA"))


def em_inf_adjust(
    logits: torch.Tensor,
    *,
    steps: int = 5,
    lr: float = 0.1,
    kl_weight: float = 0.001,
    threshold: float = 0.3,
    optimizer: str = "adam",
    early_exit: str = "row",
    backend: str = "auto",
) -> torch.Tensor:
    """EM-INF: the logits after up to ``steps`` optimiser steps that lower their entropy.

    As the paper's released code: z = logits in float32, p0 = softmax(logits); before each step
    stop if the entropy H(softmax(z)) is below ``threshold``; else one step on
    loss = H + kl_weight * KL(p0 || softmax(z)) with a fresh optimiser (Adam: betas 0.9 / 0.999,
    eps 1e-8, bias-corrected; or plain SGD). The gradient is closed-form; no autograd runs.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 with backend="torch"); the last
            dim is the vocabulary. Entries equal to -inf (masked tokens) stay -inf.
        steps: number of optimiser steps, >= 0 (0 returns the logits as float32).
        lr: learning rate, >= 0 and finite in float32 (the kernels' precision). Each Adam step
            moves a logit by about lr at most (its m_hat / sqrt(v_hat) is within ~1.2 for 20
            steps, ~7.3 after hundreds), whatever the gradient's size, so the result stays
            finite (and -inf stays -inf) up to lr ~1e37; from lr ~1e38 the float32 arithmetic
            overflows to NaN. Once the logits sit ~lr apart, float32 rounding decides ties and
            the signs of the steps, so there (past lr ~1e30) the result no longer follows the
            float64 oracle. An SGD step moves a logit by lr * |gradient|, so there the bound is
            on that product.
        kl_weight: weight of KL(p0 || p), >= 0 and finite in float32.
        threshold: entropy (nats) below which a row stops; -inf never stops, +inf never moves.
        optimizer: "adam" (the released code) or "sgd".
        early_exit: "row": every row is its own problem and stops on its own entropy (a row's
            result does not depend on the batch). "batch": the released code exactly, one loss
            over the rows of (..., V) flattened: the entropies summed, the KLs averaged
            ("batchmean"), every row stopping when the summed entropy is below threshold. So
            there, as in the released code, a row with NaN or no finite logit (a padding row)
            makes the sum NaN: no row exits early, and it counts in the KL's mean. Drop such
            rows first, or use "row".
        backend: "auto", "triton", "cuda", "cpu" or "torch" (see `available_backends()`).

    Returns:
        float32 tensor shaped like ``logits`` (float64 for float64 logits), never an alias of
        them. NaN in a row makes that row's finite entries NaN; a row that is all -inf stays so.
    """
    steps = _checks.check_int("steps", steps, 0, MAX_STEPS)
    lr = _checks.check_number("lr", lr, low=0.0, high=_checks.FLOAT32_MAX)
    kl_weight = _checks.check_number("kl_weight", kl_weight, low=0.0, high=_checks.FLOAT32_MAX)
    threshold = _checks.check_number("threshold", threshold, allow_inf=True)
    optimizer = _checks.check_choice("optimizer", optimizer, _OPTIMIZERS)
    early_exit = _checks.check_choice("early_exit", early_exit, _EARLY_EXITS)
    _checks.check_logits(logits, backend)
    # No autograd runs through EM-INF (the output is a new set of logits to sample from):
    # detached, the output never requires grad, on every backend and under torch.compile.
    logits = logits.detach()
    rows = _checks.as_rows(logits)
    backend = em_inf_backend(rows, backend, steps)
    run = em_inf_adjust_impl if _checks.eager_tensor(logits) else em_inf_adjust_op
    adjusted = run(rows, steps, lr, kl_weight, threshold, optimizer == "adam",
                   early_exit == "batch", backend)
    return adjusted.reshape(logits.shape)


def adaptive_temperature(
    logits: torch.Tensor,
    *,
    alpha: float = 0.5,
    delta: float = 0.1,
    max_iters: int = 100,
    tol: float = 0.01,
    backend: str = "auto",
) -> torch.Tensor:
    """The paper's adaptive-temperature baseline: logits / tau with tau chosen per row.

    target = max(delta, alpha * H(softmax(z))). A row whose entropy is at most ``delta`` is
    returned unchanged (tau = 1). Otherwise tau is bisected in [0.01, 1]: tau = (lo + hi) / 2,
    stop when |H(softmax(z / tau)) - target| < tol, else hi = tau if the entropy is too high,
    lo = tau if too low; at most ``max_iters`` halvings (the last tau tried is kept), and none
    once lo and hi have met in floating point (the midpoint repeats; every further halving would
    redo the last), so a tolerance the row cannot meet costs ~30 halvings, not max_iters.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 with backend="torch").
        alpha: fraction of the entropy to aim for, in [0, 1].
        delta: entropy floor in nats, finite and >= 0.
        max_iters: most bisection steps, in [0, 2^30].
        tol: tolerance in nats, finite and > 0.
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        float32 tensor shaped like ``logits`` (float64 for float64 logits): logits / tau.
    """
    alpha = _checks.check_number("alpha", alpha, low=0.0, high=1.0)
    delta = _checks.check_number("delta", delta, low=0.0, high=_checks.FLOAT32_MAX)
    max_iters = _checks.check_int("max_iters", max_iters, 0, MAX_STEPS)
    tol = _checks.check_number("tol", tol, low=0.0, low_open=True, high=_checks.FLOAT32_MAX)
    _checks.check_logits(logits, backend)
    if backend == "auto" and logits.device.type == "cuda" and _has_cuda_kernel(
            "adaptive_temperature"):
        # H200, V 151936, fp32 (2026-11-27): cuda 0.085 / 0.14 / 0.17 ms at batch 1 / 16 / 64,
        # triton 0.58 / 1.18 / 1.27 ms: the CUDA kernel whenever it is built.
        backend = "cuda"
    backend = _resolve(backend, logits.device, "adaptive_temperature")
    logits = logits.detach()  # no autograd, as em_inf_adjust
    rows = _checks.as_rows(logits)
    run = adaptive_temperature_impl if _checks.eager_tensor(logits) else adaptive_temperature_op
    scaled = run(rows, alpha, delta, max_iters, tol, backend)
    return scaled.reshape(logits.shape)
