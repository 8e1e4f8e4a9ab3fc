"""The orthogonality penalty of a layer with its summary of frozen branches (their stack, or their Gram matrix): equal
to the per-block definition (value and every gradient), built once per task, and rebuilt whenever the frozen branches
change (add/remove a task, loading, moves and casts)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_sparta import SpaRTAConfig, SpaRTALayer
from peft_sparta.kernels import orthogonality_penalty_reference
from tests.conftest import tiny_llama


def sparta_with_tasks(tasks: int, seed: int = 0, r_task: int = 4, **kwargs):
    """SpaRTA on the q and v projections of `tiny_llama` with ``tasks`` task branches, in training mode."""
    model = get_peft_model(
        tiny_llama(seed), SpaRTAConfig(target_modules=["q_proj", "v_proj"], r_shared=2, r_task=r_task, **kwargs)
    )
    for index in range(1, tasks):
        model.add_task(f"task_{index}")
    return model.train()


def first_layer(model) -> SpaRTALayer:
    return next(module for module in model.modules() if isinstance(module, SpaRTALayer))


def definition(layer: SpaRTALayer, norm: str) -> torch.Tensor:
    """The penalty block by block, as the paper writes it: the current task's A against the shared and every old A,
    and the shared A against every old one while it trains."""
    tasks = list(layer.sparta_A_task["default"])
    current, old = tasks[-1], tasks[:-1]
    shared = layer._shared_down("default")
    loss = sum(orthogonality_penalty_reference(current, block, norm) for block in shared + old)
    for block in shared:
        if old and block.requires_grad:
            loss = loss + sum(orthogonality_penalty_reference(block, other, norm) for other in old)
    return loss


def value_and_gradients(layer: SpaRTALayer, loss: torch.Tensor) -> list[torch.Tensor]:
    trainable = [p for p in (*layer._shared_down("default"), *layer.sparta_A_task["default"]) if p.requires_grad]
    return [loss.detach(), *torch.autograd.grad(loss, trainable)]


def assert_penalty_is_the_definition(layer: SpaRTALayer, norm: str = "fro") -> None:
    actual = value_and_gradients(layer, layer.orthogonality_loss("default"))
    expected = value_and_gradients(layer, definition(layer, norm))
    for name, got, want in zip(["loss", *(f"gradient {i}" for i in range(len(expected) - 1))], actual, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def frozen_stack(layer: SpaRTALayer) -> torch.Tensor | None:
    """The layer's cached summary of its frozen branches: their stack, or their Gram matrix."""
    cached = layer.sparta_frozen_summary.get("default")
    return None if cached is None else cached[2]


def frozen_blocks(layer: SpaRTALayer) -> list[torch.Tensor]:
    return [p for p in (*layer._shared_down("default"), *layer.sparta_A_task["default"]) if not p.requires_grad]


@pytest.mark.parametrize("norm", ["fro", "l1"])
@pytest.mark.parametrize("shared_update", ["freeze_after_first", "train"])
@pytest.mark.parametrize(("tasks", "r_task"), [(1, 4), (2, 4), (4, 4), (2, 16), (4, 16)])
def test_penalty_equals_the_per_block_definition(tasks, r_task, shared_update, norm):
    """Value and the gradient of every trainable down-projection (the shared one included while it trains), at the
    first call (the summary is built) and the second (it is reused). With r_task=16 and 4 tasks the frozen branches
    hold more rows (50 or 48) than the layer's 32 input features: the Frobenius penalty then reads their Gram matrix,
    the l1 penalty their stack."""
    layer = first_layer(sparta_with_tasks(tasks, shared_update=shared_update, orth_norm=norm, r_task=r_task))
    for _ in range(2):
        assert_penalty_is_the_definition(layer, norm)
    frozen = frozen_blocks(layer)
    stacked = torch.cat(frozen) if frozen else None
    if len(frozen) < 2:
        assert frozen_stack(layer) is None, "one frozen block (or none) needs no stack"
    elif norm == "fro" and stacked.shape[0] > stacked.shape[1]:
        assert r_task == 16 and tasks == 4
        torch.testing.assert_close(frozen_stack(layer), stacked.T @ stacked, atol=0, rtol=0)
    else:
        torch.testing.assert_close(frozen_stack(layer), stacked, atol=0, rtol=0)


