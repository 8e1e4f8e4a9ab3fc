"""Small helpers shared by the tuner, the routers and the continual-learning tools."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` (batch, positions, features) over the positions where ``mask`` (batch, positions) is true,
    in fp32; every position counts when ``mask`` is None, and a row without any masked position gives zeros."""
    if mask is None:
        return values.float().mean(dim=1)
    total, count = masked_sum(values, mask)
    return total / count.clamp(min=1.0)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (batch, features) in fp32 of ``values`` (batch, positions, features) over the positions where ``mask``
    (batch, positions) is true, and the number of those positions (batch, 1)."""
    weights = mask.to(values.device, torch.float32).unsqueeze(-1)
    return (values.float() * weights).sum(dim=1), weights.sum(dim=1)


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (where its inputs must go)."""
    return next(module.parameters()).device


def tensor_states(tensors) -> list[tuple]:
    """What identifies the contents of each tensor without reading them: the tensor itself, its storage and its
    version counter (bumped by every in-place change), to key values derived from the tensors."""
    return [(tensor, tensor.data_ptr(), tensor._version) for tensor in tensors]


def same_tensor_states(cached: list[tuple], current: list[tuple]) -> bool:
    """Whether two `tensor_states` name the same tensors, in the same order, storage and version."""
    return len(cached) == len(current) and all(
        old is new and old_state == new_state for (old, *old_state), (new, *new_state) in zip(cached, current)
    )
