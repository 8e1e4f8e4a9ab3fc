"""The prototype router (default): parameter-free, each task's prototypes are online k-means centroids of the queries
of its training inputs' prompt part, frozen once the task is over."""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import distributed as dist
from torch.nn import functional as F

from ..utils import same_tensor_states, tensor_states
from .base import Branches, Router, random_projection
from .context import RoutingContext


#: How far below 1 a task's floor stays at most (see `PrototypeRouter.score_floors`).
FLOOR_TOLERANCE = 1e-4

#: Size of the fingerprints by which the prototype router recognises an input seen again (see `unseen_queries`).
FINGERPRINT_DIM = 16

#: Distance between two queries' fingerprints under which they count as one input seen twice: well above the rounding
#: by which the same prompt's query differs in other batches or paddings, well below two prompts a token apart.
REPEAT_TOLERANCE = 1e-5

#: Score of a task that has no prototype yet: below any cosine similarity, so it never wins against a real task.
EMPTY_TASK_SCORE = -2.0

#: Weight of the identity in the covariance of ``router_metric="discriminant"``, in units of the mean variance of the
#: within-task spread (`discriminant_transform`). Chosen on the calibration splits of the benchmark's translation
#: suite and suite (a), never on scored data, in the middle of the values that route them equally well
#: (benchmarks/README.md).
DISCRIMINANT_SHRINKAGE = 1.0

#: Factor of the discriminant similarities before the gates' softmax: they spread wider than plain cosine
#: similarities, so that under the default ``router_temperature`` (0.02) text of no task would go almost wholly to one
#: branch. Under the scale the default acts as 0.08 (0.02 / 0.25), chosen as the softest temperature at which every
#: task of the calibration splits (translation suite and suite a, never scored) keeps 95% of its gates on its own
#: branch (benchmarks/README.md).
DISCRIMINANT_SCORE_SCALE = 0.25


