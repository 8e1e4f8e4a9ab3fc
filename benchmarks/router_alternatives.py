"""What the router should do with inputs of no trained task: SpaRTA is trained once on a suite with the defaults, then
scored under each router setting of inference (temperature, top_k, one abstain threshold, per-task floors from the
prototypes' spread) on the trained tasks, the held-out tasks (never trained) and unrelated text.

Per setting the table gives the accuracy on every trained task after the whole sequence (AA), each held-out task's
accuracy and its gain over the base model, the drift on unrelated text (NEUTRAL_TEXTS) and the share of router mass
that abstains (no task branch) on each group. The settings are chosen on a calibration split that is never scored:
fresh prompts of the trained tasks (the suite's generator with seed + 1000, minus any train or test prompt) and
CALIBRATION_TEXTS. The one threshold ("calibrated threshold") is the midpoint between the two groups' best router
scores, and `choose_spread` picks the per-task floor's k from the same split.

    python -m benchmarks.router_alternatives --suite minilm
    python -m benchmarks.router_alternatives --suite minilm --boilerplate
    python -m benchmarks.router_alternatives --suite smollm --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

import peft_sparta  # noqa: F401
from peft_sparta.continual import (
    ContinualArguments,
    RoutingRecorder,
    abstain_threshold,
    choose_spread,
    train_sequence,
)
from peft_sparta.continual.calibration import SPREADS
from peft_sparta.continual.driver import _candidates, _held_out_candidates

from . import suites
from .baselines import make_method
from .common import markdown_table, write_results
from .continual import DEFAULTS, RESULTS, build_suite, parse_args, parse_overrides
from .suites import Task


#: Most of the calibration task prompts' router mass a floor may take away (abstaining costs task accuracy).
MAX_TASK_ABSTAIN = 0.01

#: What every setting starts from, whatever the package defaults are: soft routing over every task by cosine
#: similarity, no abstention.
BASELINE = {
    "router_temperature": 0.02,
    "top_k": None,
    "router_min_gate": 0.0,
    "router_abstain_threshold": None,
    "router_abstain_spread": None,
    "router_metric": "cosine",
}


def settings_grid() -> dict[str, dict]:
    """Named router settings of inference, each complete (`BASELINE` updated with its own values)."""
    grid = {
        "no abstention": {},
        "temperature 0.05": {"router_temperature": 0.05},
        "temperature 0.1": {"router_temperature": 0.1},
        "top_k 1": {"top_k": 1},
        "top_k 2, temperature 0.1": {"top_k": 2, "router_temperature": 0.1},
        "calibrated threshold": {"router_abstain_threshold": "calibrated"},
    }
    grid.update({f"spread {k:g}": {"router_abstain_spread": k} for k in SPREADS})
    for k in (2.5, 5.0):
        grid[f"spread {k:g}, temperature 0.05"] = {"router_abstain_spread": k, "router_temperature": 0.05}
        grid[f"spread {k:g}, top_k 1"] = {"router_abstain_spread": k, "top_k": 1}
    grid["discriminant"] = {"router_metric": "discriminant"}
    grid["discriminant, spread 6"] = {"router_metric": "discriminant", "router_abstain_spread": 6.0}
    for k in (1, 2):
        grid[f"discriminant, spread 6, top_k {k}"] = {**grid["discriminant, spread 6"], "top_k": k}
    for gate in (0.01, 0.05):
        grid[f"discriminant, spread 6, min gate {gate:g}"] = {
            **grid["discriminant, spread 6"],
            "router_min_gate": gate,
        }
    grid["discriminant, spread 4, min gate 0.01"] = {
        **grid["discriminant, spread 6"],
        "router_abstain_spread": 4.0,
        "router_min_gate": 0.01,
    }
    return {name: {**BASELINE, **setting} for name, setting in grid.items()}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["minilm", "smollm", "translation", "long"], default="minilm")
    parser.add_argument("--boilerplate", action="store_true")
    parser.add_argument("--order", type=int, choices=[1, 2, 3], default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-per-task", type=int, default=32, help="fresh prompts per trained task")
    parser.add_argument("--sparta", nargs="*", default=[], metavar="FIELD=VALUE", help="SpaRTAConfig overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/router-<suite>)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def suite_arguments(args, seed: int):
    """The continual benchmark's arguments for this suite and seed (its suite builder reads them)."""
    argv = ["--suite", args.suite, "--seed", str(seed), "--order", str(args.order)]
    return parse_args(argv + (["--boilerplate"] if args.boilerplate else []))


