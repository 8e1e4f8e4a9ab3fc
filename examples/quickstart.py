"""Quickstart: two tasks in sequence with SpaRTA on SmolLM2-135M-Instruct, offline, on CPU in a few minutes.

Trains task "spell" (digits to English words) and then task "plural" (noun to plural) with the HF Trainer, saves
the adapter, reloads it into a fresh base model and generates for prompts of both tasks with no task id: the router
picks the branch from the prompt.

    python -m examples.quickstart [--steps 30] [--output-dir sparta-quickstart]
"""

from __future__ import annotations

import argparse
import random

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import peft_sparta  # noqa: F401  (registers the SPARTA peft type: import it before loading an adapter)
from benchmarks.offline import load_smollm2
from peft_sparta import SpaRTAConfig


NUMBERS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen",
]  # fmt: skip
NOUNS = {
    "cat": "cats", "box": "boxes", "city": "cities", "child": "children", "mouse": "mice", "leaf": "leaves",
    "bus": "buses", "baby": "babies", "foot": "feet", "wolf": "wolves", "story": "stories", "dish": "dishes",
    "tooth": "teeth", "party": "parties", "knife": "knives", "fox": "foxes",
}  # fmt: skip
TASKS = {
    "spell": [(f"Write the number {i} in words.", word) for i, word in enumerate(NUMBERS)],
    "plural": [(f"What is the plural of '{noun}'?", plural) for noun, plural in NOUNS.items()],
}


def encode(tokenizer, prompt: str, answer: str | None = None) -> dict[str, list[int]]:
    """Chat-formatted prompt; with an answer, labels cover the answer only (-100 on the prompt), which is also what
    the router builds its prototypes from."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if answer is None:
        return {"input_ids": prompt_ids}
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)

    def pad(values, fill):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values])

    ids = [f["input_ids"] for f in features]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(v) for v in ids], 0),
        "labels": pad([f["labels"] for f in features], -100),
    }


def train_task(model, tokenizer, examples, steps: int, output_dir: str) -> None:
    data = [encode(tokenizer, prompt, answer) for prompt, answer in examples]
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=lambda f: collate(f, tokenizer.pad_token_id)
    )
    trainer.train()


def generate(model, tokenizer, prompt: str) -> str:
    ids = torch.tensor([encode(tokenizer, prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per task")
    parser.add_argument("--output-dir", default="sparta-quickstart", help="where the adapter is saved")
    args = parser.parse_args()
    random.seed(0)
    torch.manual_seed(0)

    base, tokenizer = load_smollm2()
    config = SpaRTAConfig(
        r_shared=8,
        r_task=16,
        alpha_task=32,  # scale alpha / r = 2, as the defaults and the benchmarks
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_names=["spell"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    for index, (task, examples) in enumerate(TASKS.items()):
        if index:
            model.add_task(task)
        print(f"--- training task {task!r} (tasks so far: {model.task_names})")
        train_task(model, tokenizer, examples, args.steps, args.output_dir)
    model.save_pretrained(args.output_dir)

    fresh_base, _ = load_smollm2()
    loaded = PeftModel.from_pretrained(fresh_base, args.output_dir)
    loaded.eval()
    print(f"--- reloaded from {args.output_dir}: tasks {loaded.task_names}; the router picks the branch")
    for prompt in ["Write the number 7 in words.", "What is the plural of 'wolf'?", "What is the plural of 'box'?"]:
        print(f"{prompt!r} -> {generate(loaded, tokenizer, prompt)!r}")


if __name__ == "__main__":
    main()
