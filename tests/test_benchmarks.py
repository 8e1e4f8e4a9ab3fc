"""The speed benchmark scripts (benchmarks/bench_layers.py, bench_train_step.py): the files they write name their run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_layers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their sibling `common`
    spec = importlib.util.spec_from_file_location("bench_layers", BENCHMARKS / "bench_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("common", None)


def test_bench_layers_output_records_results_table_and_run(bench_layers, tmp_path, monkeypatch):
    args = argparse.Namespace(
        shapes=["576x1536"], tasks=[1, 2], tokens=4, r_shared=2, r_task=2, warmup=0, repeats=1, device="cpu",
        output=tmp_path / "layers.json",
    )  # fmt: skip
    monkeypatch.setattr(bench_layers.argparse.ArgumentParser, "parse_args", lambda self: args)
    bench_layers.main()
    saved = json.loads((tmp_path / "layers.json").read_text())
    sparta = {f"576x1536/{method}/{tasks}" for tasks in (1, 2) for method in ("sparta-eager", "sparta-fused")}
    assert set(saved["results"]) == {"576x1536/lora/1"} | sparta
    assert all({"step_s", "peak_bytes", "infer_s"} <= set(value) for value in saved["results"].values())
    run = saved["run"]
    assert run["commit"] is None or len(run["commit"]) == 40
    assert isinstance(run["dirty"], (bool, type(None))) and run["machine"] == saved["machine"]
    assert run["settings"]["tokens"] == 4 and run["settings"]["output"] == str(tmp_path / "layers.json")
    report = (tmp_path / "layers.md").read_text()
    assert saved["table"] in report and "| 576->1536 | sparta-fused | 2 |" in report
    assert "Run: commit" in report
