"""Triton kernels for `linear_entropy`: softmax statistics of z = (hidden @ weight^T + bias) / T
computed tile by tile on the tensor cores, without ever writing the [N, V] logits.

Notation: hidden h [N, H], weight W [V, H] (one vocab shard in vocab-parallel mode), bias b [V],
z = (h W^T + b) / T, p = softmax(z), lse = logsumexp(z), entropy E = lse - sum_j p_j z_j.

Forward, `_linear_entropy_fwd_kernel`, one program per (row tile, vocab split); a split is
TILES_PER_SPLIT consecutive vocab tiles. For each of its vocab tiles the program computes the
[BLOCK_N, BLOCK_V] logit tile with tl.dot over H in BLOCK_H steps (fp32 accumulator), then in the
epilogue folds the tile into online row statistics relative to the running max m:

    s = sum_j exp(z_j - m),   t = sum_j exp(z_j - m) (z_j - m),   chosen = z_y (the token's logit)

and writes (m, s, t, chosen) of its split to a workspace [4, num_splits, N] (no atomics). The host
(em_kernels/_ops/linear_entropy.py) merges the splits in a fixed order, so results are bitwise
deterministic, and since the split boundaries depend only on V and the tile sizes (never on N), a
row's result does not depend on which other rows are in the batch. From the merged statistics:
lse = m + log s and E = log s - t / s.

Operand tiles reach shared memory by per-thread async copies, software-pipelined over
num_stages, or, with TileConfig.tma (the 16-bit GPU default on Hopper), by TMA bulk copies from
host-built tensor descriptors. Memory traffic of the forward: the matmul's own (each
program reads its hidden tile once per vocab tile and each weight tile once; grouped program
order keeps GROUP_N row tiles on the same weight tiles at once, so most re-reads hit L2) plus 16
bytes per row per split. Extra memory: the workspace, 16 * N * ceil(V / (BLOCK_V *
TILES_PER_SPLIT)) bytes (4.8 MiB at N 8192, V 152064).

Backward: the dispatcher (em_kernels/_ops/linear_entropy.py, `chunked_backward`) walks the
vocabulary in chunks and calls `linear_entropy_dz`, which recomputes each chunk's logits and
writes its dz (in the matmul operand dtype); cuBLAS then does the two gradient matmuls. No
atomics: the backward is bitwise deterministic.

`_linear_entropy_dz_kernel`, one program per [BLOCK_N, BLOCK_V] tile of a [N, width] chunk whose
first column is vocab id vocab_start: the logit tile by the forward's mainloop (`_logit_tile`,
the same tile sizes and operand path), then in the epilogue, elementwise,

    p = exp2((z - lse) log2 e),   dz = (1/T) [ p (g_lse - g_E (z - lse + E)) + g_chosen onehot(y) ]

(with the float64 lse handed over as c = float(lse), r = float(lse - c), z - lse is taken as
(z - c) - r: exact near the row max, where a float32 lse would round log p to an ulp of |lse|)

(the public function passes g_lse = -g_logprobs and g_chosen = g_logprobs, so that
dz = (1/T) [ -g_E p (log p + E) + g_lp (onehot(y) - p) ]); an entry with z = -inf gets dz = 0,
also when it is the chosen token (as in the entropy ops).
With TileConfig.tma, dz leaves by one TMA bulk store per tile (no per-entry addresses or masks:
they took registers the accumulator needs). Traffic: the matmul's own plus one write of dz in the
operand dtype (2 B/entry for 16-bit inputs: 2.5 GB at N 8192, V 152064, ~0.5 ms of an H200's
bandwidth). The logits never leave the chip: a separate cuBLAS logits matmul and dz pass would
add a 4 B/entry write and read (10 GB).

Gradient filtering (FILTER): a row's BLOCK_V entries of a tile (its segment) whose every |dz| is
below grad_filter_eps (and none NaN) are written as zeros, and `kept` records per (row, segment)
whether they were. The error this causes in one gradient entry is at most eps times the sum
of |operand| over the zeroed entries (for d_hidden[r, k]: eps * sum_j |W[j, k]|; for
d_weight[j, k]: eps * sum_r |h[r, k]|). The dispatcher then leaves the rows with no kept segment
in a chunk out of that chunk's two gradient matmuls (`chunked_backward`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import cdiv, launches_on_tensor_device

_LOG2E = tl.constexpr(1.4426950408889634)
# -127 ln 2: a shift z - m (nats) below it has exp(z - m) < 2^-127, which tl.exp2 flushes to 0 on
# the GPU, so clamping it there changes no product e * shift except 0 * -inf (NaN) -> 0.
_SHIFT_FLOOR = tl.constexpr(-88.02969193111305)


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # rows per tile
    block_v: int  # vocab entries per tile
    block_h: int  # hidden features per tl.dot step
    num_warps: int
    num_stages: int
    tiles_per_split: int  # vocab tiles per forward program (fixes the split boundaries); 1 in
    # the backward, whose programs own one tile each
    group_n: int  # row tiles that walk the same vocab tiles together (L2 reuse of weight tiles)
    # Operands by TMA (Hopper's tensor memory accelerator: host-built descriptors, one bulk copy
    # per tile, bounds handled by the copy engine) instead of per-thread async copies, and in the
    # backward dz stored the same way. Needs sm_90 (the interpreter emulates it); other GPUs and
    # unaligned tensors fall back to pointers.
    tma: bool = False


# Hopper/Ampere, 16-bit inputs. Forward: 128 x 256 x 64 is the largest tile whose fp32
# accumulator (128 regs/thread at 8 warps) leaves room for the epilogue; 3 stages of
# (128 + 256) x 64 x 2 B = 144 KiB of shared memory fit the 228 KiB of an H100/H200 SM.
# 16 tiles per split give 38 splits at V 152064: enough programs to fill 132 SMs from 512 rows up.
# TMA operands: bench/tune.py (H200, 2026-11-27) 13.3 ms against 16.8 ms by pointers at
# M8192-H3584-V152064, 3.98 against 4.64 ms at H 896; unaligned operands fall back to pointers.
# 16 row tiles per group (more reuse of each weight tile in L2): 12.7 against 13.2 ms at H 3584 in
# the same sweep, 3.75 against 3.70 ms at H 896.
_FWD_GPU_16BIT = TileConfig(128, 256, 64, num_warps=8, num_stages=3, tiles_per_split=16,
                            group_n=16, tma=True)
# fp32 inputs run the dots in IEEE fp32 (no tensor cores; TF32 would miss the fp32 tolerance):
# smaller tiles, because an fp32 operand tile is twice the bytes.
_GPU_FP32 = TileConfig(64, 64, 32, num_warps=4, num_stages=3, tiles_per_split=32, group_n=8)
# Interpreter (CPU tensors, tests): 16 is tl.dot's smallest tile, so tiny shapes span many tiles
# and several splits.
_INTERPRETER = TileConfig(16, 16, 16, num_warps=1, num_stages=1, tiles_per_split=2, group_n=2)


def tile_config(device: torch.device, dtype: torch.dtype) -> TileConfig:
    """The forward's tiles for inputs of this dtype on this device."""
    if device.type != "cuda":
        return _INTERPRETER
    if dtype == torch.float32:
        return _GPU_FP32
    return _FWD_GPU_16BIT


