"""SpaRTA on the offline real models: wrap, train a few Trainer steps, save, reload, same outputs."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_sparta import SpaRTAConfig
from tests.conftest import Rows, minilm, smollm2


pytestmark = pytest.mark.slow


def _train(model, rows, tmp_path, steps=3):
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Rows(rows)).train()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_smollm2_trainer_save_reload(tmp_path):
    base, tokenizer = smollm2()
    config = SpaRTAConfig(r_shared=4, r_task=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    ids = tokenizer(["The capital of France is Paris."] * 4, return_tensors="pt")["input_ids"]
    rows = [{"input_ids": row, "labels": row} for row in ids]
    before = _snapshot(model)
    _train(model, rows, tmp_path)
    after = _snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids[:2]).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = smollm2()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids[:2]).logits, expected)


class _MeanPooledRegression(torch.nn.Module):
    """A tiny regression head over the encoder, so that the Trainer has a loss to optimise."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden.mean(dim=1)
        return {"loss": torch.nn.functional.mse_loss(pooled[:, 0], labels)}


def test_minilm_trainer_save_reload(tmp_path):
    base, tokenizer = minilm()
    config = SpaRTAConfig(r_shared=4, r_task=8, target_modules=["query", "value"], task_names=["first"])
    model = get_peft_model(base, config)
    encoded = tokenizer(["a happy day", "a sad day", "great news", "bad news"], padding=True, return_tensors="pt")
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": torch.tensor(float(k % 2))}
        for k, (i, m) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"]))
    ]
    before = _snapshot(model)
    _train(_MeanPooledRegression(model), rows, tmp_path)
    assert any(not torch.equal(before[n], p) for n, p in _snapshot(model).items())
    model.add_task("second")
    model.eval()
    with torch.no_grad():
        expected = model(**encoded).last_hidden_state
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = minilm()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    loaded.eval()
    assert loaded.task_names == ["first", "second"]
    with torch.no_grad():
        assert torch.equal(loaded(**encoded).last_hidden_state, expected)
