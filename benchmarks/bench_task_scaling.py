"""Cost of one SpaRTA adapter as tasks accumulate (1, 4, 16 and 64 tasks) on a small Llama-shaped model.

Per task count: trainable and stored adapter parameters, the saved adapter file's size, the training step of the
newest task (forward, backward and AdamW step, as configured by default; also with the orthogonality penalty at
`PENALTY_WEIGHT`, to show its cost where it is turned on), top_k=1 inference (one forward of a batch, as a deployed
adapter runs it) and the router's time (the routing context and every layer's `Router.decide`) in the first inference
after the training steps, which also refreshes what the router derives from the prototypes those steps moved, as a
share of an inference; each time also as a ratio to one task. The earlier tasks' branches are synthetic (added with
``add_task`` and never trained: costs do not depend on the weights), but each task's router prototypes are learned
from training-mode forwards of its own tokens (a vocabulary slice per task), so that top_k=1 routes every input to
one task as a trained adapter does; with empty prototypes every task would tie and every branch would run.

The model has SmolLM2-135M's layer shape (width 576, MLP 1536, 9 heads, 3 KV heads, all 7 projections adapted) with
few layers and a small vocabulary, so that the adapted layers take about the share of the compute they take in the
30-layer, 49k-vocabulary model. ``--output`` writes the results as JSON (with the commit, machine and settings of the
run), the table as markdown and the plot as PNG beside it. On a machine that other jobs load, ``--threads 1`` keeps
the thread pool's waits, which then cost milliseconds per small op, out of the figures.

    python -m benchmarks.bench_task_scaling --threads 1 --output benchmarks/results/task-scaling-cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig
from peft_sparta.layer import sparta_layers

from .common import machine, markdown_table, report


SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Orthogonality weight of the penalty's timing (off by default; the paper design's weight).
PENALTY_WEIGHT = 0.5


def build(tasks: int, args) -> torch.nn.Module:
    """The SpaRTA model with ``tasks`` tasks, each task's prototypes learned from forwards of its own tokens."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SHAPE, num_hidden_layers=args.layers, vocab_size=args.vocab))
    config = SpaRTAConfig(
        r_shared=args.r_shared, r_task=args.r_task, target_modules=TARGETS, top_k=1, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    model.train()
    for task in range(tasks):
        if task:
            model.add_task(f"task_{task}")
        with torch.no_grad():
            for _ in range(args.prototype_batches):
                model(**task_batch(task, args))
    return model


def task_batch(task: int, args) -> dict:
    """Model inputs: random tokens from task ``task``'s slice of the vocabulary (the slices of 64 tasks tile it) and
    an attention mask, as a tokenizer gives (so that the adapter routes per sequence, its default for LMs)."""
    width = args.vocab // 64
    input_ids = torch.randint(task * width, (task + 1) * width, (args.batch, args.seq))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@contextmanager
def router_timer(model):
    """Accumulate, in the yielded list, the seconds spent in the routing context and every layer's router decision."""
    total = [0.0]
    owners = [model.base_model.routing_context] + [
        router for layer in sparta_layers(model) for router in layer.sparta_router.values()
    ]
    names = ["begin_forward"] + ["decide"] * (len(owners) - 1)

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start

        return wrapper

    for owner, name in zip(owners, names):
        object.__setattr__(owner, name, timed(getattr(owner, name)))
    try:
        yield total
    finally:
        for owner, name in zip(owners, names):
            object.__delattr__(owner, name)


class Case:
    """One task count: the model, its sizes, and the steps whose time is measured."""

    def __init__(self, tasks: int, args) -> None:
        self.tasks = tasks
        self.model = model = build(tasks, args)
        self.config = model.peft_config["default"]
        trainable = [p for p in model.parameters() if p.requires_grad]
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            file_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
        self.sizes = {
            "tasks": tasks,
            "trainable_params": sum(p.numel() for p in trainable),
            "stored_params": sum(value.numel() for value in get_peft_model_state_dict(model).values()),
            "file_bytes": file_bytes,
        }
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.train_batch = task_batch(tasks - 1, args)
        self.infer_batch = task_batch(0, args)
        self.times: dict[str, list[float]] = {"step_s": [], "step_penalty_s": [], "infer_s": [], "router_s": []}

    def train_step(self) -> None:
        self.model.train()
        self.model(**self.train_batch, labels=self.train_batch["input_ids"]).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer_step(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(**self.infer_batch)

    def run_round(self) -> None:
        """One timing of each step: the default training step, then with the orthogonality penalty on, the router's
        time in the first inference after them (which refreshes what the router derives from the prototypes the
        training steps moved), and the inference that follows, as a deployed adapter runs it."""
        self.times["step_s"].append(seconds(self.train_step))
        default, self.config.orth_lambda = self.config.orth_lambda, PENALTY_WEIGHT
        self.times["step_penalty_s"].append(seconds(self.train_step))
        self.config.orth_lambda = default
        with router_timer(self.model) as total:
            self.infer_step()
        self.times["router_s"].append(total[0])
        self.times["infer_s"].append(seconds(self.infer_step))

    def result(self) -> dict:
        return {**self.sizes, **{key: statistics.median(values) for key, values in self.times.items()}}


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(args) -> dict:
    """Every task count's sizes and median times; the timing rounds visit the task counts in turn, so that a change
    in the machine's load during the run falls on all of them alike."""
    cases = [Case(tasks, args) for tasks in tqdm(args.tasks, desc="building")]
    for _ in range(args.warmup):
        for case in cases:
            case.train_step()
            case.infer_step()
    for _ in tqdm(range(args.repeats), desc="timing rounds"):
        for case in cases:
            case.run_round()
    return {str(case.tasks): case.result() for case in cases}


def table(results: dict, args, load: tuple[float, float]) -> str:
    one = results["1"] if "1" in results else next(iter(results.values()))
    rows = []
    for value in results.values():
        rows.append(
            [
                value["tasks"],
                f"{value['trainable_params']:,}",
                f"{value['stored_params']:,}",
                f"{value['file_bytes'] / 1e6:.1f}",
                f"{value['step_s'] * 1000:.0f} ({value['step_s'] / one['step_s']:.2f}x)",
                f"{value['step_penalty_s'] * 1000:.0f} ({value['step_penalty_s'] / one['step_penalty_s']:.2f}x)",
                f"{value['infer_s'] * 1000:.0f} ({value['infer_s'] / one['infer_s']:.2f}x)",
                f"{value['router_s'] * 1000:.2f} ({value['router_s'] / value['infer_s']:.1%})",
            ]
        )
    header = ["tasks", "trainable params", "stored adapter params", "file (MB)", "train step ms (vs 1 task)",
              f"train step, orth_lambda={PENALTY_WEIGHT}, ms", "top_k=1 inference ms (vs 1 task)", "router ms after training (share)"]  # fmt: skip
    note = (
        f"Machine: {machine()}; {args.layers} layers of SmolLM2-135M's shape, vocabulary {args.vocab}; batch "
        f"{args.batch} x {args.seq} tokens; r_shared={args.r_shared}, r_task={args.r_task}, 7 projections adapted; "
        f"median of {args.repeats} rounds; load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end. "
        "The 1-task adapter trains its shared branch too and routes nothing (one task is the constant router)."
    )
    return note + "\n\n" + markdown_table(header, rows)


def plot(results: dict, path: Path) -> None:
    """Each cost as a ratio to one task, against the number of tasks (log scale), beside the 1.15x target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(results.values())
    tasks = [value["tasks"] for value in values]
    figure, (costs, sizes) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("step_s", "train step"), ("step_penalty_s", f"train step, orth_lambda={PENALTY_WEIGHT}"),
                       ("infer_s", "top_k=1 inference")):  # fmt: skip
        costs.plot(tasks, [value[key] / values[0][key] for value in values], marker="o", label=label)
    costs.axhline(1.15, color="grey", linestyle="--", label="target 1.15x")
    costs.set_xscale("log", base=2)
    costs.set_xticks(tasks, [str(t) for t in tasks])
    costs.set_xlabel("tasks")
    costs.set_ylabel(f"time / time at {tasks[0]} task(s)")
    costs.legend(fontsize=7)
    costs.set_title("Time per step", fontsize=9)
    sizes.plot(
        tasks, [value["stored_params"] / 1e6 for value in values], marker="o", label="stored adapter params (M)"
    )
    sizes.plot(tasks, [value["file_bytes"] / 1e6 for value in values], marker="o", label="adapter file (MB)")
    sizes.plot(tasks, [value["trainable_params"] / 1e6 for value in values], marker="o", label="trainable params (M)")
    sizes.plot(tasks, [value["router_s"] * 1e3 for value in values], marker="o", label="router time per forward (ms)")
    sizes.set_xscale("log", base=2)
    sizes.set_yscale("log")
    sizes.set_xticks(tasks, [str(t) for t in tasks])
    sizes.set_xlabel("tasks")
    sizes.legend(fontsize=7)
    sizes.set_title("Size and router time", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r-shared", type=int, default=8)
    parser.add_argument("--r-task", type=int, default=32)
    parser.add_argument("--prototype-batches", type=int, default=1, help="training-mode forwards per task")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--output", type=Path, default=None, help="write the results here as JSON, the table as .md, the plot as .png"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = os.getloadavg()[0]
    results = measure(args)
    load = (start, os.getloadavg()[0])
    report(args, "Cost as tasks accumulate: one SpaRTA adapter at 1 to 64 tasks", results, table(results, args, load))
    if args.output:
        plot(results, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
