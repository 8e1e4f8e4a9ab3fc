"""One router state per adapter under sequence routing: every layer routes by the same query, so the first adapted
layer's router holds the state and the other layers hold a `SharedRouter` that reads it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Branches, Router
from .context import RoutingContext


class SharedRouter(Router):
    """Stands in for ``owner``, the router of another layer of the same adapter: it scores with the owner's state and
    learns nothing itself (the owner learns once per forward in its own layer, and is saved there, once). Adding or
    removing a task changes the owner's state only, through the owner's layer."""

    def __init__(self, owner: Router) -> None:
        nn.Module.__init__(self)
        self.__dict__["owner"] = owner  # not a submodule: the state belongs to, and is saved with, the owner's layer
        self.granularity = owner.granularity  # fixed at construction; read at every call, so held here

    @property
    def config(self):
        return self.owner.config

    @config.setter
    def config(self, config) -> None:
        self.owner.config = config

    def __getattr__(self, name: str):
        """The owner's settings and state (granularity, prototypes, keys, ...) read through this layer's router."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["owner"], name)

    @property
    def state_owner(self) -> Router:
        return self.owner

    def queries(self, x: torch.Tensor, context: Optional[RoutingContext]) -> torch.Tensor:
        return self.owner.queries(x, context)

    def scores(self, queries: torch.Tensor, branches: Branches) -> torch.Tensor:
        return self.owner.scores(queries, branches)
