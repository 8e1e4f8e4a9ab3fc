"""The two designs of an adapter's task branches, kept as variants the way PEFT's LoRA keeps DoRA: each adapted layer
holds one `TaskBranchVariant` per adapter, chosen from the config's ``task_branches`` when the adapter is built, and
calls its static hooks wherever the designs differ (the routing recorder reads the layer's too); the checkpoint
checks, the LoRA export, the model card and the Trainer callback resolve it from the config (`task_branch_variant`).

- `PerTaskBranches` (``task_branches="per_task"``, the default): one high-rank branch per task, frozen once its task
  is done; the router picks the task branch per input.
- `SharedTaskBranch` (``task_branches="shared"``, the paper design of the authors' public code): one high-rank branch
  trained on every task, which the component router weighs per input against the low-rank branch; a task adds router
  components only.

What both share stays in the layer (`peft_sparta.layer`): the low-rank branch, which branches train, the regularizers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from .routers.components import BRANCHES


if TYPE_CHECKING:
    from .config import SpaRTAConfig
    from .layer import SpaRTALayer


class TaskBranchVariant:
    """What the designs of the task branches differ in; ``module`` is the `SpaRTALayer` that holds the adapter."""

    #: The config's ``task_branches`` value that chooses this variant.
    task_branches: str
    #: A checkpoint key (without adapter name) of the tensor the adapter holds one of per task, the task index its
    #: group, and what these tensors are, named when the config's tasks and the weights disagree on load.
    checkpoint_task_key: re.Pattern
    checkpoint_task_tensors: str
    #: Whether the router's gates (`SpaRTALayer.router_gates`) have one column per task; else they are the weights of
    #: the shared and the task branch.
    gates_per_task: bool

    @staticmethod
    def add_task(module: SpaRTALayer, adapter_name: str) -> None:
        """Create the task branch a new task trains, if the design adds one (the layer then grows the router)."""
        raise NotImplementedError

    @staticmethod
    def remove_task(module: SpaRTALayer, adapter_name: str, index: int) -> None:
        """Drop what task ``index`` owns among the task branches (the layer then drops its router state)."""
        raise NotImplementedError

    @staticmethod
    def branch_of(task: int) -> int:
        """The task branch that task ``task`` uses."""
        raise NotImplementedError

    @staticmethod
    def forced_gates(module: SpaRTALayer, adapter_name: str, task: int, x: torch.Tensor) -> torch.Tensor:
        """The router's gates (`SpaRTALayer.router_gates`) for input ``x`` while `set_task` forces task ``task``."""
        raise NotImplementedError

    @staticmethod
    def unforced_merge_task(module: SpaRTALayer, adapter_name: str) -> int:
        """The task whose branch a merge folds into the weight when no task is forced, or a ValueError saying why
        none can be and how to merge."""
        raise NotImplementedError

    @staticmethod
    def check_lora_export(config: SpaRTAConfig) -> None:
        """A ValueError when no plain LoRA (one per task, see `peft_sparta.export`) reproduces the design."""
        raise NotImplementedError

    @staticmethod
    def model_card_design(config: SpaRTAConfig) -> str:
        """The adapter's branches and router, as the model card describes them."""
        raise NotImplementedError

    @staticmethod
    def gate_logs(gates: torch.Tensor, task_names: list[str], prefix: str, with_current: bool) -> dict[str, float]:
        """The Trainer log values of the router ``gates`` (inputs, gates) recorded since the previous log;
        ``with_current``: also the fraction of inputs routed to the current task."""
        raise NotImplementedError


