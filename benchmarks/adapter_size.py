"""Size of a saved SpaRTA adapter and of its router state, SmolLM2-135M shape (30 layers, 7 projections adapted).

The router state under sequence routing (prototypes and counts, and since format version 5 the query spread) is
stored once per adapter since format version 3; versions 1-2 stored an identical copy of the prototypes and counts
in every adapted layer. The table gives the measured file size and router state and, for comparison, what the
per-layer copies would add (the measured bytes of prototypes and counts times the other adapted layers).
A randomly initialised model of the real shape is used: sizes do not depend on the weights.

    python -m benchmarks.adapter_size --out benchmarks/results/adapter-size
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig

from .common import markdown_table, write_results


SMOLLM2_135M = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure(tasks: int) -> dict:
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), SpaRTAConfig(target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    for index in range(1, tasks):
        model.add_task(f"task_{index}")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        path = Path(folder) / "adapter_model.safetensors"
        weights = load_file(path)
        file_bytes = path.stat().st_size
    router = {k: v.numel() * v.element_size() for k, v in weights.items() if ".sparta_router." in k}
    copied_bytes = sum(size for key, size in router.items() if key.endswith((".prototypes", ".counts")))
    layers = len({k.split(".sparta_A_shared")[0] for k in weights if k.endswith("sparta_A_shared")})
    per_layer_bytes = file_bytes + (layers - 1) * copied_bytes
    return {
        "tasks": tasks,
        "adapted_layers": layers,
        "file_mb": file_bytes / 1e6,
        "router_state_mb": sum(router.values()) / 1e6,
        "per_layer_layout_mb": per_layer_bytes / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 16])
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    rows = [measure(tasks) for tasks in args.tasks]
    header = ["tasks", "adapted layers", "file (MB)", "router state (MB)", "per-layer copies, format <= 2 (MB)"]
    table = markdown_table(
        header,
        [
            [
                r["tasks"],
                r["adapted_layers"],
                f"{r['file_mb']:.1f}",
                f"{r['router_state_mb']:.2f}",
                f"{r['per_layer_layout_mb']:.1f}",
            ]
            for r in rows
        ],
    )
    print(table)
    if args.out:
        settings = {"tasks": args.tasks, "targets": TARGETS, **SMOLLM2_135M}
        write_results(args.out, "Saved adapter size, SmolLM2-135M shape", rows, table, settings)


if __name__ == "__main__":
    main()
