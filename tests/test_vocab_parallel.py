"""Vocab-parallel mode of every op that has one: 2 CPU processes on gloo, each holding a
contiguous vocabulary shard of the logits (entropy, logprobs_and_entropy) or of the LM head
(linear_entropy, linear_entropy_loss, linear_policy_loss), must reproduce the unsharded
entropies, log-probs, losses and gradients, and linear_entropy stay within the filtering bound
with grad_filter_eps; ranks whose calls differ get the same error. On a GPU, one NCCL rank runs
the CUDA path."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import em_kernels
from em_kernels import _checks
from em_kernels._ops import linear_entropy_loss as loss_ops

from conftest import COLLECTIVE_TIMEOUT, free_port
from oracle import assert_row_relative
from test_linear_entropy import confident_head, confident_head_oracle

WORLD_SIZE = 2
# Uneven shards (rank 0 holds 23 ids, rank 1 holds 18) and a masked id on each side; several
# rows pick tokens from rank 1's shard, so the owner logic is exercised on both ranks.
ROWS, FEATURES, VOCAB, SPLIT = 13, 24, 41, 23


def _tolerance(dtype):
    """Sharded against unsharded: float32 agrees to its rounding; bf16 rounds the logits and
    gradients to 8 bits, and the two sum their vocab slices in different orders."""
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def _problem(dtype):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(ROWS, FEATURES, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, FEATURES, generator=generator) / 4).to(dtype)
    bias = torch.randn(VOCAB, generator=generator)
    bias[[5, 30]] = float("-inf")
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    tokens[tokens == 5] = 6
    tokens[tokens == 30] = 31
    # the ids either side of each shard boundary (SPLIT, and 33 in the uneven-shard case)
    tokens[:4] = torch.tensor([SPLIT - 1, SPLIT, 32, 33])
    grad_entropy = torch.randn(ROWS, generator=generator)
    grad_logprobs = torch.randn(ROWS, generator=generator)
    return hidden, weight, bias.to(dtype), tokens, grad_entropy, grad_logprobs


def _run(hidden, weight, bias, tokens, grad_entropy, grad_logprobs, backend, group,
         use_tokens, grad_filter_eps=None):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    out = em_kernels.linear_entropy(
        hidden, weight, bias=bias, tokens=tokens if use_tokens else None, temperature=0.9,
        process_group=group, backend=backend, grad_filter_eps=grad_filter_eps)
    loss = (out.entropy * grad_entropy).sum()
    if use_tokens:
        loss = loss + (out.logprobs * grad_logprobs).sum()
    loss.backward()
    return out, hidden.grad, weight.grad, bias.grad


def _worker(rank, port, cases):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT)
    try:
        torch.set_num_threads(1)
        for backend, dtype in cases:
            _check_logits_case(rank, backend, dtype)
            _check_case(rank, backend, dtype)
            _check_loss_case(rank, backend, dtype)
            _check_token_on_masked_shard(rank, backend, dtype)
            _check_unchecked_token_outside_vocabulary(rank, backend, dtype)
            if dtype == torch.float32 and backend != "torch":  # torch: plain float32 PyTorch
                _check_confident_rows(rank, backend)
        # Before torch 2.8, gloo's group destructor held the GIL while it joined its worker
        # threads (pytorch#154976), and a worker still releasing the last all-reduce's tensor
        # needs the GIL: destroy_process_group hung for good (3 of 12 runs of this test, torch
        # 2.7.1, 2026-11-28). Collected garbage and a barrier let the workers finish first (none
        # of 12).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _logit_stats(logits, tokens, grad_entropy, grad_logprobs, backend, group):
    """(entropy, logprobs or None, d/dlogits) of entropy . grad_entropy (+ logprobs .
    grad_logprobs with tokens) through entropy or logprobs_and_entropy."""
    logits = logits.clone().requires_grad_()
    if tokens is None:
        entropy = em_kernels.entropy(logits, temperature=0.9, process_group=group,
                                     backend=backend)
        logprobs, loss = None, (entropy * grad_entropy).sum()
    else:
        logprobs, entropy = em_kernels.logprobs_and_entropy(
            logits, tokens, temperature=0.9, process_group=group, backend=backend)
        loss = (entropy * grad_entropy).sum() + (logprobs * grad_logprobs).sum()
    loss.backward()
    return entropy, logprobs, logits.grad


def _check_logits_case(rank, backend, dtype):
    """Vocab-sharded logits (a tensor-parallel LM head's) in a (1, N, V) batch: each rank gets
    the full-vocabulary statistics and its slice of the unsharded gradient, also with a shard
    masked whole and with a row that is -inf everywhere."""
    hidden, weight, bias, tokens, grad_entropy, grad_logprobs = _problem(dtype)
    logits = (hidden.double() @ weight.double().T + bias.double()).to(dtype)[None]
    tokens, grad_entropy, grad_logprobs = tokens[None], grad_entropy[None], grad_logprobs[None]
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    stats_tolerance = dict(rtol=1e-5, atol=1e-5)
    grad_tolerance = _tolerance(dtype)
    masked = logits.clone()
    masked[..., SPLIT:] = float("-inf")  # rank 1's shard has no finite logit
    nothing = logits.clone()
    nothing[0, 0] = float("-inf")  # row 0 has no distribution at all
    for case_logits, case_tokens in ((logits, tokens), (logits, None), (masked, tokens % SPLIT),
                                     (nothing, tokens)):
        full = _logit_stats(case_logits, case_tokens, grad_entropy, grad_logprobs, backend, None)
        sharded = _logit_stats(case_logits[..., shard], case_tokens, grad_entropy,
                               grad_logprobs, backend, dist.group.WORLD)
        torch.testing.assert_close(sharded[0], full[0], equal_nan=True, **stats_tolerance)
        if case_tokens is None:
            assert sharded[1] is None
        else:
            torch.testing.assert_close(sharded[1], full[1], equal_nan=True, **stats_tolerance)
        torch.testing.assert_close(sharded[2], full[2][..., shard], **grad_tolerance)
    _check_sliced_positions(rank, backend, dtype)
    _check_offloaded_logits_are_freed(backend, dtype)
    if backend == "torch" and dtype == torch.float32:
        _check_logits_compiled(rank, logits, tokens, grad_entropy, grad_logprobs)
    try:
        em_kernels.logprobs_and_entropy(logits[..., shard], tokens + VOCAB,
                                        process_group=dist.group.WORLD, backend=backend)
    except ValueError as error:
        assert f"[0, {VOCAB})" in str(error)
    else:
        raise AssertionError("an id outside the global vocabulary was accepted")


def _check_sliced_positions(rank, backend, dtype):
    """logits[:, :-1] of a vocab-sharded (B, T, V_r) batch, the RL shift, is read in place
    (`_checks.RowLayout`: the kernels run on the B T - 1 rows that hold it, and the rows asked
    for are picked out before the merge). The ranks lay their shards out differently (rank 0's
    a slice of positions-major full logits, rank 1's a batch-major copy), so they read
    different row counts, yet all-reduce the same rows: the unsharded results, and each rank
    its slice of the gradient with nothing outside the view."""
    batch, positions = 3, 6
    generator = torch.Generator().manual_seed(11)
    full = (torch.randn(batch, positions, VOCAB, generator=generator) * 3).to(dtype)
    full[0, 2, :] = float("-inf")  # a row without a distribution, inside the view
    full[1, 1, SPLIT:] = float("-inf")  # a row that rank 1's shard masks whole
    tokens = torch.randint(0, VOCAB, (batch, positions - 1), generator=generator)
    tokens[1, 1] = 4
    upstream = [torch.randn(batch, positions - 1, generator=generator) for _ in "ab"]
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    if rank == 0:  # positions-major, the full vocabulary: the lattice is the 15 rows asked for
        base = full.transpose(0, 1).contiguous().requires_grad_()
        batch_major = base.transpose(0, 1)
    else:  # batch-major, its shard alone: 17 rows, 2 of them the last positions
        base = full[..., shard].contiguous().requires_grad_()
        batch_major = base
    logits = batch_major[..., :SPLIT][:, :-1] if rank == 0 else batch_major[:, :-1]
    _, layout = _checks.RowLayout.rows_of(logits)
    assert layout.lattice_strides is not None, "the view would be copied"
    reference = full[:, :-1].contiguous().requires_grad_()
    for group, rows in ((dist.group.WORLD, logits), (None, reference)):
        saved = []  # what the ops keep for the backward: the logits' own memory, no copy
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            logprobs, entropy = em_kernels.logprobs_and_entropy(
                rows, tokens, temperature=0.9, process_group=group, backend=backend)
            alone = em_kernels.entropy(rows, temperature=0.9, process_group=group,
                                       backend=backend)
        kept = [t for t in saved if t.dim() == 2]
        assert len(kept) == 2 and all(
            t.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr() for t in kept)
        loss = (logprobs * upstream[0]).nan_to_num() + entropy.nan_to_num() * upstream[1]
        loss.sum().backward()
        if group is not None:
            sharded = logprobs, entropy, alone
    for ours, exact in zip(sharded, (logprobs, entropy, alone)):
        assert ours.shape == exact.shape == tokens.shape
        torch.testing.assert_close(ours, exact, equal_nan=True, rtol=1e-5, atol=1e-5)
    grad = base.grad.transpose(0, 1) if rank == 0 else base.grad
    own = grad[..., :SPLIT] if rank == 0 else grad
    torch.testing.assert_close(own[:, :-1], reference.grad[..., shard], **_tolerance(dtype))
    assert not own[:, -1].any(), "a row outside the view got a gradient"
    if rank == 0:
        assert not grad[..., SPLIT:].any(), "another rank's shard got a gradient"
    # shift=1 on the whole shard (the input ids for tokens): the kernels run on all 18 rows, the
    # same results, and the backward writes the shard's gradient whole, its last positions 0.
    whole = full[..., shard].contiguous().requires_grad_()
    assert _checks.RowLayout.rows_of_shifted(whole, 1)[1].total == batch * positions
    input_ids = torch.cat([torch.zeros_like(tokens[:, :1]), tokens], 1)
    logprobs, entropy = em_kernels.logprobs_and_entropy(
        whole, input_ids, temperature=0.9, shift=1, process_group=dist.group.WORLD,
        backend=backend)
    alone = em_kernels.entropy(whole, temperature=0.9, shift=1, process_group=dist.group.WORLD,
                               backend=backend)
    for ours, exact in zip((logprobs, entropy, alone), sharded):
        torch.testing.assert_close(ours, exact, equal_nan=True, rtol=0, atol=0)
    loss = (logprobs * upstream[0]).nan_to_num() + entropy.nan_to_num() * upstream[1]
    loss.sum().backward()
    torch.testing.assert_close(whole.grad[:, :-1], reference.grad[..., shard],
                               **_tolerance(dtype))
    assert not whole.grad[:, -1].any(), "a position with no next token got a gradient"


def _check_offloaded_logits_are_freed(backend, dtype):
    """With saved-tensor hooks that offload what the op saves (as activation offloading does),
    nothing else keeps the logits alive until the backward: the autograd context holds the
    row layout's metadata, not its rows."""
    shard_vocab = SPLIT if dist.get_rank() == 0 else VOCAB - SPLIT
    leaf = torch.randn(2, 5, shard_vocab).to(dtype).requires_grad_()
    logits = leaf * 1.0  # not a leaf: only what the op keeps can hold it
    alive = weakref.ref(logits)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        entropy = em_kernels.entropy(logits[:, :-1], process_group=dist.group.WORLD,
                                     backend=backend)
    del logits
    gc.collect()
    assert alive() is None, "the vocab-parallel op kept the logits outside its saved tensors"
    entropy.sum().backward()
    assert bool(torch.isfinite(leaf.grad).all())


def _check_logits_compiled(rank, logits, tokens, grad_entropy, grad_logprobs):
    """Inside torch.compile the vocab-parallel entropy ops run eagerly (a graph break): the
    eager gradients."""
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)

    def loss_of(logits):
        logprobs, entropy = em_kernels.logprobs_and_entropy(
            logits, tokens, process_group=dist.group.WORLD, backend="torch")
        return (entropy * grad_entropy).sum() + (logprobs * grad_logprobs).sum()

    _assert_compiles_like_eager(loss_of, logits[..., shard])


def _check_case(rank, backend, dtype):
    hidden, weight, bias, tokens, grad_entropy, grad_logprobs = _problem(dtype)
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    tolerance = _tolerance(dtype)
    # The last case: a shard with no finite logit for any row (rank 1 masks its whole shard);
    # the other rank's shard carries the whole distribution, nothing turns NaN.
    masked_bias = bias.clone()
    masked_bias[SPLIT:] = float("-inf")
    for case_bias, case_tokens, use_tokens in ((bias, tokens, True), (bias, tokens, False),
                                               (masked_bias, tokens % SPLIT, True)):
        full, full_hidden, full_weight, full_bias = _run(
            hidden, weight, case_bias, case_tokens, grad_entropy, grad_logprobs, backend, None,
            use_tokens)
        sharded, grad_hidden, grad_weight, grad_bias = _run(
            hidden, weight[shard], case_bias[shard], case_tokens, grad_entropy, grad_logprobs,
            backend, dist.group.WORLD, use_tokens)
        assert bool(torch.isfinite(sharded.entropy).all())
        torch.testing.assert_close(sharded.entropy, full.entropy, rtol=1e-5, atol=1e-5)
        if use_tokens:
            torch.testing.assert_close(sharded.logprobs, full.logprobs, rtol=1e-5, atol=1e-5)
        else:
            assert sharded.logprobs is None
        torch.testing.assert_close(grad_hidden, full_hidden, **tolerance)
        torch.testing.assert_close(grad_weight, full_weight[shard], **tolerance)
        torch.testing.assert_close(grad_bias, full_bias[shard], **tolerance)
    if dtype == torch.float32:
        _check_maxima_apart(shard, backend)
    if backend == "torch" and dtype == torch.float32:
        _check_filtered(shard, hidden, weight, bias, tokens, grad_entropy, grad_logprobs)
        _check_linear_entropy_compiled(rank, hidden, weight, bias, tokens, grad_entropy,
                                       grad_logprobs)
    # Out-of-range global ids are caught on CPU, on every rank.
    try:
        em_kernels.linear_entropy(hidden, weight[shard], tokens=tokens + VOCAB,
                                  process_group=dist.group.WORLD, backend=backend)
    except ValueError as error:
        assert f"[0, {VOCAB})" in str(error)
    else:
        raise AssertionError("an id outside the global vocabulary was accepted")


def _check_unchecked_token_outside_vocabulary(rank, backend, dtype):
    """Where the range check would cost a device sync (CUDA, torch.compile) an id outside the
    vocabulary is not refused: its log-prob is NaN, and its row's gradient keeps the log-prob's
    -p term with no one-hot, sharded as unsharded (the check is switched off here to get
    there on CPU)."""
    hidden, weight, bias, tokens, grad_entropy, grad_logprobs = _problem(dtype)
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    tokens = tokens.clone()
    tokens[[4, 7]] = torch.tensor([VOCAB + 3, -2])
    logits = (hidden.double() @ weight.double().T + bias.double()).to(dtype)
    check_token_range = em_kernels._checks.check_token_range
    em_kernels._checks.check_token_range = lambda tokens, vocab: None
    try:
        full = _run(hidden, weight, bias, tokens, grad_entropy, grad_logprobs, backend, None,
                    True)
        sharded = _run(hidden, weight[shard], bias[shard], tokens, grad_entropy, grad_logprobs,
                       backend, dist.group.WORLD, True)
        full_logits = _logit_stats(logits, tokens, grad_entropy, grad_logprobs, backend, None)
        sharded_logits = _logit_stats(logits[:, shard], tokens, grad_entropy, grad_logprobs,
                                      backend, dist.group.WORLD)
    finally:
        em_kernels._checks.check_token_range = check_token_range
    tolerance = _tolerance(dtype)
    for out in (full[0], sharded[0]):
        assert bool(out.logprobs[[4, 7]].isnan().all())
        assert bool(out.logprobs.isnan().sum() == 2)
    torch.testing.assert_close(sharded[0].logprobs, full[0].logprobs, equal_nan=True,
                               rtol=1e-5, atol=1e-5)
    for sharded_grad, full_grad in zip(sharded[1:], (full[1], full[2][shard], full[3][shard])):
        torch.testing.assert_close(sharded_grad, full_grad, **tolerance)
    assert bool(sharded_logits[1][[4, 7]].isnan().all())
    torch.testing.assert_close(sharded_logits[2], full_logits[2][:, shard], **tolerance)
    # and the rows' -p term is there: without it, d/dlogits of those rows would be the
    # entropy's alone
    entropy_only = _logit_stats(logits, None, grad_entropy, grad_logprobs, backend, None)[2]
    assert not torch.allclose(full_logits[2][[4, 7]], entropy_only[[4, 7]])


def _loss(hidden, weight, bias, tokens, entropy_weight, logprob_weight, backend, group):
    """linear_entropy_loss's outputs and the gradients of 1.5 x its loss w.r.t. hidden, weight,
    bias and both row weights."""
    leaves = [x.clone().requires_grad_() if x is not None else None
              for x in (hidden, weight, bias, entropy_weight, logprob_weight)]
    hidden, weight, bias, entropy_weight, logprob_weight = leaves
    out = em_kernels.linear_entropy_loss(
        hidden, weight, bias=bias, tokens=tokens, entropy_weight=entropy_weight,
        logprob_weight=logprob_weight, temperature=0.9, process_group=group, backend=backend)
    (1.5 * out.loss).backward()
    return out, [x.grad if x is not None else None for x in leaves]


def _assert_loss_matches(rank, split, hidden, weight, bias, tokens, entropy_weight,
                         logprob_weight, backend, dtype):
    shard = slice(0, split) if rank == 0 else slice(split, weight.shape[0])
    stats_tolerance, grad_tolerance = {
        torch.float64: (dict(rtol=1e-9, atol=1e-9),) * 2,
        torch.float32: (dict(rtol=1e-5, atol=1e-5),) * 2,
        # bf16 logits: the statistics differ by the merge's fp32 sums, d_hidden by a rounding
        # of each rank's bf16 part before the all-reduce
        torch.bfloat16: (dict(rtol=1e-2, atol=1e-2), dict(rtol=2e-2, atol=2e-2)),
    }[dtype]
    full, full_grads = _loss(hidden, weight, bias, tokens, entropy_weight, logprob_weight,
                             backend, None)
    sharded, grads = _loss(hidden, weight[shard], bias[shard], tokens, entropy_weight,
                           logprob_weight, backend, dist.group.WORLD)
    torch.testing.assert_close(sharded.loss, full.loss, **stats_tolerance)
    torch.testing.assert_close(sharded.entropy, full.entropy, **stats_tolerance)
    if tokens is None:
        assert sharded.logprobs is None
    else:
        torch.testing.assert_close(sharded.logprobs, full.logprobs, **stats_tolerance)
    for name, got, expected in zip(("hidden", "weight", "bias", "entropy_weight",
                                    "logprob_weight"), grads, full_grads):
        if name in ("weight", "bias"):
            expected = expected[shard]
        if expected is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, expected, **grad_tolerance, msg=name)


