"""Triton kernels of EM-INF (`em_inf_adjust`) and of the adaptive-temperature baseline.

EM-INF, per row (the released code's semantics): z_0 = logits in fp32,
p0 = softmax(z_0); for k = 0 .. steps-1: lse_k, H_k = stats of z_k; stop if H_k < threshold
(row mode) or sum_rows H_k < threshold (batch mode); else one Adam (or SGD) step

    g = -p (log p + H_k) + kl (p - p0),   p = exp(z_k - lse_k),  g := 0 where z_k is not finite
    log p + H_k = (z_k - max_k) - mean_shift_k,   mean_shift_k = E_p[z_k - max_k]

The last identity is how the kernel forms the factor: log p and H separately are each ~log V,
rounded, and their sum errs by ~1e-7 where it should be ~0 on a near-uniform row; Adam's first
step lr * g / (|g| + eps) turns that into an error of lr. (z - max) - mean_shift errs relative
to |z - max| and |mean_shift| instead, and needs no log.
    m = 0.9 m + 0.1 g;  v = 0.999 v + 0.001 g^2
    z_{k+1} = z_k - lr * ((m / (1 - 0.9^(k+1))) / (sqrt(v / (1 - 0.999^(k+1))) + 1e-8))

with kl = kl_weight (row mode) or kl_weight / N (batch mode: the released code's "batchmean").
The quotient comes first, in every backend: it is O(1), so a step overflows only where lr nears
float32's maximum, not where lr * |g| does.

Design: recompute, don't store. Every step needs four numbers per row (max_k, log s_k,
mean_shift_k and H_k = log s_k - mean_shift_k for the exit test; lse_k = max_k + log s_k is kept
in two parts so that log p = (z - max_k) - log s_k is as exact as torch's log_softmax) from a
reduction over the whole row, and otherwise only elementwise work.
Given those scalars, z_k, m_k and v_k of an element are a pure function of its z_0. So pass t
(t = 0 .. steps) re-reads only the logits and replays the first t updates in registers:

    pass t < steps: z_t = replay(z_0, row scalars of passes 0..t-1); write the chunk's partial
                    statistics (max, sum e^(z-max), sum e^(z-max) (z-max)) of z_t
    pass steps:     z_steps = replay(...); write it (the output)

Memory traffic per element: (steps + 1) reads of the logits (2 bytes in bf16) plus one 4-byte
write: 16 bytes at 5 steps (batch 64, V 151936: 156 MB, ~37 us at 4.2 TB/s), against ~110 bytes
for streaming z, m, v between steps (26 bytes per middle step: ~255 us). No [N, V] scratch at
all. The price is compute: pass t replays t updates of 3 MUFU ops each (exp2, sqrt, divide; the
bias corrections are folded into two scalars as torch.optim.Adam does), plus one exp2 for p0 and
one for the statistics per pass: 55 MUFU ops per element at 5 steps, ~130 us of SFU time at
batch 64, V 151936 on an H200 (132 SMs x 16 per clock), overlapping ~90 us of FP32 work:
compute-bound, but under the streaming design's HBM time. Replay grows as steps^2: beyond
~10-15 steps a design that checkpoints (z, m, v) every few steps would win (not built).

Parallelism and determinism: a row is cut into chunks of BLOCK entries (BLOCK depends on V
only), one program per (row, chunk), so batch 1 at V 151936 runs 149 programs, about one per SM.
Pass t+1 merges the row's chunk partials of pass t inside every program, in a fixed order (no
atomics, no merge kernel); the chunk-0 program stores the merged scalars in a per-row history
[4, N, steps] that the later passes read. A row's numbers therefore do not depend on the batch.
Batch mode needs the entropy summed over all rows before each step: one extra single-program
launch per step (`_em_inf_batch_entropy_kernel`) reduces every row's partials in row order.

Launches: steps + 1 (row mode), 2 * steps + 1 (batch mode), queued back to back with no host
sync and no allocation whose size depends on data (one scratch tensor of 3 * steps * N * chunks
+ 4 * N * steps + steps floats), so a whole call can be captured in a CUDA graph, which removes
the per-launch CPU cost that dominates at batch 1.

Adaptive temperature: one program per row; the bisection runs inside the program and every
iteration is one pass over the row computing H(z / tau) (one exp per element), usually ~5-10
passes, from L2 at decode sizes. It is the paper's baseline, not a tuned path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import cdiv, launches_on_tensor_device, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): one MUFU op
# Shifts (nats) between two parts' maxima are floored here where they multiply a sum: e^-100 is
# below every float32, so the part's weight is 0 either way, and 0 * floor stays 0.
SHIFT_FLOOR = tl.constexpr(-100.0)
# The floor of z - m (_floored_shift): -inf only from a -inf logit, never from an overflow.
FLOAT32_MAX = tl.constexpr(torch.finfo(torch.float32).max)
# Entries per program: ~75 programs per row at V ~150k. bench/tune.py (H200, 2026-11-27, V 151936,
# 5 steps): batch 64 0.286 ms against 0.331 ms for 1024 (half the partials to merge per step),
# batch 1 and 16 within 3% of 1024 in that sweep, though a later run timed batch 16 slower
# (bench/RESULTS.md). Batch 1 runs the CUDA kernel under backend="auto" anyway.
BLOCK = 2048
# Widest vector for merging a row's chunk partials (V up to 1024 * 1024 in one step of the loop).
MAX_MERGE_BLOCK = 1024
# Rows merged at once by the batch-entropy kernel (rows x chunk partials per tile).
BATCH_ROWS_BLOCK = 16
# Tile of the adaptive-temperature row loop: 8 fp32 per thread at 4 warps.
TEMPERATURE_BLOCK = 1024


@triton.jit
def _combine(big_m, big_s, big_t, m, s, t):
    """Merge two online statistics (max, sum e^(z-max), sum e^(z-max)(z-max)). -inf maxima
    (nothing seen) weigh 0 without forming 0 * -inf; a NaN anywhere stays NaN."""
    new_m = tl.maximum(big_m, m)
    shift_a = tl.where(big_m == float("-inf"), 0.0, big_m - new_m)
    shift_b = tl.where(m == float("-inf"), 0.0, m - new_m)
    w_a = tl.where(big_m == float("-inf"), 0.0, tl.exp2(shift_a * LOG2E))
    w_b = tl.where(m == float("-inf"), 0.0, tl.exp2(shift_b * LOG2E))
    new_s = w_a * big_s + w_b * s
    # The shift is floored where it multiplies: a part masked with finfo(float32).min sits ~3e38
    # below the other, big_s * shift overflows to -inf and its weight 0 would make NaN of it.
    new_t = (w_a * (big_t + big_s * tl.maximum(shift_a, SHIFT_FLOOR))
             + w_b * (t + s * tl.maximum(shift_b, SHIFT_FLOOR)))
    return new_m, new_s, new_t


@triton.jit
def _floored_shift(z, m):
    """z - m, floored at -FLOAT32_MAX where a finite z ~3.4e38 below m makes it -inf: its p is 0
    and its terms (p (z - m), and the gradient's) are 0, not 0 * -inf = NaN. NaN stays NaN (a
    select: tl.maximum may drop it on the GPU)."""
    shift = z - m
    return tl.where(shift < -FLOAT32_MAX, -FLOAT32_MAX, shift)


@triton.jit
def _tile_stats(z):
    """(max, sum e^(z-max), sum e^(z-max)(z-max)) of a 1-D fp32 tile; -inf entries add 0."""
    m = tl.max(z, 0)
    live = z != float("-inf")
    d = tl.where(live, _floored_shift(z, m), 0.0)
    e = tl.where(live, tl.exp2(d * LOG2E), 0.0)
    return m, tl.sum(e, 0), tl.sum(e * d, 0)


@triton.jit
def _merge_partials(part_ptr, rows, n_rows, n_chunks, ROWS: tl.constexpr,
                    MERGE_BLOCK: tl.constexpr):
    """(max, log s, mean shift t / s, H) of rows `rows` ([ROWS] int64) from their chunk
    partials, laid out as part[3, n_rows, n_chunks] (max, s, t); chunks are merged in a fixed
    order. lse = max + log s is kept in two parts so that log p = (z - max) - log s is as exact as
    torch's log_softmax; log p + H is formed as (z - max) - t / s (module docstring)."""
    chunk_offs = tl.arange(0, MERGE_BLOCK)
    plane = n_rows.to(tl.int64) * n_chunks
    big_m = tl.full([ROWS], float("-inf"), tl.float32)
    big_s = tl.zeros([ROWS], tl.float32)
    big_t = tl.zeros([ROWS], tl.float32)
    row_ok = rows < n_rows
    for start in range(0, n_chunks, MERGE_BLOCK):
        cols = start + chunk_offs
        mask = row_ok[:, None] & (cols < n_chunks)[None, :]
        offs = rows[:, None] * n_chunks + cols[None, :]
        m = tl.load(part_ptr + offs, mask=mask, other=float("-inf"))
        s = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
        t = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)
        block_m = tl.max(m, 1)
        live = m != float("-inf")
        shift = tl.where(live, m - block_m[:, None], 0.0)
        w = tl.where(live, tl.exp2(shift * LOG2E), 0.0)
        block_s = tl.sum(w * s, 1)
        block_t = tl.sum(w * (t + s * tl.maximum(shift, SHIFT_FLOOR)), 1)  # as in _combine
        big_m, big_s, big_t = _combine(big_m, big_s, big_t, block_m, block_s, block_t)
    # In float64, each rounded once (an fp32 log and t / s are approximate on the GPU). Per row
    # only: free.
    s64 = big_s.to(tl.float64)
    log_s64 = tl.log(s64)
    mean_shift64 = big_t.to(tl.float64) / s64
    return (big_m, log_s64.to(tl.float32), mean_shift64.to(tl.float32),
            (log_s64 - mean_shift64).to(tl.float32))