# Backward (one logit tile -> its dz per program): the forward's mainloop and tile, since it is
# the same matmul; the dz epilogue stores 64 KiB per tile instead of folding statistics. Their
# block_v is only the default: backward_tile_config sets the dispatcher's filtering segment
# (DZ_TILE_COLS, 256), so tuning cannot vary it.
_BWD_GPU_16BIT = replace(_FWD_GPU_16BIT, tiles_per_split=1)
# fp32: a 256-wide tile in 64 rows keeps the accumulator at 64 registers a thread in 8 warps;
# 3 stages of (64 + 256) x 32 x 4 B = 120 KiB of shared memory.
_BWD_GPU_FP32 = TileConfig(64, 256, 32, num_warps=8, num_stages=3, tiles_per_split=1, group_n=8)


def backward_tile_config(device: torch.device, dtype: torch.dtype, segment: int) -> TileConfig:
    """The backward's tiles for inputs of this dtype on this device, segment columns wide."""
    if device.type != "cuda":
        config = _INTERPRETER
    elif dtype == torch.float32:
        config = _BWD_GPU_FP32
    else:
        config = _BWD_GPU_16BIT
    return replace(config, block_v=segment)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def num_vocab_splits(vocab: int, config: TileConfig) -> int:
    return cdiv(cdiv(vocab, config.block_v), config.tiles_per_split)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST_OPERANDS (set on CPU tensors only): Triton's
    interpreter multiplies bfloat16 tiles as their raw uint16 bits, so there the operands go to
    fp32 first, which gives the same products (a 16-bit product is exact in fp32)."""
    if UPCAST_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _grouped_tile(pid, num_row_tiles, num_col_tiles, GROUP_N: tl.constexpr):
    """Program id -> (row tile, column tile), row tiles fastest within groups of GROUP_N, so the
    programs running at one time share few weight tiles (L2 reuse)."""
    programs_per_group = GROUP_N * num_col_tiles
    group = pid // programs_per_group
    first_row_tile = group * GROUP_N
    rows_in_group = tl.minimum(num_row_tiles - first_row_tile, GROUP_N)
    local = pid % programs_per_group
    return first_row_tile + local % rows_in_group, local // rows_in_group


@triton.jit
def _column_in_tile(token, first_col, BLOCK_V: tl.constexpr):
    """Each row's token as a 32-bit column of the tile that starts at first_col, -1 where it
    lies outside: the one-hot compares 32-bit indices (64-bit ones per entry take registers the
    accumulator needs)."""
    column = token - first_col
    return tl.where((column >= 0) & (column < BLOCK_V), column, -1).to(tl.int32)


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, first_row, rows, row_in, first_col, cols,
                col_in, H, stride_hidden_n, stride_hidden_h, stride_weight_v, stride_weight_h,
                inv_temperature, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST_OPERANDS: tl.constexpr, TMA: tl.constexpr):
    """z = (h[rows] @ W[cols]^T + b[cols]) / T as an fp32 [BLOCK_N, BLOCK_V] tile; -inf in the
    columns past V. rows = first_row + arange(BLOCK_N) and cols = first_col + arange(BLOCK_V),
    int64. TMA: hidden_ptr and weight_ptr are tensor descriptors of blocks [BLOCK_N, BLOCK_H] and
    [BLOCK_V, BLOCK_H], whose loads fill what lies outside the tensors with zeros (the masks of
    the pointer path)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if TMA:
        for k in range(0, H, BLOCK_H):
            hidden_tile = hidden_ptr.load([first_row, k])
            weight_tile = weight_ptr.load([first_col, k])
            acc = _dot(hidden_tile, tl.trans(weight_tile), acc, DOT_PRECISION, UPCAST_OPERANDS)
    else:
        offs_h = tl.arange(0, BLOCK_H)
        hidden_ptrs = (hidden_ptr + rows[:, None] * stride_hidden_n
                       + offs_h[None, :] * stride_hidden_h)
        weight_ptrs = (weight_ptr + cols[None, :] * stride_weight_v
                       + offs_h[:, None] * stride_weight_h)
        for k in range(0, H, BLOCK_H):
            h_in = offs_h < H - k
            hidden_tile = tl.load(hidden_ptrs, mask=row_in[:, None] & h_in[None, :], other=0.0)
            weight_tile = tl.load(weight_ptrs, mask=h_in[:, None] & col_in[None, :], other=0.0)
            acc = _dot(hidden_tile, weight_tile, acc, DOT_PRECISION, UPCAST_OPERANDS)
            hidden_ptrs += BLOCK_H * stride_hidden_h
            weight_ptrs += BLOCK_H * stride_weight_h
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_in[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _linear_entropy_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, partials_ptr,
    N, V, H,
    stride_hidden_n, stride_hidden_h, stride_weight_v, stride_weight_h,
    num_splits, partials_plane, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr, GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, TMA: tl.constexpr,
):
    """Row statistics (m, s, t, chosen) of one split of the vocabulary for one row tile; see
    the module docstring. partials is [4, num_splits, N] fp32, partials_plane = num_splits * N."""
    row_tile, split = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
    first_row = row_tile * BLOCK_N
    rows = (first_row + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_in = rows < N
    if HAS_TOKENS:
        token = tl.load(tokens_ptr + rows, mask=row_in, other=-1)
    row_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_exp_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_tile = split * TILES_PER_SPLIT
    end_tile = tl.minimum(first_tile + TILES_PER_SPLIT, tl.cdiv(V, BLOCK_V))
    for vocab_tile in range(first_tile, end_tile):
        first_col = vocab_tile * BLOCK_V
        cols = (first_col + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_in = cols < V
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, first_row, rows, row_in, first_col,
                        cols, col_in, H,
                        stride_hidden_n, stride_hidden_h, stride_weight_v, stride_weight_h,
                        inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                        UPCAST_OPERANDS, TMA)
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        # Rows with nothing finite yet keep m = -inf; shift by 0 there so that no -inf - -inf
        # (NaN) appears. A shift multiplies a sum only clamped at _SHIFT_FLOOR: masked entries
        # (z = -inf) and earlier tiles whose max lies ~1e38 below (the difference overflows to
        # -inf) have exp = 0 and add 0 * floor = 0 instead of 0 * -inf = NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2((row_max - safe_max) * _LOG2E)
        old_shift = tl.maximum(row_max - safe_max, _SHIFT_FLOOR)
        shifted = z - safe_max[:, None]
        e = tl.exp2(shifted * _LOG2E)
        sum_exp_z = rescale * (sum_exp_z + sum_exp * old_shift) + tl.sum(
            e * tl.maximum(shifted, _SHIFT_FLOOR), axis=1)
        sum_exp = rescale * sum_exp + tl.sum(e, axis=1)
        row_max = new_max
        if HAS_TOKENS:
            chosen += tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :]
                                      == _column_in_tile(token, first_col, BLOCK_V)[:, None],
                                      z, 0.0), axis=1)
    out = partials_ptr + split.to(tl.int64) * N + rows
    tl.store(out, row_max, mask=row_in)
    tl.store(out + partials_plane, sum_exp, mask=row_in)
    tl.store(out + 2 * partials_plane, sum_exp_z, mask=row_in)
    tl.store(out + 3 * partials_plane, chosen, mask=row_in)


