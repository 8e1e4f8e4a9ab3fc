"""Training step of a whole Llama-shaped model: PEFT LoRA vs SpaRTA eager vs SpaRTA fused, side by side.

LoRA gets the same total trainable rank as SpaRTA (r_shared + r_task). SpaRTA carries 1, 4 or 16 tasks (the last one
training). Reports step time (forward + backward), tokens/s and peak memory (CUDA allocator peak; on CPU the bytes
autograd saves for backward), each also as a ratio to LoRA measured in the same run, and the inference cost with
top_k=1 at many tasks relative to one task. All models of a shape are built first and timed in turns, one step each
per round, so that a shared machine's drift does not bias the ratios. ``--output`` writes the results as JSON (with the commit, machine and
settings of the run) and the table as markdown beside it.

    python -m benchmarks.bench_train_step --shape smollm --output benchmarks/results/train-step-smollm-cpu.json
    python -m benchmarks.bench_train_step --shape 1b --layers 2      # a 1B-class layer shape, fewer layers on CPU
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig

from .common import add_train_step_arguments, interleaved_medians, machine, markdown_table, peak_memory_bytes, report


SHAPES = {
    "smollm": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "vocab_size": 49152},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000},
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, layers: int | None, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = dict(SHAPES[shape])
    if layers is not None:
        config["num_hidden_layers"] = layers
    return LlamaForCausalLM(LlamaConfig(**config)).to(device=device, dtype=dtype)


def wrap(base, method: str, tasks: int, args) -> torch.nn.Module:
    if method == "lora":
        return get_peft_model(base, LoraConfig(r=args.r_shared + args.r_task, target_modules=TARGETS))
    backend = "eager" if method == "sparta-eager" else None
    config = SpaRTAConfig(
        r_shared=args.r_shared, r_task=args.r_task, target_modules=TARGETS, kernel_backend=backend, top_k=1
    )
    model = get_peft_model(base, config)
    for index in range(1, tasks):
        model.add_task(f"task_{index}")
    return model


def measure(models: dict, batch: torch.Tensor, device: torch.device, args) -> dict:
    """Step time, tokens/s, peak memory and top_k=1 inference time of every model, the times taken in turns (see
    `interleaved_medians`)."""

    def train_step(model):
        def step():
            model.train()
            model(input_ids=batch, labels=batch).loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    def infer_step(model):
        def step():
            model.eval()
            with torch.no_grad():
                model(input_ids=batch)

        return step

    steps = interleaved_medians({key: train_step(m) for key, m in models.items()}, device, args.warmup, args.repeats)
    infers = interleaved_medians({key: infer_step(m) for key, m in models.items()}, device, args.warmup, args.repeats)
    return {
        key: {
            "step_s": steps[key],
            "tokens_per_s": batch.numel() / steps[key],
            "peak_bytes": peak_memory_bytes(train_step(model), device, model),
            "infer_s": infers[key],
        }
        for key, model in models.items()
    }


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {}
    for shape in args.shape:
        batch = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.seq), device=device)
        cases = [("lora", 1)] + [(m, t) for t in args.tasks for m in ("sparta-eager", "sparta-fused")]
        models = {
            f"{shape}/{method}/{tasks}": wrap(build(shape, args.layers, dtype, device), method, tasks, args)
            for method, tasks in tqdm(cases, desc=f"{shape} shape: building")
        }
        results.update(measure(models, batch, device, args))
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results: dict, args) -> str:
    rows = []
    for key, value in results.items():
        shape, method, tasks = key.split("/")
        lora = results[f"{shape}/lora/1"]
        one_task = results.get(f"{shape}/{method}/1", value)
        rows.append(
            [
                shape,
                method,
                tasks,
                f"{value['step_s'] * 1000:.1f}",
                f"{value['step_s'] / lora['step_s']:.2f}x",
                f"{value['tokens_per_s']:.0f}",
                f"{value['peak_bytes'] / 2**20:.0f}",
                f"{value['peak_bytes'] / lora['peak_bytes']:.2f}x",
                f"{value['infer_s'] / one_task['infer_s']:.2f}x",
            ]
        )
    header = ["shape", "method", "tasks", "step ms", "time vs LoRA", "tokens/s", "peak MiB", "memory vs LoRA",
              "inference vs 1 task (top_k=1)"]  # fmt: skip
    layers = f", {args.layers} layers" if args.layers else ""
    note = f"Machine: {machine()}; batch {args.batch} x {args.seq} tokens{layers}; r_shared={args.r_shared}, "
    note += f"r_task={args.r_task}, LoRA r={args.r_shared + args.r_task}; all 7 projections adapted."
    return note + "\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["smollm"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 4, 16])
    add_train_step_arguments(parser)
    args = parser.parse_args()
    results = run(args)
    report(args, "Training step of a whole model: LoRA vs SpaRTA", results, table(results, args))


if __name__ == "__main__":
    main()
