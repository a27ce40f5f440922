"""EMFTTrainer and EMRLTrainer unchanged under torch.distributed: 2 CPU processes on gloo
(127.0.0.1 only), the same tiny model wrapped in DDP, then sharded with FSDP2 (fully_shard).
Each rank samples its own prompts (different rollouts, so different local gradients); after one
step of each trainer the DDP replicas must still be identical and must have moved, and FSDP2
must reach the same weights as DDP (same seeds, same rollouts, gradients averaged over ranks
either way; plain SGD so that the update is linear in the gradient). Rank 0 writes the
checkpoint, the full unsharded weights in both cases. An LM head sharded as an FSDP2 unit of its
own is refused with a clear error."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from algos_support import EOS, PAD, tiny_causal_lm
from conftest import COLLECTIVE_TIMEOUT, free_port

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
# FSDP2 on CPU tensors (gloo) from torch 2.7, whose CPU streams gained record_event; 2.7 and 2.8
# sum the gradients over ranks instead of averaging them (a plain two-layer MLP's SGD step comes
# out twice DDP's there, equal from 2.9; checked 2026-11-28).
_TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__)
FSDP2_ON_CPU = _TORCH_VERSION >= (2, 7)
FSDP2_AVERAGES_ON_CPU = _TORCH_VERSION >= (2, 9)
MODES = ("ddp", "fsdp2") if FSDP2_ON_CPU else ("ddp",)
needs_fsdp2 = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on CPU needs torch >= 2.7")


def _flat_parameters(state_dict) -> torch.Tensor:
    values = [value.detach().reshape(-1).float() for _, value in sorted(state_dict.items())]
    return torch.cat(values)


def _wrap(model, mode, head_unit=False):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if head_unit:  # the LM head sharded as a unit of its own (unsupported)
        fully_shard(model.lm_head, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _save_refusal(model, path: str, score=None) -> None:
    """Save what ``score`` (em_ft_loss by default) says of the model on one batch: its
    ValueError's text, or None."""
    from algos_support import random_batch

    from em_algos import em_ft_loss

    try:
        (score or em_ft_loss)(model, *random_batch(torch.Generator().manual_seed(0), 2, 3, 4))
        refusal = None
    except ValueError as error:
        refusal = str(error)
    torch.save({"refusal": refusal}, path)


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from em_algos import EMFTTrainer, EMRLTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=COLLECTIVE_TIMEOUT)
    try:
        full = StateDictOptions(full_state_dict=True)
        for mode in MODES:
            model = _wrap(tiny_causal_lm(seed=0, family="qwen2"), mode)
            initial = _flat_parameters(get_model_state_dict(model, options=full))
            torch.manual_seed(100 + rank)  # each rank its own prompts and samples
            prompts = torch.randint(2, 23, (3, 4))
            mask = torch.ones_like(prompts)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            common = dict(pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5,
                          optimizer=optimizer, progress=False)
            EMFTTrainer(model, save_dir=os.path.join(out_dir, mode), save_every=1,
                        **common).step(prompts, mask)
            # A plain (unsharded) reference model serves the KL under either wrapper.
            EMRLTrainer(model, num_rollouts=2, minibatch_size=3, beta=0.1,
                        reference_model=tiny_causal_lm(seed=0, family="qwen2"),
                        **common).step(prompts, mask)
            final = _flat_parameters(get_model_state_dict(model, options=full))
            torch.save({"initial": initial, "final": final},
                       os.path.join(out_dir, f"{mode}-rank{rank}.pt"))
        if FSDP2_ON_CPU:
            model = _wrap(tiny_causal_lm(seed=0, family="llama"), "fsdp2", head_unit=True)
            _save_refusal(model, os.path.join(out_dir, f"head-unit-rank{rank}.pt"))
        # A head whose logits only rank 1 sees transformed, in a DDP model (its calls are
        # collective steps): every rank must refuse the model (the ranks agree on the verdict),
        # not rank 0 go on into the next collective alone.
        model = tiny_causal_lm(seed=1, family="llama")
        if rank == 1:
            model.get_output_embeddings().register_forward_hook(lambda m, a, out: out * 2)
        _save_refusal(torch.nn.parallel.DistributedDataParallel(model),
                      os.path.join(out_dir, f"head-check-rank{rank}.pt"))
        # Rank 0 alone scores the plain model (an evaluation on the main process): a local
        # call, which must not wait for rank 1 in a collective. Then both ranks score it through
        # DDP: rank 0, which has checked this head before, must still join the check's
        # all-reduce (else rank 1's pairs with DDP's next collective, or hangs).
        from em_algos import sequence_reward
        from em_algos._common import runs_collectives

        model = tiny_causal_lm(seed=2, family="llama")
        if rank == 0:
            _save_refusal(model, os.path.join(out_dir, "rank0-alone.pt"), sequence_reward)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        _save_refusal(wrapped, os.path.join(out_dir, f"after-rank0-alone-rank{rank}.pt"),
                      sequence_reward)
        # Which calls are collective steps: DDP, also under torch.compile (built lazily: no
        # compile runs here); FSDP2 units; not the plain module inside.
        collective = {"plain": runs_collectives(model), "ddp": runs_collectives(wrapped),
                      "compiled ddp": runs_collectives(torch.compile(wrapped))}
        if FSDP2_ON_CPU:
            collective["fsdp2"] = runs_collectives(
                _wrap(tiny_causal_lm(seed=3, family="llama"), "fsdp2"))
        torch.save(collective, os.path.join(out_dir, f"collective-rank{rank}.pt"))
        del wrapped
        # Let go of the wrapped models (FSDP2's hold the group through their device mesh) and
        # wait for the other rank before the group goes. Without this, one worker in about 9
        # aborted after all its Python had run ("terminate called without an active
        # exception", 8 of 70 runs of this worker, torch 2.14; none in 40 with it).
        del model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return out_dir


