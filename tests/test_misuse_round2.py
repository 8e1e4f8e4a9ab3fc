"""Misuse, round 2 (issue 29, items 6-20): each case either works as documented or fails with an error that names the
problem and the fix, and leaves the model exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_sparta import SpaRTAConfig, SpaRTALoadError
from peft_sparta.layer import sparta_layers
from tests.conftest import tiny_llama


def config(**kwargs) -> SpaRTAConfig:
    return SpaRTAConfig(r_shared=2, r_task=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def prompts(low: int, rows: int = 8, seed: int = 0) -> torch.Tensor:
    """Prompts of token ids low..low+26: tasks trained on disjoint ranges route apart."""
    return torch.randint(low, low + 27, (rows, 8), generator=torch.Generator().manual_seed(seed))


def trained(model, *tasks: str):
    """Train the router state of ``model`` on one batch of prompts per task (the first task is the model's own)."""
    for index, name in enumerate(tasks):
        if index:
            model.add_task(name)
        model.train()
        with torch.no_grad():
            model(input_ids=prompts(3 + 30 * index, seed=index))
    return model.eval()


def two_task_adapter(tmp_path, **kwargs):
    """A saved two-task adapter ("a", "b") with a trained router, and the logits it gives ``prompts(3)``."""
    model = trained(get_peft_model(tiny_llama(), config(init_weights=False, **kwargs)), "task_0", "b")
    expected = logits(model, prompts(3))
    model.save_pretrained(tmp_path)
    return expected


def edit_weights(folder, edit) -> None:
    path = folder / "adapter_model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def edit_config(folder, edit) -> None:
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))


def router_key(weights: dict, name: str) -> str:
    return next(key for key in weights if key.endswith(f"sparta_router.{name}"))


# ---- item 12: router tensors are checked at load -----------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda w: w[router_key(w, "counts")].__setitem__((0, 0), -3), "negative"),
        (lambda w: w[router_key(w, "prototypes")].__setitem__((1, 0, 0), float("nan")), "not finite"),
        (lambda w: w[router_key(w, "query_scatter")].__setitem__((0, 0), float("inf")), "not finite"),
    ],
)
def test_damaged_router_tensors_are_refused_at_load(tmp_path, damage, message):
    two_task_adapter(tmp_path)
    edit_weights(tmp_path, damage)
    base = tiny_llama()
    with pytest.raises(SpaRTALoadError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert not sparta_layers(base)


# ---- item 14: temperatures that overflow the softmax are refused ---------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-7])
def test_a_vanishing_router_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="router_temperature"):
        config(router_temperature=temperature)
    settings = config()
    with pytest.raises(ValueError, match="router_temperature"):
        settings.router_temperature = temperature
    assert settings.router_temperature == 0.02


def test_the_smallest_router_temperature_gives_finite_gates():
    model = trained(get_peft_model(tiny_llama(), config(router_temperature=1e-6)), "task_0", "b")
    assert torch.isfinite(logits(model, torch.cat([prompts(3, 2), prompts(33, 2)]))).all()


# ---- item 15: an edited task list is refused ----------------------------------------------------------------------


@pytest.mark.parametrize("names", [["b", "task_0"], ["task_0", "renamed"]])
def test_reordered_or_renamed_task_names_are_refused_at_load(tmp_path, names):
    two_task_adapter(tmp_path)
    edit_config(tmp_path, lambda saved: saved.__setitem__("task_names", names))
    base = tiny_llama()
    with pytest.raises(SpaRTALoadError, match="task_names"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not sparta_layers(base)


def test_an_unedited_task_list_loads_and_routes_the_same(tmp_path):
    expected = two_task_adapter(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.task_names == ["task_0", "b"]
    assert torch.equal(logits(loaded, prompts(3)), expected)
    loaded.add_task("c")
    loaded.save_pretrained(tmp_path / "again")
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").task_names == ["task_0", "b", "c"]


# ---- item 16: the saved kernel backend is ignored on every load path ----------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "future_backend"])
def test_a_saved_kernel_backend_is_ignored_on_every_load_path(tmp_path, backend):
    expected = two_task_adapter(tmp_path)
    edit_config(tmp_path, lambda saved: saved.__setitem__("kernel_backend", backend))
    assert PeftConfig.from_pretrained(tmp_path).kernel_backend is None
    assert SpaRTAConfig.from_pretrained(tmp_path).kernel_backend is None
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=PeftConfig.from_pretrained(tmp_path))
    assert torch.equal(logits(loaded, prompts(3)), expected)


def test_a_constructed_config_still_checks_its_kernel_backend():
    with pytest.raises(ValueError, match="kernel_backend"):
        config(kernel_backend="future_backend")
    assert config(kernel_backend="eager").kernel_backend == "eager"


# ---- item 18: add_task on an inactive adapter ---------------------------------------------------------------------


def test_add_task_on_an_inactive_adapter_leaves_it_frozen():
    model = get_peft_model(tiny_llama(), config())
    model.add_adapter("other", config())
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    model.add_task("b", adapter_name="other")
    assert {name for name, param in model.named_parameters() if param.requires_grad} == trainable
    model.add_task("c")
    assert any(".sparta_A_task.default.1" in name and param.requires_grad for name, param in model.named_parameters())


# ---- item 19: the config must match the weights when saving -------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c, "r_task", -5), "r_task"),
        (lambda c: setattr(c, "r_task", 8), "r_task"),
        (lambda c: setattr(c, "task_names", ["task_0"]), "task_names"),
        (lambda c: c.task_names.append("ghost"), "task_names"),
        (lambda c: setattr(c, "target_modules", {"k_proj"}), "target_modules"),
    ],
)
def test_a_config_edited_after_construction_is_refused_at_save(tmp_path, edit, message):
    model = trained(get_peft_model(tiny_llama(), config()), "task_0", "b")
    edit(model.peft_config["default"])
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_run_time_settings_changed_after_construction_save_and_load(tmp_path):
    model = trained(get_peft_model(tiny_llama(), config()), "task_0", "b")
    model.peft_config["default"].router_temperature = 0.05
    model.peft_config["default"].top_k = 1
    expected = logits(model, prompts(3))
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), prompts(3)), expected)
