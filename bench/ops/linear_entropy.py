"""linear_entropy: the entropy of softmax(hidden @ weight^T) from hidden [M, H], weight [V, H].

Work (the model TFLOP/s and the roofline fraction use; compute-bound at these sizes):
    fwd      2 M H V        the logits matmul
    bwd      4 M H V        d(hidden) and d(weight)
    fwd+bwd  6 M H V        the three matmuls of a linear layer
The recomputation of the logits in a fused backward is not counted: it is the price of never
holding [M, V], and the roofline fraction shows what it costs.

Providers: matmul (the bare LM-head matmul, the floor; its backward takes a random [M, V]
upstream gradient), eager (matmul, then eager entropy in fp32), compile (torch.compile of eager:
the strongest unfused baseline), chunked (eager over checkpointed row chunks, verl's fallback),
em-kernels' backends, the same backends' linear_entropy_loss ("<backend>-loss": the loss
sum_r u_r H_r with u the upstream gradient the others get, its gradients computed in the
forward; no bwd row, as there is nothing left for its backward to do), and the peers when
installed: TRL's fused LM head (trl, what its GRPO trainer runs since TRL 1.15: the same
entropy, with the log-probs of random targets; on CPU from TRL 1.16), on CUDA verl's (verl, what
its actors run with use_fused_kernels and the triton backend: the same entropy and log-probs),
and on CUDA Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy: they compute
cross-entropy, not entropy, so they show the speed of the nearest fused peer and have no error
column.

Error: the entropy of every row and, in the backward modes, d(hidden) on a subset of rows and
d(weight) on a subset of vocabulary rows, against float64. Every row's lse and entropy come from
one float64 pass over the whole M x H x V matmul, in vocabulary chunks, without holding [M, V];
a row of d(hidden) depends only on its own row, while a row j of d(weight) sums dlogits[:, j] h
over every row, so its oracle takes those lse and entropies.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import NamedTuple

import torch

from em_kernels import reference

from ..harness import OpBench, Provider, Skip, upstream_like
from .common import (chunked, compile_unavailable, compiled, em_providers, never_built,
                     not_offered, package_unavailable)
from .entropy import LOGIT_SCALE, eager_entropy, random_logits

# hidden ~ N(0, 1), weight ~ N(0, 1/H): logits ~ N(0, 1) like a trained LM head's pre-scaling.
WEIGHT_SCALE_POWER = -0.5
# Vocab rows per float64 matmul of the oracle: bounds its [V, H] float64 temporary.
ORACLE_VOCAB_CHUNK = 16384
# The vocab tile TRL's trainers hand its fused LM head (trl.trainer.utils'
# _CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.15 and 1.16), so that the trl row runs as GRPO does.
TRL_VOCAB_CHUNK = 32768
# The module TRL's fused-head backward takes its ZeRO-3 gather context from.
TRL_TRAINER_UTILS = "trl.trainer.utils"
# verl's fused LM head: its autograd Function and the module function that applies it.
VERL_FUSED_LM_HEAD = "verl.utils.kernel.linear_cross_entropy"
# The first verl release with a fused LM head (verl.utils.kernel); its signature, (hidden,
# weight, labels, temperature, reduction, dist_process_group), is unchanged through 0.9.1.
VERL_SINCE = "0.4.1"
# verl's kernels assert that the hidden size is a multiple of 128 (forward and backward).
VERL_HIDDEN_MULTIPLE = 128


def lm_head_matmul(case):
    """The bare LM-head matmul (the floor of every op on the logits): the build of a "matmul"
    provider."""
    return lambda: (case.inputs["hidden"] @ case.inputs["weight"].T,)


def eager_linear_entropy(hidden, weight) -> tuple[torch.Tensor]:
    return eager_entropy(hidden @ weight.T)


class LinearEntropyBench(OpBench):
    name = "linear_entropy"
    dims = ("M", "H", "V")
    bound = "compute"
    grad_inputs = ("hidden", "weight")
    provider_notes = {
        "cpu": 'em-kernels\' path for CPU tensors (backend="cpu"): chunked PyTorch that never '
               "holds [M, V]; this op has no C++ kernel",
        "triton-loss": "linear_entropy_loss with the Triton entropy kernels: logits by cuBLAS "
                       "in bf16 per row chunk, gradients in the forward (three matmuls)",
        "cuda-loss": "linear_entropy_loss with the CUDA entropy kernels",
        "cpu-loss": "linear_entropy_loss with the C++ entropy kernels",
        "liger": "Liger-Kernel's fused linear cross-entropy: cross-entropy, not entropy; its "
                 "gradients come from its forward (recent versions skip them where nothing "
                 "requires grad, as in the fwd row; older ones compute them there too), and it "
                 "syncs once per call (the count of tokens to average over)",
        "cce": "Cut Cross-Entropy: cross-entropy, not entropy, with its default gradient "
               'filtering (filter_eps="auto"; our backward is exact unless asked)',
        "trl": "TRL's fused LM head (trl.kernels.ChunkedLogProbFunction, which GRPOTrainer "
               "runs since TRL 1.15): logits by cuBLAS in tiles of 4096 tokens x 32768 vocab "
               "entries, folded by a Triton kernel (by torch ops on CPU, from TRL 1.16), the "
               "backward recomputing each tile; the entropy, with the log-probs of random "
               "targets",
        "verl": "verl's fused LM head (verl.utils.kernel.linear_cross_entropy, which its actors "
                "run with use_fused_kernels and the triton backend): Triton matmul tiles "
                "updating the softmax statistics online per 1024-entry vocab split, merged by "
                "a second kernel; its backward (0.9.1) recomputes the logit gradient by Triton "
                "into [M, 9504] vocab slices and multiplies those by cuBLAS; the entropy, with "
                "the log-probs of random targets",
    }

    def shapes(self, device_type, full):
        # The shapes: Qwen2.5-7B's head (H 3584), a small RL model's (H 896).
        headline = [{"M": 8192, "H": 3584, "V": 152064}, {"M": 8192, "H": 896, "V": 151936}]
        if full:
            return headline + [{"M": 8192, "H": 4096, "V": 131072},
                               {"M": 4096, "H": 4096, "V": 128256},
                               {"M": 4096, "H": 2560, "V": 262144},
                               {"M": 4096, "H": 4096, "V": 32000},
                               {"M": 16384, "H": 3584, "V": 152064}]
        if device_type == "cuda":
            return headline
        return [{"M": 64, "H": 256, "V": 32000}]

    def dtypes(self, device_type, full):
        if device_type == "cuda" and not full:
            return [torch.bfloat16]
        return [torch.float32] if device_type == "cpu" and not full else [
            torch.bfloat16, torch.float32]

    def make_inputs(self, dims, dtype, device, generator):
        hidden = random_logits(dims["M"], dims["H"], dtype, device, generator) / LOGIT_SCALE
        weight = torch.randn(dims["V"], dims["H"], device=device, generator=generator)
        weight = (weight * dims["H"] ** WEIGHT_SCALE_POWER).to(dtype)
        return {"hidden": hidden, "weight": weight}

    def input_numel(self, dims):
        return (dims["M"] + dims["V"]) * dims["H"]

    def eager_numel(self, dims):
        return max(self.input_numel(dims), dims["M"] * dims["V"])  # eager's [M, V] logits

    def summed_terms(self, dims):
        # the logits are H-term dot products, the statistics V-term sums, a d(weight) row an
        # M-term sum
        return dims["V"] + dims["H"] + dims["M"]

    def traffic(self, dims, dtype, mode):
        mhv = dims["M"] * dims["H"] * dims["V"]
        return None, {"fwd": 2 * mhv, "bwd": 4 * mhv, "fwd+bwd": 6 * mhv}[mode]

    def output_oracle(self, case):
        return [case_float64_rows(case).entropy]

    def grad_oracle(self, case, upstream):
        hidden = case.inputs["hidden"].detach().index_select(0, case.grad_rows).double()
        hidden.requires_grad_()
        weight = case.inputs["weight"].detach()
        entropy = reference.entropy_ref(torch.cat(list(float64_logit_chunks(hidden, weight)), -1))
        entropy.backward(upstream[0].index_select(0, case.grad_rows).double())
        vocab_rows = spread_rows(weight.shape[0], case.grad_rows.numel(), weight.device)
        return {"hidden": hidden.grad,
                "weight": weight_grad_rows(case_float64_rows(case), weight, vocab_rows,
                                           grad_entropy=upstream[0])}

    def providers(self):
        import em_kernels

        def eager(case):
            return lambda: eager_linear_entropy(case.inputs["hidden"], case.inputs["weight"])

        def compile_(case):
            fn = compiled(eager_linear_entropy)
            return lambda: fn(case.inputs["hidden"], case.inputs["weight"])

        def chunked_(case):
            return lambda: chunked(
                eager_linear_entropy, (case.inputs["hidden"],), (case.inputs["weight"],))

        def ours(case, backend):
            return lambda: (em_kernels.linear_entropy(
                case.inputs["hidden"], case.inputs["weight"], backend=backend).entropy,)

        def ours_loss(case, backend):
            hidden = case.inputs["hidden"]
            # The upstream gradient the harness gives every provider's (M,) entropy output.
            (weights,) = upstream_like([hidden.new_empty(hidden.shape[:1], dtype=torch.float32)],
                                       case.seed)

            def run():
                out = em_kernels.linear_entropy_loss(
                    hidden, case.inputs["weight"], entropy_weight=weights, backend=backend)
                return (_LossSeenAsEntropy.apply(out.loss, out.entropy, weights),)
            return run

        def liger(case):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss()
            targets = _targets(case)
            return lambda: (loss(case.inputs["weight"], case.inputs["hidden"], targets),)

        def cce(case):
            from cut_cross_entropy import linear_cross_entropy

            targets = _targets(case)
            return lambda: (linear_cross_entropy(
                case.inputs["hidden"], case.inputs["weight"], targets),)

        def trl(case):
            trl_lm_head = import_trl_fused_lm_head()
            targets = _targets(case)

            def run():
                _, entropy, *_ = trl_lm_head.apply(
                    case.inputs["hidden"], case.inputs["weight"], None, targets, 1.0,
                    TRL_VOCAB_CHUNK, None, 1.0, ("log_probs", "entropy"))
                return (entropy,)
            return run

        def verl(case):
            if case.dims["H"] % VERL_HIDDEN_MULTIPLE:
                raise Skip(f"verl's fused LM head needs H a multiple of {VERL_HIDDEN_MULTIPLE}")
            linear_cross_entropy = import_verl_fused_lm_head()
            targets = _targets(case)

            def run():
                _, entropy = linear_cross_entropy(
                    case.inputs["hidden"], case.inputs["weight"], targets, 1.0, "none")
                return (entropy,)
            return run

        triton_, _, cpu = em_providers(ours)
        loss_providers = em_providers(ours_loss, "-loss", modes_not_offered={
            "bwd": "linear_entropy_loss computes its gradients in the forward: its fwd+bwd row "
                   "is the comparable one"})
        return [
            Provider("matmul", lm_head_matmul, compares=False),
            Provider("eager", eager),
            Provider("compile", compile_, unavailable=compile_unavailable),
            Provider("chunked", chunked_), triton_,
            Provider("cuda", never_built, unavailable=not_offered(
                'linear_entropy has no CUDA kernel: backend="cuda" runs the Triton kernels, '
                "the triton row")),
            cpu, *loss_providers,
            Provider("liger", liger, compares=False,
                     unavailable=package_unavailable("liger_kernel", "liger-kernel"),
                     modes_not_offered={"bwd": "Liger computes its gradients in the forward: "
                                               "its fwd+bwd row is the comparable one"}),
            Provider("cce", cce, compares=False,
                     unavailable=package_unavailable("cut_cross_entropy", "cut-cross-entropy")),
            Provider("trl", trl, unavailable=package_unavailable("trl", "trl", since="1.15",
                                                                cpu_since="1.16")),
            Provider("verl", verl, unavailable=package_unavailable("verl", "verl",
                                                                  since=VERL_SINCE)),
        ]


def import_trl_fused_lm_head():
    """TRL's fused LM head, trl.kernels.ChunkedLogProbFunction. Its backward imports
    trl.trainer.utils at call time for one context manager, the one that gathers a DeepSpeed
    ZeRO-3 head, and that module imports accelerate, pandas and datasets, which a machine
    without TRL's trainers may lack (the lent GPU machine has no datasets). Where it does not
    import, a stand-in module gives the null context that TRL's own gives outside ZeRO-3, so
    that the backward runs as TRL's does without ZeRO-3."""
    from trl.kernels import ChunkedLogProbFunction

    try:
        importlib.import_module(TRL_TRAINER_UTILS)
    except Exception:  # any failure in its dependencies' imports, not only ImportError
        stand_in = types.ModuleType(TRL_TRAINER_UTILS)
        stand_in.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules[TRL_TRAINER_UTILS] = stand_in
    return ChunkedLogProbFunction