def _load(results, mode, rank):
    return torch.load(results / f"{mode}-rank{rank}.pt")


def test_ddp_replicas_stay_in_sync_and_move(results):
    ranks = [_load(results, "ddp", rank) for rank in range(WORLD_SIZE)]
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    assert (ranks[0]["final"] - ranks[0]["initial"]).abs().max() > 1e-4, "the steps did nothing"
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=1e-6)


@pytest.mark.skipif(not FSDP2_AVERAGES_ON_CPU,
                    reason="torch < 2.9's FSDP2 on gloo sums the ranks' gradients")
def test_fsdp2_reaches_the_ddp_weights(results):
    ddp, fsdp = _load(results, "ddp", 0), _load(results, "fsdp2", 0)
    assert torch.equal(ddp["initial"], fsdp["initial"])
    torch.testing.assert_close(fsdp["final"], ddp["final"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_rank_zero_saves_the_full_model(results, mode):
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(results / mode / "step-1")
    reference = tiny_causal_lm(seed=0, family="qwen2")
    assert reloaded.state_dict().keys() == reference.state_dict().keys()
    shapes = {name: value.shape for name, value in reloaded.state_dict().items()}
    assert shapes == {name: value.shape for name, value in reference.state_dict().items()}


@needs_fsdp2
def test_an_lm_head_sharded_on_its_own_is_refused(results):
    """Its weight is still a DTensor after the model's forward: a clear ValueError on every
    rank, not torch's mixed Tensor/DTensor error."""
    for rank in range(WORLD_SIZE):
        refusal = _load(results, "head-unit", rank)["refusal"]
        assert refusal is not None and "shard the LM head with the root module" in refusal


def test_the_ranks_agree_on_the_head_check(results):
    """Rank 1's logits are twice its head's output, rank 0's are not: both refuse."""
    for rank in range(WORLD_SIZE):
        refusal = _load(results, "head-check", rank)["refusal"]
        assert refusal is not None and "not its LM head applied" in refusal


def test_collective_calls_are_recognised_through_wrappers(results):
    for rank in range(WORLD_SIZE):
        collective = _load(results, "collective", rank)
        assert collective.pop("plain") is False
        assert all(collective.values()), collective


def test_one_rank_may_score_alone(results):
    """A plain model scored on rank 0 alone, then the DDP model on both ranks: neither call
    hangs in the head check's all-reduce (the worker would time out), and both score."""
    assert torch.load(results / "rank0-alone.pt")["refusal"] is None
    for rank in range(WORLD_SIZE):
        assert _load(results, "after-rank0-alone", rank)["refusal"] is None
