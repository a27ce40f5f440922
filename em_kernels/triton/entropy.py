"""Triton kernels of the softmax-statistics ops: entropy, logsumexp and chosen-token log-probs.

Launchers (the contract that em_kernels/_ops/entropy.py calls, shared with torch.ops.em_C):

    softmax_stats_fwd(logits[N, V], tokens[N] | None, temperature)
        -> (entropy[N], lse[N], logprobs[N] or an empty [0] tensor), lse float64, the others
           float32 (why: em/softmax_stats.h in csrc/include, shared by all three backends)
    softmax_stats_bwd(logits, tokens | None, entropy, lse, grad_entropy[N], grad_logprobs[N] | None,
                      temperature) -> grad_logits[N, V], contiguous, in logits.dtype

logits have a contiguous last dim and any row stride; float32, bfloat16 or float16. Everything is
accumulated in float32.

How a row is split: the vocabulary is cut into chunks of BLOCK entries, BLOCK a function of V only
(`_block_size`), and one program reduces one (row, chunk) tile. Many programs per row let a small
batch fill the GPU; because the split and the merge order depend on V alone, a row's bits never
depend on the batch size or on the other rows (batch invariance), and there are no atomics
(determinism). When V fits one chunk the tile program writes the row's results itself; otherwise
a second, tiny kernel merges each row's per-chunk partials in a fixed order.

Compiled variants: BLOCK (4 sizes), the dtype and the feature flags are constexpr. N and the
chunk count are never specialised (no recompile per batch size); V and the row stride keep
Triton's divisibility-by-16 specialisation, which is what allows 16-byte vector loads.

Units: the kernels work in base 2. With k = log2(e) / T, exp((z_j - m) / T) = exp2((z_j - m) k)
costs one subtract, one multiply and one exp2, the only transcendental per element. Results are
converted back to nats (times ln 2) once per row.

Accuracy at small T: the exponent is formed from the shifted logit, (z_j - m) k, never as one FMA
z_j k - m k. z_j - m is exact for z_j near the max m (Sterbenz) and the product then rounds
relative to |(z_j - m) / T|, so the argmax term is exactly exp2(0), as in plain PyTorch's
z / T - max(z / T). The FMA form rounds m k, a number of size |m| / T: at T = 1e-4 it moved log p
of the argmax by ~0.01 nats, at T <= 1e-10 to +-inf. So row maxima are kept in logit units.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from . import cdiv, launches_on_tensor_device, next_power_of_2

LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))
LN2: tl.constexpr = tl.constexpr(math.log(2.0))
# The backward's trust limit on |lse| (nats, csrc/include/em/softmax_stats.h's kExactLseLimit):
# there a double's ulp is 2^-12; past it the row's gradient is NaN.
EXACT_LSE_LIMIT: tl.constexpr = tl.constexpr(2.0**40)
# float32's largest finite value, where the backward clamps its per-row center.
FLOAT32_MAX: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).max)
# Temperatures from which the backward's center is 0 (softmax_stats.h's kCenterlessTemperature):
# below, z - c overflows only where p < e^-1000 = 0; above, lse T could reach float32's max.
CENTERLESS_TEMPERATURE = torch.finfo(torch.float32).max / 1024
# Exponents (bits) are clamped here where they multiply p: below -126, tl.exp2's result is already
# flushed to 0 on the GPU, so the clamp only turns the 0 * -inf of a masked entry into 0.
EXP2_FLOOR: tl.constexpr = tl.constexpr(-127.0)

# Largest vocabulary chunk per program: a 16 KiB bf16 tile (32 KiB fp32) is enough bytes in flight
# per program for HBM, and still leaves ~19 programs per row at V = 151936 so that even a handful
# of rows fills every SM.
MAX_BLOCK = 8192
# Smallest tile: vocabularies up to 1024 share one compiled variant (one warp, 32 entries a
# thread) instead of one per power of two; such rows are latency-bound anyway.
MIN_BLOCK = 1024
# Elements each thread holds: 64 bf16 values are eight 16-byte vector loads in flight per thread
# (bench/tune.py, H200, 2026-11-27: 0.667 ms at [8192, 151936] bf16 against 0.715 ms for 32).
ELEMENTS_PER_THREAD = 64
# (rows x chunks) entries merged per program of the merge kernel: 1024 partials is 12 KiB, one
# short program; the merge reads N * V / BLOCK * 12 bytes, under 0.1% of the logits.
MERGE_TILE = 1024
# Merge kernel warps: 1024 entries over 128 threads, 8 each.
MERGE_WARPS = 4
# Triton's limit on the first grid dimension.
MAX_GRID = 2**31 - 1


@triton.jit
def _times_pair(x, hi, lo):
    """x (float64) times the float pair hi + lo, in float64; an infinite x keeps its sign (lo may
    be 0 or negative, and inf * lo would add a NaN), as in csrc/include/em/softmax_stats.h."""
    rest = tl.where(tl.abs(x) < float("inf"), x * tl.cast(lo, tl.float64), 0.0)
    return x * tl.cast(hi, tl.float64) + rest


@triton.jit
def _store_row_results(
    rows, N, reference, total, weighted,
    logits_ptr, stride_row, tokens_ptr, V, scale2, inv_temperature_hi, inv_temperature_lo,
    entropy_ptr, lse_ptr, logprobs_ptr,
    HAS_TOKENS: tl.constexpr,
):
    """Write entropy, lse and (if HAS_TOKENS) log p(token) of ``rows`` (a scalar or a vector).

    ``reference`` is the row max of z in logit units (0 for a row whose scaled max is -inf); the
    sums are in bits relative to it, with d_j = (z_j - reference) k: total = sum_j exp2(d_j),
    weighted = sum_j exp2(d_j) d_j. With log2 p_j = d_j - log2 total,

        H   = ln2 (log2 total - weighted / total)
        lse = reference / T + ln2 log2 total      (float64, 1 / T = inv_temperature_hi + _lo)
        log p(y) = ln2 ((z_y - reference) k - log2 total)    (NaN when y is outside [0, V))

    A row with no distribution (all -inf, or finfo.min logits that overflow when scaled) has
    total = 0: H = NaN (0 / 0), lse = -inf and log p(y) = NaN.
    Memory: 12 or 16 bytes written per row, plus one token id and one logit read per row."""
    row_mask = rows < N
    log2_total = tl.log2(total)
    tl.store(entropy_ptr + rows, (log2_total - weighted / total) * LN2, mask=row_mask)
    lse = (_times_pair(reference.to(tl.float64), inv_temperature_hi, inv_temperature_lo)
           + (log2_total * LN2).to(tl.float64))
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if HAS_TOKENS:
        token = tl.load(tokens_ptr + rows, mask=row_mask, other=0)
        in_vocab = (token >= 0) & (token < V)
        chosen = tl.load(
            logits_ptr + rows * stride_row + token, mask=row_mask & in_vocab, other=float("nan")
        ).to(tl.float32)
        # total = 0 only for a row with no distribution. The formula would give NaN for an all
        # -inf row, but +inf for finfo.min logits once the GPU fuses it into one FMA (the product
        # is not rounded to -inf first), so that row's NaN is explicit.
        logprob = tl.where(total == 0.0, float("nan"),
                           ((chosen - reference) * scale2 - log2_total) * LN2)
        tl.store(logprobs_ptr + rows, logprob, mask=row_mask)


@triton.jit(do_not_specialize=["N", "num_chunks"])
def _softmax_stats_fwd_kernel(
    logits_ptr, tokens_ptr,
    partial_max_ptr, partial_total_ptr, partial_weighted_ptr,
    entropy_ptr, lse_ptr, logprobs_ptr,
    N, V, num_chunks, stride_row, scale2, inv_temperature_hi, inv_temperature_lo,
    HAS_TOKENS: tl.constexpr, SINGLE_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Softmax statistics of one (row, chunk) tile: program id = row * num_chunks + chunk.

    Math, with k = scale2 = log2(e) / T, over the tile's entries:
        m = max_j z_j (logit units)
        d_j = (z_j - m) k  (exact difference, one rounding: see the module docstring)
        e_j = exp2(d_j)  (the one transcendental)
        total = sum_j e_j,  weighted = sum_j e_j d_j
    Keeping d relative to the tile max makes `weighted` a sum of small numbers rather than the
    difference of two large ones (H = lse - E[z / T] loses digits when |z| is large).
    Masking: z_j = -inf gives d_j = -inf and e_j = 0, and its e_j d_j is 0 (d_j is clamped at
    EXP2_FLOOR first, which changes no other term: 2^d is flushed to 0 below -126 on the GPU);
    a tile whose scaled max m k is -inf (all -inf, or finite logits such as finfo.min that
    overflow when scaled) uses 0 as its reference instead of m (relative to m its max entry would
    give exp2(0)), giving (m = -inf, total = 0, weighted = 0).
    A NaN reaches `total` and poisons the row.

    SINGLE_CHUNK (V <= BLOCK): the tile is the row; write the row's results directly.
    Otherwise store (m, total, weighted) at the program id for _softmax_stats_merge_kernel.

    Memory: reads the tile once (V * itemsize bytes per row in all, evict-first: nothing else
    reads it soon); writes 12 bytes per tile.
    """
    pid = tl.program_id(0)
    row = (pid // num_chunks).to(tl.int64)
    chunk = pid % num_chunks
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    z = tl.load(
        logits_ptr + row * stride_row + cols, mask=cols < V, other=float("-inf"),
        eviction_policy="evict_first",
    ).to(tl.float32)
    tile_max = tl.max(z, axis=0)
    empty = tile_max * scale2 == float("-inf")
    reference = tl.where(empty, 0.0, tile_max)
    d = (z - reference) * scale2
    e = tl.exp2(d)
    total = tl.sum(e, axis=0)
    # e * max(d, EXP2_FLOOR): a masked entry gives 0 * EXP2_FLOOR = 0 instead of 0 * -inf, and
    # the clamp changes no other term, since exp2 of anything below EXP2_FLOOR is 0 on the GPU
    # (ex2.approx.ftz). One FMNMX per entry where a compare and a select used to be. It reads d,
    # not z, so z dies after the multiply (bf16, sm_90a, 32 entries a thread: 63 registers, not
    # 95; at today's 64: 80 under Triton 3.6, 119 under 3.8, no spills).
    weighted = tl.sum(e * tl.maximum(d, EXP2_FLOOR), axis=0)
    if SINGLE_CHUNK:
        _store_row_results(
            row, N, reference, total, weighted, logits_ptr, stride_row, tokens_ptr, V, scale2,
            inv_temperature_hi, inv_temperature_lo, entropy_ptr, lse_ptr, logprobs_ptr, HAS_TOKENS)
    else:
        tl.store(partial_max_ptr + pid, tl.where(empty, float("-inf"), tile_max))
        tl.store(partial_total_ptr + pid, total)
        tl.store(partial_weighted_ptr + pid, weighted)


@triton.jit(do_not_specialize=["N", "num_chunks"])
def _softmax_stats_merge_kernel(
    partial_max_ptr, partial_total_ptr, partial_weighted_ptr,
    logits_ptr, tokens_ptr, entropy_ptr, lse_ptr, logprobs_ptr,
    N, V, num_chunks, stride_row, scale2, inv_temperature_hi, inv_temperature_lo,
    HAS_TOKENS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):
    """Merge the per-chunk partials of BLOCK_ROWS rows, then write their results.

    Chunk c of a row has (m_c, total_c, weighted_c), relative to its own max m_c (logit units).
    With M = max_c m_c, delta_c = (m_c - M) k (difference first, as in the tiles) and
    w_c = exp2(delta_c), relative to M:
        total    = sum_c w_c total_c
        weighted = sum_c w_c (weighted_c + total_c delta_c)
    (since each d_j shifts by delta_c). delta_c is clamped at EXP2_FLOOR where it multiplies
    total_c: a chunk that is all -inf, or whose max lies ~1e38 below M (delta_c overflows to -inf),
    has w_c = 0 and adds 0 rather than 0 * -inf = NaN. Each row is reduced along its own
    BLOCK_CHUNKS axis; BLOCK_ROWS and BLOCK_CHUNKS depend only on V, so a row's bits do not depend
    on its neighbours.

    Memory: reads 12 bytes per (row, chunk), writes 12-16 bytes per row.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    mask = (rows < N)[:, None] & (chunks < num_chunks)[None, :]
    offsets = rows[:, None] * num_chunks + chunks[None, :]
    chunk_max = tl.load(partial_max_ptr + offsets, mask=mask, other=float("-inf"))
    chunk_total = tl.load(partial_total_ptr + offsets, mask=mask, other=0.0)
    chunk_weighted = tl.load(partial_weighted_ptr + offsets, mask=mask, other=0.0)
    row_max = tl.max(chunk_max, axis=1)
    reference = tl.where(row_max == float("-inf"), 0.0, row_max)
    offset = (chunk_max - reference[:, None]) * scale2
    weight = tl.exp2(offset)
    total = tl.sum(weight * chunk_total, axis=1)
    weighted = tl.sum(
        weight * (chunk_weighted + chunk_total * tl.maximum(offset, EXP2_FLOOR)), axis=1)
    _store_row_results(
        rows, N, reference, total, weighted, logits_ptr, stride_row, tokens_ptr, V, scale2,
        inv_temperature_hi, inv_temperature_lo, entropy_ptr, lse_ptr, logprobs_ptr, HAS_TOKENS)


@triton.jit
def _round_to_bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), still as float32. GPUs convert this
    way; Triton's interpreter truncates instead, so it gets this first. NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["num_chunks"])
def _softmax_stats_bwd_kernel(
    logits_ptr, tokens_ptr, entropy_ptr, lse_ptr, grad_entropy_ptr, grad_logprobs_ptr,
    grad_logits_ptr,
    V, num_chunks, stride_row, scale2, inv_temperature, inv_temperature_lo, center_temperature_hi,
    center_temperature_lo,
    HAS_LOGPROB_GRAD: tl.constexpr, ROUND_TO_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradient of sum(gH * H + gL * logp) w.r.t. the logits, for one (row, chunk) tile.

    With p_j = softmax(z / T)_j recomputed from the saved float64 lse, ln p_j = ln2 log2 p_j:
        c = float(lse T),  r = float(lse - c / T) log2(e)     (per row, in float64)
        log2 p_j = (z_j - c) k - r                            (a subtract, an FMA, one exp2)
    T and 1 / T come as float pairs, center_temperature_hi + _lo (0 past CENTERLESS_TEMPERATURE)
    and inv_temperature + inv_temperature_lo (the forward's, so that c / T is bitwise its m / T
    when c = m), both products in float64 without a division (whose registers this kernel cannot
    spare). On a confident row
    c is the row max itself: log2 p of the argmax is -r, which rounds relative
    to log s, not to |lse| as the former float32 lse made it (5-10% off in the gradient of a row
    with H ~ 1e-4 at |lse| ~ 100); elsewhere log2 p_j rounds relative to its own size. The math:
    csrc/include/em/softmax_stats.h.
        dH/dz_j   = -(1/T) p_j (ln p_j + H)
        dlp/dz_j  =  (1/T) (onehot(y)_j - p_j)     (no one-hot if y is outside [0, V): its logit
                                                   lies elsewhere, as on a vocabulary shard)
    A -inf logit gets exactly 0 (p_j = 0 times a clamped ln p_j, and no one-hot), also when it
    is the chosen token; so does the entropy term of every entry whose p_j is 0 (a finite logit
    far below the max: a -1e38 mask, or any gap at T ~ 1e-20).

    With a log-prob gradient, every entry gets -gL p_j / T as the entropy term's twin, and the
    program whose tile holds y then overwrites that entry with its one-hot form (a scalar load
    and store, ordered by two barriers that every program of this variant passes): the per-entry
    work is the entropy backward's. Values are the former per-entry form's; a zero may now be
    -0.0 where it was +0.0 (where p_j = 0 and the factor is negative), as in the C++ kernel.

    Memory: reads the tile once (evict-first) and 16-28 bytes of row statistics; writes the
    tile's gradient once, in the logits' dtype (with a log-prob gradient, the chosen entry's logit
    is read and its gradient written once more). Tiles are independent: fully parallel.
    ROUND_TO_BF16 (interpreter only): round float32 to the nearest bfloat16 before the store.
    """
    pid = tl.program_id(0)
    row = (pid // num_chunks).to(tl.int64)
    chunk = pid % num_chunks
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < V
    z = tl.load(
        logits_ptr + row * stride_row + cols, mask=in_vocab, other=0.0,
        eviction_policy="evict_first",
    ).to(tl.float32)
    entropy = tl.load(entropy_ptr + row)
    lse = tl.load(lse_ptr + row)  # float64
    grad_entropy = tl.load(grad_entropy_ptr + row)
    # A row with no distribution (lse = -inf: all -inf, or all finfo.min once scaled) gets a zero
    # gradient, like every masked entry: with lse and H taken as 0 and no upstream gradient, no
    # inf - inf or 0 * NaN is formed.
    no_distribution = lse == float("-inf")
    entropy = tl.where(no_distribution, 0.0, entropy)
    grad_entropy = tl.where(no_distribution, 0.0, grad_entropy)
    lse = tl.where(no_distribution, 0.0, lse)
    # A row whose |lse| is past EXACT_LSE_LIMIT (|z| / T past ~1e12, or +inf logits; the
    # forward's values are right, being formed relative to the max) has lost every log p_j: a NaN
    # offset makes its gradient NaN, whatever the upstream gradients, instead of all 0 but a
    # plausible-looking one-hot term. (Its -inf entries stay 0 here; the C++ and CUDA kernels
    # make them NaN too.)
    # A one-hot row (H exactly 0: s = 1, lse = m / T exactly) is exempt: its ln s = 0 is not lost.
    trusted = (tl.abs(lse) <= EXACT_LSE_LIMIT) | ((entropy == 0.0) & (tl.abs(lse) < float("inf")))
    # lse T = m (1 + delta) + T ln s may pass float32's max by T ln s (T < FLOAT32_MAX / 1024):
    # clamped.
    center = _times_pair(lse, center_temperature_hi, center_temperature_lo)
    center = tl.minimum(tl.maximum(center, -FLOAT32_MAX), FLOAT32_MAX).to(tl.float32)
    offset = (lse - _times_pair(center.to(tl.float64), inv_temperature, inv_temperature_lo)).to(
        tl.float32)
    offset = tl.where(trusted, offset * LOG2E, float("nan"))
    if HAS_LOGPROB_GRAD:
        token = tl.load(tokens_ptr + row)
        grad_logprob = tl.where(no_distribution, 0.0, tl.load(grad_logprobs_ptr + row))
        # The chosen token's one-hot term, +gL / T, is written by a scalar store after the tile
        # (a per-entry compare and select held 96 registers a thread at 64 entries a thread,
        # against 63 without them on sm_90a). Its logit is read now, before the tile's store: the
        # gradient may overwrite the logits in place. A token outside [0, V) (its logit lies
        # elsewhere, as on a vocabulary shard) or outside this tile gets no one-hot here.
        chosen_here = (token >= 0) & (token < V) & (token // BLOCK == chunk)
        z_chosen = tl.load(logits_ptr + row * stride_row + token, mask=chosen_here,
                           other=float("-inf")).to(tl.float32)
    else:
        grad_logprob = 0.0
    grad = _grad_without_one_hot(z, center, offset, scale2, entropy, grad_entropy, grad_logprob,
                                 HAS_LOGPROB_GRAD) * inv_temperature
    grad = tl.where(z == float("-inf"), 0.0, grad)
    if ROUND_TO_BF16:
        grad = _round_to_bf16(grad)
    if HAS_LOGPROB_GRAD:
        tl.debug_barrier()  # every thread has read z_chosen before any stores over the logits
    tl.store(
        grad_logits_ptr + row * V + cols, grad.to(grad_logits_ptr.dtype.element_ty),
        mask=in_vocab)
    if HAS_LOGPROB_GRAD:
        # The same arithmetic as the tile's entry, plus gL before the 1 / T, so the bits are
        # those of the entry's one-hot form. A -inf chosen logit keeps the tile's 0.
        grad_chosen = (_grad_without_one_hot(z_chosen, center, offset, scale2, entropy,
                                             grad_entropy, grad_logprob, HAS_LOGPROB_GRAD)
                       + grad_logprob) * inv_temperature
        if ROUND_TO_BF16:
            grad_chosen = _round_to_bf16(grad_chosen)
        tl.debug_barrier()  # the tile's store of this entry lands first, then this one
        tl.store(grad_logits_ptr + row * V + token,
                 grad_chosen.to(grad_logits_ptr.dtype.element_ty),
                 mask=chosen_here & (z_chosen != float("-inf")))


@triton.jit
def _grad_without_one_hot(z, center, offset, scale2, entropy, grad_entropy, grad_logprob,
                          HAS_LOGPROB_GRAD: tl.constexpr):
    """T dz_j but the one-hot term: -gH p_j (ln p_j + H), minus gL p_j with a log-prob gradient,
    for a tile or for one entry (the same arithmetic, so the same bits).

    log2 p_j = (z_j - center) k - offset. ln p_j + H is formed with log2 p_j clamped at EXP2_FLOOR,
    as the C++ and CUDA kernels clamp it: where p_j is 0 (z = -inf, or log2 p_j below the range:
    -1e38 masks, T ~ 1e-20) it stays finite times gH, so that p_j times it is exactly 0
    (unclamped, a huge finite log2 p_j times gH / T overflowed and 0 * inf gave NaN); where 2^d is
    nonzero on the GPU it changes nothing. The caller multiplies by 1 / T last, after p_j, for the
    same reason: at T ~ 1e-38 even EXP2_FLOOR gH / T overflowed."""
    log2_p = (z - center) * scale2 - offset
    p = tl.exp2(log2_p)
    log_factor = tl.fma(tl.maximum(log2_p, EXP2_FLOOR), LN2, entropy)
    if HAS_LOGPROB_GRAD:
        return p * (-grad_entropy * log_factor - grad_logprob)
    return -grad_entropy * p * log_factor


def _center_temperature(temperature: float) -> tuple[float, float]:
    """T for the backward's centers as a float pair; (0, 0) past CENTERLESS_TEMPERATURE."""
    return (0.0, 0.0) if temperature >= CENTERLESS_TEMPERATURE else _float32_pair(temperature)


def _float32_pair(value: float) -> tuple[float, float]:
    """value as two float32s hi + lo (Triton passes float arguments as float32), good to ~2^-48
    relative: hi is value rounded, lo the rest rounded."""
    high = _to_float32(value)
    return high, _to_float32(value - high)


def _to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _block_size(vocab: int) -> int:
    """Tile width along the vocabulary: a function of V only (batch invariance)."""
    return min(MAX_BLOCK, max(MIN_BLOCK, next_power_of_2(vocab)))


def _tile_warps(block: int) -> int:
    """Warps of a tile program: ELEMENTS_PER_THREAD entries per thread (fewer for a small tile).
    The constant is read at each call, so that bench/tune.py's candidates take effect."""
    return max(1, block // (32 * ELEMENTS_PER_THREAD))


def _grid_size(rows: int, num_chunks: int) -> int:
    programs = rows * num_chunks
    if programs > MAX_GRID:
        raise ValueError(
            f"{rows} rows x {num_chunks} vocabulary chunks = {programs} programs exceeds Triton's "
            f"grid limit {MAX_GRID}; split the batch")
    return programs


def _check_layout(logits: torch.Tensor) -> None:
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(
            f"the Triton kernels need logits with a contiguous last dim, got strides "
            f"{logits.stride()}")


@launches_on_tensor_device
def softmax_stats_fwd(
    logits: torch.Tensor, tokens: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, lse, logprobs or an empty tensor) of softmax(logits / temperature) per row.

    Two launches at most: the tile kernel, and the merge kernel when V > MAX_BLOCK. Extra memory:
    12 bytes per (row, chunk) of partials. No host sync (a token id outside [0, V) gives NaN)."""
    rows, vocab = logits.shape
    entropy = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((rows,), dtype=torch.float64, device=logits.device)
    has_tokens = tokens is not None
    logprobs = torch.empty((rows if has_tokens else 0,), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return entropy, lse, logprobs
    _check_layout(logits)
    tokens_arg = tokens.contiguous() if has_tokens else entropy  # not read without tokens
    block = _block_size(vocab)
    num_chunks = cdiv(vocab, block)
    scale2 = math.log2(math.e) / temperature
    inv_temperature = _float32_pair(1.0 / temperature)
    stride_row = logits.stride(0)
    if num_chunks == 1:
        _softmax_stats_fwd_kernel[(rows,)](
            logits, tokens_arg, entropy, entropy, entropy, entropy, lse, logprobs,
            rows, vocab, 1, stride_row, scale2, *inv_temperature,
            HAS_TOKENS=has_tokens, SINGLE_CHUNK=True, BLOCK=block,
            num_warps=_tile_warps(block))
        return entropy, lse, logprobs
    programs = _grid_size(rows, num_chunks)
    partial_max, partial_total, partial_weighted = torch.empty(
        (3, programs), dtype=torch.float32, device=logits.device).unbind(0)
    _softmax_stats_fwd_kernel[(programs,)](
        logits, tokens_arg, partial_max, partial_total, partial_weighted,
        entropy, lse, logprobs, rows, vocab, num_chunks, stride_row, scale2, *inv_temperature,
        HAS_TOKENS=has_tokens, SINGLE_CHUNK=False, BLOCK=block,
        num_warps=_tile_warps(block))
    block_chunks = next_power_of_2(num_chunks)
    block_rows = max(1, MERGE_TILE // block_chunks)
    _softmax_stats_merge_kernel[(cdiv(rows, block_rows),)](
        partial_max, partial_total, partial_weighted,
        logits, tokens_arg, entropy, lse, logprobs,
        rows, vocab, num_chunks, stride_row, scale2, *inv_temperature,
        HAS_TOKENS=has_tokens, BLOCK_ROWS=block_rows, BLOCK_CHUNKS=block_chunks,
        num_warps=MERGE_WARPS)
    return entropy, lse, logprobs


@launches_on_tensor_device
def softmax_stats_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor | None,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d/dlogits of sum(grad_entropy * entropy + grad_logprobs * logprobs): one launch, one read
    of the logits and one write of the gradient ([N, V] contiguous, logits.dtype).

    ``out``: where to write the gradient instead of a new tensor; it may be ``logits`` itself
    when those are contiguous (each tile is read whole before its gradient is stored, and no
    program reads another's tile: the chosen token's logit, read once more for its one-hot
    entry, is read by the program that owns it, before its first barrier), which
    linear_entropy_loss uses to hold one buffer, not two."""
    rows, vocab = logits.shape
    if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {logits.dtype} tensor of shape "
                         f"{tuple(logits.shape)}, got {out.dtype} {tuple(out.shape)}")
    grad_logits = out if out is not None else torch.empty(
        (rows, vocab), dtype=logits.dtype, device=logits.device)
    if rows == 0:
        return grad_logits
    _check_layout(logits)
    has_logprob_grad = tokens is not None and grad_logprobs is not None
    # The forward's tiles: each entry's gradient is computed alone, so the tile changes the
    # schedule, never the bits.
    block = _block_size(vocab)
    num_chunks = cdiv(vocab, block)
    programs = _grid_size(rows, num_chunks)
    grad_entropy = grad_entropy.contiguous()
    tokens_arg = tokens.contiguous() if has_logprob_grad else grad_entropy  # unread then
    grad_logprobs_arg = grad_logprobs.contiguous() if has_logprob_grad else grad_entropy
    _softmax_stats_bwd_kernel[(programs,)](
        logits, tokens_arg, entropy.contiguous(), lse.contiguous(), grad_entropy,
        grad_logprobs_arg, grad_logits,
        vocab, num_chunks, logits.stride(0), math.log2(math.e) / temperature,
        *_float32_pair(1.0 / temperature), *_center_temperature(temperature),
        HAS_LOGPROB_GRAD=has_logprob_grad,
        ROUND_TO_BF16=logits.dtype == torch.bfloat16 and logits.device.type == "cpu",
        BLOCK=block, num_warps=_tile_warps(block))
    return grad_logits
