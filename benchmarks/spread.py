"""Mean and spread of continual-benchmark results over runs that differ in one thing (seeds, task orders).

Reads results files written by `continual.py` and, for every method present in all of them, reports AA, BWT,
learning accuracy, routing accuracy, drift and each held-out task's gain over the base model as mean, standard
deviation and range over the files. ``--out`` writes the
figures as JSON (with each input file's runs) and the table as markdown beside it.

    python -m benchmarks.spread benchmarks/results/continual-minilm.json \
        benchmarks/results/continual-minilm-seed1.json benchmarks/results/continual-minilm-seed2.json \
        --out benchmarks/results/continual-minilm-seeds
    python -m benchmarks.spread benchmarks/results/continual-long-order{1,2,3}.json --out benchmarks/results/continual-long
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .common import markdown_table


METRICS = {
    "AA": "AA",
    "BWT": "BWT",
    "learning_accuracy": "learning acc",
    "forced_learning_accuracy": "forced learning acc",
    "routing_accuracy": "routing acc",
    "drift": "drift",
}

#: Prefix of the per-held-out-task metrics, taken from each row's ``unseen_gain``.
HELD_OUT_GAIN = "held-out gain: "


def spread(values: list[float]) -> dict:
    """Mean, population standard deviation, minimum and maximum of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarize(files: list[dict]) -> dict:
    """Per method found in every file, per metric that every file has for it: `spread` of its values."""
    common = set.intersection(*(set(results["methods"]) for results in files))
    summary = {}
    for method in sorted(common, key=list(files[0]["methods"]).index):
        rows = [{**results["methods"][method], **held_out_gains(results["methods"][method])} for results in files]
        summary[method] = {
            metric: spread([row[metric] for row in rows])
            for metric in [*METRICS, *held_out_gains(rows[0])]
            if all(row.get(metric) is not None for row in rows)
        }
    return summary


def held_out_gains(row: dict) -> dict[str, float]:
    """A row's gain over the base model on each held-out task, as metrics named `HELD_OUT_GAIN` + task."""
    return {HELD_OUT_GAIN + task: gain for task, gain in (row.get("unseen_gain") or {}).items()}


def distinct_runs(results: dict) -> list[dict]:
    """The runs (commit, machine, settings) that measured a file's rows, each once."""
    unique = {json.dumps(row.get("run"), sort_keys=True) for row in results["methods"].values()}
    return [json.loads(run) for run in sorted(unique)]


def table(summary: dict, count: int) -> str:
    def cell(stats: dict | None) -> str:
        if stats is None:
            return "—"
        return f"{stats['mean']:.3f} ± {stats['std']:.3f} ({stats['min']:.3f} to {stats['max']:.3f})"

    names = {**METRICS, **{m: m for metrics in summary.values() for m in metrics if m.startswith(HELD_OUT_GAIN)}}
    header = ["method", *(f"{label} (mean ± std, range)" for label in names.values())]
    rows = [[method, *(cell(metrics.get(metric)) for metric in names)] for method, metrics in summary.items()]
    return f"Over {count} runs.\n\n" + markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="results JSON files of continual.py")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if len(args.files) < 2:
        raise SystemExit("spread.py needs at least two results files")
    files = [json.loads(path.read_text()) for path in args.files]
    summary = summarize(files)
    text = table(summary, len(files))
    print(text)
    if args.out:
        runs = {str(path): distinct_runs(results) for path, results in zip(args.files, files)}
        payload = {"files": [str(path) for path in args.files], "runs": runs, "summary": summary, "table": text}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        sources = "\n".join(f"- {path}" for path in args.files)
        args.out.with_suffix(".md").write_text(f"# Spread over runs\n\nFrom:\n{sources}\n\n{text}\n")


if __name__ == "__main__":
    main()