def _check_loss_case(rank, backend, dtype):
    hidden, weight, bias, tokens, grad_entropy, grad_logprobs = _problem(dtype)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    entropy_weight, logprob_weight = grad_entropy.to(stats_dtype), grad_logprobs.to(stats_dtype)
    # Both terms; entropy alone; log-probs alone (every row's -p term on the non-owner rank).
    for row_weights in ((entropy_weight, logprob_weight), (entropy_weight, None),
                        (None, logprob_weight)):
        _assert_loss_matches(rank, SPLIT, hidden, weight, bias,
                             tokens if row_weights[1] is not None else None, *row_weights,
                             backend, dtype)
    # A shard with no finite logit (rank 1 masked whole), tokens all on rank 0.
    masked_bias = bias.clone()
    masked_bias[SPLIT:] = float("-inf")
    _assert_loss_matches(rank, SPLIT, hidden, weight, masked_bias, tokens % SPLIT,
                         entropy_weight, logprob_weight, backend, dtype)
    # A frozen hidden state (d_weight and d_bias only, no d_hidden all-reduce), and no grad at
    # all (statistics only): the same values.
    own = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    for frozen_hidden in (True, False):
        with torch.set_grad_enabled(frozen_hidden):
            results = []
            for group, rows in ((None, slice(None)), (dist.group.WORLD, own)):
                head = weight[rows].clone().requires_grad_()
                out = em_kernels.linear_entropy_loss(
                    hidden, head, bias=bias[rows], tokens=tokens, entropy_weight=entropy_weight,
                    logprob_weight=logprob_weight, process_group=group, backend=backend)
                if frozen_hidden:
                    out.loss.backward()
                results.append((out, head.grad))
        (full, full_grad), (sharded, grad) = results
        tolerance = _tolerance(dtype)
        torch.testing.assert_close(sharded.loss, full.loss, **tolerance)
        if frozen_hidden:
            torch.testing.assert_close(grad, full_grad[own], **tolerance)
        else:
            assert grad is None and full_grad is None
    # Uneven shards (33 and 8 ids) cut into chunks of 3 rows: both ranks must cut the widest
    # shard's chunks, or their per-chunk merges would not pair up.
    saved = loss_ops.LOSS_CHUNK_BYTES
    loss_ops.LOSS_CHUNK_BYTES = 3 * 33 * hidden.element_size() * 2
    try:
        _assert_loss_matches(rank, 33, hidden, weight, bias, tokens, entropy_weight,
                             logprob_weight, backend, dtype)
    finally:
        loss_ops.LOSS_CHUNK_BYTES = saved
    if backend == "torch" and dtype == torch.float32:
        _check_loss_compiled(rank, hidden, weight, bias, tokens, entropy_weight, logprob_weight)
    _check_policy_loss(rank, backend, dtype, hidden, weight, bias, tokens, logprob_weight)