@triton.jit
def _linear_entropy_dz_kernel(
    hidden_ptr, weight_ptr, bias_ptr, tokens_ptr, dz_ptr,
    entropy_ptr, lse_center_ptr, lse_offset_ptr, grad_entropy_ptr, grad_lse_ptr, grad_chosen_ptr,
    kept_ptr,
    N, width, H, vocab_start,
    stride_hidden_n, stride_hidden_h, stride_weight_v, stride_weight_h,
    inv_temperature, grad_filter_eps,
    HAS_BIAS: tl.constexpr, HAS_TOKENS: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    TMA: tl.constexpr,
):
    """dz of one [BLOCK_N, BLOCK_V] tile of a vocab chunk: its logits from the chunk's weight
    rows (weight_ptr and bias_ptr start at vocab id vocab_start), then the dz epilogue; dz is
    contiguous [N, width]. See the module docstring."""
    num_col_tiles = tl.cdiv(width, BLOCK_V)
    row_tile, col_tile = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_col_tiles,
                                       GROUP_N)
    first_row = row_tile * BLOCK_N
    first_col = col_tile * BLOCK_V
    rows = (first_row + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (first_col + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_in = rows < N
    col_in = cols < width
    z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, first_row, rows, row_in, first_col, cols,
                    col_in, H, stride_hidden_n, stride_hidden_h, stride_weight_v,
                    stride_weight_h, inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
                    DOT_PRECISION, UPCAST_OPERANDS, TMA)
    # The float64 lse comes as float32 center c + offset r (exact near the row max). The offset
    # goes into per-row factors, so that the tile sees as many row vectors as with one lse:
    # p = e w with e = exp(z - c), w = exp(-r), and log p + E = (z - c) + (E - r).
    lse_center = tl.load(lse_center_ptr + rows, mask=row_in, other=0.0)
    lse_offset = tl.load(lse_offset_ptr + rows, mask=row_in, other=0.0)
    offset_weight = tl.exp2(-lse_offset * _LOG2E)
    entropy = tl.load(entropy_ptr + rows, mask=row_in, other=0.0) - lse_offset
    grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_in, other=0.0) * offset_weight
    grad_lse = tl.load(grad_lse_ptr + rows, mask=row_in, other=0.0) * offset_weight
    shifted = z - lse_center[:, None]
    e = tl.exp2(shifted * _LOG2E)
    safe_shifted = tl.where(e > 0.0, shifted, 0.0)  # p log p -> 0 where z = -inf
    dz = e * (grad_lse[:, None] - grad_entropy[:, None] * (safe_shifted + entropy[:, None]))
    if HAS_TOKENS:
        token = tl.load(tokens_ptr + rows, mask=row_in, other=-1) - vocab_start
        grad_chosen = tl.load(grad_chosen_ptr + rows, mask=row_in, other=0.0)
        # A -inf chosen logit (a -inf bias entry) gets no one-hot term: 0, as every -inf entry.
        chosen_here = ((tl.arange(0, BLOCK_V)[None, :]
                        == _column_in_tile(token, first_col, BLOCK_V)[:, None])
                       & (z != float("-inf")))
        dz += tl.where(chosen_here, grad_chosen[:, None], 0.0)
    inside = row_in[:, None] & col_in[None, :]
    dz = tl.where(inside, dz * inv_temperature, 0.0)
    if FILTER:  # per row of the tile: its BLOCK_V entries are kept or zeroed together; a NaN
        # keeps them (it must reach the gradients: tl.max drops NaN on the GPU)
        has_nan = tl.max((dz != dz).to(tl.int32), axis=1) > 0
        kept = (tl.max(tl.abs(dz), axis=1) >= grad_filter_eps) | has_nan
        dz = tl.where(kept[:, None], dz, 0.0)
        tl.store(kept_ptr + rows * num_col_tiles + col_tile, kept.to(tl.int8), mask=row_in)
    if TMA:  # one bulk copy from shared memory; the copy engine clips rows and columns outside
        dz_ptr.store([first_row, first_col], dz.to(dz_ptr.dtype))
    else:  # 32-bit offsets within the tile (64-bit ones per entry take registers the
        # accumulator needs), the tile's first entry by a 64-bit scalar offset
        tile_offsets = tl.arange(0, BLOCK_N)[:, None] * width + tl.arange(0, BLOCK_V)[None, :]
        tl.store(dz_ptr + (first_row.to(tl.int64) * width + first_col) + tile_offsets,
                 dz.to(dz_ptr.dtype.element_ty), mask=inside)