def calibration_split(args, tasks: list[Task]) -> list[Task]:
    """Fresh prompts of each trained task (generator seed + 1000), none of them a train or test prompt."""
    used = {example.text for task in tasks for example in task.train + task.test}
    fresh, *_ = build_suite(suite_arguments(args, args.seed + 1000))
    split = []
    for task, other in zip(tasks, fresh):
        examples = [e for e in other.train + other.test if e.text not in used][: args.calibration_per_task]
        split.append(Task(name=task.name, train=[], test=examples, labels=task.labels))
    return split


def abstained_mass(gates: torch.Tensor) -> float:
    """Mean share of the router mass that goes to no task branch (1 for an input that abstains)."""
    return float((1.0 - gates.sum(dim=-1)).clamp(min=0.0).mean()) if gates.numel() else float("nan")


def scored_routing(model, harness, task: Task, candidates: list[str]) -> tuple[float, torch.Tensor]:
    """Accuracy of ``task`` among ``candidates`` and each test input's gates."""
    with RoutingRecorder(model) as recorder:
        recorder.enabled = False
        accuracy = harness.accuracy(model, task, candidates, recorder=recorder)
    return accuracy, recorder.take()


def text_routing(model, harness, texts: list[str]) -> torch.Tensor:
    """Gates of unrelated texts, fed as the drift measurement feeds them."""
    with RoutingRecorder(model) as recorder:
        harness.general_reference(model, texts)
    return recorder.take()


def calibrated_threshold(model, harness, tasks: list[Task], calibration: list[Task]) -> float | None:
    """`abstain_threshold` of the calibration split's best router scores (None when the groups overlap)."""
    with RoutingRecorder(model, quantity="scores") as recorder:
        for task in calibration:
            harness.accuracy(model, task, _candidates(tasks, len(tasks) - 1))
    task_scores = recorder.take().amax(dim=-1)
    with RoutingRecorder(model, quantity="scores") as recorder:
        harness.general_reference(model, list(suites.CALIBRATION_TEXTS))
    return abstain_threshold(task_scores, recorder.take().amax(dim=-1))


def measure(model, harness, tasks, held_out, calibration, reference) -> dict:
    """Every figure of one router setting."""
    last = len(tasks) - 1
    trained = [scored_routing(model, harness, task, _candidates(tasks, last)) for task in tasks]
    held = {task.name: scored_routing(model, harness, task, _held_out_candidates(tasks, task)) for task in held_out}
    calibrated = [scored_routing(model, harness, task, _candidates(tasks, last))[1] for task in calibration]
    with RoutingRecorder(model) as recorder:
        drift = harness.drift(model, list(suites.NEUTRAL_TEXTS), reference)
    return {
        "accuracy": [accuracy for accuracy, _ in trained],
        "AA": sum(accuracy for accuracy, _ in trained) / len(trained),
        "unseen_accuracy": {name: accuracy for name, (accuracy, _) in held.items()},
        "drift": drift,
        "abstained": {
            "trained": abstained_mass(torch.cat([gates for _, gates in trained])),
            **{name: abstained_mass(gates) for name, (_, gates) in held.items()},
            "neutral": abstained_mass(recorder.take()),
            "calibration_tasks": abstained_mass(torch.cat(calibrated)),
            "calibration_text": abstained_mass(text_routing(model, harness, list(suites.CALIBRATION_TEXTS))),
        },
    }