# n_rows is never specialised: on a GPU, Triton turns an int argument equal to 1 into a Python
# constant, which has no .to() (n_rows.to(tl.int64) below; batch 1 is the decode case).
@triton.jit(do_not_specialize=["step", "n_rows"])
def _em_inf_adjust_fwd_kernel(
    logits_ptr, out_ptr, part_ptr, hist_ptr, batch_entropy_ptr,
    n_rows, V, row_stride, n_chunks, step, total_steps,
    lr, kl_weight, threshold,
    ADAM: tl.constexpr, BATCH_EXIT: tl.constexpr, WRITE_OUTPUT: tl.constexpr,
    BLOCK: tl.constexpr, MERGE_BLOCK: tl.constexpr, HIST_BLOCK: tl.constexpr,
    FAST_DIVIDE: tl.constexpr,
):
    """Pass `step` of EM-INF for one (row, chunk): replay `step` updates from the logits, then
    write the chunk's partial statistics of z_step (or, in the last pass, z_step itself).

    Reads per program: BLOCK logits, the row's partials of pass step-1 (3 * n_chunks floats) and
    its history (4 * step floats, plus `step` batch entropies in batch mode); writes 3 floats
    (or BLOCK floats of output).

    FAST_DIVIDE (GPU; the interpreter lacks it): Adam's divide by div.approx.ftz.f32 (a reciprocal
    and a multiply) instead of `/`'s div.full.f32, which wraps them in range tests and rescales
    (6 more instructions per element and replayed step, ~17% of the replay loop on sm_90a). Both
    err by at most 2 ulp for divisors in [2^-126, 2^126]; Adam's divisor sqrt(v_hat) + 1e-8 lies
    in [1e-8, ~1e3] (|g| <= 1/e + log V + kl_weight). The .ftz flushes subnormal operands and
    quotients to 0: an |m| below ~1.2e-38, an update below ~lr * 1e-30."""
    pid = tl.program_id(0)
    row = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < V
    z0 = tl.load(logits_ptr + row * row_stride + offs, mask=in_row,
                 other=float("-inf")).to(tl.float32)
    z = z0
    if step > 0:
        plane = n_rows.to(tl.int64) * n_chunks
        last_max, last_log_s, last_shift, last_h = _merge_partials(
            part_ptr + (step - 1) * 3 * plane, tl.full([1], 0, tl.int64) + row, n_rows,
            n_chunks, 1, MERGE_BLOCK)
        last_max = tl.sum(last_max, 0)
        last_log_s = tl.sum(last_log_s, 0)
        last_shift = tl.sum(last_shift, 0)
        last_h = tl.sum(last_h, 0)
        # history[4, N, total_steps]: max, log s, mean shift and H of z_k for every earlier pass k.
        hist_plane = n_rows.to(tl.int64) * total_steps
        hist_max_ptr = hist_ptr + row * total_steps
        hist_log_s_ptr = hist_max_ptr + hist_plane
        hist_shift_ptr = hist_max_ptr + 2 * hist_plane
        hist_h_ptr = hist_max_ptr + 3 * hist_plane
        if chunk == 0:
            tl.store(hist_max_ptr + step - 1, last_max)
            tl.store(hist_log_s_ptr + step - 1, last_log_s)
            tl.store(hist_shift_ptr + step - 1, last_shift)
            tl.store(hist_h_ptr + step - 1, last_h)
        k_offs = tl.arange(0, HIST_BLOCK)
        earlier = k_offs < step - 1
        is_last = k_offs == step - 1
        max_hist = tl.where(is_last, last_max,
                            tl.load(hist_max_ptr + k_offs, mask=earlier, other=0.0))
        log_s_hist = tl.where(is_last, last_log_s,
                              tl.load(hist_log_s_ptr + k_offs, mask=earlier, other=0.0))
        shift_hist = tl.where(is_last, last_shift,
                              tl.load(hist_shift_ptr + k_offs, mask=earlier, other=0.0))
        h_hist = tl.where(is_last, last_h, tl.load(hist_h_ptr + k_offs, mask=earlier, other=0.0))
        if BATCH_EXIT:
            exit_hist = tl.load(batch_entropy_ptr + k_offs, mask=k_offs < step, other=0.0)
        else:
            exit_hist = h_hist
        max0 = tl.sum(tl.where(k_offs == 0, max_hist, 0.0), 0)
        log_s0 = tl.sum(tl.where(k_offs == 0, log_s_hist, 0.0), 0)
        # p0 and p (below) by the same expression: p - p0 is exactly 0 at the first step.
        p0 = tl.exp2(((z0 - max0) - log_s0) * LOG2E)
        finite = tl.abs(z0) < float("inf")
        m = tl.zeros([BLOCK], tl.float32)
        v = tl.zeros([BLOCK], tl.float32)
        # Bias corrections 1 - beta^k by the recurrence c_k = beta c_(k-1) + (1 - beta): no
        # cancellation (1 - 0.999^k in fp32 loses 4 digits).
        bias1 = tl.zeros([], tl.float32)
        bias2 = tl.zeros([], tl.float32)
        going = step > 0
        for k in range(0, step):
            max_k = tl.sum(tl.where(k_offs == k, max_hist, 0.0), 0)
            log_s_k = tl.sum(tl.where(k_offs == k, log_s_hist, 0.0), 0)
            shift_k = tl.sum(tl.where(k_offs == k, shift_hist, 0.0), 0)
            exit_k = tl.sum(tl.where(k_offs == k, exit_hist, 0.0), 0)
            going = going & ~(exit_k < threshold)
            if going:
                # As _floored_shift, by one max instruction in this hot loop: where z - max_k is
                # NaN and the max drops it, z is not finite (g is set to 0 below) or the row's
                # statistics are NaN (so p is): no NaN is lost.
                shifted = tl.maximum(z - max_k, -FLOAT32_MAX)
                p = tl.exp2((shifted - log_s_k) * LOG2E)
                log_p_plus_h = shifted - shift_k  # log p + H_k without the cancellation
                g = -p * log_p_plus_h + kl_weight * (p - p0)
                g = tl.where(finite, g, 0.0)
                if ADAM:
                    m = 0.9 * m + 0.1 * g
                    v = 0.999 * v + 0.001 * g * g
                    bias1 = 0.9 * bias1 + 0.1
                    bias2 = 0.999 * bias2 + 0.001
                    # As torch.optim.Adam: the bias corrections folded into two scalars, so an
                    # element costs one sqrt and one divide.
                    step_size = lr / bias1
                    inv_sqrt_bias2 = 1.0 / tl.sqrt(bias2)
                    denominator = tl.sqrt(v) * inv_sqrt_bias2 + 1e-8
                    if FAST_DIVIDE:  # see the kernel docstring
                        z = z - step_size * libdevice.fast_dividef(m, denominator)
                    else:
                        z = z - step_size * (m / denominator)
                else:
                    z = z - lr * g
    if WRITE_OUTPUT:
        tl.store(out_ptr + row * V + offs, z, mask=in_row)
    else:
        chunk_m, chunk_s, chunk_t = _tile_stats(z)
        plane = n_rows.to(tl.int64) * n_chunks
        base = part_ptr + step * 3 * plane + row * n_chunks + chunk
        tl.store(base, chunk_m)
        tl.store(base + plane, chunk_s)
        tl.store(base + 2 * plane, chunk_t)


