"""What EM-INF costs per generated token inside transformers' generate().

    python -m bench.decode                 tiny random Llama on CPU (hidden 64, 2 layers)
    python -m bench.decode --qwen7b        Qwen2.5-7B's shapes, random bf16 weights, on the GPU
                                           (the anchors' setting: batch 1, 256-token prompt,
                                           64 sampled tokens)

Both models are built from a config with random weights: nothing is downloaded. Providers, run
interleaved in the same process on the same prompt:

- plain:    generate() with no logits processor;
- em-inf:   em_algos.em_inf.EMInfLogitsProcessor (em_kernels.em_inf_adjust, --backend);
- released: an eager processor doing what the paper's released code does per token (fp32 leaf,
            torch.optim.Adam, autograd, a host-side early-exit check per step).

EM-INF runs 5 steps with threshold -inf, so no row ever exits early (the anchors' setting).
Reported, two ways:

- end to end: ms per generated token (wall-clock of generate() / new tokens, median over
  --repeats runs after one full-length warm-up run each; the providers take turns, and the one
  that goes first rotates each round, so drift and order effects hit them alike) and the
  overhead over plain. On a GPU a 7B decode step at batch 1 is ~20 ms of mostly host-side launch
  work whose run-to-run spread is larger than 1%, so this alone cannot resolve a 0.05 ms cost;
- per call: each processor alone on (batch, vocab) fp32 scores (what generate() hands the
  processors), synchronised after every call, median over --calls calls: its full cost per token
  (host and device, nothing overlapped), and that cost over plain's ms per token, an upper bound
  on the processor's share of a token that does not drown in the end-to-end spread. With em-inf,
  also the op alone (em_kernels.em_inf_adjust on the same scores, "em_inf_adjust" in
  ms_per_call): the per-call figure of issue 6's goal, which em-bench's GPU-only cells cannot
  give (their L2 flush hides a call's host cost).

Sampling is on (do_sample=True, temperature 1, no top-k/top-p). The models have no EOS token, so
every run makes the same number of tokens and no entry is masked to -inf (which the released code
would turn into NaN).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import em_kernels
from em_algos.em_inf import NEUTRAL_SAMPLING, EMInfLogitsProcessor
from em_kernels.em_inf import em_inf_backend

from .harness import cpu_name, git_commit

STEPS = 5
LR = 0.1
KL_WEIGHT = 0.001


class ReleasedEMInfProcessor(LogitsProcessor):
    """EM-INF as the released code runs it: one loss over the batch (entropies summed, KL
    "batchmean"), torch.optim.Adam on an fp32 leaf, autograd, a host sync per step."""

    def __call__(self, input_ids, scores):
        with torch.enable_grad():
            z = scores.detach().float().clone().requires_grad_(True)
            p0 = torch.softmax(z.detach(), -1)
            optimizer = torch.optim.Adam([z], lr=LR)
            for _ in range(STEPS):
                logp = torch.log_softmax(z, -1)
                entropy = -(logp.exp() * logp).sum()
                if entropy < -math.inf:  # the released check; never true here (no early exit)
                    break
                kl = torch.nn.functional.kl_div(logp, p0, reduction="batchmean")
                loss = entropy + KL_WEIGHT * kl
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return z.detach().to(scores.dtype)


class EMInfAdjustAlone:
    """em_kernels.em_inf_adjust with the processor's settings, called as a processor: the op's
    own cost per call, without the processor's Python."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, input_ids, scores):
        return em_kernels.em_inf_adjust(scores, steps=STEPS, lr=LR, kl_weight=KL_WEIGHT,
                                        threshold=-math.inf, optimizer="adam",
                                        early_exit="row", backend=self.backend)


def tiny_model(vocab: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=0, eos_token_id=None,
                         bos_token_id=None)
    return LlamaForCausalLM(config).to(device).eval()


def qwen7b_model(device: str):
    """Qwen2.5-7B's shapes (28 layers, hidden 3584, GQA 28/4, vocab 152064), random bf16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=None,
                         bos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialise on the GPU: seconds, not minutes
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def time_generate(model, input_ids, processors, new_tokens: int, device: str) -> float:
    """Seconds for one generate() call making exactly ``new_tokens`` tokens."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids),
            logits_processor=LogitsProcessorList(processors), do_sample=True,
            max_new_tokens=new_tokens, pad_token_id=0, **NEUTRAL_SAMPLING)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return elapsed


