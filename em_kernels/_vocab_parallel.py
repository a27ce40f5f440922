"""Vocab-parallel mode of the entropy ops, `linear_entropy` and the fused losses: each rank of a
process group holds a contiguous shard of the vocabulary (of the logits, or of the LM head), rank
r the ids after those of ranks 0..r-1, and the rows' statistics are merged across the ranks into
the full-vocabulary ones.

The merge of per-shard (lse_r, H_r, chosen logit) into the full vocabulary's, one MAX and one SUM
all-reduce of N-vectors:

    M = max_r lse_r,  S = sum_r exp(lse_r - M),  lse = M + log S
    H = sum_r w_r (H_r + lse - lse_r) = B / S + log S,   w_r = exp(lse_r - lse),
        B = sum_r exp(lse_r - M) (H_r - (lse_r - M))
    chosen = the owner's chosen logit (a sum in which the other ranks add 0)

computed in lse's dtype (float64 but on MPS: csrc/include/em/softmax_stats.h says why); entropy
and chosen come back in their own dtypes.

Every rank must call the same op with the same arguments apart from its shard. The all-gather of the
shard sizes carries a descriptor of each rank's call (`RankCall`: the op, the row count and shapes,
dtype, temperature, whether tokens are given and a checksum of them, the flags that decide which
collectives run), so a mismatch is found before any collective whose size or count it changes. Where
the host reads the gathered descriptors (CPU tensors; CUDA with EM_KERNELS_CHECK_RANKS=1, one sync;
the fused losses, which read the shard sizes anyway) every rank raises the same ValueError there,
none is left waiting in a collective. Elsewhere (CUDA, where reading would sync) the ranks compare
them on the device, and a mismatch makes every result and gradient NaN instead of a wrong number; a
mismatch in what sizes the collectives or decides which run (rows, hidden's requires_grad) then
still fails or hangs in them, as without the check. A rank that raises while another compares on the
device leaves that one waiting in its next collective: set EM_KERNELS_CHECK_RANKS alike on every
rank. A rank whose own checks refuse its arguments still joins the all-gather, with a refusal
(`shares_refusals`), so that the others raise too rather than wait in it. What decides the
collectives but is legitimately per rank stays out of them: the fused losses cut their row chunks
for two logit buffers in vocab-parallel mode, whatever the rank's backend and which of its shard's
inputs need gradients.

Upstream gradients, hidden states and row weights are assumed to be the same on every rank (a
replicated loss) and not compared: a checksum of floats would refuse values that agree to
rounding but not bitwise, and would cost a read of N x H.
"""

from __future__ import annotations

import contextvars
import functools
import os
import struct
import zlib
from dataclasses import dataclass

import torch

from . import _checks
from ._ops.linear_entropy import SHIFT_FLOOR


def _require_distributed(group=None):
    """torch.distributed, initialised, and ``group`` (where given) one of its process groups."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("process_group is given but this build of torch has no "
                         "torch.distributed")
    if not dist.is_initialized():
        raise ValueError("process_group is given but torch.distributed is not initialised")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed ProcessGroup (such as "
                        f"dist.group.WORLD or one from dist.new_group), got {type(group).__name__}")
    return dist


# EM_KERNELS_CHECK_RANKS=1 compares the ranks' calls on the host on CUDA too (one sync per call).
_CHECK_CUDA_RANKS = os.environ.get("EM_KERNELS_CHECK_RANKS", "0") == "1"

# The ops with a vocab-parallel mode, by their code in the descriptor.
OPS = ("entropy", "logprobs_and_entropy", "linear_entropy", "linear_entropy_loss",
       "linear_policy_loss")
# Descriptor slots for a call's arguments: the most any op in OPS compares (linear_policy_loss's
# 10), so that every rank gathers the same length whatever op it called.
_ARGUMENT_SLOTS = 10
# The descriptor's value for an unused slot, and the token checksum's without tokens.
_ABSENT = -(2 ** 63)
# The op code of a rank that refused its own arguments (`shares_refusals`).
_REFUSED = -1
_DESCRIPTOR_LENGTH = 2 + _ARGUMENT_SLOTS + 1  # shard size, op, arguments, token checksum
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _encoded(value) -> int:
    """An argument as one int64, equal across ranks exactly when the arguments are."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):  # its bits (-0.0 as 0.0): equal exactly when the floats are
        return struct.unpack("<q", struct.pack("<d", value + 0.0))[0]
    if isinstance(value, torch.dtype):
        return _DTYPES.index(value)  # the dtypes the ops take
    if isinstance(value, tuple):  # a shape (torch.Size too): equal shapes, equal checksums
        return zlib.crc32(repr(tuple(value)).encode())
    raise TypeError(f"no descriptor code for a {type(value).__name__}")


