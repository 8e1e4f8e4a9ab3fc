"""Keeps optimizers honest about SpaRTA's frozen and new branches.

`add_task` creates new parameters and freezes old ones. An optimizer built before it (a reused Trainer, a custom loop
that keeps its optimizer) does not hold the new branch, which then never trains, and its momentum keeps moving frozen
branches whose gradients are zero tensors (``zero_grad(set_to_none=False)``). `remove_task` of the newest task makes
the task before it trainable again, which an optimizer built for the removed task does not hold. Before every
optimizer step this guard clears the gradients of frozen SpaRTA parameters (optimizers skip parameters without a
gradient) and warns, once per optimizer and set of parameters, when trainable SpaRTA parameters are missing from an
optimizer that holds others of the same model, or parameters that `remove_task` dropped from it.
"""

from __future__ import annotations

import warnings
import weakref

from torch.optim.optimizer import register_optimizer_step_pre_hook


_TUNERS: weakref.WeakSet = weakref.WeakSet()
_WARNED: set[tuple[int, tuple[str, ...]]] = set()
_HOOK = []


def guard_optimizers_of(tuner) -> None:
    """Check every optimizer step against ``tuner``'s parameters from now on (the hook is registered once)."""
    _TUNERS.add(tuner)
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_before_step))


def held_parameter_ids(optimizer) -> set[int]:
    """The ids of the parameters an optimizer updates."""
    return {id(param) for group in optimizer.param_groups for param in group["params"]}


def _before_step(optimizer, args, kwargs) -> None:
    held = held_parameter_ids(optimizer)
    for tuner in list(_TUNERS):
        adapter_params = [(name, param) for name, param in tuner.model.named_parameters() if tuner.prefix in name]
        removed = list(getattr(tuner, "removed_parameters", ()))
        if not any(id(param) in held for param in [*(param for _, param in adapter_params), *removed]):
            continue
        for _, param in adapter_params:
            if not param.requires_grad:
                param.grad = None
        missing = tuple(name for name, param in adapter_params if param.requires_grad and id(param) not in held)
        if missing and (id(optimizer), missing) not in _WARNED:
            _WARNED.add((id(optimizer), missing))
            warnings.warn(
                f"The optimizer does not hold {len(missing)} trainable SpaRTA parameters (e.g. {missing[0]}), so they "
                "will not train: it was created before add_task or remove_task (or before the adapter was made "
                "trainable). Create a new optimizer after add_task and remove_task; with the Trainer, create a new "
                "Trainer for each task.",
                stacklevel=2,
            )
