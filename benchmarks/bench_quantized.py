"""Training step on a 4-bit (NF4) base: SpaRTA vs PEFT LoRA on the same quantized base, and both on the float base.

The Llama-shaped model of `bench_train_step` is saved once and loaded unquantized and through
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``, each prepared
as a QLoRA user prepares it on the 4-bit base (`prepare_model_for_kbit_training`, gradient checkpointing off so that
every model does the same work). LoRA gets the same total rank as SpaRTA (r_shared + r_task). Reports the step time
(forward + backward, timed in turns as `bench_train_step` does), the model's memory (weights and buffers, what 4-bit
loading shrinks) and the activations autograd saves for backward (CUDA: the allocator's peak instead), each also as a
ratio to LoRA on the same base. Only training steps run: on a CPU, bitsandbytes repacks a 4-bit weight at its first
inference forward, which changes the kernel later steps use.

    python -m benchmarks.bench_quantized --layers 4 --output benchmarks/results/quantized-train-step-cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from tqdm import tqdm
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig

from .bench_train_step import SHAPES, TARGETS, build
from .common import add_train_step_arguments, interleaved_medians, machine, markdown_table, peak_memory_bytes, report


BASES = ("float", "nf4")


def load(path: Path, base: str, device: torch.device) -> torch.nn.Module:
    if base == "float":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map=device.type)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def wrap(model: torch.nn.Module, method: str, args) -> torch.nn.Module:
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=args.r_shared + args.r_task, target_modules=TARGETS))
    return get_peft_model(model, SpaRTAConfig(r_shared=args.r_shared, r_task=args.r_task, target_modules=TARGETS))


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run(args) -> dict:
    device = torch.device(args.device)
    batch = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=device)
    with tempfile.TemporaryDirectory() as saved:
        build(args.shape, args.layers, torch.float32, torch.device("cpu")).save_pretrained(saved)
        cases = [(base, method) for base in BASES for method in ("lora", "sparta")]
        models = {
            f"{base}/{method}": wrap(load(Path(saved), base, device), method, args)
            for base, method in tqdm(cases, desc="building")
        }

    def train_step(model):
        def step():
            model.train()
            model(input_ids=batch, labels=batch).loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    steps = interleaved_medians({key: train_step(m) for key, m in models.items()}, device, args.warmup, args.repeats)
    return {
        key: {
            "step_s": steps[key],
            "tokens_per_s": batch.numel() / steps[key],
            "model_bytes": model_bytes(model),
            "peak_bytes": peak_memory_bytes(train_step(model), device, model),
        }
        for key, model in models.items()
    }


def table(results: dict, args) -> str:
    rows = []
    for key, value in results.items():
        base, method = key.split("/")
        lora = results[f"{base}/lora"]
        rows.append(
            [
                base,
                method,
                f"{value['step_s'] * 1000:.0f}",
                f"{value['step_s'] / lora['step_s']:.2f}x",
                f"{value['step_s'] / results[f'float/{method}']['step_s']:.2f}x",
                f"{value['model_bytes'] / 2**20:.0f}",
                f"{value['peak_bytes'] / 2**20:.0f}",
                f"{value['peak_bytes'] / lora['peak_bytes']:.2f}x",
            ]
        )
    header = ["base", "method", "step ms", "time vs LoRA (same base)", "time vs float base", "model MiB",
              "saved activations MiB" if args.device == "cpu" else "peak MiB", "vs LoRA"]  # fmt: skip
    layers = f", {args.layers} layers" if args.layers else ""
    note = f"Machine: {machine()}; shape {args.shape}{layers}; batch {args.batch} x {args.seq} tokens; "
    note += f"r_shared={args.r_shared}, r_task={args.r_task}, LoRA r={args.r_shared + args.r_task}; all 7 projections "
    note += "adapted; 1 task; nf4 = bitsandbytes NF4 with double quantization."
    return note + "\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm")
    add_train_step_arguments(parser)
    args = parser.parse_args()
    results = run(args)
    report(args, "Training step on a 4-bit base: SpaRTA vs LoRA, and vs the float base", results, table(results, args))


if __name__ == "__main__":
    main()
