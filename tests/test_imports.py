"""The package's modules import on their own, in a fresh process, whichever comes first (no import cycles)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peft_sparta import continual


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "first",
    [
        "peft_sparta.continual.driver",
        "benchmarks.baselines",
        "peft_sparta.trainer",
        "peft_sparta.routers.recorder",
    ],
)
def test_import_in_a_fresh_process(first):
    modules = [first, "peft_sparta.continual", "benchmarks.baselines", "peft_sparta.trainer"]
    code = "; ".join(f"import {module}" for module in modules)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_public_continual_names():
    expected = {
        "CausalLMHarness", "ContinualArguments", "ContinualResult", "EmbeddingClassificationHarness", "Harness", "Method",
        "RoutingRecorder", "SpaRTAMethod", "abstain_threshold", "average_accuracy", "best_router_scores", "calibrate_abstain_spread", "calibrate_abstain_threshold", "choose_spread", "backward_transfer", "forward_transfer", "learning_accuracy",
        "train_sequence",
    }  # fmt: skip
    assert set(continual.__all__) == expected
    assert all(hasattr(continual, name) for name in expected)
