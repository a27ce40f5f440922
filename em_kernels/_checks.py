"""Argument checks shared by the public functions (errors a user can act on, no host syncs), and
the input normalisations they share, `as_rows` and `RowLayout`.

Every check here reads only metadata (dtype, shape, device), except `check_token_range`, which
reads token values on CPU tensors only (where it costs no device sync; never on meta, fake or
vmapped tensors)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# EM_KERNELS_CHECK_TOKENS=1 also checks token ranges of CUDA tensors eagerly (one host sync).
_CHECK_CUDA_TOKENS = os.environ.get("EM_KERNELS_CHECK_TOKENS", "0") == "1"


def check_dense(tensor: torch.Tensor, name: str) -> None:
    """A strided tensor: the kernels read strides, which sparse and nested tensors lack (torch
    would fail inside the op with a message about reshape, strides or NestedTensorImpl)."""
    if tensor.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested one: pad it "
                        "first (torch.nested.to_padded_tensor)")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {tensor.layout} one: "
                        f"pass {name}.to_dense()")


def check_float_tensor(tensor, backend: str, name: str) -> None:
    """A dense tensor of a floating dtype the backend runs (float64 with backend="torch" only)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    check_dense(tensor, name)
    allowed = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if tensor.dtype not in allowed:
        hint = " (float64 runs only with backend=\"torch\")" if tensor.dtype == torch.float64 else ""
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}{hint}")


def check_autograd_mode(tensor: torch.Tensor, op: str) -> None:
    """The ops have a reverse-mode formula for torch.autograd only. A forward-mode tangent
    (torch.func.jvp, torch.autograd.forward_ad) would come back as zeros, silently, and
    torch.func.grad / vjp / jacrev fail inside torch: refuse both with a clear error (vmap
    runs). Not while tracing (Dynamo would have to trace the probes)."""
    if torch.compiler.is_compiling():
        return
    if torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None:
        raise NotImplementedError(
            f"{op} has no forward-mode AD formula (torch.func.jvp, forward_ad); use reverse "
            "mode (loss.backward() or torch.autograd.grad)")
    if torch._C._functorch.is_gradtrackingtensor(tensor):
        raise NotImplementedError(
            f"{op} supports torch.autograd (loss.backward(), torch.autograd.grad), not the "
            "torch.func gradient transforms (grad, vjp, jacrev)")


def check_logits(logits, backend: str, name: str = "logits") -> None:
    check_float_tensor(logits, backend, name)
    if logits.dim() == 0:
        raise ValueError(f"{name} must have at least one dim (..., V); got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last dim (V = 0): there is no distribution")


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, allow_inf: bool = False) -> float:
    """A Python int or float (not bool), or a NumPy one (np.float32(0.7) from a config), never
    NaN, finite unless allow_inf, within [low, high] ((low, high] with low_open; either bound
    may be None); returned as a float."""
    value = _numpy_scalar_as_python(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{name} must be {_describe_range(low, high, low_open, allow_inf)}, "
                         f"got an int of {value.bit_length()} bits") from None
    # Comparisons rather than math.isnan / math.isinf: under torch.compile(dynamic=True) the
    # value is symbolic, and Dynamo traces comparisons but not the math module's tests. NaN
    # first: an order comparison of a symbolic NaN raises inside the tracer.
    is_nan = value != value
    is_inf = not is_nan and (value == math.inf or value == -math.inf)
    if is_nan or (is_inf and not allow_inf) or (
            low is not None and (value <= low if low_open else value < low)) or (
            high is not None and value > high):
        raise ValueError(f"{name} must be {_describe_range(low, high, low_open, allow_inf)}, "
                         f"got {value}")
    return value


def _describe_range(low, high, low_open: bool, allow_inf: bool) -> str:
    kind = "a number (not NaN)" if allow_inf else "a finite number"
    if low == 0 and high is None:
        if not low_open:
            return f"{kind} >= 0"
        return f"{kind} > 0" if allow_inf else "a finite positive number"
    if low is None and high is None:
        return kind
    return (f"{kind} in {'(' if low_open else '['}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}]")


