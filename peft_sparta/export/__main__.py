"""``python -m peft_sparta.export SRC OUT``: export a saved SpaRTA adapter as plain LoRA adapters (see
`peft_sparta.export`) and print what was written. The adapter is loaded into its base model on the CPU, in the base
model's saved dtype."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import transformers
from peft import PeftModel

from ..config import SpaRTAConfig
from ..layer import sparta_layers
from . import SHARED_ONLY_FOLDER, WEIGHTS_NAME, check_exportable_config


#: The transformers class that loads the base model of each PEFT task type.
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peft_sparta.export",
        description="Export each task of a saved SpaRTA adapter as a plain PEFT LoRA adapter (one folder per task, "
        f"plus {SHARED_ONLY_FOLDER}/ for inputs the router abstains on), for vLLM, TGI, LoRAX, SGLang or PEFT.",
    )
    parser.add_argument("source", help="folder (or Hub id) of the saved SpaRTA adapter")
    parser.add_argument("output", help="new or empty folder to write the LoRA adapters to")
    parser.add_argument("--tasks", nargs="+", help="tasks to export (default: every task)")
    parser.add_argument(
        "--base-model", help="base model to load the adapter into (default: the adapter's base_model_name_or_path)"
    )
    args = parser.parse_args(argv)

    config = SpaRTAConfig.from_pretrained(args.source)
    check_exportable_config(config)  # before loading the base model
    base_name = args.base_model or config.base_model_name_or_path
    if not base_name:
        parser.error("the adapter's config names no base model; pass --base-model")
    base = base_model_class(config, base_name).from_pretrained(base_name, dtype="auto", revision=config.revision)
    model = PeftModel.from_pretrained(base, args.source)
    written = model.export_lora(args.output, tasks=args.tasks, progressbar=True)
    print(export_summary(written, model.peft_config[model.active_adapter], len(sparta_layers(model))))
    return 0


def base_model_class(config: SpaRTAConfig, base_name: str) -> type:
    """The transformers class of the adapter's task type; without a task type, the base model's saved class."""
    if config.task_type in AUTO_CLASSES:
        return getattr(transformers, AUTO_CLASSES[config.task_type])
    architectures = transformers.AutoConfig.from_pretrained(base_name, revision=config.revision).architectures
    return getattr(transformers, architectures[0]) if architectures else transformers.AutoModel


def export_summary(written: dict[Optional[str], str], config: SpaRTAConfig, module_count: int) -> str:
    """What `export_lora` wrote, and the rank an engine must accept to serve it."""
    rank = config.r_shared + config.r_task
    base = config.base_model_name_or_path
    lines = [f"Wrote {len(written)} LoRA adapters of base model {base} ({module_count} modules each):"]
    for name, path in written.items():
        size = os.path.getsize(os.path.join(path, WEIGHTS_NAME)) / 2**20
        if name is not None:
            what = f"task {name!r}, rank {rank}"
        else:
            what = f"shared branch only, rank {config.r_shared}" if config.r_shared else "no shared branch: zeros"
        lines.append(f"  {path}  ({what}, {size:.2f} MiB)")
    lines.append(
        f"Serve them with max_lora_rank >= {rank} (vLLM) and route each request with "
        "peft_sparta.TaskRouter.from_pretrained(<the SpaRTA adapter>, embeddings=...): a task name picks that "
        f"task's folder, None picks {SHARED_ONLY_FOLDER}/."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
