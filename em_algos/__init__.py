"""Reference implementations of the paper's three methods on Hugging Face causal LMs, built only
on em_kernels' public API: EM-FT (em_ft), EM-RL (em_rl) and EM-INF in generate() (em_inf)."""