def _check_policy_loss(rank, backend, dtype, hidden, weight, bias, tokens, advantages):
    """linear_policy_loss on the shards: each row's policy gradient comes from the merged
    (full-vocabulary) log-prob, so the loss and gradients are the unsharded ones."""
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    generator = torch.Generator().manual_seed(9)
    old = (torch.randn(ROWS, generator=generator) * 0.5 - 3).to(advantages.dtype)
    ref = (torch.randn(ROWS, generator=generator) * 0.5 - 3).to(advantages.dtype)
    results = []
    for group, rows in ((None, slice(None)), (dist.group.WORLD, shard)):
        leaves = [hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()]
        out = em_kernels.linear_policy_loss(
            *leaves, bias=bias[rows], tokens=tokens, advantages=advantages, old_logprobs=old,
            ref_logprobs=ref, kl_weight=0.1, clip_range=(0.2, 0.3), process_group=group,
            backend=backend)
        out.loss.backward()
        results.append((out.loss, out.logprobs, leaves[0].grad, leaves[1].grad))
    (full_loss, full_logprobs, full_hidden, full_weight), sharded = results
    tolerance = _tolerance(dtype)
    for got, want in zip(sharded, (full_loss, full_logprobs, full_hidden, full_weight[shard])):
        torch.testing.assert_close(got, want, **tolerance)