@launches_on_tensor_device
def linear_entropy_dz(hidden, weight_chunk, bias, vocab_start, tokens, entropy, lse_center,
                      lse_offset, grad_entropy, grad_lse, grad_chosen, temperature,
                      grad_filter_eps, segment, dz, kept):
    """Write dz of one vocab chunk into dz (contiguous [N, width], the matmul operand dtype),
    recomputing its logits from hidden [N, H] and weight_chunk [width, H] (the weight's rows
    vocab_start .. vocab_start + width). bias is the whole [V] bias or None; tokens are ids of
    the whole shard. lse_center + lse_offset: each row's float64 lse split into two float32s
    (`split_lse`). segment: columns per tile, a power of two >= 16 (tl.dot's smallest tile), and a
    row's entries of one tile are its filtering segment. kept (with grad_filter_eps > 0):
    int8 [N, ceil(width / segment)], set to whether each segment was kept."""
    rows, features = hidden.shape
    width = weight_chunk.shape[0]
    if rows == 0 or width == 0:
        return
    config = backward_tile_config(hidden.device, hidden.dtype, segment)
    (hidden_operand, weight_operand, dz_operand), use_tma = _operands(
        config, (hidden, [config.block_n, config.block_h]),
        (weight_chunk, [config.block_v, config.block_h]), (dz, [config.block_n, config.block_v]))
    grid = (cdiv(rows, config.block_n) * cdiv(width, config.block_v),)
    _linear_entropy_dz_kernel[grid](
        hidden_operand, weight_operand,
        bias[vocab_start:vocab_start + width] if bias is not None else dz,
        tokens if tokens is not None else dz, dz_operand,
        entropy, lse_center, lse_offset, grad_entropy, grad_lse,
        grad_chosen if grad_chosen is not None else grad_lse,
        kept if kept is not None else dz,
        rows, width, features, vocab_start,
        hidden.stride(0), hidden.stride(1), weight_chunk.stride(0), weight_chunk.stride(1),
        1.0 / temperature, grad_filter_eps,
        HAS_BIAS=bias is not None, HAS_TOKENS=tokens is not None,
        FILTER=grad_filter_eps > 0, BLOCK_N=config.block_n, BLOCK_V=config.block_v,
        BLOCK_H=config.block_h, GROUP_N=config.group_n,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_OPERANDS=hidden.device.type != "cuda",
        TMA=use_tma, num_warps=config.num_warps, num_stages=config.num_stages,
    )


