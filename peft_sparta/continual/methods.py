"""What `train_sequence` trains: a `Method` wraps a base model and does its per-task step; `SpaRTAMethod` is SpaRTA's.
The benchmark's baselines (the repository's `benchmarks.baselines`) are Methods too."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from ..config import SpaRTAConfig


class Method:
    """One continual-learning method: how to wrap the base model and what to do at each task boundary."""

    name: str = "method"
    #: trains on the union of all tasks at once (the multi-task upper bound) instead of in sequence
    multitask: bool = False
    #: the model holds a SpaRTA adapter
    is_sparta: bool = False
    #: the adapter routes inputs among its task branches, so its routing accuracy can be recorded
    routes: bool = False

    def build(self, base_model: nn.Module, task_names: list[str]) -> nn.Module:
        raise NotImplementedError

    def begin_task(self, model: nn.Module, index: int, task_name: str, num_tasks: int) -> nn.Module:
        """Called before training task ``index`` (also for the first task); returns the model to train."""
        return model

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A loss the method adds to the task loss at every step (besides what the model adds itself)."""
        return None

    def forced(self, model: nn.Module, task_name: str) -> AbstractContextManager:
        """A context in which ``model`` computes task ``task_name`` through its own path, as if its task id were
        given: what the learning accuracy would be without routing errors. Asked only of methods that route."""
        raise NotImplementedError(f"{type(self).__name__} routes, so it must say how to force a task's path.")


@dataclass
class SpaRTAMethod(Method):
    """SpaRTA: one `SpaRTAConfig`; ``add_task`` at each new task."""

    name: str = "sparta"
    target_modules: Any = None
    config: dict = field(default_factory=dict)
    is_sparta: bool = True
    routes: bool = True

    def build(self, base_model, task_names):
        config = SpaRTAConfig(target_modules=self.target_modules, task_names=[task_names[0]], **self.config)
        return get_peft_model(base_model, config)

    def begin_task(self, model, index, task_name, num_tasks):
        if task_name not in model.base_model.task_names:
            model.base_model.add_task(task_name)
        return model

    @contextmanager
    def forced(self, model, task_name):
        """The task's own branch (`set_task`), released to the router afterwards."""
        model.base_model.set_task(task_name)
        try:
            yield
        finally:
            model.base_model.set_task(None)
