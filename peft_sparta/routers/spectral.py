"""The spectral router (training-free): each task is represented by the top right singular vectors of its frozen
branch B_k A_k, as PEFT's Arrow router does for LoRA experts; an input goes to the tasks it projects most onto."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .base import Branches, Router


class SpectralRouter(Router):
    """Scores a query by its best |cosine| to each task branch's top singular directions; it holds no state."""

    uses_projection = False

    def scores(self, queries: torch.Tensor, branches: Branches) -> torch.Tensor:
        count = self.config.router_prototypes
        directions = torch.stack([spectral_directions(a, b, count) for a, b in branches])
        return spectral_scores(queries, directions)


def spectral_scores(queries: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Best |cosine| of each query (..., d) to each task's singular directions (tasks, P, d). Returns (..., tasks)."""
    return torch.einsum("...d,tpd->...tp", queries.float(), directions.float()).abs().amax(dim=-1)


def spectral_directions(a: torch.Tensor, b: torch.Tensor, count: int) -> torch.Tensor:
    """Top ``count`` right singular vectors of ``b @ a`` (count, in), through the small (r x in) factor.

    With b = Q R (thin QR), b a = Q (R a) and Q has orthonormal columns, so the right singular vectors of b a are
    those of R a. Missing directions (count > r) are zero rows, which never win a max of |cosine|.
    """
    _, r_factor = torch.linalg.qr(b.float())
    _, _, vh = torch.linalg.svd(r_factor @ a.float(), full_matrices=False)
    directions = vh[:count]
    if directions.shape[0] < count:
        directions = F.pad(directions, (0, 0, 0, count - directions.shape[0]))
    return directions
