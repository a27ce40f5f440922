// Schemas of the compiled ops (namespace em_C) and the Python module stub.
//
// Each kernel translation unit registers its own CPU or CUDA implementation with
// TORCH_LIBRARY_IMPL(em_C, CPU|CUDA, m); the fake (meta) kernels that torch.compile needs and the
// autograd formulas live in Python (em_kernels/_extension.py, em_kernels/_ops/).
//
// Conventions shared by every op: logits are 2-D [N, V] with a contiguous last dim and any row
// stride, in float32, bfloat16 or float16; statistics and results are float32 but lse, which is
// float64 (em/softmax_stats.h says why); temperature > 0.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(em_C, m) {
  // Per row of softmax(logits / temperature): (entropy, lse, logprobs of tokens or an empty
  // tensor when tokens is None). A token id outside [0, V) gives a NaN log-prob.
  m.def(
      "softmax_stats_fwd(Tensor logits, Tensor? tokens, float temperature)"
      " -> (Tensor, Tensor, Tensor)");
  // d/dlogits of sum(grad_entropy * entropy + grad_logprobs * logprobs), in the logits' dtype. A
  // token id outside [0, V) has its logit elsewhere (a vocabulary shard): -p, no one-hot.
  m.def(
      "softmax_stats_bwd(Tensor logits, Tensor? tokens, Tensor entropy, Tensor lse,"
      " Tensor grad_entropy, Tensor? grad_logprobs, float temperature) -> Tensor");
  // EM-INF: `steps` optimiser steps on an fp32 copy of the logits (adam or sgd), loss
  // H + kl_weight * KL(p0 || p), per-row (batch_exit=False) or batch-wide early exit.
  m.def(
      "em_inf_adjust(Tensor logits, int steps, float lr, float kl_weight, float threshold,"
      " bool adam, bool batch_exit) -> Tensor");
  // Adaptive temperature: per row, logits / tau with tau bisected in [0.01, 1].
  m.def(
      "adaptive_temperature(Tensor logits, float alpha, float delta, int max_iters, float tol)"
      " -> Tensor");
}

// The extension registers everything through TORCH_LIBRARY; Python only needs an importable
// module so that `import em_kernels._C` runs the registrations above. Its one attribute,
// with_cuda, says whether the CUDA part was compiled in (setup.py defines EM_WITH_CUDA).
extern "C" PyObject* PyInit__C(void) {
#if defined(EM_WITH_CUDA)
  constexpr long kWithCuda = 1;
#else
  constexpr long kWithCuda = 0;
#endif
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "em-kernels compiled ops", -1,
                                   nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
