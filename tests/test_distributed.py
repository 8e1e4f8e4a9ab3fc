"""Data-parallel training on CPU with two gloo processes (plain DDP, accelerate, FSDP, and DeepSpeed ZeRO-2/3 through
accelerate, as the Trainer runs it): every rank holds and saves the same adapter, and each rank's saved adapter reloads
to exactly the model it trained.

Each task is one training job, the way continual runs chain on a cluster: task "a" trains a new adapter; task "b"
loads it into a fresh base model, adds its branch and trains on. (accelerate on CPU always prepares DDP, whatever
FSDP plugin it is given, so FSDP is exercised through torch's own wrapper, which accelerate uses on GPUs.)
ZeRO-3 partitions every parameter, however small (persistence threshold 0), so the adapter's branches, and the
orthogonality penalty that reads them after the forward, are exercised in partitioned form.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


PROBE = torch.arange(3, 17).view(2, 7)
# strong enough that an engine dropping the orthogonality penalty's gradient trains a visibly different adapter
ORTH_LAMBDA = 1.0


ENGINES = ["ddp", "accelerate", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


def _deepspeed_plugin(engine: str):
    from accelerate import DeepSpeedPlugin

    stage = int(engine[-1])
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,  # the other engines do not clip
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }
    return DeepSpeedPlugin(hf_ds_config=config)


def _adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _prepare(model, engine: str, accelerator):
    """The model and its optimizer under the engine, and a context in which the unwrapped model holds its full
    parameters."""
    if accelerator is not None:
        wrapped, optimizer = accelerator.prepare(model, _adamw(model))
        if engine == "deepspeed_zero3":
            import deepspeed

            return wrapped, optimizer, deepspeed.zero.GatheredParameters(list(model.parameters()))
        return wrapped, optimizer, nullcontext()
    if engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        return wrapped, _adamw(wrapped), nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    return wrapped, _adamw(wrapped), FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)


def _train_task(model, task_index: int, engine: str, accelerator, generator, folder: str) -> torch.Tensor:
    """Three steps on task ``task_index``'s tokens under the engine; saves the adapter, returns the probe's logits."""
    wrapped, optimizer, full_parameters = _prepare(model, engine, accelerator)
    wrapped.train()
    for _ in range(3):
        batch = torch.randint(task_index * 40, task_index * 40 + 40, (2, 7), generator=generator)
        loss = wrapped(input_ids=batch, labels=batch).loss
        accelerator.backward(loss) if accelerator is not None else loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # the Trainer's save under DeepSpeed: the engine's consolidated state dict, filtered by save_pretrained
    state_dict = accelerator.get_state_dict(wrapped) if engine.startswith("deepspeed") else None
    with full_parameters:
        model.save_pretrained(folder, state_dict=state_dict)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE).logits
    if accelerator is not None:
        accelerator.free_memory()  # accelerate's way to train another model with the same Accelerator
    return logits


def _accelerator(engine: str):
    """accelerate's Accelerator for the engines it drives, None for the ones this test wraps itself."""
    if engine == "accelerate":
        from accelerate import Accelerator

        return Accelerator(cpu=True)
    if engine.startswith("deepspeed"):
        from accelerate import Accelerator, PartialState

        # what `accelerate launch --use_deepspeed` sets; the gloo backend because accelerate only picks one for
        # DeepSpeed on accelerators
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        return Accelerator(deepspeed_plugin=_deepspeed_plugin(engine))
    return None


def _worker(rank: int, world: int, port: int, folder: str, engine: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    accelerator = _accelerator(engine)
    if accelerator is None:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        assert accelerator.num_processes == world
    try:
        from peft import PeftModel, get_peft_model

        import peft_sparta  # noqa: F401
        from peft_sparta import SpaRTAConfig
        from tests.conftest import tiny_llama

        generator = torch.Generator().manual_seed(100 + rank)
        config = SpaRTAConfig(
            target_modules=["q_proj", "v_proj"], r_shared=2, r_task=4, task_names=["a"], orth_lambda=ORTH_LAMBDA
        )
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


@pytest.fixture(scope="module")
def train_with(tmp_path_factory):
    """Runs each engine's two-task job once per module: engine -> folder with both ranks' adapters per task."""
    folders = {}

    def train(engine: str):
        if engine.startswith("deepspeed"):
            pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (test extra, Linux only)")
        if engine not in folders:
            folder = tmp_path_factory.mktemp(engine)
            port = 29500 + os.getpid() % 1000 + 7 * ENGINES.index(engine)
            mp.spawn(_worker, args=(2, port, str(folder), engine), nprocs=2, join=True)
            folders[engine] = folder
        return folders[engine]

    return train


def _adapter(folder, task: str, rank: int) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / task / f"rank{rank}" / "adapter_model.safetensors")


@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_hold_and_save_the_same_adapter(train_with, engine):
    folder = train_with(engine)
    first, second = _adapter(folder, "b", 0), _adapter(folder, "b", 1)
    assert first.keys() == second.keys()
    assert any("sparta_A_task.1" in key for key in first), "the second task's branch was saved"
    for key in first:
        assert torch.equal(first[key], second[key]), key
    counts = [v for k, v in first.items() if k.endswith("sparta_router.counts")][0]
    assert counts.shape[0] == 2 and (counts.sum(-1) > 0).all(), "every task's prototypes saw data on both ranks"
    trained_b = [v for k, v in first.items() if "sparta_B_task.1" in k][0]
    assert trained_b.abs().sum() > 0, "the second task trained"


@pytest.mark.parametrize("engine", [engine for engine in ENGINES if engine != "ddp"])
def test_engine_trains_the_adapter_plain_ddp_trains(train_with, engine):
    """Same data, same steps: sharding parameters, gradients or optimizer state (ZeRO-3 partitions even the frozen
    branches the orthogonality penalty reads) changes nothing beyond the order of floating-point sums."""
    reference, trained = _adapter(train_with("ddp"), "b", 0), _adapter(train_with(engine), "b", 0)
    assert trained.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(
            trained[key], reference[key], atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}"
        )
