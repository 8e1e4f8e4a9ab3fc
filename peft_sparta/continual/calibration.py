"""Choosing ``router_abstain_threshold`` or ``router_abstain_spread`` from data that is not scored: held-out prompts
of the trained tasks and unrelated text, each fed to the model exactly as at inference."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..layer import sparta_layers
from ..model import find_sparta_tuner
from ..routers.recorder import RoutingRecorder


#: The k values of ``router_abstain_spread`` that `calibrate_abstain_spread` chooses from.
SPREADS = (2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


@torch.no_grad()
def router_scores(model, batches: Iterable[dict], adapter_name: str | None = None) -> torch.Tensor:
    """Each input's router score per task (inputs, tasks), from model-input batches (``input_ids``, ...), scored as
    at inference (eval mode); every module's train/eval mode is put back afterwards."""
    batches = [batch for batch in batches if _rows_and_tokens(batch)]
    if not batches:
        raise ValueError(
            "The calibration batches hold no input (no batch, or only batches of zero rows or zero tokens); pass "
            "model-input batches (input_ids or inputs_embeds) with at least one token."
        )
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with RoutingRecorder(model, adapter_name, quantity="scores") as recorder:
            for batch in batches:
                model(**batch)
    finally:
        for module, training in modes:
            module.training = training
    return recorder.take()


def _rows_and_tokens(batch: dict) -> bool:
    """Whether a model-input batch holds at least one row with one token."""
    tokens = batch.get("input_ids", batch.get("inputs_embeds"))
    return tokens is None or tokens.numel() > 0


def best_router_scores(model, batches: Iterable[dict]) -> torch.Tensor:
    """Each input's best router score over the tasks (inputs,), from model-input batches (``input_ids``, ...)."""
    return router_scores(model, batches).amax(dim=-1)


def abstain_threshold(task_scores: torch.Tensor, unrelated_scores: torch.Tensor, margin: float = 0.0) -> float | None:
    """The midpoint between the lowest best-score of the task inputs and the highest of the unrelated inputs, or
    None when the two groups overlap by more than ``margin`` (abstaining would then cost task accuracy)."""
    task_low, unrelated_high = float(task_scores.min()), float(unrelated_scores.max())
    if task_low + margin <= unrelated_high:
        return None
    return (task_low + unrelated_high) / 2


def calibrate_abstain_threshold(
    model, task_batches: Iterable[dict], unrelated_batches: Iterable[dict], margin: float = 0.0
) -> float | None:
    """`abstain_threshold` of the best router scores of held-out task inputs and unrelated inputs."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}.")
    task_scores = best_router_scores(model, task_batches)
    return abstain_threshold(task_scores, best_router_scores(model, unrelated_batches), margin)


def choose_spread(abstained: dict[float, tuple[float, float]], max_task_abstain: float = 0.01) -> float | None:
    """From each k's (share of task inputs, share of unrelated inputs) that abstain, the k that abstains most on
    unrelated inputs among those that keep all but ``max_task_abstain`` of the task inputs; among equals the largest
    k, which leaves task inputs the widest margin. None when no k keeps the task inputs."""
    candidates = [(unrelated, k) for k, (task, unrelated) in abstained.items() if task <= max_task_abstain]
    return max(candidates)[1] if candidates else None


def calibrate_abstain_spread(
    model,
    task_batches: Iterable[dict],
    unrelated_batches: Iterable[dict],
    spreads: Iterable[float] = SPREADS,
    max_task_abstain: float = 0.01,
    adapter_name: str | None = None,
) -> float | None:
    """`choose_spread` over ``spreads`` from held-out task inputs and unrelated inputs: the ``router_abstain_spread``
    for a prototype router under sequence routing (each input's task scores are then the same in every layer).
    ``adapter_name``: the adapter to calibrate, by default the active one."""
    adapter_name = find_sparta_tuner(model)._adapter(adapter_name)
    layer = next(layer for layer in sparta_layers(model) if adapter_name in layer.sparta_router)
    router = layer.router(adapter_name).state_owner
    if router.config.router != "prototype" or router.granularity != "sequence":
        raise ValueError(
            "calibrate_abstain_spread needs the prototype router under sequence routing (router='prototype', "
            f"router_granularity 'sequence' or 'auto'); this adapter routes with {router.config.router!r} per "
            f"{router.granularity}. Use calibrate_abstain_threshold instead."
        )
    if not torch.isfinite(router.score_floors(min(spreads))).any():
        raise ValueError(
            "No task of this adapter has a per-task floor yet: its prototypes hold no training query (the router was "
            "not trained) or one query each. Train the tasks first, then calibrate."
        )
    scores = [router_scores(model, batches, adapter_name) for batches in (task_batches, unrelated_batches)]

    def abstaining(group: torch.Tensor, spread: float) -> float:
        return float((group < router.score_floors(spread).to(group.device)).all(dim=-1).float().mean())

    abstained = {k: (abstaining(scores[0], k), abstaining(scores[1], k)) for k in spreads}
    return choose_spread(abstained, max_task_abstain)