def _decoded(code: int, like):
    """`_encoded`'s inverse for a value of ``like``'s type, to print (not for a shape: only its
    checksum travels)."""
    if isinstance(like, bool):
        return bool(code)
    if isinstance(like, int):
        return code
    if isinstance(like, float):
        return struct.unpack("<d", struct.pack("<q", code))[0]
    return _DTYPES[code]


# The token checksum's position weights: (i + 1) times this odd 64-bit constant (2^64 / the golden
# ratio, as a signed int64), wrapping, so that small edits at nearby positions do not cancel.
_POSITION_MIXER = 0x9E3779B97F4A7C15 - 2 ** 64


def _token_checksum(tokens: torch.Tensor) -> torch.Tensor:
    """An order-sensitive int64 checksum of the ids, on their device (no sync): sum_i w_i
    tokens[i] with w_i = (i + 1) * _POSITION_MIXER, wrapping."""
    weights = torch.arange(1, tokens.numel() + 1, device=tokens.device) * _POSITION_MIXER
    return (tokens.reshape(-1).to(torch.int64) * weights).sum().reshape(1)


@dataclass(frozen=True)
class RankCall:
    """What every rank of a vocab-parallel call must agree on: the op and its arguments, by name
    (an int, bool, float, dtype or shape each; the same names for the same op), and the
    tokens (compared by checksum) where the op takes them."""

    op: str
    arguments: tuple[tuple[str, object], ...]
    tokens: torch.Tensor | None = None

    def __post_init__(self):
        if self.op not in OPS or len(self.arguments) > _ARGUMENT_SLOTS:
            raise AssertionError(f"RankCall of {self.op} with {len(self.arguments)} arguments")

    @classmethod
    def on_head(cls, op: str, hidden: torch.Tensor, temperature: float, hidden_needs_grad: bool,
                tokens: torch.Tensor | None, *settings: tuple[str, object]) -> RankCall:
        """A call of an op on an LM-head shard: hidden's rows, size and dtype, the temperature,
        whether hidden needs grad (which decides d_hidden's all-reduce), then the op's own
        ``settings``."""
        return cls(op, (("rows", hidden.shape[0]), ("hidden size", hidden.shape[1]),
                        ("dtype", hidden.dtype), ("temperature", temperature),
                        ("hidden needs grad", hidden_needs_grad), *settings), tokens)

    def descriptor(self, local_vocab: int, device: torch.device) -> torch.Tensor:
        """[local_vocab, op, arguments..., token checksum] as int64 on ``device``. Built on the
        host and copied from pinned memory, asynchronously (a copy of pageable memory, as
        torch.tensor(list, device="cuda") makes, waits for the stream)."""
        codes = [local_vocab, OPS.index(self.op)] + [
            _encoded(value) for _, value in self.arguments]
        codes += [_ABSENT] * (_ARGUMENT_SLOTS - len(self.arguments))
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A CUDA graph would read the pinned buffer at every replay, after it is freed:
            # fills, which the graph records with their values.
            fields = torch.cat([torch.full((1,), code, dtype=torch.int64, device=device)
                                for code in codes])
        else:
            host = torch.tensor(codes, dtype=torch.int64)
            fields = (host.pin_memory() if device.type == "cuda" else host).to(
                device, non_blocking=True)
        checksum = (torch.full((1,), _ABSENT, dtype=torch.int64, device=device)
                    if self.tokens is None else _token_checksum(self.tokens))
        return torch.cat([fields, checksum])

    def disagreement(self, gathered: list[list[int]]) -> str | None:
        """What the ranks' descriptors (host lists, one per rank) disagree on, or None."""
        ops = [OPS[row[1]] if 0 <= row[1] < len(OPS) else f"op #{row[1]}" for row in gathered]
        if len(set(ops)) > 1:
            return "the op called: " + ", ".join(
                f"rank {rank} {op}" for rank, op in enumerate(ops))
        differences = []
        for slot, (name, value) in enumerate(self.arguments, start=2):
            codes = [row[slot] for row in gathered]
            if len(set(codes)) == 1:
                continue
            if isinstance(value, tuple):
                differences.append(f"{name} (this rank's: {tuple(value)})")
            else:
                differences.append(f"{name} (" + ", ".join(
                    f"rank {rank}: {_decoded(code, value)}"
                    for rank, code in enumerate(codes)) + ")")
        checksums = [row[-1] for row in gathered]
        if len(set(checksums)) > 1 and _ABSENT in checksums:
            differences.append("tokens given (" + ", ".join(
                f"rank {rank}: {checksum != _ABSENT}"
                for rank, checksum in enumerate(checksums)) + ")")
        elif len(set(checksums)) > 1:
            differences.append("tokens (their checksums differ)")
        return "; ".join(differences) or None


