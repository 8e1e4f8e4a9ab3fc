"""Choosing ``router_abstain_threshold`` from data that is not scored: held-out prompts of the trained tasks and
unrelated text, each fed to the model exactly as at inference."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..routers.recorder import RoutingRecorder


@torch.no_grad()
def best_router_scores(model, batches: Iterable[dict]) -> torch.Tensor:
    """Each input's best router score over the tasks (inputs,), from model-input batches (``input_ids``, ...)."""
    model.eval()
    with RoutingRecorder(model, quantity="scores") as recorder:
        for batch in batches:
            model(**batch)
    return recorder.take().amax(dim=-1)


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
    task_scores = best_router_scores(model, task_batches)
    return abstain_threshold(task_scores, best_router_scores(model, unrelated_batches), margin)