def import_verl_fused_lm_head():
    """verl's fused LM head, `linear_cross_entropy(hidden, weight, labels, temperature,
    reduction) -> (logprobs, entropy)`, imported without running the `__init__` of the
    packages `verl` and `verl.utils`: those import Ray, tensordict, omegaconf and transformers
    for the rest of verl, while the kernel needs torch, Triton and verl.utils.device (which
    imports packaging and verl.plugin in recent releases). Bare package modules stand in for
    the two while the kernel's modules load (its forward imports `kernels` lazily, so that is
    loaded too), and are removed afterwards: a later `import verl` runs verl's own init, though
    the kernel modules stay as loaded here (reach them by import, not as attributes of
    verl.utils). What is returned is the apply of verl's autograd Function, not the module's
    attribute, which a swap such as the README's may have replaced."""
    if VERL_FUSED_LM_HEAD in sys.modules:
        return sys.modules[VERL_FUSED_LM_HEAD].LinearCrossEntropy.apply
    with bare_verl_packages("verl", "verl.utils"):
        importlib.import_module("verl.utils.kernel.kernels")
        return importlib.import_module(VERL_FUSED_LM_HEAD).LinearCrossEntropy.apply


@contextlib.contextmanager
def bare_verl_packages(*names: str):
    """While the block runs, bare modules stand in for the installed verl's packages ``names``
    (such as "verl.utils"; those not imported yet), so that their submodules import without
    running the packages' `__init__`; they are removed afterwards."""
    spec = importlib.util.find_spec("verl")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("verl is not installed (pip install verl)")
    roots = [Path(location) for location in spec.submodule_search_locations]
    stand_ins = [name for name in names if name not in sys.modules]
    for name in stand_ins:
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")[1:])) for root in roots]
        sys.modules[name] = package
    try:
        yield
    finally:
        for name in stand_ins:
            del sys.modules[name]


