"""PLACEHOLDER: replaced by the EM-INF work (issue 6)."""


def em_inf_adjust(logits, *, steps=5, lr=0.1, kl_weight=0.001, threshold=0.3,
                  optimizer="adam", early_exit="row", backend="auto"):
    raise NotImplementedError("em_inf_adjust is not written yet")


def adaptive_temperature(logits, *, alpha=0.5, delta=0.1, max_iters=100, tol=0.01,
                         backend="auto"):
    raise NotImplementedError("adaptive_temperature is not written yet")
