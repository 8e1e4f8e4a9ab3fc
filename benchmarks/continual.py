"""Continual-learning benchmark: SpaRTA, its ablations and the PEFT baselines on one task sequence, task-free.

Suites (see benchmarks/suites):
- minilm: six offline text-classification tasks with distinct label sets on all-MiniLM-L6-v2, scored by the nearest
  label-name embedding among every label seen so far (~15 min for every method on 2 CPU cores).
- smollm: five offline instruction tasks on SmolLM2-135M-Instruct, exact-match answers (reduced CPU setting).
- translation: translation of eight words into French, Spanish and German on all-MiniLM-L6-v2, scored as minilm: the
  tasks' prompts differ in one word (the language), the hard case for routing.
- long: fifteen offline text-classification tasks (minilm's six and nine more built the same way) on
  all-MiniLM-L6-v2, scored as minilm, in three fixed task orders (--order 1, 2, 3; one results file per order).
- realtext: eight tasks of real text that installed packages ship (tzdata's time zones, pycountry's ISO lists, the
  Unicode character names) on SmolLM2-135M-Instruct, classification (scored by the most likely of the task's own
  labels) and generation (exact match) mixed; drift on real unrelated text (the Apache License 2.0 of tzdata). Every
  task has a calibration split: --evaluate-on calibration scores it instead of the test split (for choosing
  settings), and --base-only scores the untrained model alone.
- standard: the Standard CL benchmark (AG News, Amazon, Yelp, DBpedia, Yahoo; orders 1-3) through `datasets`
  (Hub download, or --data-dir with <task>/train.jsonl and test.jsonl in the Hub column layout).

Each offline suite (minilm, smollm, translation, long, realtext) also has held-out tasks, never trained (a trained task's
format with a new label set, and a format no trained task has; long: minilm's): every method, and the base model
before training, is scored on them after the whole sequence (--no-held-out skips them).

Writes benchmarks/results/continual-<suite>.json (long: continual-long-order<k>.json, one file per task order;
merged with the methods already there), a markdown table
(continual-<suite>.md) and plots (continual-<suite>-accuracy.png: accuracy-matrix heatmap per method;
continual-<suite>-routing.png: mean router gates per true task for each SpaRTA run; continual-<suite>-learning.png:
each task's accuracy right after its training, router deciding and own branch forced; continual-<suite>-held-out.png:
accuracy on the held-out tasks, base model first). Every method row records the run
that measured it under "run" (commit, dirty flag and changed files, machine, date, settings), since one file gathers
rows of several runs; the header's "latest_run" is the last run that wrote the file. Rows of files written before
rows kept their run get the header's former "machine" and "settings", marked as such, and an unknown commit.

    python -m benchmarks.continual --suite minilm
    python -m benchmarks.continual --suite minilm --methods sparta seq_lora --steps 30
    python -m benchmarks.continual --suite minilm --methods sparta --sparta router_temperature=0.05 --tag t005
    python -m benchmarks.continual --suite smollm --methods sparta seq_lora o_lora --steps 20
    python -m benchmarks.continual --suite translation --methods sparta seq_lora
    python -m benchmarks.continual --suite long --order 2
    python -m benchmarks.continual --suite realtext --evaluate-on calibration --base-only
    python -m benchmarks.continual --suite realtext --seed 1
    python -m benchmarks.continual --suite standard --order 1 --data-dir data/standard_cl --model minilm
"""

from __future__ import annotations

import os


os.environ.setdefault("OMP_NUM_THREADS", "2")  # without it, torch on a shared CPU machine can run 30x slower
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import ast
import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

import peft_sparta  # noqa: F401
from peft_sparta.continual import (
    CausalLMHarness,
    ContinualArguments,
    EmbeddingClassificationHarness,
    abstain_threshold,
    best_router_scores,
    train_sequence,
)
from peft_sparta.continual.driver import _candidates, _held_out_candidates
from peft_sparta.model import find_sparta_tuner

from . import offline, suites
from .baselines import METHODS, make_method
from .common import describe_run, markdown_table, provenance