def _check_token_on_masked_shard(rank, backend, dtype):
    """Tokens whose ids lie in a shard with no finite logit (rank 1 masks its whole shard): their
    log-prob is -inf, as unsharded, and not NaN, so that linear_policy_loss with old log-probs
    gives those rows ratio 0 (a finite term): the sharded loss, log-probs and gradients are the
    unsharded ones."""
    hidden, weight, bias, tokens, _, advantages = _problem(dtype)
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    masked_bias = bias.clone()
    masked_bias[SPLIT:] = float("-inf")
    old = (torch.randn(ROWS, generator=torch.Generator().manual_seed(4)) * 0.5 - 3).to(
        advantages.dtype)
    results = []
    for group, rows in ((None, slice(None)), (dist.group.WORLD, shard)):
        leaves = [hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()]
        out = em_kernels.linear_policy_loss(
            *leaves, bias=masked_bias[rows], tokens=tokens, advantages=advantages,
            old_logprobs=old, process_group=group, backend=backend)
        out.loss.backward()
        results.append((out.loss, out.logprobs, leaves[0].grad, leaves[1].grad))
    (full_loss, full_logprobs, full_hidden, full_weight), sharded = results
    on_masked = tokens >= SPLIT
    assert bool(on_masked.any()) and bool(torch.isfinite(full_loss))
    assert bool((full_logprobs[on_masked] == float("-inf")).all())
    tolerance = _tolerance(dtype)
    for got, want in zip(sharded, (full_loss, full_logprobs, full_hidden, full_weight[shard])):
        torch.testing.assert_close(got, want, **tolerance)


