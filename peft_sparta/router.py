"""Routing functions of SpaRTA: scores of each task for each query, gates, and the router state updates.

Queries and prototypes are compared by cosine similarity; a task's score is its best similarity over its
prototypes, and the gates are a softmax over tasks of score / temperature, optionally restricted to the top k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch.nn import functional as F


#: Score of a task that has no prototype yet: below any cosine similarity, so it never wins against a real task.
EMPTY_TASK_SCORE = -2.0


@dataclass
class RoutingContext:
    """Per-forward information computed once by the model and read by every SpaRTA layer.

    sequence_query: (batch, dim) masked mean of the input embeddings, for sequence routing.
    token_mask: (batch, seq) bool, positions whose queries build the router state in training (the prompt part).
    """

    sequence_query: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None

    def clear(self) -> None:
        self.sequence_query = None
        self.token_mask = None


def prototype_scores(queries: torch.Tensor, prototypes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Best cosine similarity of each query to each task's prototypes.

    queries (..., d) unit norm; prototypes (tasks, P, d); counts (tasks, P), 0 for a prototype not yet seen.
    Returns (..., tasks).
    """
    centroids = F.normalize(prototypes.float(), dim=-1)
    similarity = torch.einsum("...d,tpd->...tp", queries.float(), centroids)
    similarity = similarity.masked_fill(counts == 0, EMPTY_TASK_SCORE)
    return similarity.amax(dim=-1)


def key_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query (..., d) to each task key (tasks, d). Returns (..., tasks)."""
    return queries.float() @ F.normalize(keys.float(), dim=-1).T


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


def gates_from_scores(
    scores: torch.Tensor, temperature: float, top_k: int | None, abstain_threshold: float | None = None
) -> torch.Tensor:
    """Softmax over tasks of scores / temperature; with top_k, zero outside the k best tasks and renormalise; with
    abstain_threshold, zero gates for every query whose best score is below it (no task branch for that input)."""
    if top_k is not None and top_k < scores.shape[-1]:
        kth_best = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    gates = torch.softmax(scores / temperature, dim=-1)
    if abstain_threshold is None:
        return gates
    return gates * (scores.amax(dim=-1, keepdim=True) >= abstain_threshold)


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor) -> None:
    """One step of online (mini-batch) k-means of unit queries (N, d) into prototypes (P, d), in place.

    Empty prototypes are seeded with the first queries; every query then moves its nearest prototype towards it with
    step 1 / count, so each prototype is the exact mean of the queries assigned to it. Under data parallelism the
    seeds and the per-prototype sums are shared across ranks, so every rank holds the same prototypes (every rank
    must call this the same number of times, as it does in a forward of the same model).
    """
    queries = queries.float()
    _seed_empty_prototypes(prototypes, counts, queries)
    nearest = (queries @ F.normalize(prototypes.float(), dim=-1).T).argmax(dim=-1)
    added = torch.bincount(nearest, minlength=prototypes.shape[0])
    sums = torch.zeros_like(prototypes, dtype=torch.float32).index_add_(0, nearest, queries)
    if _is_data_parallel():
        dist.all_reduce(sums)
        dist.all_reduce(added)
    new_counts = counts + added
    updated = (prototypes.float() * counts.unsqueeze(-1) + sums) / new_counts.clamp(min=1).unsqueeze(-1)
    prototypes.copy_(torch.where(new_counts.unsqueeze(-1) > 0, updated, prototypes.float()).to(prototypes.dtype))
    counts.copy_(new_counts)


def _seed_empty_prototypes(prototypes: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor) -> None:
    """Start empty prototypes at the first queries (of rank 0, then rank 1, ... under data parallelism); they count
    no query until the assignment step gives them some."""
    empty = (counts == 0).nonzero().flatten()
    if len(empty) == 0:
        return
    candidates = queries[: len(empty)]
    if _is_data_parallel():
        candidates = _gather_rows(candidates, len(empty))
    taken = min(len(empty), candidates.shape[0])
    prototypes[empty[:taken]] = candidates[:taken].to(prototypes.dtype)


def _is_data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """Rows of every rank, in rank order (each rank holds at most ``capacity`` rows)."""
    padded = rows.new_zeros(capacity, rows.shape[1])
    padded[: rows.shape[0]] = rows
    size = torch.tensor([rows.shape[0]], device=rows.device)
    world = dist.get_world_size()
    all_rows = [torch.empty_like(padded) for _ in range(world)]
    all_sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_sizes, size)
    return torch.cat([block[: int(count)] for block, count in zip(all_rows, all_sizes)])


def router_loss(queries: torch.Tensor, keys: torch.Tensor, task: int, temperature: float) -> torch.Tensor:
    """Loss of the learned router on queries (N, d) of task ``task``.

    Cross-entropy of the key scores to the current task (as SAPT and MoCL train their keys) plus 1 - cosine to the
    task's own key, which keeps pulling the key to its task's inputs while it is the only task.
    """
    scores = key_scores(queries, keys)
    target = torch.full((queries.shape[0],), task, dtype=torch.long, device=queries.device)
    return F.cross_entropy(scores / temperature, target) + (1.0 - scores[:, task]).mean()
