"""em-kernels: fused softmax-entropy kernels for entropy minimisation in LLMs.

Public API (re-exports only; each function's docstring has the details):

- entropy(logits)                      entropy of softmax(logits / T) per row
- logprobs_and_entropy(logits, tokens) log p(token) and entropy per row, one read of the logits
- linear_entropy(hidden, weight, ...)  the same straight from hidden states and the LM head
- linear_entropy_loss(hidden, weight, ...)  a weighted sum of those, gradients in its forward
- linear_policy_loss(hidden, weight, ...)   PPO's clipped policy loss (+ k3 KL), the same way
- em_inf_adjust(logits, ...)           EM-INF's logit adjustment at decode time
- adaptive_temperature(logits, ...)    the paper's adaptive-temperature baseline
- available_backends()                 which backends can run here, or why not
"""

from ._backend import BackendUnavailableError, available_backends
from .em_inf import adaptive_temperature, em_inf_adjust
from .entropy import entropy, logprobs_and_entropy
from .linear_entropy import LinearEntropyOutput, linear_entropy
from .linear_loss import LinearEntropyLoss, linear_entropy_loss, linear_policy_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LinearEntropyLoss",
    "LinearEntropyOutput",
    "adaptive_temperature",
    "available_backends",
    "em_inf_adjust",
    "entropy",
    "linear_entropy",
    "linear_entropy_loss",
    "linear_policy_loss",
    "logprobs_and_entropy",
]