def _check_loss_compiled(rank, hidden, weight, bias, tokens, entropy_weight, logprob_weight):
    """Inside torch.compile the vocab-parallel loss still runs eagerly (a graph break) and gives
    the eager gradients: traced, the all-reduce of d_hidden in the forward was lost."""
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)

    def loss_of(hidden, weight):
        out = em_kernels.linear_entropy_loss(
            hidden, weight, bias=bias[shard], tokens=tokens, entropy_weight=entropy_weight,
            logprob_weight=logprob_weight, process_group=dist.group.WORLD, backend="torch")
        return 2.0 * out.loss

    _assert_compiles_like_eager(loss_of, hidden, weight[shard])


def _check_linear_entropy_compiled(rank, hidden, weight, bias, tokens, grad_entropy,
                                   grad_logprobs):
    """Inside torch.compile vocab-parallel linear_entropy runs eagerly too (a graph break, no
    traced collective), with the eager gradients; fullgraph=True says so rather than trace
    the collectives."""
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)

    def loss_of(hidden, weight):
        out = em_kernels.linear_entropy(hidden, weight, bias=bias[shard], tokens=tokens,
                                        process_group=dist.group.WORLD, backend="torch")
        return (out.entropy * grad_entropy).sum() + (out.logprobs * grad_logprobs).sum()

    _assert_compiles_like_eager(loss_of, hidden, weight[shard])
    try:
        torch.compile(loss_of, fullgraph=True)(hidden, weight[shard])
    except Exception as error:  # Dynamo's Unsupported, whose module moved between versions
        assert "disable" in str(error), error
    else:
        raise AssertionError("fullgraph=True traced the vocab-parallel collectives")


