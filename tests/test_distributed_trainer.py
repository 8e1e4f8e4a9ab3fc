"""The Trainer on two gloo processes trains the same objective as on one: the same first-step gradients, the
orthogonality penalty included (transformers scales the loss by the number of processes; the penalty, attached to
the layer outputs, is weighed per optimizer step instead)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.helpers import ROWS, first_step_gradients


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    import peft_sparta  # noqa: F401

    grads = first_step_gradients(Path(folder) / f"rank{rank}", batch_size=ROWS // 2, accumulation=1)
    torch.save(grads, os.path.join(folder, f"grads{rank}.pt"))


def test_two_processes_give_the_gradients_of_one(tmp_path):
    port = 29500 + os.getpid() % 1000 + 61
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(2)]
    one = first_step_gradients(tmp_path / "single", batch_size=ROWS, accumulation=1)
    assert one.keys() == two[0].keys() == two[1].keys() and any("sparta_A_task" in name for name in one)
    for name in one:
        torch.testing.assert_close(two[0][name], two[1][name], msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(
            two[0][name], one[name], atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
