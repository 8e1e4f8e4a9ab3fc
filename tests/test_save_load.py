"""Saving and loading SpaRTA adapters: files, keys, bit-identical outputs, AutoPeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sparta import SpaRTAConfig, SpaRTALayer
from tests.conftest import tiny_llama
from tests.test_model import LLAMA_TARGETS, train_steps


def three_task_model(dtype=torch.float32, **kwargs):
    config = SpaRTAConfig(target_modules=LLAMA_TARGETS, r_shared=2, r_task=4, task_names=["a"], **kwargs)
    model = get_peft_model(tiny_llama(dtype=dtype), config)
    generator = torch.Generator().manual_seed(5)
    for index, name in enumerate(["a", "b", "c"]):
        if index:
            model.add_task(name)
        batch = torch.randint(index * 30, index * 30 + 30, (3, 8), generator=generator)
        train_steps(model, batch, steps=2)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", ["prototype", "learned", "spectral"])
def test_multi_task_round_trip_is_bit_identical(tmp_path, input_ids, dtype, router):
    model = three_task_model(dtype, router=router)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPARTA" and saved["task_names"] == ["a", "b", "c"]
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    for part in ["sparta_A_shared", "sparta_B_shared", "sparta_A_task.2", "sparta_B_task.0"]:
        assert any(part in key for key in keys), part
    if router == "prototype":
        assert any("sparta_router.prototypes" in key for key in keys)
    if router == "learned":
        assert any("sparta_router.keys.2" in key for key in keys)

    loaded = PeftModel.from_pretrained(tiny_llama(dtype=dtype), tmp_path)
    loaded.eval()
    assert loaded.task_names == ["a", "b", "c"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)


def test_loaded_adapter_continues_with_a_new_task(tmp_path, input_ids):
    model = three_task_model()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    loaded.add_task("d")
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("task.default.3" in n or "_shared." in n for n in trainable)
    train_steps(loaded, input_ids, steps=2)
    loaded.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    assert again.task_names == ["a", "b", "c", "d"]
    layers = [m for m in again.modules() if isinstance(m, SpaRTALayer)]
    assert len(layers[0].sparta_A_task["default"]) == 4


def test_auto_peft_model_for_causal_lm(tmp_path, input_ids):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    base = type(tiny_llama()).from_pretrained(base_dir)
    config = SpaRTAConfig(target_modules=LLAMA_TARGETS, r_shared=2, r_task=4, init_weights=False)
    model = get_peft_model(base, config)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("router", ["prototype", "learned"])
def test_format_version_1_files_load_to_the_same_outputs(tmp_path, input_ids, router):
    """Version 1 kept the router state in layer-level containers (sparta_prototypes, sparta_prototype_counts,
    sparta_router_keys); a file written then must load into today's routers unchanged."""
    from safetensors.torch import save_file

    model = three_task_model(router=router)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    old_names = {
        ".sparta_router.prototypes": ".sparta_prototypes",
        ".sparta_router.counts": ".sparta_prototype_counts",
        ".sparta_router.keys.": ".sparta_router_keys.",
    }
    renamed = {}
    for key, value in weights.items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert any(old in key for key in renamed for old in old_names.values())
    save_file(renamed, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["format_version"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
