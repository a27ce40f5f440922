"""entropy and logprobs_and_entropy on [N, V] logits.

Least traffic (the model GB/s and the roofline fraction use; e = bytes per logit):
    fwd      N V e          read the logits once (+ 4N for the entropy; + 16N with log-probs:
                            the int64 tokens read, the log-probs and entropy written)
    bwd      2 N V e        read the logits, write their gradient (the O(N) statistics aside)
    fwd+bwd  3 N V e        both
No FLOP count: at 1 exp per element these ops are memory-bound on every device here.

Providers: eager (what RL trainers write: fp32 upcast, logsumexp minus the sum of softmax times
logits), compile (torch.compile of eager), chunked (eager over checkpointed row chunks, the
verl / TRL memory-saving form), em-kernels' triton, cuda and cpu backends, and, on CUDA where
installed, TRL's Triton log-prob and entropy kernel (trl, since TRL 1.14: log-probs and entropy
in one pass, so it has no entropy-only row). Liger-Kernel and Cut Cross-Entropy offer no op on
logits (they fuse the LM head; see linear_entropy).
"""

from __future__ import annotations

import torch

from em_kernels import reference

from ..harness import OpBench, Provider, row_chunks
from .common import (chunked, compile_unavailable, compiled, em_providers, not_offered,
                     never_built, package_unavailable)

# Logits ~ N(0, 3^2): about the spread of real LLM logits, so the entropy sits well below log V.
LOGIT_SCALE = 3.0
VOCABS = (32000, 128256, 151936, 262144)
ROWS = (1, 16, 64, 4096, 8192, 16384)
# Rows generated per random draw: bounds the fp32 temporary when filling 16384 x 262144 logits.
FILL_ROWS = 1024


def random_logits(rows: int, vocab: int, dtype, device, generator) -> torch.Tensor:
    logits = torch.empty(rows, vocab, dtype=dtype, device=device)
    for start in range(0, rows, FILL_ROWS):
        block = logits[start:start + FILL_ROWS]
        block.copy_(torch.randn(block.shape, device=device, generator=generator) * LOGIT_SCALE)
    return logits


def eager_entropy(logits: torch.Tensor) -> tuple[torch.Tensor]:
    z = logits.float()
    return (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1),)


