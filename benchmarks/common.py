"""Timing and memory helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def machine() -> str:
    """One line naming the device the figures come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}"


def provenance() -> dict:
    """What a result needs to be traced to the code and machine that measured it: the checked-out commit, whether the
    working tree differs from it outside benchmarks/results (``dirty``, with the changed or untracked paths), the
    machine and the UTC time. Call it once per run, before the run writes any result; record the run's settings
    beside it. ``commit`` and ``dirty`` are None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout

    head = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    changed = sorted(line[3:] for line in (changes or "").splitlines() if line.strip())
    return {
        "commit": head.strip() if head else None,
        "dirty": bool(changed) if changes is not None else None,
        "changed_files": changed,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def describe_run(run: dict) -> str:
    """One line naming a run: its commit (and uncommitted changes), date, machine and settings."""
    if run.get("commit"):
        where = f"commit {run['commit'][:12]}"
        if run.get("dirty"):
            where += f" with uncommitted changes ({', '.join(run.get('changed_files', [])) or 'unlisted'})"
    else:
        where = f"commit unknown ({run['note']})" if run.get("note") else "commit unknown"
    when = f", {run['date']}" if run.get("date") else ""
    return f"{where}{when}; machine: {run.get('machine')}; settings: {json.dumps(run.get('settings', {}))}"


def write_results(path: Path, title: str, results: dict, table: str, settings: dict) -> None:
    """Write ``path`` with suffix .json (the run: `provenance` and ``settings``; the machine; the results; the table)
    and, beside it, with suffix .md (the title, the run and the table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run = {**provenance(), "settings": settings}
    payload = {"run": run, "machine": run["machine"], "results": results, "table": table}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(f"# {title}\n\nRun: {describe_run(run)}\n\n{table}\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(steps: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall time of each ``steps[key]()``, after ``warmup`` untimed calls each, timed in turns (one call of
    every step per round): a machine that speeds up or slows down during the run (shared hosts, clock changes) then
    shifts every step alike, and the ratios between them hold. Every other round runs the steps in reverse order, so
    that no step always follows the same one (a step can leave caches and the allocator in a state that speeds up or
    slows down the next)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times = {key: [] for key in steps}
    order = list(steps.items())
    for round_index in range(repeats):
        for key, step in order if round_index % 2 == 0 else reversed(order):
            start = time.perf_counter()
            step()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


@contextmanager
def saved_activation_bytes(model: torch.nn.Module):
    """Count the bytes autograd saves for backward inside the block (activation memory, on any device): each storage
    once, and none of the model's parameters, which autograd keeps by reference at no extra cost."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    total = {"bytes": 0}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total
    total["bytes"] = sum(storages.values())


def peak_memory_bytes(step, device: torch.device, model: torch.nn.Module) -> int:
    """Peak memory of one ``step()``: allocator peak on CUDA, saved activations elsewhere."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with saved_activation_bytes(model) as total:
        step()
    return total["bytes"]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def add_train_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a whole-model training-step benchmark (shape overrides, sizes, rounds, device, output)."""
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r-shared", type=int, default=8)
    parser.add_argument("--r-task", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output", type=Path, default=None, help="write the results here as JSON, and the table beside it as .md"
    )


def report(args, title: str, results: dict, table: str) -> None:
    """Print the table and, with ``--output``, write the results and the table with the run's record."""
    print(table)
    if args.output:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        write_results(args.output, title, results, table, settings)
