"""The README's recipes (examples/recipes.py) run as written, on a tiny Llama with a word-level chat tokenizer."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from examples import recipes
from peft_sparta.continual import RoutingRecorder
from tests.helpers import ANSWERS, OTHER_PROMPTS, PROMPTS, chat_llama, chat_sparta_model, chat_tokenizer


FAST = {
    "use_cpu": True, "bf16": False, "max_length": 32, "per_device_train_batch_size": 4, "learning_rate": 2e-2,
    "disable_tqdm": True, "seed": 0, "logging_steps": 2,
}  # fmt: skip


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_chat_training_resume_and_abstain_calibration(tmp_path):
    pytest.importorskip("trl")
    tok = chat_tokenizer()
    model = chat_sparta_model(len(tok))  # task_0 seen, "add" current
    pairs = [(prompt + " =", answer) for prompt, answer in zip(PROMPTS, ANSWERS)]
    trainer = recipes.train_chat_task(model, tok, pairs, str(tmp_path / "run"), steps=8, **FAST)
    penalties = [entry["sparta/orthogonality"] for entry in trainer.state.log_history if "loss" in entry]
    assert penalties and penalties[-1] < penalties[0]
    model.save_pretrained(tmp_path / "two")
    earlier = {name: p.detach().clone() for name, p in model.named_parameters() if "sparta_" in name}

    repeat = [(prompt, prompt.split()[-1]) for prompt in OTHER_PROMPTS]
    resumed = recipes.resume_sequence(
        chat_llama(len(tok)), str(tmp_path / "two"), "repeat",
        lambda m: recipes.train_chat_task(m, tok, repeat, str(tmp_path / "run"), steps=4, **FAST),
        str(tmp_path / "three"),
    )  # fmt: skip
    assert resumed.task_names == ["task_0", "add", "repeat"]
    now = dict(resumed.named_parameters())
    for name in (n for n in earlier if "sparta_A_task" in n or "sparta_B_task" in n):
        assert torch.equal(now[name], earlier[name]), f"{name} of an earlier task changed"
    ids = tok("add 1 and 2 =", return_tensors="pt")["input_ids"]
    reloaded = PeftModel.from_pretrained(chat_llama(len(tok)), str(tmp_path / "three"))
    assert torch.equal(logits(reloaded, ids), logits(resumed, ids))

    task_prompts = ["add 5 and 3 =", "repeat the word sun"]
    unrelated = ["zebra quill yak", "violin harbour", "marble oak tundra"]  # words outside the vocabulary
    threshold = recipes.calibrate_chat_abstain_threshold(resumed, tok, task_prompts, unrelated)
    assert threshold is not None
    resumed.peft_config["default"].router_abstain_threshold = threshold
    with RoutingRecorder(resumed) as recorder, torch.no_grad():
        for batch in recipes.chat_inputs(tok, task_prompts + unrelated):
            resumed(**batch)
    gates = recorder.take()
    assert (gates[: len(task_prompts)].sum(dim=-1) > 0.99).all() and (gates[len(task_prompts) :] == 0).all()
    assert recipes.calibrate_chat_abstain_threshold(resumed, tok, task_prompts, task_prompts) is None
