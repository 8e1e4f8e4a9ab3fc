"""Misuse, round 2 (issue 29, items 6-20): each case either works as documented or fails with an error that names the
problem and the fix, and leaves the model exactly as it was."""

from __future__ import annotations

import ast
import json
import math

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from peft_sparta import SpaRTAConfig, SpaRTALoadError
from peft_sparta.continual import (
    RoutingRecorder,
    calibrate_abstain_spread,
    calibrate_abstain_threshold,
)
from peft_sparta.continual.calibration import router_scores
from peft_sparta.hub import model_card_section
from peft_sparta.layer import sparta_layers
from tests.conftest import tiny_llama


def config(**kwargs) -> SpaRTAConfig:
    return SpaRTAConfig(
        **{"r_shared": 2, "r_task": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **kwargs}
    )


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def prompts(low: int, rows: int = 8, seed: int = 0) -> torch.Tensor:
    """Prompts of token ids low..low+26: tasks trained on disjoint ranges route apart."""
    return torch.randint(low, low + 27, (rows, 8), generator=torch.Generator().manual_seed(seed))


def trained(model, *tasks: str, rows: int = 8):
    """Train the router state of ``model`` on one batch of prompts per task (the first task is the model's own)."""
    for index, name in enumerate(tasks):
        if index:
            model.add_task(name)
        model.train()
        with torch.no_grad():
            model(input_ids=prompts(3 + 30 * index, rows, seed=index))
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


# ---- item 20: validation gaps --------------------------------------------------------------------------------------


def test_calibrating_a_threshold_with_a_nan_margin_is_refused():
    model = trained(get_peft_model(tiny_llama(), config()), "task_0", "b")
    with pytest.raises(ValueError, match="margin"):
        calibrate_abstain_threshold(model, [{"input_ids": prompts(3)}], [{"input_ids": prompts(63)}], margin=math.nan)


def test_calibrating_the_spread_of_an_untrained_router_is_refused():
    model = get_peft_model(tiny_llama(), config())
    model.add_task("b")
    model.eval()
    with pytest.raises(ValueError, match="train"):
        calibrate_abstain_spread(model, [{"input_ids": prompts(3)}], [{"input_ids": prompts(63)}])


@pytest.mark.parametrize("scale", [math.inf, math.nan, 0.0, -1.0])
def test_an_infinite_penalty_scale_is_refused(scale):
    model = get_peft_model(tiny_llama(), config())
    with pytest.raises(ValueError, match="penalty_scale"):
        model.base_model.penalty_scale = scale
    assert model.base_model.penalty_scale == 1.0


def test_a_recorder_kept_open_across_remove_task_refuses_to_mix_columns():
    model = trained(get_peft_model(tiny_llama(), config()), "task_0", "b", "c")
    with RoutingRecorder(model) as recorder:
        logits(model, prompts(63, 2))
        model.remove_task("b")
        logits(model, prompts(63, 2))
        with pytest.raises(ValueError, match="remove_task"):
            recorder.take()
    model.add_task("d")
    with RoutingRecorder(model) as recorder:
        logits(model, prompts(3, 2))
        model.add_task("e")
        logits(model, prompts(3, 2))
    assert recorder.take().shape == (4, 4)


# ---- item 13: the model card quotes task names ---------------------------------------------------------------------


def test_the_model_card_quotes_task_names_it_cannot_trust():
    hostile = 'x")\nimport os; os.system("echo owned")  #'
    model = get_peft_model(tiny_llama(), config(task_names=["a*b_`c`", hostile]))
    card = model_card_section(model, "default")
    assert "\nimport os" not in card
    snippet = card.split("```python\n")[1].split("```")[0]
    imports = [node for node in ast.walk(ast.parse(snippet)) if isinstance(node, ast.Import)]
    assert "os" not in {alias.name for node in imports for alias in node.names}
    comment = next(line for line in snippet.splitlines() if "or model.set_task(" in line)
    assert ast.literal_eval(comment.split("or model.set_task(", 1)[1][:-1]) == hostile
    assert "1. `` a*b_`c` ``\n" in card


# ---- items 6 and 7: remove_task leaves trainability and optimizers as if the task had never been added -------------