def _assert_compiles_like_eager(loss_of, *inputs):
    """torch.compile(loss_of) (inductor, where a traced collective went wrong) gives eager's
    loss and gradients w.r.t. every input."""
    results = []
    for function in (loss_of, torch.compile(loss_of)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        loss = function(*leaves)
        loss.backward()
        results.append((loss, *(leaf.grad for leaf in leaves)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def _check_maxima_apart(shard, backend):
    """Shards whose maxima lie 4e38 apart (the gap between them overflows float32): the merge
    across ranks gives the far shard weight 0, not 0 * inf = NaN. Row 0: rank 0's logits are
    all -2e38, rank 1 has one at +2e38 (entropy 0); row 1 the negation (uniform over rank 0's
    23 ids at +2e38)."""
    weight = torch.zeros(VOCAB, 1)
    weight[:SPLIT] = -2e19
    weight[SPLIT + 1] = 2e19
    hidden = torch.tensor([[1e19], [-1e19]])
    out = em_kernels.linear_entropy(hidden, weight[shard], process_group=dist.group.WORLD,
                                    backend=backend)
    expected = torch.tensor([0.0, math.log(SPLIT)])
    torch.testing.assert_close(out.entropy, expected, rtol=1e-6, atol=1e-6)


def _check_confident_rows(rank, backend):
    """The float64 lse survives the merge across ranks: on confident rows with |lse| ~ 100
    (test_linear_entropy's `confident_head`, token 7 on rank 0), each rank's slice of the
    gradient, of the LM head and of its logits, matches float64 relative to each row's size."""
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    hidden, weight = confident_head(rows=ROWS, features=FEATURES, vocab=VOCAB)
    exact_hidden, exact_weight = confident_head_oracle(hidden, weight)
    hidden.requires_grad_()
    shard_weight = weight[shard].clone().requires_grad_()
    em_kernels.linear_entropy(hidden, shard_weight, process_group=dist.group.WORLD,
                              backend=backend).entropy.sum().backward()
    assert_row_relative(hidden.grad, exact_hidden, 1e-4, "d(hidden)")
    assert_row_relative(shard_weight.grad, exact_weight[shard], 1e-4, "d(weight)")
    logits = (hidden.detach() @ weight.T)[:, shard].requires_grad_()
    em_kernels.entropy(logits, process_group=dist.group.WORLD, backend=backend).sum().backward()
    exact = (hidden.detach().double() @ weight.double().T).requires_grad_()
    em_kernels.reference.entropy_ref(exact).sum().backward()
    assert_row_relative(logits.grad, exact.grad[:, shard], 1e-4, "d(logits)")


def _check_filtered(shard, hidden, weight, bias, tokens, grad_entropy, grad_logprobs):
    """Gradient filtering on the shards: each gradient entry within eps * sum |operand| of the
    exact unsharded one (segments start at each shard's first id, so not equal to filtering the
    unsharded head), and something was filtered."""
    eps = 1e-2
    _, exact_hidden, exact_weight, _ = _run(
        hidden, weight, bias, tokens, grad_entropy, grad_logprobs, "torch", None, True)
    _, grad_hidden, grad_weight, _ = _run(
        hidden, weight[shard], bias[shard], tokens, grad_entropy, grad_logprobs, "torch",
        dist.group.WORLD, True, grad_filter_eps=eps)
    hidden_bound = eps * weight.abs().sum(0) + 1e-5
    weight_bound = eps * hidden.abs().sum(0) + 1e-5
    assert bool(((grad_hidden - exact_hidden).abs() <= hidden_bound).all())
    assert bool(((grad_weight - exact_weight[shard]).abs() <= weight_bound).all())
    assert not torch.equal(grad_hidden, exact_hidden), "nothing was filtered"


@pytest.mark.distributed
def test_vocab_parallel_matches_unsharded():
    """One spawn (process start-up dominates) runs every case of both ops: the "torch" backend
    in fp32, bf16 and float64, the C++ kernels in fp32 and bf16 (linear_entropy_loss's
    statistics; linear_entropy runs chunked torch there), and the Triton kernels in fp32 under
    the interpreter, on CPU tensors. Never on CUDA tensors: gloo has no CUDA all_gather (the
    shard sizes') and NCCL wants a GPU per rank, which no machine here has."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    cases = [("torch", torch.float32), ("torch", torch.bfloat16), ("torch", torch.float64)]
    if em_kernels.available_backends()["cpu"] == "available":
        cases += [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    if em_kernels.available_backends()["triton"] == "available" and not torch.cuda.is_available():
        cases.append(("triton", torch.float32))
    mp.spawn(_worker, args=(free_port(), cases), nprocs=WORLD_SIZE, join=True)


def _disagreeing_calls(rank):
    """(what the error names, the call) pairs in which rank 1 differs from rank 0 in one way."""
    hidden, weight, bias, tokens, _, _ = _problem(torch.float32)
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    weight, bias = weight[shard], bias[shard]
    other = rank == 1
    world = dist.group.WORLD

    def linear(rows=ROWS, temperature=0.9, use_tokens=True, token_shift=0, needs_grad=True,
               grad_filter_eps=None):
        row_hidden = hidden[:rows].clone().requires_grad_(needs_grad)
        out = em_kernels.linear_entropy(
            row_hidden, weight, bias=bias,
            tokens=(tokens[:rows] + token_shift) % VOCAB if use_tokens else None,
            temperature=temperature, process_group=world, backend="torch",
            grad_filter_eps=grad_filter_eps)
        return out.entropy.sum() + (out.logprobs.sum() if use_tokens else 0)

    logits = hidden @ weight.T + bias

    def on_logits(with_tokens=True, shift=0, dtype=torch.float32):
        rows = logits.reshape(1, ROWS, -1).to(dtype)
        if with_tokens:
            return em_kernels.logprobs_and_entropy(
                rows, tokens.reshape(1, ROWS), shift=shift, process_group=world,
                backend="torch")[1].sum()
        return em_kernels.entropy(rows, shift=shift, process_group=world, backend="torch").sum()

    def policy(clip_high=0.28):
        return em_kernels.linear_policy_loss(
            hidden, weight, bias=bias, tokens=tokens, advantages=torch.ones(ROWS),
            clip_range=(0.2, clip_high), process_group=world, backend="torch").loss

    return [
        (r"rows \(rank 0: 13, rank 1: 12\)", lambda: linear(rows=ROWS - other)),
        (r"temperature \(rank 0: 0.9, rank 1: 1.5\)",
         lambda: linear(temperature=1.5 if other else 0.9)),
        (r"tokens given \(rank 0: True, rank 1: False\)", lambda: linear(use_tokens=not other)),
        (r"tokens \(their checksums differ\)", lambda: linear(token_shift=int(other))),
        (r"hidden needs grad \(rank 0: True, rank 1: False\)",
         lambda: linear(needs_grad=not other)),
        (r"grad_filter_eps \(rank 0: 0.0, rank 1: 0.001\)",
         lambda: linear(grad_filter_eps=1e-3 if other else None)),
        (r"the op called: rank 0 logprobs_and_entropy, rank 1 entropy",
         lambda: on_logits(with_tokens=not other)),
        (r"shift \(rank 0: 0, rank 1: 1\)", lambda: on_logits(shift=int(other))),
        (r"dtype \(rank 0: torch.float32, rank 1: torch.bfloat16\)",
         lambda: on_logits(dtype=torch.bfloat16 if other else torch.float32)),
        (r"clip_high \(rank 0: 0.28, rank 1: 0.3\)", lambda: policy(0.3 if other else 0.28)),
    ]


def _check_what_may_differ(rank, hidden, weight, bias, tokens):
    """What the ranks may legitimately differ in runs and matches the unsharded results: a bias
    on one shard only, 0.0 against -0.0, and whether a shard's head needs gradients where that
    changes a rank's own row-chunk sizing (made small here, so that it would)."""
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    world = dist.group.WORLD
    head_bias = bias.clone()
    head_bias[:SPLIT] = 0.0  # rank 0's shard has no bias: it passes none
    full = em_kernels.linear_entropy(hidden, weight, bias=head_bias, tokens=tokens,
                                     backend="torch")
    sharded = em_kernels.linear_entropy(hidden, weight[shard],
                                        bias=None if rank == 0 else head_bias[shard],
                                        tokens=tokens, process_group=world, backend="torch")
    torch.testing.assert_close(sharded.entropy, full.entropy)
    torch.testing.assert_close(sharded.logprobs, full.logprobs)
    policy = [em_kernels.linear_policy_loss(
        hidden, head, bias=head_bias, tokens=tokens, advantages=torch.ones(ROWS),
        clip_range=-0.0 if rank else 0.0, process_group=group, backend="torch").loss
        for head, head_bias, group in ((weight, bias, None),
                                       (weight[shard], bias[shard], world))]
    torch.testing.assert_close(policy[1], policy[0])
    saved = loss_ops.LOSS_CHUNK_BYTES
    loss_ops.LOSS_CHUNK_BYTES = 3 * SPLIT * hidden.element_size() * 2  # 3-row chunks
    try:
        head = weight[shard].clone().requires_grad_(rank == 0)
        loss = em_kernels.linear_entropy_loss(hidden, head, bias=bias[shard], tokens=tokens,
                                              entropy_weight=1.0, process_group=world,
                                              backend="torch").loss
        full_loss = em_kernels.linear_entropy_loss(hidden, weight, bias=bias, tokens=tokens,
                                                   entropy_weight=1.0, backend="torch").loss
        torch.testing.assert_close(loss, full_loss)
    finally:
        loss_ops.LOSS_CHUNK_BYTES = saved


def _check_refusals_are_shared(rank, hidden, weight, bias, tokens):
    """An argument that only rank 1's own checks refuse: rank 1 raises its error, rank 0 one
    that names rank 1, instead of waiting in the all-gather; then the group is still in step."""
    world = dist.group.WORLD
    logits = hidden @ weight.T + bias
    refusals = [
        ("temperature must be", lambda: em_kernels.linear_entropy(
            hidden, weight, bias=bias, temperature=0.0 if rank else 1.0, process_group=world)),
        ("shift must be", lambda: em_kernels.entropy(
            logits[None], shift=-1 if rank else 0, process_group=world)),
        ("tokens must be int64", lambda: em_kernels.logprobs_and_entropy(
            logits, tokens.int() if rank else tokens, process_group=world)),
        ("give entropy_weight", lambda: em_kernels.linear_entropy_loss(
            hidden, weight, bias=bias, entropy_weight=None if rank else 1.0,
            process_group=world)),
        ("clip_range", lambda: em_kernels.linear_policy_loss(
            hidden, weight, bias=bias, tokens=tokens, advantages=1.0,
            clip_range=-1.0 if rank else 0.2, process_group=world)),
    ]
    for own_error, call in refusals:
        with pytest.raises((TypeError, ValueError),
                           match=own_error if rank else "rank 1 of the process group refused"):
            call()
        out = em_kernels.linear_entropy(hidden, weight, bias=bias, tokens=tokens,
                                        process_group=world)
        assert bool(torch.isfinite(out.entropy).all())


def _disagreement_worker(rank, port):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT)
    try:
        torch.set_num_threads(1)
        hidden, weight, bias, tokens, _, _ = _problem(torch.float32)
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
        for reason, call in _disagreeing_calls(rank):
            with pytest.raises(ValueError, match="the ranks of the process group disagree on "
                                                 + reason):
                call()
            # Every rank raised at the same collective: the group is still in step.
            out = em_kernels.linear_entropy(hidden, weight[shard], bias=bias[shard],
                                            tokens=tokens, process_group=dist.group.WORLD)
            assert bool(torch.isfinite(out.entropy).all())
        _check_what_may_differ(rank, hidden, weight, bias, tokens)
        _check_refusals_are_shared(rank, hidden, weight[shard], bias[shard], tokens)
        # Refused on every rank before any collective: not a group, meta tensors.
        for group in ("world", 1):
            with pytest.raises(TypeError, match="must be a torch.distributed ProcessGroup"):
                em_kernels.linear_entropy(hidden, weight[shard], process_group=group)
        with pytest.raises(NotImplementedError, match="not meta tensors"):
            em_kernels.entropy(torch.empty(ROWS, 5, device="meta"),
                               process_group=dist.group.WORLD, backend="torch")
        # Where the calls are compared on the device (CUDA, without a host sync), a mismatch
        # that leaves the collectives' sizes alone makes every result and gradient NaN.
        from em_kernels import _vocab_parallel
        _vocab_parallel._compared_on_host = lambda device: False
        for temperature, token_shift in ((0.9 + 0.6 * rank, 0), (0.9, rank)):
            leaf_hidden = hidden.clone().requires_grad_()
            leaf_weight = weight[shard].clone().requires_grad_()
            out = em_kernels.linear_entropy(
                leaf_hidden, leaf_weight, bias=bias[shard], tokens=(tokens + token_shift) % VOCAB,
                temperature=temperature, process_group=dist.group.WORLD, backend="torch")
            (out.entropy.sum() + out.logprobs.sum()).backward()
            for value in (out.entropy, out.logprobs, leaf_hidden.grad, leaf_weight.grad):
                assert bool(torch.isnan(value).all())
        # tokens on one rank only: the same all-reduce sizes all the same
        out = em_kernels.linear_entropy(hidden, weight[shard], bias=bias[shard],
                                        tokens=tokens if rank == 0 else None,
                                        process_group=dist.group.WORLD, backend="torch")
        assert bool(torch.isnan(out.entropy).all())
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_vocab_parallel_ranks_that_disagree():
    """A call whose arguments differ across the ranks (rows, temperature, tokens, the flags that
    decide the collectives, the op itself) raises the same ValueError on every rank, naming what
    differs, and leaves the group in step; compared on the device instead (CUDA), it gives NaN
    results and gradients rather than wrong numbers. What is the ranks' own (a bias on one
    shard, whether a shard needs gradients) is not refused."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_disagreement_worker, args=(free_port(),), nprocs=WORLD_SIZE, join=True)


def _one_cuda_rank_worker(rank, port):
    """Vocab-parallel calls on CUDA tensors in a group of one rank: results and gradients as
    unsharded, no host sync on the paths that claim none, and the host comparison of the calls
    (EM_KERNELS_CHECK_RANKS=1, the fused losses) running there too."""
    from em_kernels import _vocab_parallel

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=1, timeout=COLLECTIVE_TIMEOUT)
    try:
        hidden, weight, bias, tokens, grad_entropy, grad_logprobs = (
            tensor.to(device) for tensor in _problem(torch.float32))
        logits = hidden @ weight.T + bias

        def linear(group):
            leaf_hidden, leaf_weight = (x.clone().requires_grad_() for x in (hidden, weight))
            out = em_kernels.linear_entropy(leaf_hidden, leaf_weight, bias=bias, tokens=tokens,
                                            temperature=0.9, process_group=group)
            ((out.entropy * grad_entropy).sum() + (out.logprobs * grad_logprobs).sum()).backward()
            return out.entropy, out.logprobs, leaf_hidden.grad, leaf_weight.grad

        def on_logits(group):
            leaf = logits.clone().requires_grad_()
            logprobs, entropy = em_kernels.logprobs_and_entropy(
                leaf, tokens, temperature=0.9, process_group=group)
            ((entropy * grad_entropy).sum() + (logprobs * grad_logprobs).sum()).backward()
            return entropy, logprobs, leaf.grad

        def loss(group):
            leaf_hidden = hidden.clone().requires_grad_()
            out = em_kernels.linear_entropy_loss(
                leaf_hidden, weight, bias=bias, tokens=tokens, entropy_weight=grad_entropy,
                logprob_weight=grad_logprobs, temperature=0.9, process_group=group)
            out.loss.backward()
            return out.loss, out.entropy, out.logprobs, leaf_hidden.grad

        for call, syncs in ((linear, False), (on_logits, False), (loss, True)):
            expected = call(None)
            call(dist.group.WORLD)  # the communicator, pinned memory and kernels set up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default" if syncs else "error")
            try:
                got = call(dist.group.WORLD)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            for value, reference in zip(got, expected, strict=True):
                torch.testing.assert_close(value, reference)
        _vocab_parallel._CHECK_CUDA_RANKS = True
        for value, reference in zip(linear(dist.group.WORLD), linear(None), strict=True):
            torch.testing.assert_close(value, reference)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# A fresh process that may compile the Triton kernels itself: past gpu_check.sh's 60 s default.
@pytest.mark.timeout(150)
def test_vocab_parallel_on_one_cuda_rank():
    """The vocab-parallel CUDA path (the calls' descriptor from pinned memory, compared on the
    device; NCCL), in the one-rank group a one-GPU machine can make: NCCL wants a GPU per rank,
    so a mismatch across ranks is tested on CPU only (test_vocab_parallel_ranks_that_disagree).
    Not marked distributed: bench/gpu_check.sh runs it with the GPU tests."""
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("torch.distributed with NCCL is not available")
    mp.spawn(_one_cuda_rank_worker, args=(free_port(),), nprocs=1, join=True)
