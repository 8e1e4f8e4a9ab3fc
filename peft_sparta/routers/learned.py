"""The learned router: one trainable key per task, pulled towards its task's queries by a router loss (as SAPT and
MoCL train their keys); the keys of finished tasks are frozen."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .base import Branches, Router
from .context import RoutingContext


class LearnedRouter(Router):
    """Scores a query by its cosine similarity to each task's key; ``keys`` are parameters saved with the adapter."""

    def __init__(self, config, granularity: str, source_dim: int) -> None:
        super().__init__(config, granularity, source_dim)
        self.keys = nn.ParameterList()

    def scores(self, queries: torch.Tensor, branches: Branches) -> torch.Tensor:
        return key_scores(queries, torch.stack(list(self.keys)))

    def loss(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches) -> Optional[torch.Tensor]:
        queries = self.state_queries(x, self.queries(x, context), context)
        if queries.shape[0] == 0:
            return None
        loss = router_loss(queries, torch.stack(list(self.keys)), len(self.keys) - 1, self.config.router_temperature)
        return self.config.router_lambda * loss

    def add_task(self) -> None:
        reference = self.keys[0] if len(self.keys) else None
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        self.keys.append(nn.Parameter(F.normalize(torch.randn(self.query_dim, **factory), dim=0)))

    def remove_task(self, index: int) -> None:
        self.keys = nn.ParameterList([key for task, key in enumerate(self.keys) if task != index])

    def frozen_parameters(self) -> list[nn.Parameter]:
        return list(self.keys)[:-1]


def key_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query (..., d) to each task key (tasks, d). Returns (..., tasks)."""
    return queries.float() @ F.normalize(keys.float(), dim=-1).T


def router_loss(queries: torch.Tensor, keys: torch.Tensor, task: int, temperature: float) -> torch.Tensor:
    """Loss of the learned router on queries (N, d) of task ``task``.

    Cross-entropy of the key scores to the current task (as SAPT and MoCL train their keys) plus 1 - cosine to the
    task's own key, which keeps pulling the key to its task's inputs while it is the only task.
    """
    scores = key_scores(queries, keys)
    target = torch.full((queries.shape[0],), task, dtype=torch.long, device=queries.device)
    return F.cross_entropy(scores / temperature, target) + (1.0 - scores[:, task]).mean()