@pytest.mark.parametrize("router", ["prototype", "learned"])
def test_remove_task_restores_trainability_as_if_the_task_had_never_been_added(router):
    fresh = get_peft_model(tiny_llama(), config(router=router))
    model = get_peft_model(tiny_llama(), config(router=router))
    model.add_task("b")
    model.remove_task("b")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {name for name, param in fresh.named_parameters() if param.requires_grad}


# ---- item 17: remove_task takes the task's share of the query spread away ------------------------------------------


def router_state(model) -> dict[str, torch.Tensor]:
    return {
        name: value
        for name, value in model.state_dict().items()
        if ".sparta_router." in name and name.endswith(("prototypes", "counts", "query_scatter", "query_count"))
    }


def test_remove_task_leaves_the_router_state_of_a_model_that_never_had_the_task():
    """The README's customer-removal example: after remove_task("b") the router (prototypes, counts and the query
    spread the discriminant metric whitens by) is that of a model trained on "task_0" and "c" alone."""
    removed = get_peft_model(tiny_llama(), config())
    never = get_peft_model(tiny_llama(), config())
    for model, tasks in ((removed, {"task_0": 3, "b": 33, "c": 63}), (never, {"task_0": 3, "c": 63})):
        for index, (name, low) in enumerate(tasks.items()):
            if index:
                model.add_task(name)
            model.train()
            with torch.no_grad():
                model(input_ids=prompts(low, seed=low))
    removed.remove_task("b")
    expected = router_state(never)
    assert any(name.endswith("query_count") for name in expected)
    for name, value in router_state(removed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_an_adapter_saved_with_the_pooled_query_spread_loads_and_routes_the_same(tmp_path):
    """Format 6 kept one (d, d) spread and one count for all tasks; it loads as every task holding the pooled spread,
    which routes as it did."""
    model = trained(get_peft_model(tiny_llama(), config(init_weights=False)), "task_0", "b")
    expected = logits(model.eval(), prompts(3))
    model.save_pretrained(tmp_path)

    def pool(weights):
        scatter_key, count_key = router_key(weights, "query_scatter"), router_key(weights, "query_count")
        counts = weights[count_key].float()
        weights[scatter_key] = (weights[scatter_key] * counts[:, None, None]).sum(0) / counts.sum()
        weights[count_key] = weights[count_key].sum()

    edit_weights(tmp_path, pool)
    edit_config(tmp_path, lambda saved: saved.update(format_version=6))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, prompts(3)), expected)
    owner = next(layer.sparta_router["default"] for layer in sparta_layers(loaded) if layer.sparta_router)
    assert owner.query_scatter.shape[0] == 2 and owner.query_count.tolist() == owner.counts.sum(-1).tolist()


def test_an_optimizer_built_before_remove_task_warns():
    model = get_peft_model(tiny_llama(), config())
    model.add_task("b")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.remove_task("b")
    ids = prompts(3, 2)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.warns(UserWarning, match="remove_task"):
        optimizer.step()


# ---- item 8: the calibration helpers ------------------------------------------------------------------------------


def test_calibration_helpers_leave_the_model_in_training_mode():
    model = trained(get_peft_model(tiny_llama(), config()), "task_0", "b")
    model.train()
    model.base_model.model.lm_head.eval()
    calibrate_abstain_threshold(model, [{"input_ids": prompts(3)}], [{"input_ids": prompts(63)}])
    router_scores(model, [{"input_ids": prompts(3)}])
    assert model.training and model.base_model.model.model.training
    assert not model.base_model.model.lm_head.training


@pytest.mark.parametrize(
    "batches",
    [[], [{"input_ids": torch.zeros(0, 8, dtype=torch.long)}], [{"input_ids": torch.zeros(2, 0, dtype=torch.long)}]],
    ids=["no-batch", "no-rows", "no-tokens"],
)
def test_calibration_with_no_input_is_refused_clearly(batches):
    model = trained(get_peft_model(tiny_llama(), config()), "task_0", "b")
    with pytest.raises(ValueError, match="no input"):
        calibrate_abstain_threshold(model, batches, [{"input_ids": prompts(63)}])
    with pytest.raises(ValueError, match="no input"):
        router_scores(model, batches)


