"""The orthogonality penalty reuses one stack of the frozen branches per layer: it equals the penalty over the branches
themselves (values and gradients), and the stack follows every change of those branches."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_sparta import SpaRTAConfig
from peft_sparta.kernels import orthogonality_penalty_reference
from peft_sparta.layer import sparta_layers
from tests.conftest import tiny_llama


def four_tasks(**kwargs):
    config = SpaRTAConfig(r_shared=2, r_task=4, target_modules=["q_proj", "v_proj"], init_weights=False, **kwargs)
    model = get_peft_model(tiny_llama(), config)
    for name in ["b", "c", "d"]:
        model.add_task(name)
    return model.train()


def penalty_from_branches(layer) -> torch.Tensor:
    """The penalty straight from its definition: the current branch against every other, and a trainable shared
    branch against the old ones."""
    tasks = list(layer.sparta_A_task["default"])
    shared = layer.sparta_A_shared["default"]
    loss = sum(orthogonality_penalty_reference(tasks[-1], other) for other in [shared, *tasks[:-1]])
    if shared.requires_grad:
        loss = loss + sum(orthogonality_penalty_reference(shared, old) for old in tasks[:-1])
    return loss


@pytest.mark.parametrize("shared_update", ["freeze_after_first", "train"])
def test_stacked_penalty_equals_the_penalty_over_the_branches(shared_update):
    layer = sparta_layers(four_tasks(shared_update=shared_update))[0]
    current = layer.sparta_A_task["default"][-1]
    stacked = layer.orthogonality_loss("default")
    (grad_stacked,) = torch.autograd.grad(stacked, current)
    reference = penalty_from_branches(layer)
    (grad_reference,) = torch.autograd.grad(reference, current)
    torch.testing.assert_close(stacked, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_stacked, grad_reference, rtol=1e-5, atol=1e-6)


def test_the_stack_is_reused_and_rebuilt_when_a_branch_changes(tmp_path):
    model = four_tasks()
    layer = sparta_layers(model)[0]
    first = layer._frozen_down("default")
    assert layer._frozen_down("default") is first  # reused across steps
    model.add_task("e")
    assert layer._frozen_down("default").shape[0] == first.shape[0] + 4
    model.remove_task("b")
    assert layer._frozen_down("default").shape[0] == first.shape[0]
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        layer.sparta_A_task["default"][0].mul_(3.0)  # what loading into existing tensors does
    torch.testing.assert_close(layer.orthogonality_loss("default"), penalty_from_branches(layer))
    model.to(torch.float64)
    assert layer._frozen_down("default").dtype == torch.float64
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
    loaded_layer = sparta_layers(loaded)[0]
    torch.testing.assert_close(loaded_layer.orthogonality_loss("default"), penalty_from_branches(loaded_layer))
