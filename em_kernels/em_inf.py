"""TEMPORARY: reference-backed stand-ins so that em_algos can be written against the API; the
EM-INF work (issue 6) replaces this whole module with the kernels."""

from .reference import adaptive_temperature_ref, em_inf_adjust_ref


def em_inf_adjust(logits, *, steps=5, lr=0.1, kl_weight=0.001, threshold=0.3,
                  optimizer="adam", early_exit="row", backend="auto"):
    return em_inf_adjust_ref(logits, steps, lr, kl_weight, threshold, optimizer, early_exit).float()


def adaptive_temperature(logits, *, alpha=0.5, delta=0.1, max_iters=100, tol=0.01,
                         backend="auto"):
    return adaptive_temperature_ref(logits, alpha, delta, max_iters, tol).float()
