"""The router interface: one router per adapter and adapted layer, owning its state and scoring inputs per task."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..config import DEFAULT_ABSTAIN_SPREAD
from .context import RoutingContext


#: The task branches of one adapter on one layer, as (A_k, B_k) pairs in task order.
Branches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class TaskBranches(Sequence):
    """The (A_k, B_k) pairs of two parameter lists, read on access: routers that only count the tasks (the prototype
    and learned routers) then cost the same per forward at any number of tasks."""

    def __init__(self, down: nn.ParameterList, up: nn.ParameterList) -> None:
        self.down, self.up = down, up

    def __len__(self) -> int:
        return len(self.down)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(len(self))[index]]
        return self.down[index], self.up[index]


class Routing(NamedTuple):
    """What a router decided for one layer input: the task branches to compute, their gates (None: gate 1 each), in
    training the router's own loss (learned and component routers) to add to the regularizers, and the gate of the
    shared branch (None: 1; the component router weighs it too)."""

    tasks: list[int]
    gates: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    shared_gate: Optional[torch.Tensor] = None


class RoutedLayer:
    """A layer whose inputs its adapters' routers route (`SpaRTALayer` is one). Code that reads the routing, such as
    `RoutingRecorder`, finds such layers by this class, so that it does not import the layer module. Such a layer
    holds ``sparta_A_task`` (its adapters' task branches), ``active_adapters``, ``disable_adapters`` and
    ``routing_context``, and gives `router_gates` and `router_scores` per adapter and input."""


def routed_layers(module: nn.Module) -> list[RoutedLayer]:
    """Every routed layer inside ``module``, in module order."""
    return [child for child in module.modules() if isinstance(child, RoutedLayer)]


class Router(nn.Module):
    """Decides which task branches of one adapter act on an input, and builds each task's state while it trains.

    Subclasses implement `scores` (each task's best cosine similarity to the query) and may override `learn` (what
    a training forward of the current task teaches the router's state), `loss` (a differentiable router loss) and
    `add_task` / `remove_task` / `frozen_parameters` for their state.
    The gates are a softmax over tasks of score / temperature (the `choice_scores`, by default the scores),
    optionally restricted to the top k tasks and zeroed for an input whose best score is under the abstain threshold
    or that reaches no task's floor (`score_floors`).

    ``config`` is read at every call (not copied), so settings changed on ``peft_config`` apply at once.
    """

    def __init__(self, config, granularity: str, source_dim: int) -> None:
        super().__init__()
        self.config = config
        self.granularity = granularity
        projected = config.router_dim is not None and self.uses_projection
        self.query_dim = config.router_dim if projected else source_dim
        self.register_buffer(
            "projection", random_projection(source_dim, config.router_dim) if projected else None, persistent=False
        )

    #: whether ``config.router_dim`` projects the queries (the spectral router compares raw layer inputs)
    uses_projection = True

    def queries(self, x: torch.Tensor, context: Optional[RoutingContext]) -> torch.Tensor:
        """Unit-norm routing queries: (batch, 1.., d) for sequence routing, (..., d) per token otherwise."""
        if self.granularity == "sequence":
            query = _sequence_query(x, context)
        else:
            query = x.detach()
        if self.projection is not None:
            query = query.to(self.projection.dtype) @ self.projection
        return F.normalize(query.float(), dim=-1)

    def state_queries(self, x: torch.Tensor, queries: torch.Tensor, context: Optional[RoutingContext]):
        """The queries (N, d) that build the current task's state: prompt positions only, when they are known."""
        if self.granularity == "token" and context is not None and context.token_mask is not None:
            mask = context.token_mask
            if tuple(mask.shape) == tuple(x.shape[:-1]):
                return queries[mask.to(queries.device)]
        return queries.reshape(-1, queries.shape[-1])

    def scores(self, queries: torch.Tensor, branches: Branches) -> torch.Tensor:
        """Each task's score (..., tasks) for unit queries (..., d)."""
        raise NotImplementedError

    def learn(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches) -> None:
        """Update the router's state for the current (last) task from a training input (once per input: not when
        gradient checkpointing recomputes the forward)."""

    def loss(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches) -> Optional[torch.Tensor]:
        """The weighted router loss of a training input for the current task, or None."""
        return None

    def add_task(self) -> None:
        """Make room for a new task; the state of the earlier tasks stays as it is."""

    def remove_task(self, index: int) -> None:
        """Forget task ``index``'s state, as if it had never been added."""

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters of finished tasks, which must never train again."""
        return []

    def gates(self, queries: torch.Tensor, branches: Branches) -> torch.Tensor:
        """Gates (..., tasks) for unit queries under the configured temperature, top_k, abstain threshold and per-task
        floors: abstaining compares the scores, the choice among tasks the `choice_scores`."""
        config = self.config
        owner = self.state_owner
        scores = self.scores(queries, branches)
        spread = self.abstain_spread
        floors = None if spread is None else owner.score_floors(spread).to(scores.device)
        return gates_from_scores(
            scores,
            config.router_temperature,
            config.top_k,
            config.router_abstain_threshold,
            floors,
            owner.choice_scores(queries, scores),
            config.router_min_gate,
        )

    def choice_scores(self, queries: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The scores (..., tasks) that choose among tasks, for unit queries whose `scores` are given: the scores
        themselves, unless the router compares queries otherwise to choose (``router_metric``)."""
        return scores

    @property
    def abstain_spread(self) -> Optional[float]:
        """``router_abstain_spread`` with "auto" resolved: `DEFAULT_ABSTAIN_SPREAD` for the prototype router under
        sequence routing, where the benchmark's calibration splits chose it; no floor otherwise."""
        spread = self.config.router_abstain_spread
        if spread != "auto":
            return spread
        return DEFAULT_ABSTAIN_SPREAD if self._prototypes_per_sequence else None

    @property
    def metric(self) -> str:
        """``router_metric`` with "auto" resolved: "discriminant" for the prototype router under sequence routing
        (one query per input), "cosine" otherwise."""
        metric = self.config.router_metric
        if metric != "auto":
            return metric
        return "discriminant" if self._prototypes_per_sequence else "cosine"

    @property
    def _prototypes_per_sequence(self) -> bool:
        """The prototype router under sequence routing, where the "auto" settings take their chosen values."""
        return self.config.router == "prototype" and self.granularity == "sequence"

    def score_floors(self, spread: float) -> torch.Tensor:
        """Each task's lowest score (tasks,) that still routes to it under ``router_abstain_spread`` = ``spread``."""
        raise NotImplementedError(f"{type(self).__name__} has no per-task score floor; use router='prototype'.")

    def route(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches, training: bool) -> Routing:
        """Which task branches to compute for ``x``, their gates and the router's loss.

        In training the current task is routed to its own branch while the router learns it (not again when
        gradient checkpointing recomputes the forward in backward); at inference the router decides per input,
        computing only the branches some input uses (`select_branches`). Under sequence routing that choice is made
        once per forward by the first layer that routes, and a generation decode step reuses its prefill's (kept
        with the KV cache, see `RoutingContext.begin_forward`): neither scores nor reads the gates again, so
        settings changed on the config during a generation apply from its next prompt.
        """
        tasks = len(branches)
        if training:
            if not is_recomputation():
                self.learn(x, context, branches)
            return Routing([tasks - 1], None, self.loss(x, context, branches))
        if not self._decides_per_sequence(context):
            return Routing([0]) if self._is_constant(tasks) else select_branches(self.decide(x, context, branches))
        key = (id(self.state_owner), tasks)
        routing = context.sequence_routings.get(key)
        if routing is None:
            constant = self._is_constant(tasks)
            routing = Routing([0]) if constant else select_branches(self.decide(x, context, branches))
            context.sequence_routings[key] = routing
        if routing.gates is not None and routing.gates.dim() != x.dim():
            routing = routing._replace(gates=_per_sequence(routing.gates, x))
        return routing

    def decide(self, x: torch.Tensor, context: Optional[RoutingContext], branches: Branches) -> torch.Tensor:
        """The gates (..., tasks) the router gives ``x`` at inference, with no side effect.

        Under sequence routing at inference every layer that shares this router's state gets the same gates in one
        forward, so the first layer's are kept in the context for the others (scored once per forward, not once
        per layer)."""
        if self._is_constant(len(branches)):
            return torch.ones(*x.shape[:-1], 1, device=x.device)
        if not self._decides_per_sequence(context):
            return self.gates(self.queries(x, context), branches)
        key = self._decision_key(len(branches))
        gates = context.sequence_gates.get(key)
        if gates is None:
            gates = self.gates(self.queries(x, context), branches)
            context.sequence_gates[key] = gates
        return _per_sequence(gates, x)

    def _decides_per_sequence(self, context: Optional[RoutingContext]) -> bool:
        """Whether one decision serves every layer of a forward: sequence routing at inference, within a model."""
        return self.granularity == "sequence" and not self.training and context is not None

    def _decision_key(self, tasks: int) -> tuple:
        """What a sequence-routing decision depends on besides the input: the router state and the settings."""
        config = self.config
        return (id(self.state_owner), tasks, config.router_temperature, config.top_k, config.router_min_gate,
                config.router_abstain_threshold, self.abstain_spread, self.metric)  # fmt: skip

    @property
    def state_owner(self) -> Router:
        """The router that holds this router's state (itself, or the owner a `SharedRouter` reads)."""
        return self

    def _is_constant(self, tasks: int) -> bool:
        """A single task that no input abstains from: every input goes to it with gate 1."""
        config = self.config
        return tasks == 1 and config.router_abstain_threshold is None and self.abstain_spread is None


def gates_from_scores(
    scores: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    abstain_threshold: Optional[float] = None,
    floors: Optional[torch.Tensor] = None,
    choice_scores: Optional[torch.Tensor] = None,
    min_gate: float = 0.0,
) -> torch.Tensor:
    """Softmax over tasks of ``choice_scores`` (default: ``scores``) / temperature; with top_k, zero outside the k
    best tasks and renormalise; gates below ``min_gate`` (except each input's best) zeroed and the rest renormalised.
    Zero gates (no task branch for that input) for every query whose best score is below ``abstain_threshold``, and
    for every query that reaches no task's floor (``floors``: (tasks,) lowest score that routes to each task)."""
    routed = torch.ones_like(scores[..., :1], dtype=torch.bool)
    if abstain_threshold is not None:
        routed &= scores.amax(dim=-1, keepdim=True) >= abstain_threshold
    if floors is not None:
        routed &= (scores >= floors).any(dim=-1, keepdim=True)
    choice = scores if choice_scores is None else choice_scores
    if top_k is not None and top_k < choice.shape[-1]:
        kth_best = choice.topk(top_k, dim=-1).values[..., -1:]
        choice = choice.masked_fill(choice < kth_best, float("-inf"))
    gates = torch.softmax(choice / temperature, dim=-1)
    if min_gate > 0:
        kept = (gates >= min_gate) | (gates == gates.amax(dim=-1, keepdim=True))
        gates = gates * kept
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates * routed


def select_branches(gates: torch.Tensor) -> Routing:
    """The task branches that some input's ``gates`` (..., tasks) use, with the gates of those branches, or no gates
    when every input has gate 1 on the one branch used (its plain low-rank product, as LoRA's). Reads the gates on the
    host once (one device synchronisation)."""
    flat = gates.detach().reshape(-1, gates.shape[-1])
    used_flags, full_flags = torch.stack([flat.ne(0).any(dim=0), flat.eq(1).all(dim=0)]).tolist()
    used = [task for task, flag in enumerate(used_flags) if flag]
    if len(used) == 1 and full_flags[used[0]] and not gates.requires_grad:
        return Routing(used)
    return Routing(used, gates[..., used])


def _per_sequence(gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sequence gates (batch, ..., n) shaped to broadcast over the positions of the layer input ``x``."""
    return gates.view(gates.shape[0], *([1] * (x.dim() - 2)), gates.shape[-1])


def random_projection(source_dim: int, target_dim: int) -> torch.Tensor:
    """Frozen Gaussian projection, a function of the two sizes alone so that it is the same in every process."""
    generator = torch.Generator().manual_seed(source_dim * 100_003 + target_dim)
    return torch.randn(source_dim, target_dim, generator=generator) / math.sqrt(target_dim)


def is_recomputation() -> bool:
    """Whether this forward runs inside a backward pass: gradient checkpointing recomputing activations."""
    return torch._C._current_graph_task_id() != -1


def _sequence_query(x: torch.Tensor, context: Optional[RoutingContext]) -> torch.Tensor:
    """The model's sequence query, shaped to broadcast over the layer input's positions."""
    if context is None or context.sequence_query is None:
        raise RuntimeError(
            "Sequence routing needs the model's input (input_ids or inputs_embeds) to compute its query; call "
            "the whole model, or set router_granularity='token'."
        )
    query = context.sequence_query
    if x.dim() < 2 or x.shape[0] != query.shape[0]:
        raise RuntimeError(
            f"Sequence routing expects layer inputs of shape (batch, ..., features) with batch "
            f"{query.shape[0]}, got {tuple(x.shape)}; use router_granularity='token' for this model."
        )
    return query.view(query.shape[0], *([1] * (x.dim() - 2)), query.shape[-1])
