"""Data-parallel training on CPU with two gloo processes (plain DDP, accelerate, and FSDP): every rank holds and saves
the same adapter, and each rank's saved adapter reloads to exactly the model it trained.

Each task is one training job, the way continual runs chain on a cluster: task "a" trains a new adapter; task "b"
loads it into a fresh base model, adds its branch and trains on. (accelerate on CPU always prepares DDP, whatever
FSDP plugin it is given, so FSDP is exercised through torch's own wrapper, which accelerate uses on GPUs.)
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


PROBE = torch.arange(3, 17).view(2, 7)


def _wrap(model, engine: str, accelerator):
    """The model under the engine, and a context in which the unwrapped model holds its full parameters."""
    if engine == "accelerate":
        return accelerator.prepare(model), nullcontext()
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    return wrapped, FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)


def _train_task(model, task_index: int, engine: str, accelerator, generator, folder: str) -> torch.Tensor:
    """Three steps on task ``task_index``'s tokens under the engine; saves the adapter, returns the probe's logits."""
    wrapped, full_parameters = _wrap(model, engine, accelerator)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    if accelerator is not None:
        optimizer = accelerator.prepare(optimizer)
    wrapped.train()
    for _ in range(3):
        batch = torch.randint(task_index * 40, task_index * 40 + 40, (2, 7), generator=generator)
        wrapped(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with full_parameters:
        model.save_pretrained(folder)
        model.eval()
        with torch.no_grad():
            return model(input_ids=PROBE).logits


def _worker(rank: int, world: int, port: int, folder: str, engine: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    accelerator = None
    if engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == world
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import peft_sparta  # noqa: F401
        from peft import PeftModel, get_peft_model
        from peft_sparta import SpaRTAConfig
        from tests.conftest import tiny_llama

        generator = torch.Generator().manual_seed(100 + rank)
        config = SpaRTAConfig(target_modules=["q_proj", "v_proj"], r_shared=2, r_task=4, task_names=["a"])
        first = os.path.join(folder, "a", f"rank{rank}")
        _train_task(get_peft_model(tiny_llama(), config), 0, engine, accelerator, generator, first)
        model = PeftModel.from_pretrained(tiny_llama(), first, is_trainable=True)
        model.add_task("b")
        last = os.path.join(folder, "b", f"rank{rank}")
        trained_logits = _train_task(model, 1, engine, accelerator, generator, last)
        reloaded = PeftModel.from_pretrained(tiny_llama(), last).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=PROBE).logits, trained_logits), "reload is not exact"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["ddp", "accelerate", "fsdp"])
def test_two_ranks_hold_and_save_the_same_adapter(tmp_path, engine):
    from safetensors.torch import load_file

    port = 29500 + os.getpid() % 1000 + {"ddp": 0, "accelerate": 7, "fsdp": 13}[engine]
    mp.spawn(_worker, args=(2, port, str(tmp_path), engine), nprocs=2, join=True)
    first = load_file(tmp_path / "b" / "rank0" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "rank1" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any("sparta_A_task.1" in key for key in first), "the second task's branch was saved"
    for key in first:
        assert torch.equal(first[key], second[key]), key
    counts = [v for k, v in first.items() if "prototype_counts" in k][0]
    assert counts.shape[0] == 2 and (counts.sum(-1) > 0).all(), "every task's prototypes saw data on both ranks"
    trained_b = [v for k, v in first.items() if "sparta_B_task.1" in k][0]
    assert trained_b.abs().sum() > 0, "the second task trained"