def chosen_spread(rows: dict[str, dict]) -> float | None:
    """`choose_spread` from the calibration split's abstaining shares of the spread rows."""
    shares = {
        row["setting"]["router_abstain_spread"]: (
            row["abstained"]["calibration_tasks"],
            row["abstained"]["calibration_text"],
        )
        for name, row in rows.items()
        if name.startswith("spread ") and "," not in name
    }
    return choose_spread(shares, MAX_TASK_ABSTAIN)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    suite_args = suite_arguments(args, args.seed)
    tasks, held_out, harness, factory, targets, task_type = build_suite(suite_args)
    calibration = calibration_split(args, tasks)
    steps, batch_size, lr = DEFAULTS[args.suite]
    settings = ContinualArguments(
        steps=steps, batch_size=batch_size, learning_rate=lr, seed=args.seed, progress=not args.no_progress,
        general_texts=suites.NEUTRAL_TEXTS, measure_forward_transfer=False,
    )  # fmt: skip
    overrides = parse_overrides(args.sparta)
    method = make_method(
        "sparta", targets, suite_args.r_shared, suite_args.r_task, task_type=task_type, sparta_overrides=overrides
    )
    result = train_sequence(factory, tasks, settings, harness=harness, method=method, held_out=held_out)
    model, config = result.model, result.model.peft_config["default"]
    with model.disable_adapter():
        reference = harness.general_reference(model, list(suites.NEUTRAL_TEXTS))
    rows = {}
    for name, setting in tqdm(settings_grid().items(), desc="router settings", disable=args.no_progress):
        values = dict(setting)
        if values["router_abstain_threshold"] == "calibrated":
            for field, value in BASELINE.items():
                setattr(config, field, value)
            values["router_abstain_threshold"] = calibrated_threshold(model, harness, tasks, calibration)
        for field, value in values.items():
            setattr(config, field, value)
        rows[name] = {"setting": values, **measure(model, harness, tasks, held_out, calibration, reference)}
    return {
        "suite": args.suite + ("-boilerplate" if args.boilerplate else ""),
        "tasks": [task.name for task in tasks],
        "held_out": [task.name for task in held_out],
        "unseen_base_accuracy": result.unseen_base_accuracy,
        "calibration_sizes": [len(task.test) for task in calibration],
        "chosen_spread": chosen_spread(rows),
        "rows": rows,
    }


def table(results: dict) -> str:
    held = results["held_out"]
    base = results["unseen_base_accuracy"]
    header = ["setting", "AA", *[f"{name} (base {base[name]:.3f})" for name in held], "drift",
              "abstained: trained / held-out / neutral", "calibration abstained: tasks / text"]  # fmt: skip
    body = []
    for name, row in results["rows"].items():
        abstained = row["abstained"]
        body.append([
            name, f"{row['AA']:.3f}",
            *[f"{row['unseen_accuracy'][h]:.3f} ({row['unseen_accuracy'][h] - base[h]:+.3f})" for h in held],
            f"{row['drift']:+.3f}",
            " / ".join(f"{abstained[key]:.2f}" for key in ["trained", *held, "neutral"]),
            f"{abstained['calibration_tasks']:.2f} / {abstained['calibration_text']:.2f}",
        ])  # fmt: skip
    chosen = results["chosen_spread"]
    note = f"\n\nChosen on the calibration split: router_abstain_spread = {chosen}." if chosen else ""
    return markdown_table(header, body) + note


def main(argv=None) -> None:
    args = parse(argv)
    results = run(args)
    text = table(results)
    print(text)
    stem = Path(args.out) if args.out else RESULTS / f"router-{results['suite']}"
    write_results(stem, f"Router alternatives, suite {results['suite']}", results, text, vars(args))


if __name__ == "__main__":
    main()
