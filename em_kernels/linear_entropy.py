"""TEMPORARY: a materialising stand-in so that em_algos can be written against the API; the
linear_entropy work (issue 5) replaces this whole module with the fused kernels."""
from typing import NamedTuple

import torch

from .reference import linear_entropy_ref


class LinearEntropyOutput(NamedTuple):
    entropy: torch.Tensor
    logprobs: torch.Tensor | None


def linear_entropy(hidden, weight, *, bias=None, tokens=None, temperature=1.0,
                   process_group=None, backend="auto"):
    entropy, logprobs = linear_entropy_ref(hidden, weight, bias, tokens, temperature)
    return LinearEntropyOutput(entropy.float(), None if logprobs is None else logprobs.float())
