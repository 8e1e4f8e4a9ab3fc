"""The inference path: branches stacked once per weight version, no autograd Function, routing chosen once per prefill.

"General path" below is the fused autograd path that training uses, forced by making `inference_delta` decline.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_sparta.layer as layer_module
from peft_sparta import SpaRTAConfig, SpaRTALayer
from peft_sparta.kernels import gated_lowrank_reference, gated_lowrank_stacked, stack_blocks
from peft_sparta.kernels.gated_lowrank import GatedLowRankFunction
from peft_sparta.routers import PrototypeRouter, base
from tests.conftest import tiny_llama


TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPT_RANGES = {"a": (0, 12), "b": (85, 97), "c": (30, 42)}


def draw(name: str, rows: int, seed: int) -> torch.Tensor:
    return torch.randint(*PROMPT_RANGES[name], (rows, 10), generator=torch.Generator().manual_seed(seed))


def train_steps(model, input_ids, steps=2, lr=5e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def trained_model(seed: int = 0, **kwargs):
    """Three tasks on disjoint token ranges, each trained (non-zero branches); inputs of none of them abstain."""
    kwargs = {"target_modules": TARGETS, "r_shared": 2, "r_task": 4, "router_prototypes": 2, **kwargs}
    kwargs.setdefault("router_abstain_spread", 2.0)
    model = get_peft_model(tiny_llama(seed), SpaRTAConfig(task_names=["a"], **kwargs))
    for index, name in enumerate(PROMPT_RANGES):
        if index:
            model.add_task(name)
        train_steps(model, draw(name, 16, seed + index))
    return model


def sparta_layers(model) -> list[SpaRTALayer]:
    return [module for module in model.modules() if isinstance(module, SpaRTALayer)]


def mixed_batch():
    """Rows of task a and b, a row of no task (it abstains) and a left-padded row of task c."""
    unrelated = torch.randint(50, 70, (1, 10), generator=torch.Generator().manual_seed(9))
    input_ids = torch.cat([draw("a", 1, 5), draw("b", 1, 6), unrelated, draw("c", 1, 7)])
    mask = torch.ones_like(input_ids)
    mask[3, :4] = 0
    input_ids[3, :4] = 0
    return input_ids, mask


@pytest.fixture
def general_path(monkeypatch):
    """Run the general (training) path instead of the inference path inside the block."""

    def use_general():
        monkeypatch.setattr(SpaRTALayer, "inference_delta", lambda self, *args: None)

    return use_general


def logits(model, input_ids, mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


def generate(model, input_ids, mask, tokens=6):
    return model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("top_k", [1, None])
def test_inference_path_equals_general_path_on_mixed_padded_abstaining_batch(top_k, monkeypatch, general_path):
    model = trained_model(top_k=top_k)
    input_ids, mask = mixed_batch()
    fast_logits, fast_tokens = logits(model, input_ids, mask), generate(model, input_ids, mask)
    gates = next(iter(model.base_model.routing_context.sequence_gates.values())).flatten(1)
    assert gates[2].eq(0).all(), "the unrelated row abstains"
    assert [int(gates[row].argmax()) for row in (0, 1, 3)] == [0, 1, 2], "each task row routes to its own task"
    calls = []
    stacked = layer_module.gated_lowrank_stacked
    monkeypatch.setattr(layer_module, "gated_lowrank_stacked", lambda *a: calls.append(1) or stacked(*a))
    general_path()
    torch.testing.assert_close(logits(model, input_ids, mask), fast_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, input_ids, mask), fast_tokens)
    assert not calls, "the general path ran"


def test_inference_path_uses_no_autograd_function_and_matches_under_set_task(monkeypatch, general_path):
    model = trained_model()
    input_ids, mask = mixed_batch()

    def refuse(*args):
        raise AssertionError("an autograd Function ran at inference")

    monkeypatch.setattr(GatedLowRankFunction, "apply", refuse)
    model.set_task("b")
    forced = logits(model, input_ids, mask)
    monkeypatch.undo()
    model.set_task(None)
    routed = logits(model, input_ids, mask)
    general_path()
    model.set_task("b")
    torch.testing.assert_close(logits(model, input_ids, mask), forced, rtol=1e-5, atol=1e-5)
    model.set_task(None)
    torch.testing.assert_close(logits(model, input_ids, mask), routed, rtol=1e-5, atol=1e-5)


def count_stacking(monkeypatch) -> list:
    built = []
    stack = layer_module.stack_blocks
    monkeypatch.setattr(layer_module, "stack_blocks", lambda *a, **k: built.append(1) or stack(*a, **k))
    return built


def test_branches_are_stacked_once_and_decode_steps_reuse_the_prefill_routing(monkeypatch):
    model = trained_model(top_k=1)
    input_ids, mask = mixed_batch()
    built = count_stacking(monkeypatch)
    scored, selected = [], []
    scores, select = PrototypeRouter.scores, base.select_branches
    monkeypatch.setattr(PrototypeRouter, "scores", lambda self, *a: scored.append(1) or scores(self, *a))
    monkeypatch.setattr(base, "select_branches", lambda gates: selected.append(1) or select(gates))
    generate(model, input_ids, mask, tokens=5)
    assert len(built) == len(sparta_layers(model)), "one stack per layer for the batch's set of tasks"
    assert len(scored) == 1 and len(selected) == 1, "the prefill decides, the 4 decode steps reuse it"
    generate(model, input_ids, mask, tokens=5)
    logits(model, input_ids[:1])
    assert len(built) == 2 * len(sparta_layers(model)), "a second generation stacks nothing; a new task set does"


def test_training_add_task_remove_task_and_loading_invalidate_the_stacked_branches(monkeypatch, general_path):
    model = trained_model(top_k=1)
    input_ids, mask = mixed_batch()
    layers = sparta_layers(model)
    built = count_stacking(monkeypatch)

    def check(change: str, restacked: int = len(layers)):
        """Stacks again after the change, and the inference path still equals the general path."""
        start = len(built)
        fast = logits(model, input_ids, mask)
        assert len(built) == start + restacked, f"{change}: stacked again"
        with monkeypatch.context() as patch:
            patch.setattr(SpaRTALayer, "inference_delta", lambda self, *args: None)
            torch.testing.assert_close(logits(model, input_ids, mask), fast, rtol=1e-5, atol=1e-5)
        return fast

    before = check("first inference")
    model.train()
    assert not any(layer.sparta_inference_blocks for layer in layers), "training mode drops the stacks"
    model.eval()
    check("train() and back")
    model.add_task("d")
    assert not any(layer.sparta_inference_blocks for layer in layers)
    train_steps(model, draw("a", 8, 3))
    check("add_task and training")
    model.remove_task("a")
    assert not any(layer.sparta_inference_blocks for layer in layers)
    check("remove_task")
    other = trained_model(seed=1, top_k=1)
    model.remove_task("d")
    model.add_task("a")  # the same task list as `other`, in another order
    model.load_state_dict(other.state_dict())
    loaded = check("loading")
    torch.testing.assert_close(loaded, logits(other, input_ids, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded, before)
    with torch.no_grad():
        layers[0].sparta_B_task["default"][1].mul_(2)  # an in-place change bumps the version counter
    check("an in-place change", restacked=1)


@pytest.mark.parametrize("ungated", [0, 1])
@pytest.mark.parametrize("gated", [False, True])
def test_stacked_product_equals_the_reference(ungated, gated):
    generator = torch.Generator().manual_seed(0)
    ranks, in_features, out_features = (3, 5, 2), 7, 11
    a_blocks = [torch.randn(rank, in_features, generator=generator) for rank in ranks]
    b_blocks = [torch.randn(out_features, rank, generator=generator) for rank in ranks]
    scales = [0.5, 2.0, 1.5]
    x = torch.randn(2, 4, in_features, generator=generator)
    gates = torch.rand(2, 1, len(ranks) - ungated, generator=generator) if gated else None
    all_gates = None if gates is None else torch.cat([torch.ones(2, 1, ungated), gates], dim=-1)
    expected = gated_lowrank_reference(x, a_blocks, b_blocks, scales, all_gates)
    stacked = stack_blocks(a_blocks, b_blocks, scales, ungated=ungated)
    torch.testing.assert_close(gated_lowrank_stacked(x, stacked, gates), expected, rtol=1e-5, atol=1e-5)


def test_a_compiled_model_generates_the_tokens_of_the_eager_one():
    """torch.compile of the base model in eval mode (the routing hook and the branch choice break the graph; the rest
    compiles) generates exactly what the eager model generates, on a mixed, padded, abstaining batch."""
    torch._dynamo.reset()
    model = trained_model()
    input_ids, mask = mixed_batch()
    eager = generate(model, input_ids, mask, tokens=4)
    model.get_base_model().compile()
    try:
        assert torch.equal(generate(model, input_ids, mask, tokens=4), eager)
    finally:
        torch._dynamo.reset()


def test_min_gate_computes_only_the_branches_that_matter_and_applies_at_once():
    """With the default min gate a confidently routed input computes its own branch alone; router_min_gate=0 mixes
    every task's branch, and the change applies from the next forward."""
    model = trained_model(router_abstain_spread=None)
    tasks = []
    original = SpaRTALayer.inference_blocks
    record = lambda self, name, chosen, *rest: tasks.append(chosen) or original(self, name, chosen, *rest)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SpaRTALayer, "inference_blocks", record)
        logits(model, draw("b", 1, 11))
        assert set(tasks) == {(1,)}
        tasks.clear()
        model.peft_config["default"].router_min_gate = 0.0
        logits(model, draw("b", 1, 11))
        assert set(tasks) == {(0, 1, 2)}