def test_calibrating_the_spread_of_an_adapter_not_named_default():
    model = trained(get_peft_model(tiny_llama(), config(), adapter_name="mine"), "task_0", "b", rows=48)
    spread = calibrate_abstain_spread(model, [{"input_ids": prompts(3, seed=5)}], [{"input_ids": prompts(63)}])
    assert spread is None or spread > 0


# ---- item 11: low_cpu_mem_usage loads the paper design -----------------------------------------------------------


def test_low_cpu_mem_usage_loads_a_paper_design_adapter_with_several_tasks(tmp_path):
    design = SpaRTAConfig.paper_design(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_weights=False)
    model = get_peft_model(tiny_llama(), design)
    model.add_task("b")
    model.add_task("c")
    expected = logits(model, prompts(3))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert loaded.task_names == ["task_0", "b", "c"]
    assert torch.equal(logits(loaded, prompts(3)), expected)


# ---- item 9: a SEQ_CLS head (modules_to_save) follows the shared branch ------------------------------------------


def tiny_llama_classifier():
    from transformers import LlamaForSequenceClassification

    base = tiny_llama()
    base.config.num_labels, base.config.pad_token_id = 3, 0
    torch.manual_seed(0)
    return LlamaForSequenceClassification(base.config).eval()


def train_classifier(model, ids, label: int, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.full((ids.shape[0],), label)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_a_classifier_head_freezes_with_the_shared_branch_so_old_tasks_keep_their_logits():
    model = get_peft_model(tiny_llama_classifier(), config(task_type="SEQ_CLS"))
    head = [name for name, param in model.named_parameters() if "modules_to_save" in name and param.requires_grad]
    assert head, "PEFT trains the SEQ_CLS head of the first task"
    train_classifier(model, prompts(3, 4), label=0)
    model.add_task("b")
    assert not any(param.requires_grad for name, param in model.named_parameters() if name in head)
    model.set_task("task_0")
    expected = logits(model, prompts(3, 4))
    model.set_task(None)
    model.set_adapter("default")  # PEFT makes the head trainable again here; the next training forward refreezes it
    train_classifier(model, prompts(33, 4), label=2)
    model.set_task("task_0")
    assert torch.equal(logits(model, prompts(3, 4)), expected)
    model.remove_task("b")
    assert all(param.requires_grad for name, param in model.named_parameters() if name in head)


def test_a_classifier_head_trains_on_every_task_with_shared_update_train():
    model = get_peft_model(tiny_llama_classifier(), config(task_type="SEQ_CLS", shared_update="train"))
    model.add_task("b")
    assert any(param.requires_grad for name, param in model.named_parameters() if "modules_to_save" in name)


# ---- item 10: routing sees the prompt only, in training as in generation ------------------------------------------


def paper_design_model():
    design = SpaRTAConfig.paper_design(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_weights=False)
    model = get_peft_model(tiny_llama(), design)
    model.add_task("b")
    return model


def answer_labels(ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :prompt_length] = -100
    return labels


@pytest.mark.parametrize("design", ["paper", "default"])
@pytest.mark.parametrize("training", [True, False])
def test_logits_do_not_move_when_the_answer_tokens_change(design, training):
    model = paper_design_model() if design == "paper" else trained(get_peft_model(tiny_llama(), config()), "a", "b")
    model.train(training)
    ids = prompts(3, 2)
    other = ids.clone()
    other[:, 5:] = prompts(60, 2)[:, 5:]
    with torch.no_grad():
        first = model(input_ids=ids, labels=answer_labels(ids, 5)).logits
        second = model(input_ids=other, labels=answer_labels(other, 5)).logits
    assert torch.equal(first[:, :5], second[:, :5])


def test_the_paper_design_generates_as_it_trains():
    model = paper_design_model()
    ids = prompts(3, 2)
    model.train()
    with torch.no_grad():
        trained_logits = model(input_ids=ids, labels=answer_labels(ids, 5)).logits
    model.eval()
    cache = DynamicCache()
    with torch.no_grad():
        steps = [model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True).logits]
        for position in range(5, ids.shape[1]):
            steps.append(
                model(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True).logits
            )
    torch.testing.assert_close(torch.cat(steps, dim=1), trained_logits, rtol=1e-5, atol=1e-5)
