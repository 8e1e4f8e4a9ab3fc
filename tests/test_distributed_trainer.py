"""The Trainer on two gloo processes trains the same objective as on one: the same first-step gradients, the
orthogonality penalty included (transformers scales the loss by the number of processes; the penalty, attached to
the layer outputs, is weighed per optimizer step instead)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp


ROWS = 8


def first_step_gradients(folder: str, batch_size: int) -> dict[str, torch.Tensor]:
    """The adapter's gradients at the Trainer's first optimizer step on the 8 rows, ``batch_size`` rows per process."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import Trainer

    from tests.conftest import Rows
    from tests.test_trainer import completion_rows, sparta_model, tokenizer, training_args

    tok = tokenizer()
    model = sparta_model(len(tok))
    for config in model.peft_config.values():
        config.orth_lambda = 50.0  # the penalty dominates, so a wrong weight shows
    grads = {}

    def capture(optimizer, args, kwargs):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    handle = register_optimizer_step_pre_hook(capture)
    try:
        args = training_args(
            Path(folder), max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            max_grad_norm=0.0, dataloader_drop_last=True,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=Rows(completion_rows(tok)[:ROWS])).train()
    finally:
        handle.remove()
    return grads


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    import peft_sparta  # noqa: F401

    grads = first_step_gradients(os.path.join(folder, f"rank{rank}"), batch_size=ROWS // 2)
    torch.save(grads, os.path.join(folder, f"grads{rank}.pt"))


def test_two_processes_give_the_gradients_of_one(tmp_path):
    port = 29500 + os.getpid() % 1000 + 61
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(2)]
    one = first_step_gradients(str(Path(tmp_path) / "single"), batch_size=ROWS)
    assert one.keys() == two[0].keys() == two[1].keys() and any("sparta_A_task" in name for name in one)
    for name in one:
        torch.testing.assert_close(two[0][name], two[1][name], msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(
            two[0][name], one[name], atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
