"""The designs of the task branches as layer variants (`peft_sparta.variants`): each ``task_branches`` value has one,
every layer holds the one its adapter's config chooses, and an adapter of each design keeps its own next to the
other's."""

from __future__ import annotations

from typing import get_args

import torch
from peft import get_peft_model

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig
from peft_sparta.config import TaskBranches
from peft_sparta.layer import sparta_layers
from peft_sparta.variants import VARIANTS, PerTaskBranches, SharedTaskBranch
from tests.conftest import tiny_llama


TARGETS = ["q_proj", "v_proj"]


def test_every_task_branches_value_has_its_variant():
    assert set(VARIANTS) == set(get_args(TaskBranches))
    assert all(variant.task_branches == value for value, variant in VARIANTS.items())


def test_each_adapter_routes_a_forced_task_through_its_own_variant():
    model = get_peft_model(tiny_llama(), SpaRTAConfig(target_modules=TARGETS, task_names=["a", "b"]))
    model.add_adapter("paper", SpaRTAConfig.paper_design(target_modules=TARGETS, task_names=["a", "b"]))
    layer = sparta_layers(model)[0]
    assert isinstance(layer.sparta_variant["default"], PerTaskBranches)
    assert isinstance(layer.sparta_variant["paper"], SharedTaskBranch)
    assert (layer.num_tasks("default"), layer.num_tasks("paper")) == (2, 1)
    model.set_task("a", adapter_name="default")
    model.set_task("a", adapter_name="paper")
    x = torch.randn(3, layer.in_features)
    assert torch.equal(layer.router_gates("default", x), torch.tensor([[1.0, 0.0]]).expand(3, -1))
    assert torch.equal(layer.router_gates("paper", x), torch.ones(3, 2))
    model.delete_adapter("paper")
    assert "paper" not in layer.sparta_variant