def _numpy_scalar_as_python(value):
    """A NumPy scalar (np.int64(1) from an array, np.float32(0.7) from a config) as the Python
    number it holds (np.bool_ as a bool); anything else as it is."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    return value


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """An int (not bool), Python's or a NumPy scalar, in [minimum, maximum] (no upper bound when
    maximum is None); returned as a Python int."""
    value = _numpy_scalar_as_python(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f'unknown {name} "{value}"; choose one of ' +
                         ", ".join(f'"{c}"' for c in choices))
    return value


# The largest float32: the kernels take their float parameters in float32, so a larger one would
# become inf there.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# The kernels scale logits by log2(e) / T and 1 / T in float32: below MIN_TEMPERATURE the first
# is inf; above MAX_TEMPERATURE the second is no longer a normal float32 (and from ~1e45 both
# round to 0, where a masked entry's -inf * 0 is NaN).
MIN_TEMPERATURE = math.log2(math.e) / FLOAT32_MAX
MAX_TEMPERATURE = 1.0 / float(torch.finfo(torch.float32).tiny)


def _three_digits_inward(bound: float, upper: bool) -> str:
    """The bound to three significant digits, rounded into the range it bounds (down for an
    upper bound), so that the number a message names is itself allowed."""
    rounded = float(f"{bound:.3g}")
    if (rounded > bound) if upper else (rounded < bound):
        step = 10.0 ** (math.floor(math.log10(bound)) - 2)
        rounded = rounded - step if upper else rounded + step
    return f"{rounded:.2e}"


# Formatted once here: Dynamo fails on the format specs while tracing with a symbolic temperature
# (torch.compile(dynamic=True)), which would hide the message behind an internal error.
_MIN_TEMPERATURE_TEXT = _three_digits_inward(MIN_TEMPERATURE, upper=False)
_MAX_TEMPERATURE_TEXT = _three_digits_inward(MAX_TEMPERATURE, upper=True)


def check_temperature(temperature) -> float:
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {_MIN_TEMPERATURE_TEXT} (below it "
                         f"log2(e) / T overflows float32), got {temperature}")
    if temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be <= {_MAX_TEMPERATURE_TEXT} (above it 1 / T "
                         f"is not a normal float32), got {temperature}")
    return temperature


def check_tokens(tokens, leading_shape: torch.Size, vocab: int | None, device: torch.device,
                 rows_of: str = "logits") -> None:
    """tokens: int64, shape ``leading_shape``, same device, values in [0, vocab) (vocab None:
    the caller checks the range once it knows the vocabulary, as in vocab-parallel mode);
    ``rows_of`` names the tensor whose rows they label in the messages."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    check_dense(tokens, "tokens")
    if tokens.dtype != torch.int64:
        raise TypeError(f"tokens must be int64 (torch.long), got {tokens.dtype}")
    if tokens.shape != leading_shape:
        raise ValueError(
            f"tokens must have the {rows_of}' leading shape {tuple(leading_shape)}, "
            f"got {tuple(tokens.shape)}")
    if tokens.device != device:
        raise ValueError(f"tokens are on {tokens.device} but the {rows_of} are on {device}")
    if vocab is not None:
        check_token_range(tokens, vocab)