@triton.jit(do_not_specialize=["step", "n_rows"])  # n_rows: as _em_inf_adjust_fwd_kernel
def _em_inf_batch_entropy_kernel(part_ptr, batch_entropy_ptr, n_rows, n_chunks, step,
                                 ROWS: tl.constexpr, MERGE_BLOCK: tl.constexpr):
    """Batch mode: batch_entropy[step] = sum over rows of H_step, rows added in a fixed order.
    One program; reads the 3 * N * n_chunks partials of pass `step` once."""
    plane = n_rows.to(tl.int64) * n_chunks
    total = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_rows, ROWS):
        rows = start + tl.arange(0, ROWS).to(tl.int64)
        _, _, _, h = _merge_partials(part_ptr + step * 3 * plane, rows, n_rows, n_chunks, ROWS,
                               MERGE_BLOCK)
        total += tl.where(rows < n_rows, h, 0.0)
    tl.store(batch_entropy_ptr + step, tl.sum(total, 0))


def _block_for(vocab: int) -> int:
    return min(BLOCK, max(16, next_power_of_2(vocab)))


@launches_on_tensor_device
def em_inf_adjust_fwd(logits: torch.Tensor, steps: int, lr: float, kl_weight: float,
                      threshold: float, adam: bool, batch_exit: bool) -> torch.Tensor:
    """EM-INF on [N, V] logits (last dim contiguous, any row stride) -> fp32 [N, V]."""
    n_rows, vocab = logits.shape
    out = torch.empty((n_rows, vocab), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    block = _block_for(vocab)
    n_chunks = cdiv(vocab, block)
    merge_block = min(MAX_MERGE_BLOCK, max(16, next_power_of_2(n_chunks)))
    hist_block = max(16, next_power_of_2(max(steps, 1)))
    # One allocation for all scratch: partials [steps, 3, N, n_chunks], history [4, N, steps],
    # batch entropies [steps]. Its size depends on shapes only (CUDA-graph friendly).
    partial_numel = steps * 3 * n_rows * n_chunks
    hist_numel = 4 * n_rows * steps
    scratch = torch.empty(max(partial_numel + hist_numel + steps, 1), dtype=torch.float32,
                          device=logits.device)
    partials = scratch[:partial_numel]
    history = scratch[partial_numel:partial_numel + hist_numel]
    batch_entropy = scratch[partial_numel + hist_numel:]
    kl = kl_weight / n_rows if batch_exit else kl_weight
    grid = (n_rows * n_chunks,)
    for step in range(steps + 1):
        _em_inf_adjust_fwd_kernel[grid](
            logits, out, partials, history, batch_entropy,
            n_rows, vocab, logits.stride(0), n_chunks, step, max(steps, 1),
            lr, kl, threshold,
            ADAM=adam, BATCH_EXIT=batch_exit, WRITE_OUTPUT=step == steps,
            BLOCK=block, MERGE_BLOCK=merge_block, HIST_BLOCK=hist_block,
            FAST_DIVIDE=logits.device.type == "cuda", num_warps=4)
        if batch_exit and step < steps:
            _em_inf_batch_entropy_kernel[(1,)](
                partials, batch_entropy, n_rows, n_chunks, step,
                ROWS=BATCH_ROWS_BLOCK, MERGE_BLOCK=merge_block, num_warps=4)
    return out


@triton.jit
def _row_entropy(row_ptr, V, tau, BLOCK: tl.constexpr):
    """H of softmax(z / tau) for one row: one pass, online statistics."""
    offs = tl.arange(0, BLOCK)
    big_m = tl.full([], float("-inf"), tl.float32)
    big_s = tl.zeros([], tl.float32)
    big_t = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s, t = _tile_stats(z / tau)
        big_m, big_s, big_t = _combine(big_m, big_s, big_t, m, s, t)
    log_s = tl.log(big_s)
    return log_s - big_t / big_s


@triton.jit
def _adaptive_temperature_fwd_kernel(logits_ptr, out_ptr, V, row_stride, alpha, delta,
                                     max_iters, tol, BLOCK: tl.constexpr):
    """One row per program: H0 = H(z); if H0 > delta, bisect tau in [0.01, 1] until
    |H(z / tau) - max(delta, alpha H0)| < tol (at most max_iters halvings, and none once the
    midpoint repeats: lo and hi have met, so every further halving would redo the last); write
    z / tau. Reads the row 2 + (iterations) times, writes it once in fp32."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    h0 = _row_entropy(row_ptr, V, 1.0, BLOCK)
    target = tl.maximum(alpha * h0, delta)
    searching = h0 > delta
    tau = tl.full([], 1.0, tl.float32)
    lo = tl.full([], 0.01, tl.float32)
    hi = tl.full([], 1.0, tl.float32)
    iteration = tl.zeros([], tl.int32)
    mid = (lo + hi) / 2
    while searching & (iteration < max_iters) & (mid != tau):
        h = _row_entropy(row_ptr, V, mid, BLOCK)
        tau = mid
        done = tl.abs(h - target) < tol
        too_high = h > target
        hi = tl.where(~done & too_high, mid, hi)
        lo = tl.where(~done & ~too_high, mid, lo)
        searching = ~done
        iteration += 1
        mid = (lo + hi) / 2
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < V).to(tl.float32)
        tl.store(out_ptr + row * V + cols, z / tau, mask=cols < V)


@launches_on_tensor_device
def adaptive_temperature_fwd(logits: torch.Tensor, alpha: float, delta: float, max_iters: int,
                             tol: float) -> torch.Tensor:
    """Adaptive temperature on [N, V] logits (last dim contiguous) -> fp32 [N, V]."""
    n_rows, vocab = logits.shape
    out = torch.empty((n_rows, vocab), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    block = min(TEMPERATURE_BLOCK, max(16, next_power_of_2(vocab)))
    _adaptive_temperature_fwd_kernel[(n_rows,)](
        logits, out, vocab, logits.stride(0), alpha, delta, max_iters, tol,
        BLOCK=block, num_warps=4)
    return out
