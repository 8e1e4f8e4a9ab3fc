"""Continual learning with SpaRTA: the metrics over an accuracy matrix (`metrics`), the harnesses that give a task's
loss and task-free accuracy (`harness`), the sequence driver `train_sequence` (`driver`) with the `Method` protocol and `SpaRTAMethod` (`methods`), and the routing recorder
(`peft_sparta.routers.recorder`), re-exported here.

The methods, suites and offline models of the benchmark are in the repository's `benchmarks` package, not in the
wheel.
"""

from __future__ import annotations

from ..routers.recorder import RoutingRecorder
from .calibration import (
    abstain_threshold,
    best_router_scores,
    calibrate_abstain_spread,
    calibrate_abstain_threshold,
    choose_spread,
)
from .driver import ContinualArguments, ContinualResult, train_sequence
from .harness import CausalLMHarness, EmbeddingClassificationHarness, Harness
from .methods import Method, SpaRTAMethod
from .metrics import average_accuracy, backward_transfer, forward_transfer, learning_accuracy


__all__ = [
    "CausalLMHarness",
    "ContinualArguments",
    "ContinualResult",
    "EmbeddingClassificationHarness",
    "Harness",
    "Method",
    "RoutingRecorder",
    "SpaRTAMethod",
    "abstain_threshold",
    "average_accuracy",
    "backward_transfer",
    "best_router_scores",
    "calibrate_abstain_spread",
    "calibrate_abstain_threshold",
    "choose_spread",
    "forward_transfer",
    "learning_accuracy",
    "train_sequence",
]
