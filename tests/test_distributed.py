"""Data-parallel training on CPU with two gloo processes, plain DDP and accelerate: every rank holds and saves the
same adapter."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, folder: str, engine: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    if engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == world
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import peft_sparta  # noqa: F401
        from peft import get_peft_model
        from peft_sparta import SpaRTAConfig
        from tests.conftest import tiny_llama

        config = SpaRTAConfig(target_modules=["q_proj", "v_proj"], r_shared=2, r_task=4, task_names=["a"])
        model = get_peft_model(tiny_llama(), config)
        generator = torch.Generator().manual_seed(100 + rank)
        for task_index, task in enumerate(["a", "b"]):
            if task_index:
                model.add_task(task)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            if engine == "accelerate":
                wrapped, optimizer = accelerator.prepare(model, optimizer)
            else:
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
            wrapped.train()
            for _ in range(3):
                batch = torch.randint(task_index * 40, task_index * 40 + 40, (2, 7), generator=generator)
                wrapped(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        model.save_pretrained(os.path.join(folder, f"rank{rank}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["ddp", "accelerate"])
def test_two_ranks_hold_and_save_the_same_adapter(tmp_path, engine):
    from safetensors.torch import load_file

    port = 29500 + os.getpid() % 1000 + (7 if engine == "accelerate" else 0)
    mp.spawn(_worker, args=(2, port, str(tmp_path), engine), nprocs=2, join=True)
    first = load_file(tmp_path / "rank0" / "adapter_model.safetensors")
    second = load_file(tmp_path / "rank1" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any("sparta_prototypes" in key for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    counts = [v for k, v in first.items() if "prototype_counts" in k][0]
    assert (counts.sum(-1) > 0).all(), "every task's prototypes saw data"