def time_processor_call(processors, input_ids, scores, calls: int, device: str) -> float:
    """Median seconds of one call of the processors on ``scores``, synchronised each call."""
    samples = []
    for _ in range(calls + 3):  # the first 3 warm up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = scores
        for processor in processors:
            out = processor(input_ids, out)
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[3:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen7b", action="store_true",
                        help="Qwen2.5-7B-shaped random bf16 model on the GPU")
    parser.add_argument("--backend", default="auto", help="em_kernels backend of em-inf")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=None,
                        help="prompt tokens (default 256 for --qwen7b, 32 for the tiny model)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="generated tokens (default 64 for --qwen7b, 32 for the tiny model)")
    parser.add_argument("--vocab", type=int, default=32000, help="tiny model's vocabulary")
    parser.add_argument("--repeats", type=int, default=5, help="generate() runs per provider")
    parser.add_argument("--calls", type=int, default=200,
                        help="timed calls of each processor alone")
    parser.add_argument("--providers", default="plain,em-inf,released")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats", "calls", "prompt", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.vocab < 3:  # prompt ids are drawn from [2, vocab): 0 is the pad id, 1 kept free
        parser.error("--vocab must be >= 3")

    device = "cuda" if args.qwen7b else "cpu"
    if args.qwen7b and not torch.cuda.is_available():
        parser.error("--qwen7b needs a CUDA device")
    torch.manual_seed(0)
    model = qwen7b_model(device) if args.qwen7b else tiny_model(args.vocab, device)
    prompt = args.prompt if args.prompt is not None else (256 if args.qwen7b else 32)
    new_tokens = args.new_tokens if args.new_tokens is not None else (64 if args.qwen7b else 32)
    vocab = model.config.vocab_size
    input_ids = torch.randint(2, vocab, (args.batch, prompt), device=device)

    providers = {
        "plain": [],
        "em-inf": [EMInfLogitsProcessor(steps=STEPS, lr=LR, kl_weight=KL_WEIGHT,
                                        threshold=-math.inf, backend=args.backend)],
        "released": [ReleasedEMInfProcessor()],
    }
    chosen = [name.strip() for name in args.providers.split(",")]
    unknown = sorted(set(chosen) - set(providers))
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {sorted(providers)}")
    for name in chosen:  # warm-up at full length: JIT, kernels, the allocator's KV-cache blocks
        time_generate(model, input_ids, providers[name], new_tokens, device)
    samples = {name: [] for name in chosen}
    for round_ in range(args.repeats):  # take turns; who goes first rotates
        for i in range(len(chosen)):
            name = chosen[(round_ + i) % len(chosen)]
            samples[name].append(time_generate(model, input_ids, providers[name], new_tokens,
                                               device))
    ms_per_token = {name: 1e3 * statistics.median(s) / new_tokens for name, s in samples.items()}
    scores = 3.0 * torch.randn(args.batch, vocab, device=device,
                               generator=torch.Generator(device).manual_seed(1))
    alone = {name: providers[name] for name in chosen if providers[name]}
    if "em-inf" in alone:
        alone["em_inf_adjust"] = [EMInfAdjustAlone(args.backend)]
    ms_per_call = {name: 1e3 * time_processor_call(processors, input_ids, scores, args.calls,
                                                   device)
                   for name, processors in alone.items()}

    # What "auto" (or the requested backend) runs at this batch and vocabulary.
    backend = em_inf_backend(scores, args.backend, STEPS)
    device_name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"device {device_name}, torch {torch.__version__}, triton {triton_version}, "
          f"commit {git_commit()}")
    print(f"model {'Qwen2.5-7B-shaped bf16' if args.qwen7b else 'tiny Llama'} (vocab {vocab}), "
          f"batch {args.batch}, prompt {prompt}, {new_tokens} new tokens, em-inf backend "
          f"{backend} (asked: {args.backend}); end to end: median of {args.repeats} generate() "
          f"runs, per call: median of {args.calls} calls")
    plain = ms_per_token.get("plain")
    for name in chosen:
        line = f"  {name:9s} {ms_per_token[name]:8.3f} ms/token"
        if plain is not None and name != "plain":
            line += f"  ({100 * (ms_per_token[name] - plain) / plain:+.1f}% over plain)"
        if name in ms_per_call:
            line += f";  alone {1e3 * ms_per_call[name]:8.1f} us/call"
            if plain is not None:
                line += f" = {100 * ms_per_call[name] / plain:.2f}% of plain's token"
        print(line)
    if "em_inf_adjust" in ms_per_call:
        print(f"  em_inf_adjust alone (the op, without the processor): "
              f"{1e3 * ms_per_call['em_inf_adjust']:8.1f} us/call")
    result = {"device": device_name, "torch": torch.__version__, "triton": triton_version,
              "commit": git_commit(), "qwen7b": args.qwen7b, "vocab": vocab, "batch": args.batch,
              "prompt": prompt, "new_tokens": new_tokens, "backend": backend,
              "backend_asked": args.backend,
              "ms_per_token": ms_per_token, "ms_per_call": ms_per_call}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
