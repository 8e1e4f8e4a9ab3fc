"""Stochastic restoration, from the DATA code (SpaRTA's predecessor, repository Xnhyacinth/DATA,
src/llamafactory/train/cl/trainer.py): while a task trains, every ``restore_every`` optimizer steps each trainable
entry of the adapter's branches is reset, with probability ``restore_prob``, to its value at the start of the task's
training, which keeps a few weights where the task found them. As in that code the branches are restored, not the
router's components.

How it reaches any training loop without a trainer subclass or callback:

- the start values (a `RestorePoint`) are taken by the model at the first training forward of a task: after
  `add_task`, or for an adapter loaded to train on, at the start of this training run (DATA's trainer copies the
  state when it starts);
- a global optimizer step post-hook counts the steps of every optimizer that holds the adapter's parameters and
  restores when one is due, so the Trainer, TRL's trainers, accelerate and plain loops need nothing;
- ``SpaRTAModel.restore_stochastically()`` restores at once, for loops whose optimizer holds copies of the parameters
  (DeepSpeed's engine): call it every ``restore_every`` steps.

Every rank of a data-parallel run draws the same entries (the draws come from a generator seeded by the task count
and the restoration count, not from torch's global generator), so the ranks keep holding the same adapter. Restoring
needs whole parameters: sharded ones (FSDP, DeepSpeed ZeRO-3) raise an error naming the problem.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .optimizer_guard import held_parameter_ids


#: Tuners whose restore points count optimizer steps.
_TUNERS: weakref.WeakSet = weakref.WeakSet()
_HOOK = []


@dataclass
class RestorePoint:
    """The start values of one adapter's trainable branch entries for the task being trained, and its counters."""

    #: (parameter name, parameter, its value at the start of the task's training)
    parameters: list[tuple[str, nn.Parameter, torch.Tensor]] = field(default_factory=list)
    #: the task count when the point was taken (part of the restoration seed)
    tasks: int = 1
    #: optimizer steps counted since the point was taken
    steps: int = 0
    #: restorations done since the point was taken
    restorations: int = 0

    def holds_any(self, parameter_ids: set[int]) -> bool:
        return any(id(parameter) in parameter_ids for _, parameter, _ in self.parameters)


def take_restore_point(named_parameters: list[tuple[str, nn.Parameter]], tasks: int) -> RestorePoint:
    """A restore point of the trainable parameters among ``named_parameters``."""
    return RestorePoint(
        [(name, param, param.detach().clone()) for name, param in named_parameters if param.requires_grad], tasks
    )


def restoration_generator(point: RestorePoint) -> torch.Generator:
    """The generator of a restoration's draws: the same on every rank, different for every task and restoration."""
    return torch.Generator().manual_seed(1_000_003 * point.tasks + point.restorations)


@torch.no_grad()
def restore(point: RestorePoint, probability: float) -> int:
    """Reset each entry of the point's parameters to its start value with ``probability``; the number reset."""
    generator = restoration_generator(point)
    point.restorations += 1
    reset = 0
    for name, parameter, start in point.parameters:
        if parameter.shape != start.shape:
            raise RuntimeError(
                f"Stochastic restoration found {name} with shape {tuple(parameter.shape)} instead of "
                f"{tuple(start.shape)}: the parameters are sharded (FSDP, DeepSpeed ZeRO-3). Restoration needs whole "
                "parameters (plain training, DDP, accelerate, ZeRO-1/2); set restore_every=None to train sharded."
            )
        reset += restore_entries(parameter, start, probability, generator)
    return reset


@torch.no_grad()
def restore_entries(parameter: torch.Tensor, start: torch.Tensor, probability: float, generator) -> int:
    """Reset each entry of ``parameter`` to ``start`` where ``torch.rand(shape, generator) < probability`` (drawn on
    the CPU, so that every device draws the same entries); the number of entries reset."""
    chosen = torch.rand(parameter.shape, generator=generator) < probability
    count = int(chosen.sum())
    if count:
        chosen = chosen.to(parameter.device)
        parameter.copy_(torch.where(chosen, start.to(parameter.dtype), parameter))
    return count


def count_optimizer_steps_of(tuner) -> None:
    """Let every optimizer step from now on count towards ``tuner``'s restorations (the hook is registered once)."""
    _TUNERS.add(tuner)
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_after_step))


def _after_step(optimizer, args, kwargs) -> None:
    held = held_parameter_ids(optimizer)
    for tuner in list(_TUNERS):
        tuner._count_optimizer_step(held)


__all__ = ["RestorePoint", "restore", "restore_entries", "take_restore_point"]