class PrototypeRouter(Router):
    """Scores a query by its best cosine similarity to each task's prototypes.

    State (persistent buffers, saved with the adapter): ``prototypes`` (tasks, P, d) and ``counts`` (tasks, P), the
    number of training queries each prototype averages (0: not seeded yet; under sequence routing each input counts
    once, however often it is seen, see `unseen_queries`); under sequence routing also
    ``query_scatter`` (tasks, d, d), per task the mean of (q - p)(q - p)^T over its training queries q and their
    prototypes p, and ``query_count`` (tasks,), the number of queries each averages: how prompts vary around their
    prototype (names, numbers, topic words), which the prototypes alone do not show. ``router_metric="discriminant"``
    whitens by the tasks' pooled spread (`pooled_query_scatter`); it is kept whatever the metric, which can change at
    any time (the adapter then saves and loads alike). It is kept per task so that `remove_task` takes the task's
    share away, as if it had never been added. Token routing, where every adapted layer has a router of its own
    input's size, keeps none (a d x d matrix per layer would grow with the square of the widest layer's input).
    """

    def __init__(self, config, granularity: str, source_dim: int) -> None:
        super().__init__(config, granularity, source_dim)
        self.register_buffer("prototypes", torch.zeros(0, config.router_prototypes, self.query_dim))
        self.register_buffer("counts", torch.zeros(0, config.router_prototypes, dtype=torch.long))
        keeps_spread = granularity == "sequence"
        self.register_buffer("query_scatter", torch.zeros(0, self.query_dim, self.query_dim) if keeps_spread else None)
        self.register_buffer("query_count", torch.zeros(0, dtype=torch.long) if keeps_spread else None)
        self._discriminant = None
        self._seen: Optional[torch.Tensor] = None  # fingerprints of the current task's inputs (`unseen_queries`)

    def scores(self, queries: torch.Tensor, branches: Branches) -> torch.Tensor:
        return prototype_scores(queries, self.prototypes, self.counts)

    def choice_scores(self, queries: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Under ``router_metric="discriminant"``, the best cosine similarity of each query to each task's prototypes
        after `discriminant_transform`, times `DISCRIMINANT_SCORE_SCALE`; the plain scores otherwise."""
        if self.metric != "discriminant":
            return scores
        centre, factor, prototypes = self.whitened_prototypes()
        whitened = F.normalize(whiten(queries, centre, factor), dim=-1)
        return DISCRIMINANT_SCORE_SCALE * prototype_scores(whitened, prototypes, self.counts)

    def whitened_prototypes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The centre and factor of `discriminant_transform` and the prototypes whitened by them, computed again only
        when the prototypes change (training, add_task, loading, device moves)."""
        key = tensor_states(
            [self.prototypes, self.counts]
            + ([] if self.query_scatter is None else [self.query_scatter, self.query_count])
        )
        if self._discriminant is None or not same_tensor_states(self._discriminant[0], key):
            centre, factor = discriminant_transform(self.prototypes, self.counts, self.pooled_query_scatter())
            self._discriminant = (key, (centre, factor, whiten(self.prototypes, centre, factor)))
        return self._discriminant[1]

    def pooled_query_scatter(self) -> Optional[torch.Tensor]:
        """The mean (d, d) of (q - p)(q - p)^T over every task's training queries (None under token routing)."""
        if self.query_scatter is None:
            return None
        counts = self.query_count.float()
        weighted = (self.query_scatter.float() * counts[:, None, None]).sum(dim=0)
        return weighted / counts.sum().clamp(min=1.0)

    def score_floors(self, spread: float) -> torch.Tensor:
        """1 - spread * (1 - m_t) per task, m_t the mean cosine similarity of task t's queries to their prototypes.

        A prototype is the exact mean of its n unit queries, so its norm R is their mean similarity to it; R is biased
        upwards for small n (E[R^2] = rho^2 + (1 - rho^2) / n), so each prototype counts with the unbiased estimate
        of rho, weighted by n. Prototypes of a single query say nothing of the spread and are left out; a task with
        no other prototype has no floor (-inf: inputs are never kept from it). A floor stays `FLOOR_TOLERANCE` below
        1, so that a task trained on repeats of the same prompts still takes those prompts despite rounding."""
        counts = self.counts.float()
        squared_norms = self.prototypes.float().pow(2).sum(dim=-1)
        weights = counts * (counts >= 2)
        unbiased = ((counts * squared_norms - 1) / (counts - 1).clamp(min=1)).clamp(0.0, 1.0).sqrt()
        total = weights.sum(dim=-1)
        mean_similarity = (unbiased * weights).sum(dim=-1) / total.clamp(min=1.0)
        floors = (1.0 - spread * (1.0 - mean_similarity)).clamp(max=1.0 - FLOOR_TOLERANCE)
        return floors.masked_fill(total == 0, float("-inf"))

    def learn(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches) -> None:
        """Fold a training input's queries into the current task's state: the finite ones (`finite_queries`), and
        under sequence routing only those of inputs the task has not seen yet (`unseen_queries`)."""
        queries = finite_queries(self.state_queries(x, self.queries(x, context), context))
        if self.granularity == "sequence":
            queries, self._seen = unseen_queries(queries, self._seen)
        self.learn_queries(queries)

    def learn_queries(self, queries: torch.Tensor) -> None:
        """Fold unit queries (N, d) of the current (last) task into its prototypes and into the query spread."""
        nearest = update_prototypes(self.prototypes[-1], self.counts[-1], queries)
        if self.query_scatter is not None:
            update_query_scatter(self.query_scatter[-1], self.query_count[-1], queries, self.prototypes[-1][nearest])

    def add_task(self) -> None:
        self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(1, *self.prototypes.shape[1:])])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(1, self.counts.shape[1])])
        if self.query_scatter is not None:
            self.query_scatter = torch.cat(
                [self.query_scatter, self.query_scatter.new_zeros(1, *self.query_scatter.shape[1:])]
            )
            self.query_count = torch.cat([self.query_count, self.query_count.new_zeros(1)])
        self._seen = None

    def remove_task(self, index: int) -> None:
        if index == self.prototypes.shape[0] - 1:
            self._seen = None
        keep = [task for task in range(self.prototypes.shape[0]) if task != index]
        self.prototypes, self.counts = self.prototypes[keep].clone(), self.counts[keep].clone()
        if self.query_scatter is not None:
            self.query_scatter, self.query_count = self.query_scatter[keep].clone(), self.query_count[keep].clone()