def eager_logprobs_and_entropy(logits, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float()
    lse = torch.logsumexp(z, -1)
    logprobs = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    return logprobs, lse - (torch.softmax(z, -1) * z).sum(-1)


class _LogitsOpBench(OpBench):
    dims = ("N", "V")
    grad_inputs = ("logits",)
    with_tokens = False

    def shapes(self, device_type, full):
        if full:
            return [{"N": n, "V": v} for v in VOCABS for n in ROWS]
        if device_type == "cuda":
            # The anchors' shapes (../shared/anchors), then decode batches.
            return [{"N": 8192, "V": 151936}, {"N": 32768, "V": 32000}, {"N": 4096, "V": 262144},
                    {"N": 1, "V": 151936}, {"N": 64, "V": 151936}]
        # A small batch and a decode row; the CPU goal's [256, 151936] (issue 4) takes
        # `--shapes N256-V151936` (it alone takes the quick run's time on a busy machine).
        return [{"N": 64, "V": 151936}, {"N": 1, "V": 151936}]

    def dtypes(self, device_type, full):
        if device_type == "cuda" and not full:
            return [torch.bfloat16]
        return [torch.float32, torch.bfloat16]

    def make_inputs(self, dims, dtype, device, generator):
        inputs = {"logits": random_logits(dims["N"], dims["V"], dtype, device, generator)}
        if self.with_tokens:
            inputs["tokens"] = torch.randint(
                0, dims["V"], (dims["N"],), device=device, generator=generator)
        return inputs

    def traffic(self, dims, dtype, mode):
        n, v = dims["N"], dims["V"]
        logits = n * v * dtype.itemsize
        # O(N) bytes a row: the fp32 entropy; with log-probs also an int64 token and an fp32
        # log-prob.
        per_row = 16 if self.with_tokens else 4
        return {"fwd": logits + per_row * n, "bwd": 2 * logits + 2 * per_row * n,
                "fwd+bwd": 3 * logits + 3 * per_row * n}[mode], None

    def _reference(self, logits, tokens):
        raise NotImplementedError

    def _rows(self, case, rows):
        """The float64 logits and tokens of these rows (a slice or indices of dim 0)."""
        tokens = case.inputs.get("tokens")
        return (case.inputs["logits"].detach()[rows].double(),
                None if tokens is None else tokens[rows])

    def output_oracle(self, case):
        parts = [[out.detach() for out in self._reference(*self._rows(case, rows))]
                 for rows in row_chunks(case.inputs["logits"])]
        return [torch.cat(outs) for outs in zip(*parts)]

    def grad_oracle(self, case, upstream):
        logits, tokens = self._rows(case, case.grad_rows)
        logits.requires_grad_()
        torch.autograd.backward(self._reference(logits, tokens),
                                [u.index_select(0, case.grad_rows).double() for u in upstream])
        return {"logits": logits.grad}


class EntropyBench(_LogitsOpBench):
    name = "entropy"

    def _reference(self, logits, tokens):
        return (reference.entropy_ref(logits),)

    def providers(self):
        import em_kernels

        def eager(case):
            return lambda: eager_entropy(case.inputs["logits"])

        def compile_(case):
            fn = compiled(eager_entropy)
            return lambda: fn(case.inputs["logits"])

        def chunked_(case):
            return lambda: chunked(eager_entropy, (case.inputs["logits"],))

        def ours(case, backend):
            return lambda: (em_kernels.entropy(case.inputs["logits"], backend=backend),)

        return [Provider("eager", eager), Provider("compile", compile_,
                                                   unavailable=compile_unavailable),
                Provider("chunked", chunked_), *em_providers(ours), *_PEERS,
                Provider("trl", never_built, unavailable=not_offered(
                    "TRL's kernel on logits gives log-probs and the entropy together: see "
                    "logprobs_and_entropy"))]


class LogprobsAndEntropyBench(_LogitsOpBench):
    name = "logprobs_and_entropy"
    with_tokens = True

    # The quick CPU run keeps one cell per mode: the per-dtype story is entropy's.
    def shapes(self, device_type, full):
        if device_type == "cpu" and not full:
            return [{"N": 64, "V": 151936}]
        return super().shapes(device_type, full)

    def dtypes(self, device_type, full):
        if device_type == "cpu" and not full:
            return [torch.float32]
        return super().dtypes(device_type, full)

    def _reference(self, logits, tokens):
        return reference.logprobs_and_entropy_ref(logits, tokens)

    def providers(self):
        import em_kernels

        def eager(case):
            return lambda: eager_logprobs_and_entropy(case.inputs["logits"], case.inputs["tokens"])

        def compile_(case):
            fn = compiled(eager_logprobs_and_entropy)
            return lambda: fn(case.inputs["logits"], case.inputs["tokens"])

        def chunked_(case):
            return lambda: chunked(
                eager_logprobs_and_entropy, (case.inputs["logits"], case.inputs["tokens"]))

        def ours(case, backend):
            return lambda: em_kernels.logprobs_and_entropy(
                case.inputs["logits"], case.inputs["tokens"], backend=backend)

        return [Provider("eager", eager), Provider("compile", compile_,
                                                   unavailable=compile_unavailable),
                Provider("chunked", chunked_), *em_providers(ours), *_PEERS,
                _trl_provider(lambda case: (case.inputs["logits"], case.inputs["tokens"]))]


def eager_shifted_logprobs_and_entropy(logits, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """The RL trainer's call: the positions that predict a next token, logits[:, :-1]."""
    return eager_logprobs_and_entropy(logits[:, :-1], tokens)


class ShiftedLogprobsAndEntropyBench(_LogitsOpBench):
    """logprobs_and_entropy as an RL trainer calls it: on the positions of a (B, T + 1, V) batch
    that predict a next token. eager and compile take logits[:, :-1] with tokens (B, T), as
    trainers write it (the backward's gradient then goes through torch's slice backward: a
    zeroed (B, T + 1, V) tensor and a copy into it); em-kernels takes the whole batch with its
    input ids (B, T + 1) and shift=1, which writes the batch's gradient directly. The least
    traffic counted is logprobs_and_entropy's on the N = B T rows used; the gradient's B rows
    of zeros (1 / T more to write) are outside the count."""

    name = "logprobs_and_entropy_shifted"
    dims = ("B", "T", "V")
    with_tokens = True
    # Gradients of whole sequences are checked (the outputs' dim 0 is B): two of them, 2048
    # rows at T 1024.
    grad_rows = 2

    def shapes(self, device_type, full):
        if full:
            return [{"B": 8, "T": 1024, "V": v} for v in VOCABS]
        if device_type == "cuda":  # the headline's 8192 rows
            return [{"B": 8, "T": 1024, "V": 151936}]
        return [{"B": 2, "T": 32, "V": 151936}]  # the quick CPU run's 64 rows

    def dtypes(self, device_type, full):
        if device_type == "cpu" and not full:
            return [torch.float32]
        return super().dtypes(device_type, full)

    def input_numel(self, dims):
        return dims["B"] * (dims["T"] + 1) * dims["V"]

    def make_inputs(self, dims, dtype, device, generator):
        batch, positions, vocab = dims["B"], dims["T"], dims["V"]
        logits = random_logits(batch * (positions + 1), vocab, dtype, device, generator)
        input_ids = torch.randint(0, vocab, (batch, positions + 1), device=device,
                                  generator=generator)
        return {"logits": logits.view(batch, positions + 1, vocab), "input_ids": input_ids,
                "tokens": input_ids[:, 1:]}

    def traffic(self, dims, dtype, mode):
        return super().traffic({"N": dims["B"] * dims["T"], "V": dims["V"]}, dtype, mode)

    def _reference(self, logits, tokens):  # whole sequences, (b, T + 1, V)
        return reference.logprobs_and_entropy_ref(logits[:, :-1], tokens)

    def providers(self):
        import em_kernels

        def eager(case):
            return lambda: eager_shifted_logprobs_and_entropy(case.inputs["logits"],
                                                              case.inputs["tokens"])

        def compile_(case):
            fn = compiled(eager_shifted_logprobs_and_entropy)
            return lambda: fn(case.inputs["logits"], case.inputs["tokens"])

        def ours(case, backend):
            return lambda: em_kernels.logprobs_and_entropy(
                case.inputs["logits"], case.inputs["input_ids"], shift=1, backend=backend)

        return [Provider("eager", eager), Provider("compile", compile_,
                                                   unavailable=compile_unavailable),
                Provider("chunked", never_built, unavailable=not_offered(
                    "the chunked form splits flattened rows, which a view of sliced positions "
                    "has only as a copy: see logprobs_and_entropy")),
                *em_providers(ours), *_PEERS,
                # TRL reads the sliced positions in place (row strides), as em-kernels' shift=1
                _trl_provider(lambda case: (case.inputs["logits"][:, :-1], case.inputs["tokens"]))]


def _trl_provider(arguments) -> Provider:
    """TRL's one-pass log-prob and entropy kernel on the (logits, tokens) that ``arguments``
    picks from a case."""

    def build(case):
        from trl.kernels import selective_log_softmax_and_entropy

        logits, tokens = arguments(case)
        return lambda: selective_log_softmax_and_entropy(logits, tokens)

    return Provider("trl", build, unavailable=package_unavailable("trl", "trl", since="1.14"))


_PEERS = [
    Provider("liger", never_built, unavailable=not_offered(
        "Liger-Kernel has no entropy op on logits (it fuses the LM head: see linear_entropy)")),
    Provider("cce", never_built, unavailable=not_offered(
        "Cut Cross-Entropy has no op on logits (it fuses the LM head: see linear_entropy)")),
]
