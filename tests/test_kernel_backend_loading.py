"""Adapters are portable: ``kernel_backend`` is the machine's choice, not the adapter's. It is written to
adapter_config.json as a record of the training run and ignored when the adapter is loaded, so an adapter saved by a
GPU user who forced "triton" loads and trains on a CPU-only machine, where the explicit "triton" would fail."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from peft_sparta import SpaRTAConfig
from peft_sparta.kernels.backend import ENV_VAR
from tests.conftest import tiny_llama
from tests.helpers import three_task_model


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """The same adapter saved twice: as written, and with adapter_config.json edited to say "triton"."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = three_task_model()
    model.save_pretrained(tmp_path / "default")
    model.save_pretrained(tmp_path / "triton")
    path = tmp_path / "triton" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "kernel_backend": "triton"}))
    return tmp_path / "default", tmp_path / "triton"


def forward_and_step(model, input_ids):
    """Logits of a forward pass, then one SGD step on the language-model loss: the logits, the loss and the trained
    parameters."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    output = model(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    optimizer.step()
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach(), output.loss.detach(), trained


def test_triton_adapter_loads_and_trains_on_cpu_like_the_default(folders, input_ids):
    default_folder, triton_folder = folders
    expected = forward_and_step(PeftModel.from_pretrained(tiny_llama(), default_folder, is_trainable=True), input_ids)
    model = PeftModel.from_pretrained(tiny_llama(), triton_folder, is_trainable=True)
    assert model.peft_config["default"].kernel_backend is None
    logits, loss, trained = forward_and_step(model, input_ids)
    assert torch.equal(logits, expected[0]) and torch.equal(loss, expected[1])
    assert trained.keys() == expected[2].keys()
    assert all(torch.equal(trained[name], value) for name, value in expected[2].items())


def test_saved_value_is_written_and_ignored_by_every_loader(folders, input_ids):
    _, triton_folder = folders
    assert json.loads((triton_folder / "adapter_config.json").read_text())["kernel_backend"] == "triton"
    assert SpaRTAConfig.from_pretrained(triton_folder).kernel_backend is None

    model = PeftModel.from_pretrained(tiny_llama(), triton_folder)
    model.load_adapter(triton_folder, adapter_name="second")
    assert model.peft_config["second"].kernel_backend is None

    base = tiny_llama()
    base.load_adapter(str(triton_folder))
    assert base.peft_config["default"].kernel_backend is None
    base(input_ids=input_ids)


def test_run_time_setting_is_honoured_and_validated(folders, input_ids, monkeypatch):
    default_folder, _ = folders
    model = PeftModel.from_pretrained(tiny_llama(), default_folder, is_trainable=True)
    model.train()  # the backend runs the training path; inference takes the stacked path whatever the backend
    config = model.peft_config["default"]
    config.kernel_backend = "triton"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="kernel_backend"):
        config.kernel_backend = "cuda"
    assert config.kernel_backend == "triton"
    config.kernel_backend = None
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        model(input_ids=input_ids)
    monkeypatch.setenv(ENV_VAR, "eager")
    model(input_ids=input_ids)


def test_config_given_to_from_pretrained_keeps_its_backend(folders):
    default_folder, _ = folders
    config = SpaRTAConfig.from_pretrained(default_folder)
    config.kernel_backend = "eager"
    model = PeftModel.from_pretrained(tiny_llama(), default_folder, config=config)
    assert model.peft_config["default"].kernel_backend == "eager"
