"""The paper design (``task_branches="shared"``, the DATA code's): two branches trained on every task, the component
router, its penalties and stochastic restoration, with hand-worked numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments

import peft_sparta  # noqa: F401
from peft_sparta import SpaRTAConfig, SpaRTALoadError
from peft_sparta.layer import Linear, sparta_layers
from peft_sparta.model import BRANCH_CONTAINERS
from peft_sparta.restoration import restoration_generator
from peft_sparta.routers import ComponentRouter, RoutingContext
from peft_sparta.routers.components import orthogonal_rows, row_orthogonality
from peft_sparta.trainer import SpaRTACallback
from tests.conftest import Rows, tiny_llama
from tests.helpers import ANSWERS, PROMPTS, chat_llama, chat_tokenizer


TARGETS = ["q_proj", "v_proj"]


def paper(**kwargs) -> SpaRTAConfig:
    return SpaRTAConfig.paper_design(**{"target_modules": TARGETS, "task_names": ["a"], **kwargs})


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def train(model, steps: int, seed: int = 0, weight_decay: float = 0.0, params=None) -> None:
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 97, (2, 7), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def routers(model) -> list[ComponentRouter]:
    return [layer.sparta_router["default"] for layer in sparta_layers(model)]


# ---- the router's math -----------------------------------------------------------------------------------------------


def two_component_layer(granularity: str) -> Linear:
    """A layer on 4 input features whose router has 2 components with the module's worked numbers (see below)."""
    config = SpaRTAConfig.paper_design(
        target_modules=["x"], router_components=2, router_granularity=granularity, init_weights=False
    )
    layer = Linear(nn.Linear(4, 3), "default", config, granularity="token").eval()
    router = layer.sparta_router["default"]
    attention = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]])
    keys = torch.tensor([[3.0, 4, 0, 0], [0, 0, 0, 7]])  # normalised rows sum to 1.4 and 1
    shared_w = torch.tensor([[0.5, 0.5, 0, 0], [1, -3, 0, 0]])  # row sums 1 and -2
    task_w = torch.tensor([[0, 0, 0, 0.5], [1, 0, 0, 0]])  # row sums 0.5 and 1
    with torch.no_grad():
        router.attention[0].copy_(torch.stack([attention, attention]))
        router.keys[0].copy_(torch.stack([keys, keys]))
        router.components[0].copy_(torch.stack([shared_w, task_w]))
    return layer


# Two tokens x1 = (3, 4, 0, 0), x2 = (0, 2, 5, 0): A x1 = (3, 4) -> a1 = (0.6, 0.8); A x2 = (0, 2) -> a2 = (0, 1).
# Row weights rowsum(normalize(K)) * rowsum(W): shared (1.4 * 1, 1 * -2) = (1.4, -2);
#                                              task (1.4 * 0.5, 1 * 1) = (0.7, 1).
# Logits / sqrt(4): shared token 1 (0.84 - 1.6) / 2 = -0.38, token 2 -2 / 2 = -1, sequence -1.38;
#                   task token 1 (0.42 + 0.8) / 2 = 0.61, token 2 1 / 2 = 0.5, sequence 1.11.
TOKENS = torch.tensor([[[3.0, 4, 0, 0], [0, 2, 5, 0]]])


def test_router_weights_per_sequence_on_a_two_token_two_component_example():
    layer = two_component_layer("sequence")
    weights = layer.sparta_router["default"].decide(TOKENS, None, layer.branches("default"))
    expected = torch.tensor([[[sigmoid(-1.38), sigmoid(1.11)]]])
    torch.testing.assert_close(weights, expected)


def test_router_weights_per_token_on_a_two_token_two_component_example():
    layer = two_component_layer("token")
    weights = layer.sparta_router["default"].decide(TOKENS, None, layer.branches("default"))
    expected = torch.tensor([[[sigmoid(-0.38), sigmoid(0.61)], [sigmoid(-1.0), sigmoid(0.5)]]])
    torch.testing.assert_close(weights, expected)


