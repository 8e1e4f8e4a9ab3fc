"""Helpers that test modules share, as a test module never imports another: the chat data, tokenizer and models of
the Trainer tests, a short training loop and a trained three-task model. Fixtures and the tiny models: conftest.py."""

from __future__ import annotations

import torch
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from peft_sparta import SpaRTAConfig
from tests.conftest import Rows, tiny_llama


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def train_steps(model, input_ids, steps=3, lr=1e-2, labels=None):
    """``steps`` AdamW steps of ``model`` on one batch (labels: the inputs unless given); leaves it in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids if labels is None else labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def three_task_model(dtype=torch.float32, **kwargs):
    """SpaRTA on `tiny_llama` with tasks "a", "b" and "c", each trained two steps on its own vocabulary slice."""
    config = SpaRTAConfig(target_modules=LLAMA_TARGETS, r_shared=2, r_task=4, task_names=["a"], **kwargs)
    model = get_peft_model(tiny_llama(dtype=dtype), config)
    generator = torch.Generator().manual_seed(5)
    for index, name in enumerate(["a", "b", "c"]):
        if index:
            model.add_task(name)
        batch = torch.randint(index * 30, index * 30 + 30, (3, 8), generator=generator)
        train_steps(model, batch, steps=2)
    return model


# ---- the Trainer tests' chat data, tokenizer and models ------------------------------------------------------


PROMPTS = [f"add {a} and {b}" for a in range(6) for b in range(4)]
ANSWERS = [str(a + b) for a in range(6) for b in range(4)]
OTHER_PROMPTS = [f"repeat the word {w}" for w in ("red", "blue", "green", "cat", "dog", "sun")]


#: a chat template with the `{% generation %}` markers TRL needs for ``assistant_only_loss``
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} [EOS] {% endgeneration %}"
    "{% else %}{{ message['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the chat data's words, with `CHAT_TEMPLATE`."""
    words = {w for text in PROMPTS + ANSWERS + OTHER_PROMPTS for w in text.split()}
    words = sorted(words | {"=", "is", "user", "assistant", ":"})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_llama(vocab_size: int) -> LlamaForCausalLM:
    """A tiny random Llama for `chat_tokenizer` (its vocabulary size, pad id 0, EOS id 2)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def chat_sparta_model(vocab_size: int, router: str = "prototype"):
    """SpaRTA on `chat_llama` with a first task seen (its router state built from `OTHER_PROMPTS`) and task "add"
    current, the orthogonality penalty on."""
    config = SpaRTAConfig(
        r_shared=2,
        r_task=4,
        target_modules=["q_proj", "v_proj", "up_proj"],
        task_type="CAUSAL_LM",
        router=router,
        orth_lambda=0.5,  # off by default; these tests check how the penalty is weighed and logged
    )
    model = get_peft_model(chat_llama(vocab_size), config)
    # a first task: its branch frozen with a router state built from other inputs, so that both regularizers and a
    # two-task router are exercised by the second task's training
    tok = chat_tokenizer()
    model.train()
    with torch.no_grad():
        for prompt in OTHER_PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            model(input_ids=ids, labels=ids)
    model.add_task("add")
    return model


def completion_rows(tok) -> list[dict]:
    """Equal-length rows (no collator needed): prompt, answer, EOS; labels -100 on the prompt."""
    rows = []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        prompt_ids = tok(prompt + " =")["input_ids"]
        answer_ids = tok(answer)["input_ids"] + [tok.eos_token_id]
        ids = prompt_ids + answer_ids
        rows.append(
            {
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor([-100] * len(prompt_ids) + answer_ids),
            }
        )
    return rows


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 16,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2e-2,
        "logging_steps": 4,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "lr_scheduler_type": "constant",
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


#: rows of one effective batch in the gradient-equivalence tests
ROWS = 8


def first_step_gradients(tmp_path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    """The adapter's gradients at the Trainer's first optimizer step, for one effective batch of 8 rows."""
    tok = chat_tokenizer()
    model = chat_sparta_model(len(tok))
    for config in model.peft_config.values():
        config.orth_lambda = 50.0  # the penalty dominates, so a wrong weight shows
    grads = {}

    def capture(optimizer, args, kwargs):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    handle = register_optimizer_step_pre_hook(capture)
    try:
        args = training_args(
            tmp_path, max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=Rows(completion_rows(tok)[:ROWS])).train()
    finally:
        handle.remove()
    return grads