def test_gram_summary_is_rebuilt_by_add_task_and_gives_way_to_the_stack_after_remove_task():
    model = sparta_with_tasks(3, r_task=16)
    layer = first_layer(model)
    layer.orthogonality_loss("default")
    gram = frozen_stack(layer)
    assert gram.shape == (32, 32), "2 + 2 * 16 frozen rows against 32 input features"
    model.add_task("task_3")
    assert_penalty_is_the_definition(layer)
    assert frozen_stack(layer) is not gram and frozen_stack(layer).shape == (32, 32)
    model.remove_task("task_1")
    model.remove_task("task_2")
    assert_penalty_is_the_definition(layer)
    assert frozen_stack(layer).shape == (2 + 16, 32), "18 rows: the stack is the smaller summary again"


def test_stack_is_built_once_per_task_and_rebuilt_by_add_and_remove_task():
    model = sparta_with_tasks(3)
    layer = first_layer(model)
    layer.orthogonality_loss("default")
    stack = frozen_stack(layer)
    assert stack.shape[0] == 2 + 2 * 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert frozen_stack(layer) is stack, "training steps do not change frozen branches"
    model.add_task("task_3")
    assert_penalty_is_the_definition(layer)
    assert frozen_stack(layer) is not stack and frozen_stack(layer).shape[0] == 2 + 3 * 4
    model.remove_task("task_1")
    assert_penalty_is_the_definition(layer)
    assert frozen_stack(layer).shape[0] == 2 + 2 * 4


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_stack_is_rebuilt_after_loading_a_state_dict(low_cpu_mem_usage):
    """Loading copies into the frozen branches (a new version) or, with low_cpu_mem_usage, assigns new tensors."""
    model, other = sparta_with_tasks(3), sparta_with_tasks(3, seed=1)
    layer = first_layer(model)
    layer.orthogonality_loss("default")
    stack = frozen_stack(layer)
    set_peft_model_state_dict(model, get_peft_model_state_dict(other), low_cpu_mem_usage=low_cpu_mem_usage)
    layer = first_layer(model)
    assert not torch.equal(torch.cat(list(layer.sparta_A_task["default"])[:-1]), stack[2:])
    assert_penalty_is_the_definition(layer)
    assert frozen_stack(layer) is not stack


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_stack_is_rebuilt_after_moves_and_casts(dtype):
    """``.to()`` drops the stack; the next penalty stacks the converted branches, also after a round trip whose new
    storage may reuse the old addresses (bf16 and back to fp32 rounds the values)."""
    model = sparta_with_tasks(3)
    layer = first_layer(model)
    layer.orthogonality_loss("default")
    model.to(dtype)
    assert frozen_stack(layer) is None
    assert layer.orthogonality_loss("default").dtype == dtype
    assert frozen_stack(layer).dtype == dtype
    model.to(torch.float32)
    assert frozen_stack(layer) is None
    assert_penalty_is_the_definition(layer)
    assert torch.equal(frozen_stack(layer), torch.cat(frozen_blocks(layer)))


def test_eager_backend_reads_the_blocks_themselves():
    """The eager backend is the per-branch reference: no stack, the same penalty."""
    layer = first_layer(sparta_with_tasks(3, kernel_backend="eager"))
    assert_penalty_is_the_definition(layer)
    assert frozen_stack(layer) is None


def test_eval_mode_keeps_the_summary():
    """A loop that evaluates between training steps reuses the summary: eval mode does not drop it."""
    model = sparta_with_tasks(3)
    layer = first_layer(model)
    layer.orthogonality_loss("default")
    summary = frozen_stack(layer)
    model.eval()
    model.train()
    assert_penalty_is_the_definition(layer)
    assert frozen_stack(layer) is summary
