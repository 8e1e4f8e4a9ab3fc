"""Saving and loading SpaRTA adapters: files, keys, bit-identical outputs, AutoPeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sparta import SpaRTAConfig, SpaRTALayer
from peft_sparta.routers import PrototypeRouter
from tests.conftest import tiny_llama
from tests.helpers import LLAMA_TARGETS, three_task_model, train_steps


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


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Every SpaRTA tensor of the model, parameters and router buffers, by name."""
    return dict(p for p in [*model.named_parameters(), *model.named_buffers()] if "sparta_" in p[0])


@pytest.mark.parametrize("shared_update", ["freeze_after_first", "train"])
def test_loaded_adapter_continues_with_a_new_task(tmp_path, input_ids, shared_update):
    """After reloading with is_trainable=True and adding a task, the parameters of the finished tasks (and the shared
    branch under "freeze_after_first") have requires_grad False and keep their values through training, as does the
    finished tasks' router state; the new task's branch trains."""
    model = three_task_model(shared_update=shared_update)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    loaded.add_task("d")
    shared_trains = shared_update == "train"
    parameters = dict(loaded.named_parameters())
    trainable = {name for name, param in parameters.items() if param.requires_grad}
    expected = {
        name
        for name in parameters
        if ".sparta_A_task.default.3" in name
        or ".sparta_B_task.default.3" in name
        or (shared_trains and "_shared.default" in name)
    }
    assert trainable == expected
    assert any("_shared.default" in name for name in parameters)
    before = {name: tensor.detach().clone() for name, tensor in adapter_tensors(loaded).items()}
    train_steps(loaded, input_ids, steps=2)
    after = adapter_tensors(loaded)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed & expected == expected, "every trainable tensor trains"
    for name in changed - expected:
        # the only other tensors that may change: the new task's slot of the router state, and the query spread that
        # every task's training adds to
        assert ".sparta_router." in name, name
        if name.endswith((".query_scatter", ".query_count")):
            continue
        assert name.endswith((".prototypes", ".counts")), name
        assert torch.equal(before[name][:3], after[name][:3]), f"{name}: a finished task's router state changed"

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


#: router-state names of format version 1 (layer-level containers) and of versions 2-3 (the routers' own)
VERSION_1_NAMES = {
    ".sparta_router.prototypes": ".sparta_prototypes",
    ".sparta_router.counts": ".sparta_prototype_counts",
    ".sparta_router.keys.": ".sparta_router_keys.",
}


def _write_older_format(folder, version: int) -> None:
    """Rewrite a saved adapter as versions 1-3 wrote it: without the query spread (kept from version 5 on), with the
    sequence router's state in every adapted layer for versions 1-2 (version 3 keeps it in the first), under version
    1's names for version 1."""
    from safetensors.torch import save_file

    weights = load_file(folder / "adapter_model.safetensors")
    weights = {key: value for key, value in weights.items() if ".query_" not in key}
    if version < 3:
        router_keys = [key for key in weights if ".sparta_router." in key]
        owner = router_keys[0].split(".sparta_router.")[0]
        for layer in {key.split(".sparta_A_shared")[0] for key in weights if key.endswith(".sparta_A_shared")} - {
            owner
        }:
            for key in router_keys:
                weights[key.replace(owner, layer)] = weights[key].clone()
    if version == 1:
        for new, old in VERSION_1_NAMES.items():
            weights = {key.replace(new, old): value for key, value in weights.items()}
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "format_version": version}))


def _forget_query_spread(model) -> None:
    """What the router of an adapter trained before version 5 held: no query spread."""
    for module in model.modules():
        if isinstance(module, PrototypeRouter) and module.query_scatter is not None:
            module.query_scatter.zero_()
            module.query_count.zero_()


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("router", ["prototype", "learned"])
def test_older_format_versions_load_to_the_same_outputs(tmp_path, input_ids, router, version):
    model = three_task_model(router=router)
    model.eval()
    _forget_query_spread(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)
    _write_older_format(tmp_path, version)
    router_keys = [
        key for key in load_file(tmp_path / "adapter_model.safetensors") if "_prototype" in key or "_router" in key
    ]
    assert len(router_keys) > 2 or version == 3, "versions 1-2 hold the router's state in every layer"

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
    loaded.save_pretrained(tmp_path / "again")
    saved_version = json.loads((tmp_path / "again" / "adapter_config.json").read_text())["format_version"]
    assert saved_version == (7 if router == "prototype" else 3)


def test_query_spread_changes_routing_and_is_saved(tmp_path, input_ids):
    """The query spread is part of the router's decision, so it travels with the adapter. One prototype per task, so
    that the queries spread around it; a soft temperature, so that the gates are not one-hot, and no floor, so that
    no input abstains: every change of the scores shows in the logits."""
    model = three_task_model(router_prototypes=1, router_temperature=5.0, router_abstain_spread=None)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)
    assert any(
        key.endswith("sparta_router.query_scatter") for key in load_file(tmp_path / "adapter_model.safetensors")
    )
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)
        _forget_query_spread(loaded)
        assert not torch.equal(loaded(input_ids=input_ids).logits, expected)


def test_sequence_router_state_is_stored_once_per_adapter(tmp_path):
    model = three_task_model()
    model.save_pretrained(tmp_path)
    router_keys = [key for key in load_file(tmp_path / "adapter_model.safetensors") if "sparta_router" in key]
    assert len(router_keys) == 4  # prototypes, counts and the query spread (2), once for the whole adapter


@pytest.mark.parametrize("metric", ["auto", "discriminant", "cosine"])
def test_adapter_saved_under_each_metric_holds_the_query_spread_and_the_version_that_reads_it(tmp_path, metric):
    """The metric can change at run time and the query spread is kept under every metric, per task since version 7
    (older readers expect one pooled spread): a release that cannot read it refuses the file by its version instead
    of failing on a tensor's shape."""
    model = three_task_model()
    model.peft_config["default"].router_metric = metric
    model.save_pretrained(tmp_path)
    assert any(key.endswith("query_scatter") for key in load_file(tmp_path / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == 7
