"""SpaRTA under the Hugging Face Trainer and TRL's SFTTrainer, no subclass, with SpaRTACallback logging."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

import peft_sparta  # noqa: F401
from peft_sparta.trainer import SpaRTACallback
from tests.conftest import Rows
from tests.helpers import (
    ANSWERS,
    PROMPTS,
    chat_sparta_model,
    chat_tokenizer,
    completion_rows,
    first_step_gradients,
    training_args,
)


def train_logs(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "loss" in entry]


def check_logs(history: list[dict], router: str = "prototype") -> None:
    logs = train_logs(history)
    assert len(logs) >= 3
    assert logs[-1]["loss"] < logs[0]["loss"], [entry["loss"] for entry in logs]
    # the trainer trains the penalty, whatever loss it computes: it falls from the first log to the last
    assert logs[-1]["sparta/orthogonality"] < 0.5 * logs[0]["sparta/orthogonality"]
    for entry in logs:
        assert entry["sparta/orthogonality"] > 0
        assert entry["sparta/gate/task_0"] + entry["sparta/gate/add"] == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= entry["sparta/routed_to_current"] <= 1.0
        if router == "learned":
            assert entry["sparta/router"] > 0
    # the router sends the current task's inputs to its own branch once its state is built
    assert logs[-1]["sparta/routed_to_current"] == 1.0


@pytest.mark.parametrize("router", ["prototype", "learned"])
def test_trainer_with_gradient_accumulation_logs_regularizers_and_gates(tmp_path, router):
    tok = chat_tokenizer()
    model = chat_sparta_model(len(tok), router=router)
    rows = completion_rows(tok)
    args = training_args(tmp_path, eval_strategy="steps", eval_steps=8, per_device_eval_batch_size=8)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows), eval_dataset=Rows(rows[:8]))
    SpaRTACallback.attach(trainer)
    trainer.train()
    check_logs(trainer.state.log_history, router)
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evals and all("eval_sparta/gate/add" in entry for entry in evals)
    assert evals[-1]["eval_sparta/gate/add"] > 0.5


def test_callback_values_reach_other_callbacks_through_on_log(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    tok = chat_tokenizer()
    model = chat_sparta_model(len(tok))
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=4, gradient_accumulation_steps=1, logging_steps=2),
        train_dataset=Rows(completion_rows(tok)), callbacks=[SpaRTACallback(), Spy()],
    )  # fmt: skip
    trainer.train()
    assert any("sparta/orthogonality" in logs for logs in seen)


def run_sft(tmp_path, kernel_backend=None, conversational=False, **overrides):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tok = chat_tokenizer()
    model = chat_sparta_model(len(tok))
    if kernel_backend is not None:
        for config in model.peft_config.values():
            config.kernel_backend = kernel_backend
    if conversational:
        messages = [
            [{"role": "user", "content": p + " ="}, {"role": "assistant", "content": a}]
            for p, a in zip(PROMPTS, ANSWERS)
        ]
        data = datasets.Dataset.from_dict({"messages": messages})
        overrides = {"assistant_only_loss": True, **overrides}
    else:
        data = datasets.Dataset.from_dict(
            {"prompt": [p + " =" for p in PROMPTS], "completion": [" " + a for a in ANSWERS]}
        )
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=16, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=2e-2, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, lr_scheduler_type="constant", max_length=32, **overrides,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[SpaRTACallback()]
    )
    trainer.train()
    return trainer


def test_trl_sft_trainer_prompt_completion(tmp_path):
    # fp32: see the bf16 cases below
    check_logs(run_sft(tmp_path, bf16=False).state.log_history)


def test_trl_sft_trainer_conversational_assistant_only_loss(tmp_path):
    check_logs(run_sft(tmp_path, conversational=True, bf16=False).state.log_history)


def test_trl_sft_trainer_bf16_autocast_eager_backend(tmp_path):
    # SFTConfig turns bf16 autocast on by default (also on CPU)
    check_logs(run_sft(tmp_path, kernel_backend="eager").state.log_history)


def test_trl_sft_trainer_bf16_autocast_fused_backend(tmp_path):
    check_logs(run_sft(tmp_path).state.log_history)


def test_gradient_accumulation_does_not_change_the_gradient(tmp_path):
    """bs 8 x ga 1 and bs 2 x ga 4 train the same objective, orthogonality penalty included (the callback that sets
    its weight per step is added by `import peft_sparta`, not by the test)."""
    whole = first_step_gradients(tmp_path / "a", batch_size=8, accumulation=1)
    accumulated = first_step_gradients(tmp_path / "b", batch_size=2, accumulation=4)
    assert whole.keys() == accumulated.keys() and any("sparta_A_task" in name for name in whole)
    for name in whole:
        assert torch.allclose(whole[name], accumulated[name], rtol=1e-4, atol=1e-6), name