def test_padding_is_left_out_of_the_sequence_sum():
    layer = two_component_layer("sequence")
    context = RoutingContext(valid_mask=torch.tensor([[True, False]]))
    weights = layer.sparta_router["default"].decide(TOKENS, context, layer.branches("default"))
    torch.testing.assert_close(weights, torch.tensor([[[sigmoid(-0.38), sigmoid(0.61)]]]))


def test_layer_output_weighs_each_branch_by_its_router_weight():
    layer = two_component_layer("sequence")
    s_shared, s_task = sigmoid(-1.38), sigmoid(1.11)
    base = layer.get_base_layer()
    a_sh, b_sh = layer.sparta_A_shared["default"], layer.sparta_B_shared["default"]
    a_t, b_t = layer.sparta_A_task["default"][0], layer.sparta_B_task["default"][0]
    expected = (
        base(TOKENS)
        + s_shared * layer.scaling_shared["default"] * TOKENS @ a_sh.T @ b_sh.T
        + s_task * layer.scaling_task["default"] * TOKENS @ a_t.T @ b_t.T
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(TOKENS), expected)


def test_row_orthogonality_penalty_on_a_worked_example():
    # T T^T - I = [[0, 1], [1, 1]]: mean of squares 3 / 4
    assert float(row_orthogonality(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))) == pytest.approx(0.75)
    assert float(row_orthogonality(torch.eye(3))) == 0.0


def test_router_loss_averages_the_three_penalties_of_both_branches():
    layer = two_component_layer("sequence")
    router = layer.sparta_router["default"]
    keys, attention, components = router.matrices()
    normalized = torch.nn.functional.normalize(keys, dim=-1)
    per_branch = [
        (row_orthogonality(normalized[b]) + row_orthogonality(attention[b]) + row_orthogonality(components[b])) / 3
        for b in (0, 1)
    ]
    expected = router.config.router_orth_lambda * (per_branch[0] + per_branch[1]) / 2
    torch.testing.assert_close(router.loss(TOKENS, None, layer.branches("default")), expected)


def test_new_rows_are_orthonormal_and_orthogonal_to_earlier_rows():
    torch.manual_seed(0)
    earlier = torch.randn(5, 12)
    rows = orthogonal_rows(earlier, 4, 12)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows @ earlier.T, torch.zeros(4, 5), atol=1e-5, rtol=0)
    crowded = orthogonal_rows(torch.randn(10, 12), 4, 12)  # 2 free directions: 2 orthogonal rows, 2 random unit rows
    torch.testing.assert_close(crowded.norm(dim=-1), torch.ones(4))


# ---- growth, freezing and the weights' range --------------------------------------------------------------------------


def test_add_task_grows_only_the_router_with_gram_schmidt_rows():
    model = get_peft_model(tiny_llama(), paper())
    layer = sparta_layers(model)[0]
    model.add_task("b")
    assert len(layer.sparta_A_task["default"]) == 1, "the paper design has one task branch for every task"
    assert layer.sparta_A_task["default"][0].requires_grad and layer.sparta_A_shared["default"].requires_grad
    for blocks in (layer.sparta_router["default"].keys, layer.sparta_router["default"].attention):
        assert len(blocks) == 2 and not blocks[0].requires_grad and blocks[1].requires_grad
        new, old = blocks[1].detach(), blocks[0].detach()
        for branch in (0, 1):
            torch.testing.assert_close(new[branch] @ new[branch].T, torch.eye(8), atol=1e-5, rtol=0)
            torch.testing.assert_close(new[branch] @ old[branch].T, torch.zeros(8, 8), atol=1e-5, rtol=0)


def test_old_component_rows_stay_bit_identical_across_add_task_and_training():
    model = get_peft_model(tiny_llama(), paper())
    train(model, 3)
    old = {id(router): [block.detach().clone() for block in router.matrices()] for router in routers(model)}
    model.add_task("b")
    new = {id(router): router.attention[1].detach().clone() for router in routers(model)}
    # an optimizer over every adapter tensor, frozen ones included, with weight decay
    everything = [p for name, p in model.named_parameters() if "sparta_" in name]
    train(model, 5, seed=1, weight_decay=0.1, params=everything)
    for router in routers(model):
        for before, blocks in zip(old[id(router)], (router.keys, router.attention, router.components)):
            assert torch.equal(blocks[0], before), "the first task's rows changed"
        assert not torch.equal(router.attention[1], new[id(router)]), "the second task's rows trained"