def prototype_scores(queries: torch.Tensor, prototypes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Best cosine similarity of each query to each task's prototypes.

    queries (..., d) unit norm; prototypes (tasks, P, d); counts (tasks, P), 0 for a prototype not yet seen.
    Returns (..., tasks).
    """
    centroids = F.normalize(prototypes.float(), dim=-1)
    similarity = torch.einsum("...d,tpd->...tp", queries.float(), centroids)
    similarity = similarity.masked_fill(counts == 0, EMPTY_TASK_SCORE)
    return similarity.amax(dim=-1)


def finite_queries(queries: torch.Tensor) -> torch.Tensor:
    """The rows of ``queries`` (N, d) whose values are all finite, with a warning when there are others.

    NaN or inf in an input's embeddings (or, under token routing, in a layer input, as an fp16 overflow gives) would
    make every later prototype, count and query spread of the task NaN, and every routed forward after it NaN or a
    failed Cholesky factorisation. Such rows are left out rather than raising: the step's loss shows the problem
    (and fp16 loss scaling skips the step), while the router state stays as the finite rows make it."""
    finite = torch.isfinite(queries).all(dim=-1)
    if bool(finite.all()):
        return queries
    warnings.warn(
        f"{int((~finite).sum())} of {finite.numel()} routing queries of this training forward are not finite (NaN "
        "or inf in the inputs' embeddings or layer inputs); the prototype router left them out of its state. Check "
        "the inputs (inputs_embeds) and, under fp16, the loss scale.",
        stacklevel=2,
    )
    return queries[finite]


@torch.no_grad()
def unseen_queries(queries: torch.Tensor, seen: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The queries (N, d) of inputs not seen before, and the fingerprints (M, FINGERPRINT_DIM) of every input seen so
    far, these included.

    An input seen again (the next epoch) has the same query up to rounding; folding it in again would weigh the
    prototypes by how often each prompt was seen and make a prototype of one prompt seen n times look like n alike
    prompts, whose floor (`PrototypeRouter.score_floors`) then refuses every fresh prompt of the task. A query counts
    as seen when its fingerprint (a fixed random projection) lies within `REPEAT_TOLERANCE` of an earlier one, of this
    batch or of an earlier one: the same prompt, or one with the same tokens in another order (the same point in
    query space). Under data parallelism every rank keeps every rank's fingerprints. They are not saved: training a
    loaded adapter's current task further counts its inputs once more."""
    fingerprints = queries.float() @ _fingerprint_projection(queries.shape[-1], queries.device)
    within_batch = _distances(fingerprints, fingerprints) < REPEAT_TOLERANCE
    repeated = within_batch.tril(diagonal=-1).any(dim=1)
    if seen is not None:
        repeated |= (_distances(fingerprints, seen) < REPEAT_TOLERANCE).any(dim=1)
    new = fingerprints[~repeated]
    if _is_data_parallel():
        new = _gather_all_rows(new)
    return queries[~repeated], new if seen is None else torch.cat([seen, new])


@functools.lru_cache(maxsize=8)
def _fingerprint_projection(dim: int, device: torch.device) -> torch.Tensor:
    return random_projection(dim, FINGERPRINT_DIM).to(device)


def _distances(rows: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M) of rows (N, k) to others (M, k), from the differences themselves: the matrix-product
    shortcut loses to cancellation the small distances that tell a repeat."""
    return torch.cdist(rows, others, compute_mode="donot_use_mm_for_euclid_dist")


def discriminant_transform(
    prototypes: torch.Tensor,
    counts: torch.Tensor,
    query_scatter: Optional[torch.Tensor] = None,
    shrinkage: float = DISCRIMINANT_SHRINKAGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre (d,) and the lower Cholesky factor L (d, d) of the discriminant metric for prototypes (tasks, P, d)
    with ``counts`` (tasks, P) and the mean ``query_scatter`` (d, d) of the queries around their prototypes.

    The centre is the mean of the trained tasks' means (each task's prototypes weighted by their counts), so that
    what every task's prompts share (an instruction template) does not dominate the cosine. L factors the covariance
    W + shrinkage * (trace(W) / d) * I, W the within-task scatter: the count-weighted scatter of the prototypes around
    their own task's mean plus ``query_scatter`` (the two parts of the queries' scatter around their task's mean).
    Directions in which a task's own prompts vary weigh less once whitened by L^-1, directions that only separate
    tasks keep their weight. Without ``query_scatter`` (adapters saved before it was kept) the prototypes' part
    stands alone; the shrinkage keeps the covariance invertible with fewer queries than dimensions.
    """
    points = prototypes.float()
    weights = counts.float().unsqueeze(-1)
    task_totals = weights.sum(dim=1)
    task_means = (points * weights).sum(dim=1) / task_totals.clamp(min=1.0)
    trained = task_totals.squeeze(-1) > 0
    centre = task_means[trained].mean(dim=0) if trained.any() else points.new_zeros(points.shape[-1])
    deviations = ((points - task_means.unsqueeze(1)) * weights.sqrt()).reshape(-1, points.shape[-1])
    scatter = deviations.T @ deviations / weights.sum().clamp(min=1.0)
    if query_scatter is not None:
        scatter = scatter + query_scatter.float()
    variance = (scatter.trace() / scatter.shape[0]).clamp(min=1e-12)
    identity = torch.eye(scatter.shape[0], device=scatter.device)
    return centre, torch.linalg.cholesky(scatter + shrinkage * variance * identity)


def whiten(vectors: torch.Tensor, centre: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """L^-1 (v - centre) for vectors (..., d): inner products of whitened vectors are those of the centred vectors
    under the inverse covariance L L^T."""
    centred = vectors.float() - centre
    flat = centred.reshape(-1, centred.shape[-1]).T
    return torch.linalg.solve_triangular(factor, flat, upper=False).T.reshape(centred.shape)


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """One step of online (mini-batch) k-means of unit queries (N, d) into prototypes (P, d), in place; returns the
    index (N,) of each query's prototype.

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
    return nearest


@torch.no_grad()
def update_query_scatter(
    scatter: torch.Tensor, count: torch.Tensor, queries: torch.Tensor, prototypes: torch.Tensor
) -> None:
    """Fold queries (N, d) and their prototypes (N, d) into the running mean ``scatter`` (d, d) of
    (q - p)(q - p)^T over ``count`` queries, in place. A mean, not a sum, so that it fits any dtype the model is cast
    to. Under data parallelism every rank's queries count, so every rank holds the same scatter."""
    residuals = queries.float() - prototypes.float()
    total = residuals.T @ residuals
    added = torch.tensor(residuals.shape[0], device=count.device)
    if _is_data_parallel():
        dist.all_reduce(total)
        dist.all_reduce(added)
    new_count = count + added
    divisor = new_count.clamp(min=1)
    scatter.copy_((scatter.float() * (count / divisor) + total / divisor).to(scatter.dtype))
    count.copy_(new_count)


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


def _gather_all_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, in rank order, whatever number of rows each rank holds."""
    capacity = torch.tensor([rows.shape[0]], device=rows.device)
    dist.all_reduce(capacity, op=dist.ReduceOp.MAX)
    return _gather_rows(rows, int(capacity))


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