# Whether the vocab-parallel call running in this context has made its all-gather (or runs
# outside `shares_refusals`): an error before the gather is a refusal, one after it is not.
_gathered = contextvars.ContextVar("em_kernels_vocab_parallel_gathered", default=True)


def shares_refusals(public_op):
    """Decorator of a public op whose keyword ``process_group`` runs vocab-parallel mode: where
    the call raises on this rank before its all-gather (an argument its own checks refuse), the
    rank still joins that gather, with a refusal, and re-raises its error. The other ranks,
    which wait in the gather, then raise a ValueError that names the refusing rank where they
    compare the calls on the host; where they compare on the device (CUDA) they go on and wait
    in their next collective, as before. Eager only: under torch.compile the op runs as is."""
    @functools.wraps(public_op)
    def call(*args, **kwargs):
        group = kwargs.get("process_group")
        if group is None or torch.compiler.is_compiling():
            return public_op(*args, **kwargs)
        token = _gathered.set(False)
        try:
            return public_op(*args, **kwargs)
        except Exception:
            if not _gathered.get():
                _join_as_refused(group, args[0] if args else None)
            raise
        finally:
            _gathered.reset(token)

    return call


def _join_as_refused(group, data) -> None:
    """This rank's part in the all-gather of a call it refused: a descriptor of the others'
    length with the refusal code, on the device their descriptors are on (that of ``data``,
    the logits or hidden states, where it is a CPU or CUDA tensor; else the group's backend's).
    Nothing where there is no group to join (the refusal was about the group itself)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()
            and isinstance(group, dist.ProcessGroup)):
        return
    if isinstance(data, torch.Tensor) and data.device.type in ("cpu", "cuda"):
        device = data.device
    elif "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    codes = [0, _REFUSED] + [_ABSENT] * (_DESCRIPTOR_LENGTH - 2)
    refusal = torch.tensor(codes, dtype=torch.int64, device=device)
    dist.all_gather([torch.empty_like(refusal) for _ in range(dist.get_world_size(group))],
                    refusal, group=group)


def _compared_on_host(device: torch.device) -> bool:
    """Whether the ranks' descriptors are read on the host: on every device but CUDA (CPU
    tensors, as gloo takes them), and on CUDA when asked."""
    return device.type != "cuda" or _CHECK_CUDA_RANKS


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in the vocabulary: ids [start, start + local) of ``total``, from the
    shard sizes of every rank (``sizes``, on the tensors' device). start and total stay 0-d
    tensors there, so that nothing here reads the device: only `widest` (the largest shard, which
    fixes chunk sizes that must agree on every rank), an eager token-range check (on CPU
    tensors, or with EM_KERNELS_CHECK_TOKENS=1) and the comparison of the ranks' calls (see the
    module docstring) read them on the host. ``disagree`` is None where the calls were compared
    on the host, else a 0-d bool on the device: true makes `merge`'s results NaN."""

    group: object
    local: int
    sizes: torch.Tensor
    start: torch.Tensor
    total: torch.Tensor
    disagree: torch.Tensor | None = None

    @classmethod
    def of(cls, group, local_vocab: int, device: torch.device, call: RankCall, *,
           check_on_host: bool = False) -> VocabShard:
        """One all-gather of every rank's shard size and `RankCall` descriptor (asynchronous on
        CUDA: no host sync unless the calls are compared on the host there, which
        ``check_on_host`` asks for where the caller syncs anyway). Raises ValueError, on every
        rank alike, where the calls are compared on the host and disagree."""
        if _checks.transform_active():  # the ops' vocab-parallel autograd.Functions have no rule
            raise NotImplementedError(
                "vocab-parallel mode does not run under torch.vmap or the other torch.func "
                "transforms: flatten the batch into the rows (the logits' leading dims, or "
                "hidden's N) instead")
        dist = _require_distributed(group)
        if device.type == "meta":
            raise NotImplementedError("vocab-parallel mode needs real tensors (its collectives "
                                      "exchange values), not meta tensors")
        descriptor = call.descriptor(local_vocab, device)
        gathered = [torch.empty_like(descriptor) for _ in range(dist.get_world_size(group))]
        _gathered.set(True)  # from here on an error is not a refusal: the gather is made
        dist.all_gather(gathered, descriptor, group=group)
        gathered = torch.stack(gathered)
        disagree = None
        if check_on_host or _compared_on_host(device):
            rows = gathered.tolist()
            refused = [rank for rank, row in enumerate(rows) if row[1] == _REFUSED]
            if refused:
                raise ValueError(
                    f"vocab-parallel {call.op}: rank {', '.join(map(str, refused))} of the "
                    "process group refused its arguments (its own error says which), so no "
                    "rank makes this call")
            difference = call.disagreement(rows)
            if difference is not None:
                raise ValueError(
                    f"vocab-parallel {call.op}: the ranks of the process group disagree on "
                    f"{difference}. Every rank must make the same call with the same arguments "
                    "but for its own shard of the vocabulary (weight and bias, or the logits' "
                    "last dim).")
        else:
            disagree = (gathered[:, 1:] != gathered[:1, 1:]).any()
        sizes = gathered[:, 0]
        rank = dist.get_rank(group)
        return cls(group, local_vocab, sizes, sizes[:rank].sum(), sizes.sum(), disagree)

    @property
    def widest(self) -> int:
        """The largest shard's size, on the host (one sync on CUDA)."""
        return int(self.sizes.max())

    def local_ids(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens - start, owned: the id lies in this shard, valid: it lies in [0, total))."""
        local = tokens - self.start
        owned = (local >= 0) & (local < self.local)
        valid = (tokens >= 0) & (tokens < self.total)
        return local, owned, valid

    def merge(self, local_entropy: torch.Tensor, local_lse: torch.Tensor,
              local_chosen: torch.Tensor | None, owned: torch.Tensor | None):
        """(entropy, lse, chosen) over the full vocabulary from this shard's (see the module
        docstring); chosen is None without local_chosen. A row with no finite logit in a shard
        (lse_r = -inf) takes weight 0 there; one with none anywhere gets lse -inf, entropy NaN."""
        dist = _require_distributed()
        global_max = local_lse.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=self.group)
        safe_max = torch.where(global_max == float("-inf"), torch.zeros_like(global_max),
                               global_max)
        empty_shard = local_lse == float("-inf")
        zero = torch.zeros_like(local_lse)
        gap = (local_lse - safe_max).clamp_min(SHIFT_FLOOR)
        shard_weight = torch.where(empty_shard, zero, torch.exp(gap))
        entropy_part = torch.where(empty_shard, zero, shard_weight * (local_entropy - gap))
        # The chosen row even without tokens (zeros): ranks that disagree on giving tokens, where
        # the calls are compared on the device, still all-reduce the same size (and get NaN).
        chosen_part = (zero if local_chosen is None
                       else torch.where(owned, local_chosen.to(local_lse.dtype), zero))
        sums = torch.stack([shard_weight, entropy_part, chosen_part])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        log_total = torch.log(sums[0])
        results = ((sums[1] / sums[0] + log_total).to(local_entropy.dtype), safe_max + log_total,
                   sums[2].to(local_chosen.dtype) if local_chosen is not None else None)
        if self.disagree is None:
            return results
        return tuple(None if result is None else result.masked_fill(self.disagree, float("nan"))
                     for result in results)

    def merge_logprobs(self, local_entropy, local_lse, local_logprobs, owned, valid):
        """`merge` for the kernels that give shard log-probs (log p_r = chosen - lse_r) rather
        than chosen logits: (entropy, lse, log-probs) over the full vocabulary, NaN log-probs
        for ids outside it (``valid`` False)."""
        local_chosen = torch.where(local_lse == float("-inf"), local_lse,
                                   local_logprobs + local_lse)  # the owner's chosen logit / T
        entropy, lse, chosen = self.merge(local_entropy, local_lse, local_chosen, owned)
        logprobs = (chosen - lse).to(local_logprobs.dtype)
        return entropy, lse, torch.where(valid, logprobs, torch.full_like(logprobs, float("nan")))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist = _require_distributed()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor
