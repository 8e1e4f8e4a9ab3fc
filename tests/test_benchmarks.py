"""The speed benchmark scripts (benchmarks/bench_layers.py, bench_train_step.py): the files they write name their run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import bench_layers, bench_task_scaling, common, router_alternatives, spread


def test_bench_layers_output_records_results_table_and_run(tmp_path, monkeypatch):
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


def test_bench_task_scaling_sizes_known_answers_and_output(tmp_path, monkeypatch):
    args = argparse.Namespace(
        tasks=[1, 3], layers=1, vocab=128, batch=1, seq=4, r_shared=2, r_task=3, prototype_batches=1, warmup=0,
        repeats=1, threads=1, output=tmp_path / "scaling.json",
    )  # fmt: skip
    monkeypatch.setattr(bench_task_scaling.argparse.ArgumentParser, "parse_args", lambda self: args)
    bench_task_scaling.main()
    saved = json.loads((tmp_path / "scaling.json").read_text())
    one, three = saved["results"]["1"], saved["results"]["3"]
    # (in + out) features per rank over the layer's projections, SmolLM2's shape: q, o; k, v; gate, up, down
    features = 2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)
    # per task: 16 prototypes of the 576-wide sequence query and their counts, and its query spread and its count
    router = 16 * (576 + 1) + 576 * 576 + 1
    assert one["trainable_params"] == (2 + 3) * features, "one task: the shared and the task branch train"
    assert three["trainable_params"] == 3 * features, "later tasks: the newest task branch alone"
    assert three["stored_params"] - one["stored_params"] == 2 * (3 * features + router)
    assert three["file_bytes"] > one["file_bytes"] > 4 * one["stored_params"]
    assert all(value > 0 for value in (three["step_s"], three["step_penalty_s"], three["infer_s"]))
    assert one["router_s"] > 0 and three["router_s"] > 0
    assert saved["run"]["settings"]["tasks"] == [1, 3]
    assert "| 3 | 30,528 |" in (tmp_path / "scaling.md").read_text()
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_bench_task_scaling_router_timer_restores_the_model():
    args = argparse.Namespace(layers=1, vocab=128, batch=1, seq=4, r_shared=2, r_task=3, prototype_batches=1)
    case = bench_task_scaling.Case(2, args)
    routers = [
        router for layer in bench_task_scaling.sparta_layers(case.model) for router in layer.sparta_router.values()
    ]
    with bench_task_scaling.router_timer(case.model) as total:
        case.infer_step()
    assert total[0] > 0
    assert all("decide" not in vars(router) for router in routers)
    assert "begin_forward" not in vars(case.model.base_model.routing_context)


def test_interleaved_medians_time_every_step_in_turns():
    """Warm-up calls of each step, then rounds of one call of every step (every other round in reverse order),
    medians per step."""
    calls = []
    medians = common.interleaved_medians(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, common.torch.device("cpu"), 1, 3
    )
    assert calls == ["a", "b"] + ["a", "b"] + ["b", "a"] + ["a", "b"]
    assert set(medians) == {"a", "b"} and all(value >= 0 for value in medians.values())


def test_spread_over_runs_known_answers_and_output(tmp_path):
    """Mean, population std and range per method present in every file; metrics missing anywhere are left out."""
    runs = [
        {
            "methods": {
                "a": {
                    "AA": 0.5,
                    "BWT": -0.1,
                    "routing_accuracy": None,
                    "run": {"commit": "x"},
                    "drift": 0.1,
                    "unseen_gain": {"new": 0.25},
                },  # fmt: skip
                "b": {"AA": 1.0},
            }
        },
        {
            "methods": {
                "a": {
                    "AA": 0.7,
                    "BWT": -0.3,
                    "routing_accuracy": 0.9,
                    "run": {"commit": "y"},
                    "drift": 0.3,
                    "unseen_gain": {"new": -0.25},
                }
            }
        },  # fmt: skip
    ]
    paths = []
    for index, results in enumerate(runs):
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps(results))
    spread.main([*map(str, paths), "--out", str(tmp_path / "spread")])
    saved = json.loads((tmp_path / "spread.json").read_text())
    assert set(saved["summary"]) == {"a"}
    aa, bwt = saved["summary"]["a"]["AA"], saved["summary"]["a"]["BWT"]
    assert (
        aa["mean"] == pytest.approx(0.6) and aa["std"] == pytest.approx(0.1) and (aa["min"], aa["max"]) == (0.5, 0.7)
    )
    assert bwt["mean"] == pytest.approx(-0.2) and "routing_accuracy" not in saved["summary"]["a"]
    assert saved["summary"]["a"]["drift"]["mean"] == pytest.approx(0.2)
    assert saved["summary"]["a"]["held-out gain: new"]["values"] == [0.25, -0.25]
    assert saved["runs"][str(paths[1])] == [{"commit": "y"}]
    assert "0.600 ± 0.100 (0.500 to 0.700)" in (tmp_path / "spread.md").read_text()


def test_router_alternatives_choose_the_spread_from_the_calibration_shares_of_the_spread_rows():
    def row(k: float, tasks: float, text: float) -> dict:
        setting = {"router_abstain_spread": k}
        return {"setting": setting, "abstained": {"calibration_tasks": tasks, "calibration_text": text}}

    rows = {"spread 2": row(2.0, 0.05, 1.0), "spread 2.5": row(2.5, 0.01, 0.9), "spread 4": row(4.0, 0.0, 0.5),
            "spread 3, top_k 1": row(3.0, 0.0, 1.0)}  # fmt: skip
    assert router_alternatives.chosen_spread(rows) == 2.5, "2 abstains on too many task prompts; combined rows ignored"
    gates = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.25, 0.25]])
    assert router_alternatives.abstained_mass(gates) == pytest.approx(0.5)


def test_router_alternatives_calibration_split_holds_fresh_prompts_only():
    args = router_alternatives.parse(["--suite", "minilm", "--calibration-per-task", "8"])
    tasks, *_ = router_alternatives.build_suite(router_alternatives.suite_arguments(args, args.seed))
    split = router_alternatives.calibration_split(args, tasks)
    used = {example.text for task in tasks for example in task.train + task.test}
    assert [task.name for task in split] == [task.name for task in tasks]
    for task, fresh in zip(tasks, split):
        assert len(fresh.test) == 8 and not used & {example.text for example in fresh.test}
        assert {example.target for example in fresh.test} <= set(task.labels) and not fresh.train