class PerTaskBranches(TaskBranchVariant):
    """One high-rank branch per task, frozen once its task is done; the router picks among them per input."""

    task_branches = "per_task"
    checkpoint_task_key = re.compile(r"\.sparta_A_task\.(\d+)$")
    checkpoint_task_tensors = "task branches"
    gates_per_task = True

    @staticmethod
    def add_task(module: SpaRTALayer, adapter_name: str) -> None:
        module._append_task_branch(adapter_name)

    @staticmethod
    def remove_task(module: SpaRTALayer, adapter_name: str, index: int) -> None:
        module._drop_task_branch(adapter_name, index)

    @staticmethod
    def branch_of(task: int) -> int:
        return task

    @staticmethod
    def forced_gates(module: SpaRTALayer, adapter_name: str, task: int, x: torch.Tensor) -> torch.Tensor:
        """One-hot on the forced task's branch."""
        index = torch.tensor(task, device=x.device)
        return F.one_hot(index, module.num_tasks(adapter_name)).float().expand(*x.shape[:-1], -1)

    @staticmethod
    def unforced_merge_task(module: SpaRTALayer, adapter_name: str) -> int:
        """The only task; with several, the router chooses per input, which a merged weight cannot."""
        if module.num_tasks(adapter_name) == 1:
            return 0
        names = module.sparta_settings[adapter_name].task_names
        raise ValueError(
            f"Cannot merge SpaRTA adapter '{adapter_name}': it has {len(names)} tasks ({', '.join(names)}) and the "
            "router chooses among them per input, which a single merged weight cannot do. Call "
            "model.set_task(<task name>) first to merge that task's branch with the shared branch."
        )

    @staticmethod
    def check_lora_export(config: SpaRTAConfig) -> None:
        """Each task's branch with the shared branch is a LoRA."""

    @staticmethod
    def model_card_design(config: SpaRTAConfig) -> str:
        return (
            f"a shared low-rank branch (rank {config.r_shared}) and one branch of rank {config.r_task} per task, with "
            f"a `{config.router}` router that picks the task branch from the input"
        )

    @staticmethod
    def gate_logs(gates: torch.Tensor, task_names: list[str], prefix: str, with_current: bool) -> dict[str, float]:
        """``gate/<task>``: the mean gate of each task branch; ``routed_to_current``: the fraction of inputs whose
        top gate is the current task."""
        gates = gates[:, : len(task_names)]
        logs = {f"{prefix}gate/{name}": float(value) for name, value in zip(task_names, gates.mean(dim=0))}
        if with_current:
            logs[f"{prefix}routed_to_current"] = float((gates.argmax(dim=-1) == len(task_names) - 1).float().mean())
        return logs


class SharedTaskBranch(TaskBranchVariant):
    """The paper design: one high-rank branch trained on every task, weighed per input against the low-rank branch by
    the component router; a task adds router components only."""

    task_branches = "shared"
    checkpoint_task_key = re.compile(r"\.sparta_router\.keys\.(\d+)$")
    checkpoint_task_tensors = "blocks of router components"
    gates_per_task = False

    @staticmethod
    def add_task(module: SpaRTALayer, adapter_name: str) -> None:
        """The single task branch is created with the first task."""
        if not module.num_tasks(adapter_name):
            module._append_task_branch(adapter_name)

    @staticmethod
    def remove_task(module: SpaRTALayer, adapter_name: str, index: int) -> None:
        """Nothing: the branches keep what every task taught them."""

    @staticmethod
    def branch_of(task: int) -> int:
        return 0

    @staticmethod
    def forced_gates(module: SpaRTALayer, adapter_name: str, task: int, x: torch.Tensor) -> torch.Tensor:
        """The weights (..., 2) of the shared and the task branch, both 1."""
        return torch.ones(*x.shape[:-1], 2, device=x.device)

    @staticmethod
    def unforced_merge_task(module: SpaRTALayer, adapter_name: str) -> int:
        """None: the component router weighs the branches per input; a forced task fixes both weights at 1."""
        names = module.sparta_settings[adapter_name].task_names
        raise ValueError(
            f"Cannot merge SpaRTA adapter '{adapter_name}': with task_branches='shared' the component router "
            "weighs the two branches per input, which a single merged weight cannot do. Call "
            f"model.set_task('{names[-1]}') first (any task): it fixes both weights at 1, the LoRA that merges."
        )

    @staticmethod
    def check_lora_export(config: SpaRTAConfig) -> None:
        """The per-input weights of the two branches are no LoRA."""
        raise ValueError(
            "Cannot export an adapter with task_branches='shared' (the paper design) as LoRA: its component router "
            "weighs the low-rank and the high-rank branch per input, a per-input mix that no single LoRA reproduces. "
            "Serve it with peft_sparta, or fix both weights with model.set_task(<any task>) and merge it "
            "(merge_and_unload)."
        )

    @staticmethod
    def model_card_design(config: SpaRTAConfig) -> str:
        return (
            f"a low-rank branch (rank {config.r_shared}) and a high-rank branch (rank {config.r_task}) trained on "
            'every task (the paper design, `task_branches="shared"`), with a component router that weighs the '
            "two branches per input"
        )

    @staticmethod
    def gate_logs(gates: torch.Tensor, task_names: list[str], prefix: str, with_current: bool) -> dict[str, float]:
        """``weight/shared`` and ``weight/task``: the mean router weights of the two branches."""
        return {f"{prefix}weight/{name}": float(value) for name, value in zip(BRANCHES, gates.mean(dim=0))}


#: The variant of each ``task_branches`` value.
VARIANTS: dict[str, TaskBranchVariant] = {
    variant.task_branches: variant for variant in (PerTaskBranches(), SharedTaskBranch())
}


def task_branch_variant(config: SpaRTAConfig) -> TaskBranchVariant:
    """The variant that ``config`` chooses (`PerTaskBranches` for a config without ``task_branches``)."""
    return VARIANTS[getattr(config, "task_branches", "per_task")]


__all__ = ["VARIANTS", "PerTaskBranches", "SharedTaskBranch", "TaskBranchVariant", "task_branch_variant"]