def check_token_range(tokens: torch.Tensor, vocab: int | torch.Tensor) -> None:
    """Raise ValueError for ids outside [0, vocab) where that costs no device sync: on CPU
    tensors, or on CUDA when EM_KERNELS_CHECK_TOKENS=1. Elsewhere (CUDA, or inside
    torch.compile) the kernels themselves give such a row a NaN log-prob (and no one-hot in its
    gradient), so a bad id is visible without stalling the stream."""
    if tokens.numel() == 0 or torch.compiler.is_compiling():
        return
    if tokens.device.type not in ("cpu", "cuda") or isinstance(
            tokens, torch._subclasses.FakeTensor):  # meta or fake: no values to read
        return
    if torch._C._functorch.is_functorch_wrapped_tensor(tokens):  # under vmap: no .item()
        return
    if tokens.device.type == "cuda" and not _CHECK_CUDA_TOKENS:
        return
    low, high, vocab = int(tokens.min()), int(tokens.max()), int(vocab)  # vocab: or a 0-d tensor
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside [0, {vocab}) (the vocabulary size V)")


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V) with a contiguous last dim: a view when the strides allow it."""
    # The row count spelled out, not -1: under torch.vmap with a batch of 0 the -1 of a
    # zero-element tensor is ambiguous.
    rows = logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])
    if rows.stride(-1) != 1 and rows.shape[-1] != 1:
        rows = rows.contiguous()
    return rows


# RowLayout reads a few rows more than asked rather than copy the logits: at most this fraction
# of the rows asked for (logits[:, :-1] of a (B, T, V) batch reads B - 1 more, 1/(T-1) of them,
# or B more with shift=1; a superset 25% larger still moves fewer bytes than the copy's read and
# write).
MAX_EXTRA_ROWS = 0.25


def check_shift(shift, logits: torch.Tensor) -> int:
    """shift: an int >= 0, at most the logits' positions (their dim -2) when positive."""
    shift = check_int("shift", shift, 0)
    if shift and logits.dim() < 2:
        raise ValueError("shift needs logits of shape (..., T, V), positions along dim -2; got "
                         f"shape {tuple(logits.shape)}")
    if shift and shift > logits.shape[-2]:
        raise ValueError(f"shift={shift} is more than the logits' {logits.shape[-2]} positions "
                         "(dim -2)")
    return shift


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Where the rows of logits (..., V) lie among the 2-D rows (M, V) the kernels take, which
    `RowLayout.rows_of` forms without a copy where a few more rows allow it.

    When the leading dims do not merge into one row stride, reshape copies every row: the whole
    (N, V) logits (2.5 GB in bf16 at 8192 x 151936), a read and a write before the op's own read,
    and kept alive until the backward, which needs the rows. That is the common case of
    `logits[:, :-1]` (the positions that predict a next token) or a response slice
    `logits[:, -R - 1:-1]` of a (B, T, V) batch. There, the rows the view selects lie on a
    lattice: every leading stride is a multiple of the smallest one, s, and the view is a subset
    of the M rows start + m * s, m in [0, M) (all of them, in another order, for transposed
    leading dims). The kernels then run on those M rows, a strided view of the same memory
    (each row's result depends on its row alone, so the extra rows cost their read and nothing
    else), and `results` picks the N asked for. Used when the view's rows do not overlap
    (s >= V, lattice positions distinct) and M - N <= MAX_EXTRA_ROWS * N; else `as_rows`, as
    before. The backward hands the logits the (M, V) gradient as a strided view of the N rows
    they own (`_LatticeRows`): no copy of ours (torch's generic as_strided backward would add
    one), so the copy the reshape cost in the forward is gone, and with it the second copy of
    the logits that the forward held until the backward.

    The slice's own backward still runs after it: torch's slice backward zeroes a tensor of the
    full logits' size and copies the slice's gradient into it (at the headline shape 2.5 GB
    written twice and read once, about the traffic of the whole entropy backward, with both
    gradients alive at once). `rows_of_shifted` (the ops' ``shift``) avoids it: given the full
    (..., T, V) logits, whose leading dims merge into one row stride as a model's output does,
    the kernels run on all their M rows, the layout picks the positions t < T - shift, and the
    backward hands the logits themselves the (M, V) gradient, a plain view's, with the last
    positions zeroed by a hook on the rows (`_zero_last_positions`): written once.

    Eager tensors only (not under torch.compile, vmap, or on fake or meta tensors): there the
    plain reshape (and slice) stays, and the compiler sees what it always did; nor under
    anomaly detection (`_may_read_more`).

    The layout holds no tensor, so an autograd context may keep it without keeping the logits
    alive outside save_for_backward (where activation offloading and checkpointing see them).
    """

    leading: torch.Size  # the leading shape of the rows asked for, N rows in all
    total: int  # M, the rows the kernels run on
    lattice_strides: tuple[int, ...] | None  # the leading dims' strides in rows; None: as_rows

    @classmethod
    def rows_of(cls, logits: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
        """(the (M, V) rows the kernels run on, their layout)."""
        lattice = _row_lattice(logits) if _may_read_more(logits) else None
        if lattice is None:
            rows = as_rows(logits)
            return rows, cls(logits.shape[:-1], rows.shape[0], None)
        total, row_stride, lattice_strides = lattice
        rows = _LatticeRows.apply(logits, total, row_stride, lattice_strides)
        return rows, cls(logits.shape[:-1], total, lattice_strides)

    @classmethod
    def rows_of_shifted(cls, logits: torch.Tensor, shift: int) -> tuple[torch.Tensor, RowLayout]:
        """The rows of logits[..., :T - shift, :] (the positions whose token ``shift`` on is
        known; ``shift`` checked by `check_shift`) and their layout, with the full logits'
        gradient written by the backward where their rows have one stride (see above); else
        `rows_of` on that slice."""
        if not shift:
            return cls.rows_of(logits)
        positions = logits.shape[-2] - shift
        leading = logits.shape[:-2] + (positions,)
        total, count = math.prod(logits.shape[:-1]), math.prod(leading)
        if (count == 0 or total - count > MAX_EXTRA_ROWS * count or not _may_read_more(logits)
                or not _rows_have_one_stride(logits)):
            return cls.rows_of(logits[..., :positions, :])
        lattice_strides, rows_per_step = [], 1
        for size in reversed(logits.shape[:-1]):  # the strides of a contiguous (..., T) in rows
            lattice_strides.insert(0, rows_per_step if size > 1 else 0)
            rows_per_step *= size
        rows = logits.view(total, logits.shape[-1])  # the leading dims have one row stride
        if rows.requires_grad:
            rows.register_hook(functools.partial(_zero_last_positions, logits.shape, shift))
        return rows, cls(leading, total, tuple(lattice_strides))

    def results(self, values: torch.Tensor) -> torch.Tensor:
        """A per-row result of the kernels, (M,), as the leading shape (...)."""
        if self.lattice_strides is None:
            return values.reshape(self.leading)
        return values.as_strided(self.leading, self.lattice_strides).contiguous()

    def picked(self, values: torch.Tensor) -> torch.Tensor:
        """A per-row result of the kernels, (M,), as the (N,) rows asked for, in the order of
        the leading dims (the order of tokens.reshape(-1))."""
        return self.results(values).reshape(-1)

    def row_values(self, values: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row values of the leading shape, or flattened to (N,) (tokens, merged
        statistics), as the kernels' (M,) rows: ``fill``'s rows (an (M,) tensor), else zeros,
        on the rows that only fill the lattice."""
        if self.lattice_strides is None:
            return values.reshape(self.total).contiguous()
        placed = values.new_zeros(self.total) if fill is None else fill.clone()
        placed.as_strided(self.leading, self.lattice_strides).copy_(values.reshape(self.leading))
        return placed


class _LatticeRows(torch.autograd.Function):
    """logits (..., V) -> the (M, V) rows of stride s that hold them (RowLayout), as a view. The
    gradient of those rows, (M, V), goes back as the strided view of its rows that the logits
    own (row m at m * V): no copy."""

    @staticmethod
    def forward(ctx, logits, total, row_stride, lattice_strides):
        ctx.shape, ctx.lattice_strides = logits.shape, lattice_strides
        return logits.as_strided((total, logits.shape[-1]), (row_stride, 1))

    @staticmethod
    def backward(ctx, grad_rows):
        grad_rows = grad_rows.contiguous()
        vocab = ctx.shape[-1]
        strides = [step * vocab for step in ctx.lattice_strides] + [1]
        grad = grad_rows.as_strided(ctx.shape, strides, grad_rows.storage_offset())
        return grad, None, None, None


def _zero_last_positions(shape: torch.Size, shift: int, grad_rows: torch.Tensor) -> torch.Tensor:
    """The gradient of the (M, V) rows of logits ``shape`` (..., T, V) with the last ``shift``
    positions zeroed (whatever the kernels computed there, NaN included): M / T * shift * V
    stores, where slicing first would have torch zero all M V entries and copy the rest into
    them (RowLayout.rows_of_shifted). In place: a hook on the rows, whose gradient is the
    backward op's fresh output, which autograd hands to them alone."""
    grad = grad_rows.contiguous().view(shape)
    grad[..., shape[-2] - shift:, :].zero_()
    return grad.view(grad_rows.shape)


def transform_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is active, eagerly, over any of the
    ops' arguments or none: autograd.Functions fail there (they need setup_context), and only
    the dispatcher hands the ops' vmap rules their arguments."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def eager_tensor(tensor: torch.Tensor) -> bool:
    """Not tracing (torch.compile), no torch.func transform active (`transform_active`), and a
    real CPU or CUDA tensor: not fake, meta or vmapped. There the public functions may call an
    op's body directly rather than through the dispatcher."""
    return (not torch.compiler.is_compiling() and tensor.device.type in ("cpu", "cuda")
            and not isinstance(tensor, torch._subclasses.FakeTensor)
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
            and not transform_active())


def _may_read_more(logits: torch.Tensor) -> bool:
    """Whether RowLayout may run the kernels on rows besides those asked for: eager tensors
    only, and not under anomaly detection, which flags a NaN in any backward output, where
    those rows' gradients (NaN from a NaN row, say) appear before they are dropped."""
    return eager_tensor(logits) and not torch.is_anomaly_enabled()


def _leading_dims(logits: torch.Tensor) -> tuple[list[tuple[int, int]], bool]:
    """The (size, stride) of logits' leading dims of size > 1, outermost first, and whether
    they merge into one row stride (each stride the next one's times its size: a plain view
    under reshape)."""
    dims = [(size, stride) for size, stride in zip(logits.shape[:-1], logits.stride()[:-1])
            if size > 1]
    merge = all(outer_stride == inner_stride * inner_size
                for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]))
    return dims, merge


