"""One adapted linear layer: PEFT LoRA vs SpaRTA eager vs SpaRTA fused, forward + backward, side by side.

Layer shapes of SmolLM2-135M (576 -> 1536, 1536 -> 576) and of a 1B-class model (2048 -> 8192, 8192 -> 2048), with
1, 4 and 16 tasks (the last one training; frozen task branches get no gradient). Also the inference forward with
top_k=1 routing, whose cost must not grow with the number of tasks. ``--output`` writes the results as JSON (with the
commit, machine and settings of the run) and the table as markdown beside it.

    python -m benchmarks.bench_layers --tokens 1024 --output benchmarks/results/layers-cpu.json
    python -m benchmarks.bench_layers --shapes 576x1536 --tasks 1 --tokens 16 --warmup 0 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm import tqdm

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig

from .common import interleaved_medians, machine, markdown_table, peak_memory_bytes, report


SHAPES = {"576x1536": (576, 1536), "1536x576": (1536, 576), "2048x8192": (2048, 8192), "8192x2048": (8192, 2048)}


class OneLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x):
        return self.proj(x)


def wrap(shape, method: str, tasks: int, args, dtype, device) -> nn.Module:
    torch.manual_seed(0)
    base = OneLayer(*shape).to(device=device, dtype=dtype)
    if method == "lora":
        return get_peft_model(base, LoraConfig(r=args.r_shared + args.r_task, target_modules=["proj"]))
    backend = "eager" if method == "sparta-eager" else None
    # token routing: a lone layer has no input embeddings to build a sequence query from
    config = SpaRTAConfig(
        r_shared=args.r_shared,
        r_task=args.r_task,
        target_modules=["proj"],
        kernel_backend=backend,
        top_k=1,
        router_granularity="token",
        orth_lambda=0.0,
    )
    model = get_peft_model(base, config)
    for index in range(1, tasks):
        model.add_task(f"task_{index}")
    return model


def measure(models: dict, x: torch.Tensor, device, args) -> dict:
    """Step time, peak memory and inference time of every model on input ``x``, the times taken in turns (see
    `interleaved_medians`)."""

    def train_step(model, x):
        def step():
            model.train()
            model(x).float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
            x.grad = None

        return step

    def infer_step(model, x):
        def step():
            model.eval()
            with torch.no_grad():
                model(x)

        return step

    trains = {key: train_step(model, x) for key, model in models.items()}
    steps = interleaved_medians(trains, device, args.warmup, args.repeats)
    infers = {key: infer_step(model, x) for key, model in models.items()}
    infer_times = interleaved_medians(infers, device, args.warmup, args.repeats)
    return {
        key: {
            "step_s": steps[key],
            "peak_bytes": peak_memory_bytes(trains[key], device, model),
            "infer_s": infer_times[key],
        }
        for key, model in models.items()
    }


def run(args) -> dict:
    """Results keyed "<in>x<out>/<method>/<tasks>"; the models of one layer shape are timed in turns."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    methods = [("lora", 1)] + [(m, t) for t in args.tasks for m in ("sparta-eager", "sparta-fused")]
    results = {}
    for name in tqdm(args.shapes, desc="layer shapes"):
        shape = SHAPES[name]
        x = torch.randn(args.tokens, shape[0], device=device, dtype=dtype, requires_grad=True)
        models = {
            f"{name}/{method}/{tasks}": wrap(shape, method, tasks, args, dtype, device) for method, tasks in methods
        }
        results.update(measure(models, x, device, args))
    return results


def table(results: dict, args) -> str:
    rows = []
    for key, value in results.items():
        name, method, tasks = key.split("/")
        lora = results[f"{name}/lora/1"]
        one_task = results.get(f"{name}/{method}/1")
        rows.append(
            [
                name.replace("x", "->"),
                method,
                tasks,
                f"{value['step_s'] * 1000:.2f}",
                f"{value['step_s'] / lora['step_s']:.2f}x",
                f"{value['peak_bytes'] / 2**20:.1f}",
                f"{value['peak_bytes'] / lora['peak_bytes']:.2f}x",
                f"{value['infer_s'] / one_task['infer_s']:.2f}x" if one_task else "—",
            ]
        )
    header = ["layer", "method", "tasks", "fwd+bwd ms", "time vs LoRA", "peak MiB", "memory vs LoRA",
              "inference vs 1 task (top_k=1)"]  # fmt: skip
    note = f"Machine: {machine()}; {args.tokens} tokens; r_shared={args.r_shared}, r_task={args.r_task}, LoRA r="
    note += f"{args.r_shared + args.r_task}; median of {args.repeats} after {args.warmup} warm-up calls."
    return note + "\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="in x out features")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--r-shared", type=int, default=8)
    parser.add_argument("--r-task", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output", type=Path, default=None, help="write the results here as JSON, and the table beside it as .md"
    )
    args = parser.parse_args()
    results = run(args)
    report(args, "One adapted layer: LoRA vs SpaRTA", results, table(results, args))


if __name__ == "__main__":
    main()