def test_new_rows_train_while_old_rows_get_no_gradient():
    model = get_peft_model(tiny_llama(), paper(init_weights=False))
    model.add_task("b")
    model.train()
    ids = torch.randint(0, 97, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    for router in routers(model):
        for blocks in (router.keys, router.attention, router.components):
            assert blocks[0].grad is None
            assert blocks[1].grad is not None and blocks[1].grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_weights_lie_strictly_between_zero_and_one(granularity):
    model = get_peft_model(tiny_llama(), paper(router_granularity=granularity, init_weights=False))
    train(model, 3)
    model.add_task("b")
    train(model, 3, seed=1)
    generator = torch.Generator().manual_seed(5)
    for layer in sparta_layers(model):
        for scale in (0.01, 1.0, 30.0):
            x = scale * torch.randn(3, 6, layer.in_features, generator=generator)
            weights = layer.router_gates("default", x)
            assert weights.shape[-1] == 2
            assert (weights > 0).all() and (weights < 1).all(), weights


# ---- one task, fixed weights: a LoRA of the two ranks -----------------------------------------------------------------


def test_one_task_with_fixed_weights_equals_a_lora_of_the_two_ranks(input_ids):
    config = paper(init_weights=False, router_granularity="token")
    model = get_peft_model(tiny_llama(), config).eval()
    model.set_task("a")  # fixes both weights at 1
    rank = config.r_shared + config.r_task
    lora = get_peft_model(
        tiny_llama(), LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
    ).eval()
    lora_layers = {name: module for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if layer not in sparta_layers(model):
                continue
            target = lora_layers[name]
            scale_sh, scale_t = layer.scaling_shared["default"], layer.scaling_task["default"]
            target.lora_A["default"].weight.copy_(
                torch.cat([layer.sparta_A_shared["default"], layer.sparta_A_task["default"][0]])
            )
            target.lora_B["default"].weight.copy_(
                torch.cat(
                    [scale_sh * layer.sparta_B_shared["default"], scale_t * layer.sparta_B_task["default"][0]], dim=1
                )
            )
        expected = lora(input_ids=input_ids).logits
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merging_needs_fixed_weights(input_ids):
    model = get_peft_model(tiny_llama(), paper(init_weights=False)).eval()
    with pytest.raises(ValueError, match="set_task"):
        model.merge_adapter()
    model.set_task("a")
    with torch.no_grad():
        fixed = model(input_ids=input_ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=input_ids).logits, fixed, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        model.set_task(None)
        assert not torch.allclose(model(input_ids=input_ids).logits, fixed, atol=1e-4), "the router weighs again"


# ---- stochastic restoration -------------------------------------------------------------------------------------------


def branch_values(model) -> dict[str, torch.Tensor]:
    """The branch matrices, named as the tuner names them."""
    named = model.base_model.model.named_parameters()
    return {name: p.detach().clone() for name, p in named if any(f".{c}." in name for c in BRANCH_CONTAINERS)}


def router_values(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".sparta_router." in name}


def test_restoration_resets_only_the_chosen_entries_to_their_task_start_values():
    model = get_peft_model(tiny_llama(), paper(init_weights=False, restore_every=1000, restore_prob=0.3))
    start = branch_values(model)
    train(model, 3)
    trained, trained_router = branch_values(model), router_values(model)
    point = model.base_model._restore_points["default"]
    assert point.restorations == 0 and point.steps == 3
    generator = restoration_generator(point)  # the draws the restoration will make, in the point's order
    chosen = {name: torch.rand(tensor.shape, generator=generator) < 0.3 for name, _, tensor in point.parameters}

    reset = model.restore_stochastically()

    assert reset == sum(int(mask.sum()) for mask in chosen.values()) > 0
    restored = branch_values(model)
    assert set(chosen) == set(start), "every trainable branch entry can be restored"
    for name, mask in chosen.items():
        assert not torch.equal(trained[name], start[name]), f"{name} trained"
        assert torch.equal(restored[name], torch.where(mask, start[name], trained[name])), name
    for name, value in router_values(model).items():
        assert torch.equal(value, trained_router[name]), "router rows are not restored"


def test_restoration_returns_to_the_start_of_the_current_task():
    model = get_peft_model(tiny_llama(), paper(init_weights=False, restore_every=1000, restore_prob=1.0))
    train(model, 2)
    model.add_task("b")
    task_start = branch_values(model)
    train(model, 2, seed=1)
    assert any(not torch.equal(value, task_start[name]) for name, value in branch_values(model).items())
    model.restore_stochastically()
    for name, value in branch_values(model).items():
        assert torch.equal(value, task_start[name]), f"{name} is not back at task b's start"


def test_optimizer_steps_restore_every_restore_every_steps():
    model = get_peft_model(tiny_llama(), paper(restore_every=2, restore_prob=1.0))
    start = branch_values(model)
    train(model, 4)
    point = model.base_model._restore_points["default"]
    assert (point.steps, point.restorations) == (4, 2)
    for name, value in branch_values(model).items():
        assert torch.equal(value, start[name]), "with probability 1 the last restoration put every entry back"
    train(model, 1, seed=3)
    assert point.restorations == 2
    assert any(not torch.equal(value, start[name]) for name, value in branch_values(model).items())


def test_restoration_is_off_by_default_and_needs_a_restore_point():
    model = get_peft_model(tiny_llama(), paper())
    train(model, 2)
    assert model.base_model._restore_points == {}
    with pytest.raises(ValueError, match="restore point"):
        model.restore_stochastically()


def test_restoration_under_the_trainer_needs_no_callback(tmp_path):
    model = get_peft_model(tiny_llama(), paper(restore_every=1, restore_prob=1.0))
    start, router_start = branch_values(model), router_values(model)
    ids = torch.randint(0, 97, (8, 7), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True
    )
    Trainer(model=model, args=args, train_dataset=Rows(rows)).train()
    for name, value in branch_values(model).items():
        assert torch.equal(value, start[name]), "each optimizer step was followed by a full restoration"
    router_now = router_values(model)
    assert any(not torch.equal(router_now[name], value) for name, value in router_start.items()), "the router trained"


def test_trl_sft_trainer_trains_restores_and_logs_the_branch_weights(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tok = chat_tokenizer()
    config = paper(
        target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM", restore_every=2, restore_prob=0.5
    )
    model = get_peft_model(chat_llama(len(tok)), config)
    start = branch_values(model)
    data = datasets.Dataset.from_dict(
        {"prompt": [p + " =" for p in PROMPTS], "completion": [" " + a for a in ANSWERS]}
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=2e-2, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        bf16=False, max_length=32,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[SpaRTACallback()]
    )
    trainer.train()
    point = model.base_model._restore_points["default"]
    assert (point.steps, point.restorations) == (4, 2), "one count per optimizer step, not per micro-batch"
    assert any(not torch.equal(value, start[name]) for name, value in branch_values(model).items())
    logs = [record for record in trainer.state.log_history if "loss" in record]
    assert logs and all(
        0 < record["sparta/weight/shared"] < 1 and 0 < record["sparta/weight/task"] < 1 for record in logs
    )
    assert all(record["sparta/router"] >= 0 and record["sparta/orthogonality"] > 0 for record in logs)
    assert not any(key.startswith("sparta/gate/") for record in logs for key in record)


# ---- regularizers -----------------------------------------------------------------------------------------------------


def test_subspace_and_router_penalties_are_added_like_the_other_regularizers():
    model = get_peft_model(tiny_llama(), paper(orth_lambda=0.5, router_orth_lambda=2.0, init_weights=False))
    model.train()
    ids = torch.randint(0, 97, (2, 7))
    model(input_ids=ids, labels=ids)
    values = model.base_model.last_regularization
    subspace = sum(
        (layer.sparta_A_task["default"][0] @ layer.sparta_A_shared["default"].T).pow(2).sum()
        for layer in sparta_layers(model)
    )
    torch.testing.assert_close(values["orthogonality"], 0.5 * subspace.detach())
    expected_router = sum(router.loss(None, None, None) for router in routers(model))
    torch.testing.assert_close(values["router"], expected_router.detach())


# ---- saving, loading, removing tasks ----------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), paper(init_weights=False))
    train(model, 2)
    model.add_task("b")
    train(model, 2, seed=1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["format_version"] == 4 and saved["task_branches"] == "shared" and saved["task_names"] == ["a", "b"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    ours, theirs = model.state_dict(), loaded.state_dict()
    for name, value in ours.items():
        if "sparta_" in name:
            assert torch.equal(theirs[name], value), name
    assert "high-rank branch" in (tmp_path / "README.md").read_text()


def test_loading_with_a_task_list_that_does_not_match_the_router_rows_fails(tmp_path):
    model = get_peft_model(tiny_llama(), paper())
    model.add_task("b")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "task_names": ["a", "b", "c"]}))
    with pytest.raises(SpaRTALoadError, match="different saves"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_remove_task_drops_its_router_rows_only():
    model = get_peft_model(tiny_llama(), paper())
    train(model, 1)
    model.add_task("b")
    branches = branch_values(model)
    first_rows = [block.detach().clone() for block in routers(model)[0].matrices()]
    model.remove_task("b")
    assert model.base_model.task_names == ["a"]
    for name, value in branch_values(model).items():
        assert torch.equal(value, branches[name])
    router = routers(model)[0]
    assert len(router.keys) == 1 and router.keys[0].requires_grad, "task a is the current task again"
    assert torch.equal(router.matrices()[0], first_rows[0][:, :8])


# ---- generation with a KV cache --------------------------------------------------------------------------------------


def test_decode_steps_weigh_by_the_prompt_as_training_does():
    model = get_peft_model(tiny_llama(), paper(init_weights=False)).eval()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    first = routers(model)[0]  # layer 0's q_proj: its input does not depend on the adapter
    context = model.base_model.routing_context
    labels = ids.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :7], use_cache=True)
        model(input_ids=ids[:, 7:], cache=prefill.cache, use_cache=True)
        decoded = context.sequence_sums[first].clone()
        model(input_ids=ids, labels=labels)
        whole = context.sequence_sums[first]
    torch.testing.assert_close(decoded, whole, atol=1e-5, rtol=1e-5)


# ---- configuration ---------------------------------------------------------------------------------------------------


def test_paper_design_preset_follows_the_data_code():
    config = SpaRTAConfig.paper_design(target_modules=TARGETS)
    assert (config.task_branches, config.router, config.shared_update) == ("shared", "components", "train")
    assert (config.r_shared, config.r_task, config.alpha_shared, config.alpha_task) == (4, 16, 4, 16)
    assert (config.router_components, config.router_orth_lambda, config.restore_every) == (8, 1.0, None)
    assert SpaRTAConfig(target_modules=TARGETS).task_branches == "per_task"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"task_branches": "shared"}, "router='components'"),
        ({"router": "components"}, "router='components'"),
        ({"task_branches": "shared", "router": "components"}, "shared_update='train'"),
        ({"task_branches": "bogus"}, "task_branches"),
        ({"router_components": 0}, "router_components"),
        ({"router_orth_lambda": -1.0}, "router_orth_lambda"),
        ({"restore_every": 0}, "restore_every"),
        ({"restore_prob": 1.5}, "restore_prob"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        SpaRTAConfig(target_modules=TARGETS, **kwargs)


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"router_abstain_threshold": 0.5}, {"r_shared": 0}])
def test_paper_design_rejects_task_choice_and_a_missing_low_rank_branch(kwargs):
    with pytest.raises(ValueError, match="task_branches='shared'"):
        SpaRTAConfig.paper_design(target_modules=TARGETS, **kwargs)
