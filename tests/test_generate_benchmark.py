"""benchmarks.bench_generate in its quick mode, and the dry run of benchmarks/gpu_check.sh: both stay runnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_generate


ROOT = Path(__file__).resolve().parents[1]


def test_bench_generate_quick_writes_every_row_and_generates_the_general_paths_tokens(tmp_path):
    bench_generate.main(["--quick", "--output", str(tmp_path / "generate.json")])
    saved = json.loads((tmp_path / "generate.json").read_text())
    sparta = [f"sparta/{tasks}/{setting}" for tasks in (1, 2) for setting in ("default", "top_k=1", "min_gate=0")]
    names = ["base", "lora", "lora-merged", *sparta, "sparta-merged/1"]
    assert list(saved["results"]) == [f"{batch}/{name}" for batch in (1, 2) for name in names]
    for key, value in saved["results"].items():
        assert value["prefill_s"] > 0 and value["decode_s_per_token"] > 0, key
        if key.split("/")[1] == "sparta":
            assert value["same_tokens_as_general_path"] is True, key
            assert 1 <= value["branches_per_row"] <= value["tasks"], key
    assert saved["run"]["settings"]["quick"] is True and saved["run"]["machine"] == saved["machine"]
    report = (tmp_path / "generate.md").read_text()
    assert saved["table"] in report and "| 2 | sparta | 2 | top_k=1 | 1.0 |" in report and "Run: commit" in report


def test_gpu_check_dry_run_checks_every_command_without_a_gpu():
    environment = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the 3 CUDA tests exist" in done.stdout
    for module in ("benchmarks.bench_train_step", "benchmarks.bench_generate"):
        assert f"arguments of {module} parse" in done.stdout
        assert f"-m {module} --device cuda" in done.stdout, "the commands a GPU run would run are listed"
    assert "generate-smollm-gpu.json" in done.stdout and "train-step-smollm-gpu.json" in done.stdout
