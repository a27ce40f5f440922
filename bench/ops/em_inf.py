"""em_inf_adjust and adaptive_temperature: the decode-time ops on [B, V] logits (forward only).

Least traffic (e = bytes per logit): B V (e + 4), reading the logits once and writing the fp32
result once. A kernel that keeps each row on chip for all its steps reaches it; one that streams
the row and its Adam moments per step moves several times more, and the roofline fraction shows
how many passes it makes.

EM-INF runs 5 steps with the released code's settings and a threshold of 0, which the entropy is
never below, so no row exits early (the anchors' setting). Providers: eager (the released code's
loop: torch.optim.Adam on an fp32 leaf, autograd, a host-side early-exit check per step; the KL
summed over rows, so at B > 1 it computes what early_exit="row" does, and at B = 1 exactly the
released code), and em-kernels' backends. For adaptive_temperature, eager is the reference's
batched fp32 bisection.

On CUDA a cell's time is the GPU's alone (harness.cuda_timing holds the host's part of the call
out) and host_ms the host's per call (argument checks, dispatch, launches): at B 1 the host is
most of a call (RESULTS.md: 35 us of kernel in an 84 us call), so a call costs about the larger
of the two. bench/decode.py times the processor per call with a sync after each, host included:
the number for a decode step.
"""

from __future__ import annotations

import torch

from em_kernels import reference

from ..harness import OpBench, Provider
from .common import em_providers
from .entropy import VOCABS, random_logits

STEPS = 5
LR = 0.1
KL_WEIGHT = 0.001
THRESHOLD = 0.0  # the entropy is never below 0: every call runs all STEPS steps
BATCHES = (1, 16, 64)  # the anchors' batches


def released_em_inf(logits: torch.Tensor) -> tuple[torch.Tensor]:
    """EM-INF's logit adjustment the way the paper's released code runs it (KL summed per row)."""
    with torch.enable_grad():
        z = logits.detach().float().clone().requires_grad_(True)
        p0 = torch.softmax(z.detach(), -1)
        optimizer = torch.optim.Adam([z], lr=LR)
        for _ in range(STEPS):
            logp = torch.log_softmax(z, -1)
            entropy = -(logp.exp() * logp).sum(-1)
            if bool((entropy < THRESHOLD).all()):  # the released code's check: a host sync
                break
            kl = torch.nn.functional.kl_div(logp, p0, reduction="sum")
            loss = entropy.sum() + KL_WEIGHT * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (z.detach(),)


class _DecodeOpBench(OpBench):
    dims = ("B", "V")
    modes = ("fwd",)

    def shapes(self, device_type, full):
        if full:
            return [{"B": b, "V": v} for v in VOCABS for b in BATCHES]
        if device_type == "cuda":
            return [{"B": b, "V": 151936} for b in BATCHES] + [{"B": 1, "V": 32000}]
        return [{"B": 1, "V": 151936}, {"B": 16, "V": 151936}]

    def dtypes(self, device_type, full):
        # generate() hands logits processors fp32 scores.
        return [torch.float32, torch.bfloat16] if full else [torch.float32]

    def make_inputs(self, dims, dtype, device, generator):
        return {"logits": random_logits(dims["B"], dims["V"], dtype, device, generator)}

    def traffic(self, dims, dtype, mode):
        return dims["B"] * dims["V"] * (dtype.itemsize + 4), None

    def _reference(self, logits):
        raise NotImplementedError

    def output_oracle(self, case):  # B <= 64 rows: one float64 call
        return [self._reference(case.inputs["logits"].double())]


class EmInfAdjustBench(_DecodeOpBench):
    name = "em_inf_adjust"

    def _reference(self, logits):
        return reference.em_inf_adjust_ref(logits, STEPS, LR, KL_WEIGHT, THRESHOLD, "adam", "row")

    def providers(self):
        import em_kernels

        def eager(case):
            return lambda: released_em_inf(case.inputs["logits"])

        def ours(case, backend):
            return lambda: (em_kernels.em_inf_adjust(
                case.inputs["logits"], steps=STEPS, lr=LR, kl_weight=KL_WEIGHT,
                threshold=THRESHOLD, early_exit="row", backend=backend),)

        return [Provider("eager", eager), *em_providers(ours)]


class AdaptiveTemperatureBench(_DecodeOpBench):
    name = "adaptive_temperature"

    def _reference(self, logits):
        return reference.adaptive_temperature_ref(logits)

    def providers(self):
        import em_kernels

        def eager(case):
            return lambda: (reference.adaptive_temperature_ref(case.inputs["logits"]),)

        def ours(case, backend):
            return lambda: (em_kernels.adaptive_temperature(
                case.inputs["logits"], backend=backend),)

        return [Provider("eager", eager), *em_providers(ours)]