RESULTS = Path(__file__).resolve().parent / "results"
MINILM_TARGETS = ["query", "key", "value", "dense"]
SMOLLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_METHODS = [
    "sparta", "seq_lora", "o_lora", "osf", "mtl_lora", "sparta_no_router", "sparta_no_shared", "sparta_orth",
    "sparta_spectral_init", "sparta_learned_router", "sparta_spectral_router", "sparta_token_routing",
    "sparta_train_shared", "sparta_one_prototype",
]  # fmt: skip
SMOLLM_METHODS = ["sparta", "seq_lora", "o_lora", "osf", "mtl_lora"]
REALTEXT_METHODS = ["sparta", "sparta_paper", "seq_lora", "o_lora", "osf", "mtl_lora"]
SUITE_METHODS = {"minilm": MINILM_METHODS, "standard": MINILM_METHODS, "smollm": SMOLLM_METHODS,
                 "translation": SMOLLM_METHODS, "long": SMOLLM_METHODS, "realtext": REALTEXT_METHODS}  # fmt: skip
SUITES = ["minilm", "smollm", "translation", "long", "realtext", "standard"]
DEFAULTS = {
    # suite: steps per task, batch size, learning rate
    "minilm": (30, 16, 1e-3),
    "translation": (30, 16, 1e-3),
    "long": (30, 16, 1e-3),
    "smollm": (40, 8, 1e-3),
    "realtext": (40, 8, 1e-3),
    "standard": (100, 16, 1e-3),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="minilm")
    parser.add_argument("--methods", nargs="+", default=None, help=f"any of {sorted(METHODS)}; default: the suite's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per task")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument(
        "--up-lr-ratio", type=float, default=1.0, help="learning rate of every B (up-projection) over the rest (LoRA+)"
    )
    parser.add_argument("--r-shared", type=int, default=8)
    parser.add_argument("--r-task", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", default=None, help="task names (subset / order) of the suite")
    parser.add_argument(
        "--train-per-label",
        type=int,
        default=None,
        help="minilm/translation/long/standard, realtext's classification tasks: train examples per label",
    )
    parser.add_argument(
        "--test-per-label",
        type=int,
        default=None,
        help="minilm/translation/long/standard, realtext's classification tasks: test examples per label",
    )
    parser.add_argument("--no-held-out", action="store_true", help="do not score the suite's held-out tasks")
    parser.add_argument(
        "--boilerplate", action="store_true", help="minilm/long: wrap inputs in shared boilerplate (harder routing)"
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="smollm (default 48), realtext's generation tasks (default 64): training examples per task",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=None,
        help="smollm (default 24), realtext's generation tasks (default 32): test examples per task",
    )
    parser.add_argument(
        "--evaluate-on",
        choices=["test", "calibration"],
        default="test",
        help="realtext: score every task (and drift) on its calibration split instead of its test split, to choose "
        "settings without looking at the test split; results go to <stem>-calibration",
    )
    parser.add_argument(
        "--base-only",
        action="store_true",
        help="score the untrained base model on every task and held-out task, train nothing (results: base_model)",
    )
    parser.add_argument("--order", type=int, default=1, choices=[1, 2, 3], help="standard, long: task order")
    parser.add_argument("--data-dir", default=None, help="standard: local <task>/{train,test}.jsonl files")
    parser.add_argument("--model", choices=["minilm", "smollm"], default="minilm", help="standard: the model")
    parser.add_argument(
        "--sparta", nargs="*", default=[], metavar="FIELD=VALUE", help="SpaRTAConfig overrides for the SpaRTA runs"
    )
    parser.add_argument(
        "--calibrate-abstain", type=int, default=0, metavar="N",
        help="smollm: after each task, set router_abstain_threshold from N fresh prompts per trained task (drawn "
        "with another seed, never trained or scored) and suites.CALIBRATION_TEXTS (not the drift texts)",
    )  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the method names in the results (design sweeps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results stem; default benchmarks/results/continual-<suite>")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def build_suite(args):
    """(tasks, held-out tasks, harness, model factory, target modules, task_type)."""
    if args.suite in ("minilm", "translation", "long") or (args.suite == "standard" and args.model == "minilm"):
        _, tokenizer = offline.load_minilm()
        harness = EmbeddingClassificationHarness(tokenizer, max_length=128 if args.suite == "standard" else 64)
        factory, targets, task_type = (lambda: offline.load_minilm()[0]), MINILM_TARGETS, None
    else:
        _, tokenizer = offline.load_smollm2()
        harness = CausalLMHarness(tokenizer, max_new_tokens=8, score_labels=args.suite == "realtext")
        factory, targets, task_type = (lambda: offline.load_smollm2()[0]), SMOLLM_TARGETS, "CAUSAL_LM"
    held_out = []
    test_per_label = args.test_per_label or 16
    if args.suite == "minilm":
        tasks = suites.classification_suite(
            args.seed, train_per_label=args.train_per_label or 48, test_per_label=test_per_label,
            tasks=args.tasks, boilerplate=args.boilerplate,
        )  # fmt: skip
        held_out = suites.classification_held_out(args.seed, test_per_label, boilerplate=args.boilerplate)
    elif args.suite == "long":
        tasks = suites.long_sequence_suite(
            args.seed, train_per_label=args.train_per_label or 48, test_per_label=test_per_label,
            order=tuple(args.tasks) if args.tasks else args.order, boilerplate=args.boilerplate,
        )  # fmt: skip
        held_out = suites.classification_held_out(args.seed, test_per_label, boilerplate=args.boilerplate)
    elif args.suite == "translation":
        tasks = suites.translation_suite(
            args.seed, train_per_label=args.train_per_label or 48, test_per_label=test_per_label, tasks=args.tasks
        )
        held_out = suites.translation_held_out(args.seed, test_per_label)
    elif args.suite == "smollm":
        tasks = suites.generation_suite(
            args.seed, train_size=args.train_size or 48, test_size=args.test_size or 24, tasks=args.tasks
        )
        held_out = suites.generation_held_out(args.seed, test_size=args.test_size or 24)
    elif args.suite == "realtext":
        sizes = {
            "train_per_label": args.train_per_label, "test_per_label": args.test_per_label,
            "train_size": args.train_size, "test_size": args.test_size,
        }  # fmt: skip
        sizes = {key: value for key, value in sizes.items() if value is not None}
        tasks = suites.realtext_suite(args.seed, tasks=args.tasks, **sizes)
        held_out = suites.realtext_held_out(
            args.seed, **{key: value for key, value in sizes.items() if key.startswith("test")}
        )
    else:
        tasks = suites.standard_cl_suite(
            tuple(args.tasks) if args.tasks else args.order, data_dir=args.data_dir,
            train_per_label=args.train_per_label or 1000, test_per_label=args.test_per_label or 500, seed=args.seed,
            text_to_text=args.model == "smollm",
        )  # fmt: skip
    if args.evaluate_on == "calibration":
        tasks, held_out = on_calibration_split(tasks), on_calibration_split(held_out)
    return tasks, [] if args.no_held_out else held_out, harness, factory, targets, task_type


def on_calibration_split(tasks: list) -> list:
    """The tasks with their calibration examples in place of their test examples (training data unchanged)."""
    missing = [task.name for task in tasks if not task.calibration]
    if missing:
        raise SystemExit(f"--evaluate-on calibration: tasks {missing} have no calibration split (suite realtext has).")
    return [dataclasses.replace(task, test=task.calibration) for task in tasks]


def general_texts(args) -> list[str]:
    """The unrelated texts on which drift is measured: the real-text suite's own (its calibration half under
    --evaluate-on calibration), else `suites.NEUTRAL_TEXTS`."""
    if args.suite == "realtext":
        return suites.unrelated_texts(args.evaluate_on)
    return suites.NEUTRAL_TEXTS


def default_stem(args) -> str:
    """The results stem without --out: continual-<suite>, with the task order for the long suite (unless --tasks)."""
    order = f"-order{args.order}" if args.suite == "long" and not args.tasks else ""
    boilerplate = "-boilerplate" if args.boilerplate else ""
    calibration = "-calibration" if args.evaluate_on == "calibration" else ""
    return f"continual-{args.suite}{order}{boilerplate}{calibration}"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    steps, batch_size, lr = DEFAULTS[args.suite]
    settings = ContinualArguments(
        steps=args.steps or steps,
        batch_size=args.batch_size or batch_size,
        learning_rate=args.lr or lr,
        up_lr_ratio=args.up_lr_ratio,
        seed=args.seed,
        progress=not args.no_progress,
        general_texts=general_texts(args),
    )
    tasks, held_out, harness, factory, targets, task_type = build_suite(args)
    methods = args.methods or SUITE_METHODS[args.suite]
    overrides = parse_overrides(args.sparta)
    stem = Path(args.out) if args.out else RESULTS / default_stem(args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(stem)
    this_run = provenance()
    this_run["settings"] = {
        "suite": args.suite, "tasks": [task.name for task in tasks], "steps_per_task": settings.steps,
        "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
        "up_lr_ratio": settings.up_lr_ratio, "seed": args.seed,
        "boilerplate": args.boilerplate, "r_shared": args.r_shared, "r_task": args.r_task, "target_modules": targets,
        "train_sizes": [len(task.train) for task in tasks], "test_sizes": [len(task.test) for task in tasks],
        "held_out": [task.name for task in held_out], "held_out_test_sizes": [len(task.test) for task in held_out],
        "threads": args.threads, "sparta_overrides": overrides, "arguments": vars(args),
        "evaluated_on": args.evaluate_on, "sources": tasks[0].metadata.get("sources"),
    }  # fmt: skip
    results.update(suite=args.suite, tasks=[task.name for task in tasks], latest_run=this_run)
    if held_out:
        results["held_out"] = [
            {"name": task.name, "kind": task.metadata.get("held_out"), "format_of": task.metadata.get("format_of")}
            for task in held_out
        ]
    if args.base_only:
        accuracy = base_model_accuracy(factory(), tasks, held_out, harness)
        results["base_model"] = {"accuracy": accuracy, "run": this_run}
        save(results, stem, plots=False)
        return results
    thresholds: list = []
    if args.calibrate_abstain:
        settings.before_evaluation = abstain_calibrator(args, tasks, harness, thresholds)
    for name in tqdm(methods, desc="methods", disable=args.no_progress):
        method = make_method(
            name, targets, args.r_shared, args.r_task, task_type=task_type, sparta_overrides=overrides
        )
        key = name + (f"_{args.tag}" if args.tag else "")
        method.name = key
        result = train_sequence(factory, tasks, settings, harness=harness, method=method, held_out=held_out)
        result = result.to_dict()
        if method.is_sparta and overrides:
            result["sparta_overrides"] = overrides
        if thresholds:
            result["abstain_thresholds"], thresholds[:] = list(thresholds), []
        result["run"] = this_run
        results["methods"][key] = result
        save(results, stem, plots=not args.no_plots)
        tqdm.write(summary_line(key, result))
    return results


@torch.no_grad()
def base_model_accuracy(model, tasks, held_out, harness) -> dict[str, float]:
    """The untrained model's accuracy on every task and held-out task, each scored as `train_sequence` scores it
    before training (among the labels of the tasks up to it; a held-out task among every trained task's and its
    own)."""
    harness.prepare(model, [*tasks, *held_out])
    model.eval()
    accuracy = {task.name: harness.accuracy(model, task, _candidates(tasks, j)) for j, task in enumerate(tasks)}
    for task in held_out:
        accuracy[task.name] = harness.accuracy(model, task, _held_out_candidates(tasks, task))
    return accuracy


def abstain_calibrator(args, tasks, harness, thresholds: list):
    """``before_evaluation`` that sets the abstain threshold from a calibration split: fresh prompts of the tasks
    trained so far (the suite's generator with seed + 1000, minus any train or test prompt) and CALIBRATION_TEXTS,
    formatted as the harness's test prompts; each stage's threshold and the scores it was chosen from are appended to
    ``thresholds``."""
    if args.suite != "smollm":
        raise SystemExit("--calibrate-abstain is implemented for the smollm suite")
    used = {example.text for task in tasks for example in task.train + task.test}
    fresh = suites.generation_suite(
        args.seed + 1000, train_size=4 * args.calibrate_abstain, test_size=0, tasks=[task.name for task in tasks]
    )
    prompts = [[e.text for e in task.train if e.text not in used][: args.calibrate_abstain] for task in fresh]

    def batches(texts: list[str]) -> list[dict]:
        tokenizer = harness.tokenizer
        return [tokenizer(harness.prompt(text), return_tensors="pt") for text in texts]

    def calibrate(model, seen: list[int]) -> None:
        if find_sparta_tuner(model) is None:
            return
        task_scores = best_router_scores(model, batches([text for index in seen for text in prompts[index]]))
        unrelated_scores = best_router_scores(model, batches(suites.CALIBRATION_TEXTS))
        threshold = abstain_threshold(task_scores, unrelated_scores)
        for config in model.peft_config.values():
            config.router_abstain_threshold = threshold
        thresholds.append(
            {
                "threshold": threshold,
                "task_scores": task_scores.tolist(),
                "unrelated_scores": unrelated_scores.tolist(),
            }
        )

    return calibrate


def load_results(stem: Path) -> dict:
    """The results file at ``stem`` (or an empty one), every row with its "run": a file written before rows kept their
    run gives its rows the header's "machine" and "settings" (see `legacy_run`) and loses those header fields."""
    path = stem.with_suffix(".json")
    if not path.exists():
        return {"methods": {}}
    results = json.loads(path.read_text())
    for row in results["methods"].values():
        row.setdefault("run", legacy_run(results))
    results.pop("machine", None)
    results.pop("settings", None)
    return results


def legacy_run(results: dict) -> dict:
    """The run of a row written before rows kept their own: the file header's machine and settings, which the last run
    that updated the file wrote over those of earlier runs, so they may describe another run; the commit is unknown."""
    return {
        "commit": None,
        "dirty": None,
        "machine": results.get("machine"),
        "settings": results.get("settings", {}),
        "note": "recorded before rows kept their run: machine and settings from the file header, which the last run "
        "that wrote the file set, so they may belong to another run",
    }


def runs_of(results: dict) -> tuple[list[dict], list[int]]:
    """The distinct runs of the rows, in row order, and each row's index into them (1-based)."""
    runs, keys, indices = [], [], []
    for row in results["methods"].values():
        run = row.get("run") or legacy_run(results)
        key = json.dumps(run, sort_keys=True)
        if key not in keys:
            keys.append(key)
            runs.append(run)
        indices.append(keys.index(key) + 1)
    return runs, indices


def summary_line(name: str, result: dict) -> str:
    def fmt(value, signed=False):
        return "—" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")

    gains = result.get("unseen_gain") or {}
    unseen = " ".join(f"{task} {fmt(gain, True)}" for task, gain in gains.items())
    return (
        f"{name}: AA {fmt(result['AA'])} BWT {fmt(result['BWT'], True)} FWT {fmt(result['FWT'], True)} "
        f"learning {fmt(result['learning_accuracy'])} forced {fmt(result.get('forced_learning_accuracy'))} "
        f"routing {fmt(result['routing_accuracy'])}" + (f" unseen gain: {unseen}" if unseen else "")
        + f" wall {result['wall_s']:.0f}s"
    )  # fmt: skip


def save(results: dict, stem: Path, plots: bool = True) -> None:
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown_report(results))
    if plots:
        plot(results, stem)


def markdown_report(results: dict) -> str:
    def fmt(value, signed=False):
        return "—" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")

    header = [
        "method", "AA", "BWT", "FWT", "learning acc", "forced learning acc", "routing acc", "drift",
        "trainable params", "wall s", "run",
    ]  # fmt: skip
    runs, run_of_row = runs_of(results)
    rows = [
        [
            name, fmt(r["AA"]), fmt(r["BWT"], True), fmt(r["FWT"], True), fmt(r["learning_accuracy"]),
            fmt(r.get("forced_learning_accuracy")), fmt(r["routing_accuracy"]), fmt(r.get("drift")),
            f"{r['trainable_params']:,}", f"{r['wall_s']:.0f}", run,
        ]
        for (name, r), run in zip(results["methods"].items(), run_of_row)
    ]  # fmt: skip
    lines = [
        f"# Continual benchmark: {results.get('suite')}",
        "",
        f"Tasks in order: {', '.join(results.get('tasks', []))}.",
        "",
        "Runs (the table's last column names the run that measured each row):",
        "",
        *[f"{index}. {describe_run(run)}" for index, run in enumerate(runs, start=1)],
        "",
        (
            "AA: mean accuracy over all tasks after the last one; BWT: mean (final - just-trained) accuracy of earlier "
            "tasks (forgetting = -BWT); FWT: mean (accuracy on task j before training it - base model's); learning "
            "acc: mean accuracy of each task right after its own training; forced learning acc: the same with the "
            "task's own branch forced (its task id given; a method without a router has one path, so the same "
            "value): learning acc - forced learning acc is what routing loses, 1 - forced learning acc what learning "
            "did not reach; routing acc: fraction of test inputs whose top router gate is their own task's branch "
            "(SpaRTA with a router only); drift: change on unrelated text (minilm, translation: 1 - cosine of "
            "embeddings to the base model's; smollm, realtext: mean token NLL increase). No task id at test time."
        ),
        "",
        markdown_table(header, rows),
        "",
        *held_out_report(results),
        *base_model_report(results),
    ]
    return "\n".join(lines)


def base_model_report(results: dict) -> list[str]:
    """Markdown lines of the --base-only table: the untrained model's accuracy per task."""
    base = results.get("base_model")
    if not base:
        return []
    accuracy = base["accuracy"]
    return [
        "## Base model (no training)",
        "",
        f"Accuracy of the untrained model per task (run: {describe_run(base['run'])}).",
        "",
        markdown_table(["task", "accuracy"], [[name, f"{value:.3f}"] for name, value in accuracy.items()]),
        "",
    ]


def held_out_names(results: dict) -> list[str]:
    """The held-out tasks of the file's rows, in the order the suite lists them."""
    names = [entry["name"] for entry in results.get("held_out", [])]
    for row in results["methods"].values():
        names += [name for name in row.get("unseen_accuracy") or {} if name not in names]
    return names


def base_unseen_accuracy(results: dict, name: str) -> float | None:
    """The base model's accuracy on held-out task ``name``, as the first row that measured it recorded it."""
    for row in results["methods"].values():
        if name in (row.get("unseen_base_accuracy") or {}):
            return row["unseen_base_accuracy"][name]
    return None


def held_out_report(results: dict) -> list[str]:
    """Markdown lines of the held-out table: unseen accuracy (and gain over the base model) per held-out task (none
    before a method row has measured them, e.g. after a --base-only run alone)."""
    names = held_out_names(results)
    if not names or not results["methods"]:
        return []
    kinds = {entry["name"]: entry for entry in results.get("held_out", [])}

    def title(name: str) -> str:
        entry = kinds.get(name, {})
        kind = entry.get("kind") or "held out"
        return f"{name} ({kind}" + (f" of {entry['format_of']})" if entry.get("format_of") else ")")

    def cell(row: dict, name: str) -> str:
        if name not in (row.get("unseen_accuracy") or {}):
            return "—"
        return f"{row['unseen_accuracy'][name]:.3f} ({row['unseen_gain'][name]:+.3f})"

    base = ["base model"] + [
        "—" if (value := base_unseen_accuracy(results, name)) is None else f"{value:.3f}" for name in names
    ]
    rows = [base] + [[method, *[cell(row, name) for name in names]] for method, row in results["methods"].items()]
    return [
        "## Held-out tasks (never trained)",
        "",
        (
            "Unseen accuracy after the whole sequence, and in brackets the gain over the base model (the same model "
            "before any training); each held-out task is scored among the labels of every trained task and its own."
        ),
        "",
        markdown_table(["method", *[title(name) for name in names]], rows),
        "",
    ]


def plot(results: dict, stem: Path) -> None:
    """The figures beside the results: accuracy matrices, routing, learning accuracy and held-out tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results["methods"]:
        return
    for suffix, draw in (
        ("accuracy", plot_accuracy), ("routing", plot_routing), ("learning", plot_learning),
        ("held-out", plot_held_out),
    ):  # fmt: skip
        figure = draw(results, plt)
        if figure is not None:
            figure.tight_layout()
            figure.savefig(stem.parent / f"{stem.name}-{suffix}.png", dpi=110)
            plt.close(figure)


def _grid(plt, count: int):
    columns = min(4, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.3 * rows), squeeze=False)
    for axis in list(axes.flat)[count:]:
        axis.axis("off")
    return figure, axes


def plot_accuracy(results: dict, plt):
    """Accuracy-matrix heatmap per method."""
    import numpy as np

    methods = results["methods"]
    figure, axes = _grid(plt, len(methods))
    for axis, (name, result) in zip(axes.flat, methods.items()):
        matrix = [[np.nan if v is None else v for v in row] for row in result["accuracy_matrix"]]
        matrix = np.array(matrix, dtype=float)
        axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                color = "w" if value < 0.6 else "k"
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
        names = result.get("task_names") or results.get("tasks", [])
        axis.set_title(f"{name}\nAA {result['AA']:.2f}", fontsize=8)
        axis.set_xticks(range(len(names)), names, rotation=60, fontsize=6)
        labels = ["all (MTL)"] if matrix.shape[0] == 1 and len(names) > 1 else names[: matrix.shape[0]]
        axis.set_yticks(range(matrix.shape[0]), labels, fontsize=6)
        axis.set_xlabel("evaluated task", fontsize=6)
        axis.set_ylabel("after training", fontsize=6)
    return figure


def plot_routing(results: dict, plt):
    """Mean router gates per true task (and per held-out task, marked "new") for each routing run."""
    import numpy as np

    routed = {name: r for name, r in results["methods"].items() if r.get("routing_weights")}
    if not routed:
        return None
    figure, axes = _grid(plt, len(routed))
    for axis, (name, result) in zip(axes.flat, routed.items()):
        unseen = {task: gates for task, gates in (result.get("unseen_routing_weights") or {}).items() if gates}
        weights = np.array(result["routing_weights"] + list(unseen.values()), dtype=float)
        axis.imshow(weights, vmin=0, vmax=1, cmap="magma")
        for (i, j), value in np.ndenumerate(weights):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value < 0.6 else "k")
        names = result.get("task_names") or results.get("tasks", [])
        rows = names[: len(result["routing_weights"])] + [f"new: {task}" for task in unseen]
        axis.set_title(f"{name}\nrouting acc {result['routing_accuracy']:.2f}", fontsize=8)
        axis.set_xticks(range(weights.shape[1]), names[: weights.shape[1]], rotation=60, fontsize=6)
        axis.set_yticks(range(weights.shape[0]), rows, fontsize=6)
        axis.set_xlabel("task branch (mean gate)", fontsize=6)
        axis.set_ylabel("test inputs of task", fontsize=6)
    return figure


def plot_learning(results: dict, plt):
    """Each method's learning accuracy with the router deciding beside the one with each task's branch forced."""
    import numpy as np

    rows = {
        name: r for name, r in results["methods"].items()
        if r.get("learning_accuracy") is not None and r.get("forced_learning_accuracy") is not None
    }  # fmt: skip
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.4))
    positions = np.arange(len(rows))
    routed = [r["learning_accuracy"] for r in rows.values()]
    forced = [r["forced_learning_accuracy"] for r in rows.values()]
    for offset, values, label in ((-0.2, routed, "router deciding"), (0.2, forced, "own branch forced")):
        bars = axis.bar(positions + offset, values, width=0.4, label=label)
        axis.bar_label(bars, fmt="%.2f", fontsize=6)
    axis.set_xticks(positions, list(rows), rotation=45, ha="right", fontsize=7)
    axis.set_ylim(0, 1.08)
    axis.set_ylabel("accuracy right after each task's training", fontsize=7)
    axis.set_title("Learning accuracy: routing loss vs learning loss", fontsize=8)
    axis.legend(fontsize=6, loc="lower right")
    return figure


def plot_held_out(results: dict, plt):
    """Accuracy on each held-out task after the whole sequence: the base model first, then every method."""
    import numpy as np

    names = held_out_names(results)
    if not names:
        return None
    figure, axes = _grid(plt, len(names))
    for axis, task in zip(axes.flat, names):
        labels = ["base model"] + [
            m for m, r in results["methods"].items() if task in (r.get("unseen_accuracy") or {})
        ]
        base = base_unseen_accuracy(results, task)
        values = [np.nan if base is None else base]
        values += [results["methods"][m]["unseen_accuracy"][task] for m in labels[1:]]
        bars = axis.bar(range(len(labels)), values, color=["grey"] + ["C0"] * (len(labels) - 1))
        axis.bar_label(bars, fmt="%.2f", fontsize=6)
        axis.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=6)
        axis.set_ylim(0, 1.1)
        axis.set_title(f"held out: {task}", fontsize=8)
        axis.set_ylabel("accuracy after the sequence", fontsize=6)
    return figure


def main(argv=None) -> None:
    results = run(parse_args(argv))
    print(markdown_report(results))


if __name__ == "__main__":
    main()