class _LossSeenAsEntropy(torch.autograd.Function):
    """linear_entropy_loss shown to the harness as the op's entropy output, so that its errors
    are checked like the other providers': the forward passes the entropies through; the
    backward, handed the upstream gradient g of that output, gives the loss the upstream
    gradient (g . u) / (u . u), which is 1 when g is the u the loss was weighted with (the
    harness's fixed upstream gradient): the gradients are then those of sum_r u_r H_r."""

    @staticmethod
    def forward(ctx, loss, entropy, weights):
        ctx.save_for_backward(weights)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad_entropy):
        (weights,) = ctx.saved_tensors
        return torch.dot(grad_entropy, weights) / torch.dot(weights, weights), None, None


def spread_rows(size: int, count: int, device) -> torch.Tensor:
    """`count` indices spread evenly over range(size), both ends included."""
    return torch.linspace(0, size - 1, count, device=device).round().long()


def float64_logit_chunks(hidden64: torch.Tensor, weight: torch.Tensor):
    """hidden64 @ weight^T in float64, one vocabulary chunk at a time."""
    for start in range(0, weight.shape[0], ORACLE_VOCAB_CHUNK):
        yield hidden64 @ weight[start:start + ORACLE_VOCAB_CHUNK].double().T


class Float64Rows(NamedTuple):
    """Every row's hidden state, lse and entropy in float64: what an oracle of d(weight), whose
    rows sum over every row, needs."""
    hidden: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor


def case_float64_rows(case) -> Float64Rows:
    """float64_rows of the case's hidden states and head, computed once per case."""
    return case.cached("float64_rows",
                       lambda: float64_rows(case.inputs["hidden"], case.inputs["weight"]))


def float64_rows(hidden: torch.Tensor, weight: torch.Tensor) -> Float64Rows:
    """Float64Rows of softmax(hidden @ weight^T), online over vocabulary chunks (a float64 pass
    over the whole M x H x V matmul without holding [M, V])."""
    hidden = hidden.detach().double()
    row_max = torch.full((hidden.shape[0],), float("-inf"), dtype=torch.float64,
                         device=hidden.device)
    total = torch.zeros_like(row_max)  # sum exp(z - row_max)
    weighted = torch.zeros_like(row_max)  # sum exp(z - row_max) z
    for z in float64_logit_chunks(hidden, weight.detach()):
        new_max = torch.maximum(row_max, z.amax(-1))
        rescale = torch.exp(row_max - new_max)
        e = torch.exp(z - new_max[:, None])
        total = total * rescale + e.sum(-1)
        weighted = weighted * rescale + (e * z).sum(-1)
        row_max = new_max
    lse = row_max + torch.log(total)
    return Float64Rows(hidden, lse, lse - weighted / total)


def weight_grad_rows(rows: Float64Rows, weight: torch.Tensor, vocab_rows: torch.Tensor, *,
                     grad_entropy: torch.Tensor | None = None,
                     grad_logprob: torch.Tensor | None = None,
                     tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocab_rows, d(weight)[vocab_rows] in float64) of the loss sum_r grad_entropy[r] H_r +
    grad_logprob[r] log p_r(tokens[r]) (either term may be absent): dlogits[:, j] =
    g_H (-p (log p + H)) + g_lp (onehot(tokens) - p) for those vocabulary rows j, then
    dlogits[:, j]^T hidden."""
    log_p = rows.hidden @ weight.detach().index_select(0, vocab_rows).double().T - rows.lse[:, None]
    p = log_p.exp()
    dlogits = torch.zeros_like(log_p)
    if grad_entropy is not None:
        dlogits -= grad_entropy.double()[:, None] * p * (log_p + rows.entropy[:, None])
    if grad_logprob is not None:
        dlogits += grad_logprob.double()[:, None] * ((tokens[:, None] == vocab_rows).double() - p)
    return vocab_rows, dlogits.T @ rows.hidden


def _targets(case) -> torch.Tensor:
    gen = torch.Generator(case.device).manual_seed(case.seed)
    return torch.randint(0, case.dims["V"], (case.dims["M"],), device=case.device, generator=gen)
