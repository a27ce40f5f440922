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

Upstream gradients and row weights are assumed to be the same on every rank (a replicated loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._ops.linear_entropy import SHIFT_FLOOR


def _require_distributed():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group is given but torch.distributed is not initialised")
    return dist


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in the vocabulary: ids [start, start + local) of ``total``, from the
    shard sizes of every rank (``sizes``, on the tensors' device). start and total stay 0-d
    tensors there, so that nothing here reads the device: only `widest` (the largest shard, which
    fixes chunk sizes that must agree on every rank) and an eager token-range check (on CPU
    tensors, or with EM_KERNELS_CHECK_TOKENS=1) read the sizes on the host."""

    group: object
    local: int
    sizes: torch.Tensor
    start: torch.Tensor
    total: torch.Tensor

    @classmethod
    def of(cls, group, local_vocab: int, device: torch.device) -> VocabShard:
        """One all-gather of the shard sizes (asynchronous on CUDA: no host sync)."""
        dist = _require_distributed()
        # torch.full, not torch.tensor: a host-to-device copy of a Python list waits for the
        # stream on CUDA, a fill does not.
        size = torch.full((1,), local_vocab, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, size, group=group)
        sizes = torch.cat(gathered)
        rank = dist.get_rank(group)
        return cls(group, local_vocab, sizes, sizes[:rank].sum(), sizes.sum())

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
        sums = [shard_weight, entropy_part]
        if local_chosen is not None:
            sums.append(torch.where(owned, local_chosen.to(local_lse.dtype), zero))
        sums = torch.stack(sums)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        log_total = torch.log(sums[0])
        return ((sums[1] / sums[0] + log_total).to(local_entropy.dtype), safe_max + log_total,
                sums[2].to(local_chosen.dtype) if local_chosen is not None else None)

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
