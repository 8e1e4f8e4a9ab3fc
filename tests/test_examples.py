"""The quickstart runs end to end (with few steps): load offline, train two tasks, save, reload, generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import smollm2


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    smollm2()  # skips where the offline model is not installed
    result = subprocess.run(
        [sys.executable, "-m", "examples.quickstart", "--steps", "2", "--output-dir", str(tmp_path / "adapter")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tasks ['spell', 'plural']; the router picks the branch" in result.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
