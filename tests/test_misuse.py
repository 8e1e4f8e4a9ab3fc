"""Misuse that used to corrupt state or route silently wrong: each case either works or fails with an error that names
the problem and the fix, and leaves the model exactly as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import DynamicCache

from peft_sparta import SpaRTAConfig, SpaRTALoadError
from peft_sparta.continual import RoutingRecorder
from peft_sparta.layer import sparta_layers
from tests.conftest import tiny_llama


def config(**kwargs) -> SpaRTAConfig:
    return SpaRTAConfig(r_shared=2, r_task=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_two_task_model() -> PeftModel:
    """Two tasks with well separated prompts (token ids 3-29 for task_0, 60-89 for task_1) and their prototypes."""
    model = get_peft_model(tiny_llama(), config(init_weights=False))
    generator = torch.Generator().manual_seed(0)
    for index, low in enumerate([3, 60]):
        if index:
            model.add_task("task_1")
        model.train()
        with torch.no_grad():
            model(input_ids=torch.randint(low, low + 27, (8, 8), generator=generator))
    return model.eval()


def test_failed_load_onto_an_adapted_base_keeps_its_adapter(tmp_path, input_ids):
    base = tiny_llama()
    model = get_peft_model(base, config(init_weights=False))
    model.add_task("b")
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpaRTALoadError, match="left as it was"):
        PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(logits(model, input_ids), expected)
    assert len(base._forward_pre_hooks) == 1 and len(base._forward_hooks) == 1
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(base, tmp_path / "missing")
    assert torch.equal(logits(model, input_ids), expected)


def test_decode_steps_follow_their_own_cache_when_conversations_interleave():
    model = trained_two_task_model()
    prompt_a = torch.randint(3, 30, (1, 6), generator=torch.Generator().manual_seed(1))
    prompt_b = torch.randint(60, 87, (1, 6), generator=torch.Generator().manual_seed(2))
    with RoutingRecorder(model) as recorder, torch.no_grad():
        cache_a, cache_b = DynamicCache(), DynamicCache()
        model(input_ids=prompt_a, past_key_values=cache_a, use_cache=True)
        model(input_ids=prompt_b, past_key_values=cache_b, use_cache=True)
        model(input_ids=torch.tensor([[5]]), past_key_values=cache_a, use_cache=True)
        model(input_ids=torch.tensor([[70]]), past_key_values=cache_b, use_cache=True)
    assert recorder.take().argmax(dim=-1).tolist() == [0, 1, 0, 1]


def test_optimizer_built_before_add_task_warns_and_frozen_branches_stay_put(input_ids):
    model = get_peft_model(tiny_llama(), config())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    model.add_task("b")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if "sparta_" in name}
    with pytest.warns(UserWarning, match="optimizer does not hold"):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen and not param.requires_grad:
            assert torch.equal(param, frozen[name]), name


def test_add_task_releases_a_forced_task(input_ids):
    model = get_peft_model(tiny_llama(), config())
    model.set_task("task_0")
    model.add_task("t1")
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    layer = sparta_layers(model)[0]
    assert layer.sparta_B_task["default"][1].grad is not None
    assert layer.sparta_router["default"].counts[1].sum() > 0


def test_one_config_object_serves_two_models_independently(input_ids):
    shared = config()
    first, second = get_peft_model(tiny_llama(), shared), get_peft_model(tiny_llama(), shared)
    first.add_task("b")
    assert second.task_names == ["task_0"] and shared.task_names == ["task_0"]
    assert first.task_names == ["task_0", "b"]
    logits(second, input_ids)


def test_refused_merge_leaves_the_model_working(input_ids):
    model = trained_two_task_model()
    other = torch.randint(3, 97, (3, 5))
    expected, expected_other = logits(model, input_ids), logits(model, other)
    with pytest.raises(ValueError, match="set_task"):
        model.merge_and_unload()
    assert torch.equal(logits(model, input_ids), expected)
    assert torch.equal(logits(model, other), expected_other)


def test_gradient_checkpointing_does_not_learn_twice(input_ids):
    model = get_peft_model(tiny_llama(), config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    first, second = torch.randint(3, 97, (4, 8)), torch.randint(3, 97, (3, 8))
    loss_a = model(input_ids=first, labels=first).loss
    loss_b = model(input_ids=second, labels=second).loss
    (loss_a + loss_b).backward()
    counts = sparta_layers(model)[0].sparta_router["default"].counts
    assert int(counts.sum()) == 7


def test_loading_twice_onto_one_base_regularizes_once(tmp_path, input_ids):
    base = tiny_llama()
    model = get_peft_model(base, config(orth_lambda=5.0))
    model.add_task("b")
    model.save_pretrained(tmp_path)
    model.train()
    expected = model(input_ids=input_ids, labels=input_ids).loss
    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    loaded.train()
    assert len(base._forward_pre_hooks) == 1 and len(base._forward_hooks) == 1
    assert torch.allclose(loaded(input_ids=input_ids, labels=input_ids).loss, expected)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("router_temperature", float("inf"), "finite"),
        ("orth_lambda", float("nan"), "finite"),
        ("task_names", "abc", "got the string"),
    ],
)
def test_config_rejects_values_that_would_misbehave(field, value, message):
    with pytest.raises(ValueError, match=message):
        config(**{field: value})


def test_settings_changed_after_construction_are_checked_and_numpy_numbers_accepted():
    settings = SpaRTAConfig(target_modules=["q_proj"], r_task=np.int64(4), alpha_task=np.float32(8.0))
    assert type(settings.r_task) is int and type(settings.alpha_task) is float
    with pytest.raises(ValueError, match="router_abstain_threshold"):
        settings.router_abstain_threshold = 5.0
    assert settings.router_abstain_threshold is None
    settings.router_abstain_threshold = 0.5
    assert settings.router_abstain_threshold == 0.5


def test_weights_with_more_tasks_than_the_config_name_them(tmp_path):
    import json

    model = get_peft_model(tiny_llama(), config())
    model.add_task("b")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["task_names"] = ["task_0"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(SpaRTALoadError, match="different saves"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_tensors_the_config_does_not_create_are_an_error(tmp_path, input_ids):
    import json

    model = get_peft_model(tiny_llama(), config())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["target_modules"] = ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    base = tiny_llama()
    expected = logits(base, input_ids)
    with pytest.raises(SpaRTALoadError, match="does not create"):
        PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(logits(base, input_ids), expected)


def test_set_task_while_merged_is_refused():
    model = get_peft_model(tiny_llama(), config())
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.set_task(None)


def test_train_mode_under_no_grad_learns_and_reports_the_same_loss(input_ids):
    model = get_peft_model(tiny_llama(), config(orth_lambda=5.0, init_weights=False))
    model.add_task("b")
    model.train()
    with torch.no_grad():
        without_grad = model(input_ids=input_ids, labels=input_ids).loss
    assert int(sparta_layers(model)[0].sparta_router["default"].counts[1].sum()) == input_ids.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.allclose(model(input_ids=input_ids, labels=input_ids).loss, without_grad)


def _drop_router_state(folder) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    weights = load_file(path)
    save_file({key: value for key, value in weights.items() if "sparta_router" not in key}, path)


def _truncate(folder) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _cut_task_list(folder) -> None:
    import json

    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "task_names": ["task_0"]}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [(_truncate, "SafetensorError"), (_drop_router_state, "lack"), (_cut_task_list, "different saves")],
    ids=["truncated", "no-router-state", "task-list"],
)
def test_transformers_load_adapter_fails_clearly_and_can_be_retried(tmp_path, input_ids, damage, message):
    model = trained_two_task_model()
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path / "good")
    model.save_pretrained(tmp_path / "bad")
    damage(tmp_path / "bad")
    base = tiny_llama()
    untouched = logits(base, input_ids)
    with pytest.raises(SpaRTALoadError, match=message):
        base.load_adapter(str(tmp_path / "bad"))
    assert torch.equal(logits(base, input_ids), untouched)
    assert not sparta_layers(base) and not base._forward_pre_hooks and not base._forward_hooks
    base.load_adapter(str(tmp_path / "good"))
    assert torch.equal(logits(base, input_ids), expected)
