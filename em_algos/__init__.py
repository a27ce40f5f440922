"""Reference implementations of the paper's three methods on Hugging Face causal LMs, built only
on em_kernels' public API: EM-FT (em_ft), EM-RL (em_rl) and EM-INF in generate() (em_inf).

transformers is imported lazily, by the functions that need it."""

from .em_ft import EMFTTrainer, em_ft_loss
from .em_rl import EMRLTrainer, grpo_advantages, rloo_advantages, sequence_reward, token_reward

__all__ = [
    "EMFTTrainer",
    "EMRLTrainer",
    "em_ft_loss",
    "grpo_advantages",
    "rloo_advantages",
    "sequence_reward",
    "token_reward",
]