@launches_on_tensor_device
def linear_entropy_fwd(hidden, weight, bias, tokens, temperature):
    """Per-split row statistics, fp32 [4, num_splits, N]: (max, sum exp, sum exp * (z - max),
    chosen logit or 0), merged by the caller. hidden [N, H], weight [V, H], bias [V] or None,
    tokens [N] int64 (ids of this weight's rows) or None."""
    rows, features = hidden.shape
    vocab = weight.shape[0]
    config = tile_config(hidden.device, hidden.dtype)
    num_splits = num_vocab_splits(vocab, config)
    partials = torch.empty((4, num_splits, rows), dtype=torch.float32, device=hidden.device)
    if rows == 0:
        return partials
    (hidden_operand, weight_operand), use_tma = _operands(
        config, (hidden, [config.block_n, config.block_h]),
        (weight, [config.block_v, config.block_h]))
    grid = (cdiv(rows, config.block_n) * num_splits,)
    _linear_entropy_fwd_kernel[grid](
        hidden_operand, weight_operand, bias if bias is not None else hidden,
        tokens if tokens is not None else hidden, partials,
        rows, vocab, features,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        num_splits, num_splits * rows, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_TOKENS=tokens is not None,
        BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h,
        TILES_PER_SPLIT=config.tiles_per_split, GROUP_N=config.group_n,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_OPERANDS=hidden.device.type != "cuda",
        TMA=use_tma, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return partials


def _operands(config, *tensors_and_blocks):
    """([tensor, ...], True) as TMA descriptors of the given block shapes, when config.tma holds
    and the device and every tensor allow it; else the tensors themselves and False (per-thread
    loads and stores)."""
    tensors = [tensor for tensor, _ in tensors_and_blocks]
    if not (config.tma and _tma_supported(tensors[0].device)
            and all(_tma_compatible(tensor) for tensor in tensors)):
        return tensors, False
    return [TensorDescriptor.from_tensor(tensor, block)
            for tensor, block in tensors_and_blocks], True


@functools.lru_cache(maxsize=None)
def _tma_supported(device: torch.device) -> bool:
    """TMA descriptors need a Hopper or newer GPU (compute capability 9); the interpreter (CPU
    tensors) emulates them."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_compatible(operand: torch.Tensor) -> bool:
    """What a TMA descriptor needs of a 2-D operand: a contiguous last dim, rows that neither
    overlap nor repeat (expand()ed operands have row stride 0), and the base address and the
    row stride in bytes multiples of 16."""
    row_bytes = operand.stride(0) * operand.element_size()
    return (operand.stride(1) == 1 and operand.stride(0) >= operand.shape[1]
            and row_bytes % 16 == 0 and operand.data_ptr() % 16 == 0
            and operand.shape[1] * operand.element_size() >= 16)