def _rows_have_one_stride(logits: torch.Tensor) -> bool:
    """Whether logits' leading dims merge into one row stride s >= V (rows m * s, as reshape
    views them: a model's output) with a contiguous last dim."""
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        return False
    dims, merge = _leading_dims(logits)
    return merge and (not dims or dims[-1][1] >= logits.shape[-1])


def _row_lattice(logits: torch.Tensor) -> tuple[int, int, tuple[int, ...]] | None:
    """(M, s, the leading dims' strides in rows of s) when the leading dims do not merge into
    one row stride (reshape would copy) but logits' rows are N of the M rows start + m * s
    (RowLayout), with M <= (1 + MAX_EXTRA_ROWS) N (M = N: the rows in another order, as
    transposed leading dims give them); else None."""
    vocab = logits.shape[-1]
    if logits.numel() == 0:
        return None
    dims, merge = _leading_dims(logits)
    if len(dims) < 2 or logits.stride(-1) != 1 or merge:  # merged: reshape gives a plain view
        return None
    row_stride = min(stride for _, stride in dims)
    if row_stride < vocab or any(stride % row_stride for _, stride in dims):
        return None
    span = 0  # the lattice positions are distinct when each step passes all smaller dims' span
    for step, size in sorted((stride // row_stride, size) for size, stride in dims):
        if step <= span:
            return None
        span += (size - 1) * step
    total, count = span + 1, math.prod(size for size, _ in dims)
    if total - count > MAX_EXTRA_ROWS * count:
        return None
    steps = tuple(stride // row_stride if size > 1 else 0
                  for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]))
    return total, row_stride, steps
