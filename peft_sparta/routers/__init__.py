"""SpaRTA's routers, one class per router (as LoRA's variants are): each owns its state, scores inputs per task and
learns the current task in training; the layer calls the one `Router` interface.

To add a router: subclass `Router`, implement `scores` (and `learn`/`add_task`/`frozen_parameters` if it has state),
and add it to `ROUTERS` under the name `SpaRTAConfig.router` takes.
"""

from __future__ import annotations

from .base import (
    Branches,
    RoutedLayer,
    Router,
    Routing,
    TaskBranches,
    gates_from_scores,
    is_recomputation,
    routed_layers,
    select_branches,
)
from .components import ComponentRouter
from .context import IGNORE_INDEX, RoutingContext, prompt_mask
from .learned import LearnedRouter
from .prototype import PrototypeRouter
from .shared import SharedRouter
from .spectral import SpectralRouter


ROUTERS: dict[str, type[Router]] = {
    "components": ComponentRouter,
    "learned": LearnedRouter,
    "prototype": PrototypeRouter,
    "spectral": SpectralRouter,
}


def make_router(config, granularity: str, source_dim: int, owner: Router | None = None) -> Router:
    """The router ``config.router`` names, for inputs of ``source_dim`` features routed per ``granularity``; a
    `SharedRouter` of ``owner`` when another layer's router already holds the adapter's sequence-routing state."""
    if owner is not None:
        return SharedRouter(owner)
    return ROUTERS[config.router](config, granularity, source_dim)


__all__ = [
    "IGNORE_INDEX",
    "ROUTERS",
    "Branches",
    "ComponentRouter",
    "LearnedRouter",
    "PrototypeRouter",
    "RoutedLayer",
    "Router",
    "Routing",
    "RoutingContext",
    "SharedRouter",
    "SpectralRouter",
    "TaskBranches",
    "gates_from_scores",
    "is_recomputation",
    "make_router",
    "prompt_mask",
    "routed_layers",
    "select_branches",
]
