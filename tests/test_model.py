"""Behaviour of SpaRTA models: no-op at init, trainable parameters, continual API, routing, merging, adapters."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.nn import functional as F

from peft_sparta import SpaRTAConfig, SpaRTALayer
from peft_sparta.continual import calibrate_abstain_spread
from peft_sparta.layer import sparta_layers
from peft_sparta.routers import PrototypeRouter, Router
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama
from tests.helpers import LLAMA_TARGETS, train_steps


def sparta(base, **kwargs):
    kwargs.setdefault("target_modules", LLAMA_TARGETS)
    kwargs.setdefault("r_shared", 2)
    kwargs.setdefault("r_task", 4)
    return get_peft_model(base, SpaRTAConfig(**kwargs))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("init_weights", [True, "spectral"])
@pytest.mark.parametrize("router", ["prototype", "learned", "spectral"])
def test_output_equals_base_at_init(input_ids, init_weights, router):
    expected = logits(tiny_llama(), input_ids)
    model = sparta(tiny_llama(), init_weights=init_weights, router=router, task_names=["a", "b", "c"])
    assert torch.equal(logits(model, input_ids), expected)


def test_init_weights_false_changes_output(input_ids):
    expected = logits(tiny_llama(), input_ids)
    assert not torch.allclose(logits(sparta(tiny_llama(), init_weights=False), input_ids), expected)


@pytest.mark.parametrize(
    ("factory", "targets"),
    [(tiny_gpt2, ["c_attn", "c_fc"]), (tiny_bert, ["query", "value", "intermediate.dense"])],
)
def test_other_architectures_are_no_op_at_init_and_train(factory, targets, input_ids):
    base = factory()
    with torch.no_grad():
        expected = base(input_ids=input_ids)[0]
    model = get_peft_model(factory(), SpaRTAConfig(target_modules=targets, r_shared=2, r_task=4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids)[0], expected)
    model.train()
    model(input_ids=input_ids)[0].pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_unsupported_layer_type_is_a_clear_error():
    with pytest.raises(ValueError, match="only `torch.nn.Linear` and"):
        sparta(tiny_llama(), target_modules=["embed_tokens"])


def _quantized_stand_in(module: str, name: str, on_weight: bool = False) -> torch.nn.Module:
    """A model whose layer ``lin`` is an `nn.Linear` with float weights whose class (or, as torchao does it, whose
    weight's tensor class: ``on_weight``) is ``module.name``: what a quantization library leaves in a model, without
    the library (several need a GPU). Only the package name can tell it from a plain linear layer."""
    net = torch.nn.Module()
    if not on_weight:
        net.lin = type(name, (torch.nn.Linear,), {"__module__": module})(4, 4)
        return net
    net.lin = torch.nn.Linear(4, 4)
    tensor_class = type(name, (torch.Tensor,), {"__module__": module})
    net.lin.weight = torch.nn.Parameter(torch.zeros(4, 4).as_subclass(tensor_class), requires_grad=False)
    assert type(net.lin.weight) is tensor_class and net.lin.weight.dtype == torch.float32
    return net


@pytest.mark.parametrize(
    ("module", "name", "on_weight"),
    [
        ("bitsandbytes.nn.modules", "Linear8bitLt", False),
        ("bitsandbytes.nn.modules", "Linear4bit", False),
        ("auto_gptq.nn_modules.qlinear.qlinear_cuda", "QuantLinear", False),
        ("gptqmodel.nn_modules.qlinear.torch", "TorchQuantLinear", False),
        ("awq.modules.linear.gemm", "WQLinear_GEMM", False),
        ("optimum.gptq.quantizer", "QuantLinear", False),
        ("torchao.dtypes.affine_quantized_tensor", "AffineQuantizedTensor", True),
        ("torchao.quantization.quantize_.workflows.int8.int8_tensor", "Int8Tensor", True),
    ],
)
def test_quantized_base_layer_of_each_library_is_a_clear_error(module, name, on_weight):
    with pytest.raises(ValueError, match="quantized base layers"):
        get_peft_model(_quantized_stand_in(module, name, on_weight), SpaRTAConfig(target_modules=["lin"]))


def test_quantized_base_layer_with_integer_weights_is_a_clear_error():
    net = _quantized_stand_in("my_quantizer", "Int8Linear")
    net.lin.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantized base layers"):
        get_peft_model(net, SpaRTAConfig(target_modules=["lin"]))


def test_linear_layers_of_other_libraries_are_not_taken_for_quantized(input_ids):
    """The library check matches package names, not substrings: a layer from a package merely named like one
    (``awqward``, ``my_bitsandbytes``) is an ordinary linear layer."""
    for module in ("awqward.layers", "my_bitsandbytes"):
        model = get_peft_model(_quantized_stand_in(module, "Linear"), SpaRTAConfig(target_modules=["lin"]))
        assert isinstance(model.base_model.model.lin, SpaRTALayer)


def test_gradients_only_on_trainable_parameters(input_ids):
    model = sparta(tiny_llama(), task_names=["a", "b"])
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "sparta_" in name and param.grad is not None, name
            assert "task.default.0" not in name, f"frozen task branch is trainable: {name}"
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("shared_update", ["train", "freeze_after_first"])
def test_add_task_freezes_previous_task_under_optimizer_step(input_ids, shared_update):
    model = sparta(tiny_llama(), shared_update=shared_update)
    train_steps(model, input_ids)
    model.add_task("second")
    assert model.task_names == ["task_0", "second"]
    before = snapshot(model)
    train_steps(model, input_ids)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert all("sparta_" in n for n in changed)
    assert not any("task.default.0" in n for n in changed)
    assert any("task.default.1" in n for n in changed)
    shared_changed = any("_shared." in n for n in changed)
    assert shared_changed == (shared_update == "train")
    for layer in sparta_layers(model):
        assert layer.sparta_router["default"].counts.shape[0] == 2


def test_task_name_errors(input_ids):
    model = sparta(tiny_llama())
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("task_0")
    with pytest.raises(ValueError, match="non-empty string"):
        model.add_task("")
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        model.set_task("nope")


def test_forced_routing_uses_only_that_branch(input_ids):
    model = sparta(tiny_llama(), init_weights=False, task_names=["a", "b"])
    model.set_task("a")
    forced_a = logits(model, input_ids)
    for layer in sparta_layers(model):
        torch.nn.init.zeros_(layer.sparta_B_task["default"][1])
    assert torch.equal(logits(model, input_ids), forced_a)
    model.set_task(None)
    assert all(layer.forced_task["default"] is None for layer in sparta_layers(model))


def _two_task_inputs():
    generator = torch.Generator().manual_seed(3)
    task_a = torch.randint(0, 12, (4, 10), generator=generator)
    task_b = torch.randint(85, 97, (4, 10), generator=generator)
    return task_a, task_b


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("router", ["prototype", "learned"])
def test_router_picks_the_task_of_the_input_without_task_id(granularity, router):
    task_a, task_b = _two_task_inputs()
    model = sparta(tiny_llama(), router=router, router_granularity=granularity, task_names=["a"], router_lambda=1.0)
    steps = 60 if router == "learned" else 2
    train_steps(model, task_a, steps=steps, lr=5e-2)
    model.add_task("b")
    train_steps(model, task_b, steps=steps, lr=5e-2)
    layer = sparta_layers(model)[0]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    for expected, batch in enumerate([task_a, task_b]):
        model(input_ids=batch)
        chosen = layer.router_gates("default", captured["x"]).argmax(-1).flatten()
        # one linear key per task separates single random tokens less cleanly than prototypes or sequence queries
        assert (chosen == expected).float().mean() >= (0.8 if (router, granularity) == ("learned", "token") else 0.9)
    hook.remove()


def test_sequence_routing_scores_each_input_once_per_forward_and_gives_each_layer_the_same_gates(monkeypatch):
    task_a, task_b = _two_task_inputs()
    model = sparta(tiny_llama(), task_names=["a"])
    train_steps(model, task_a, steps=2)
    for name, batch in [("b", task_b), ("c", task_a + 1)]:
        model.add_task(name)
        train_steps(model, batch, steps=2)
    mixed = torch.cat([task_a[:2], task_b[:2]])
    calls = []
    scores = PrototypeRouter.scores
    monkeypatch.setattr(PrototypeRouter, "scores", lambda self, *args: calls.append(1) or scores(self, *args))
    routed_once = logits(model, mixed)
    assert len(calls) == 1, "every adapted layer shares the adapter's sequence routing"

    monkeypatch.setattr(Router, "_decides_per_sequence", lambda self, context: False)  # every layer decides itself
    routed_per_layer = logits(model, mixed)
    assert len(calls) == 1 + len(sparta_layers(model))
    torch.testing.assert_close(routed_once, routed_per_layer, rtol=0, atol=0)


def _prompt_answer_batch(prompt_tokens: tuple[int, int], answer_tokens: tuple[int, int], seed: int):
    """Rows of a short prompt and a long answer drawn from other tokens, labels -100 on the prompt (completion-only
    loss); the last row is right-padded: its last two positions are masked out and labelled -100 too."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(*prompt_tokens, (4, 4), generator=generator)
    answer = torch.randint(*answer_tokens, (4, 14), generator=generator)
    input_ids = torch.cat([prompt, answer], dim=1)
    labels = torch.cat([torch.full_like(prompt, -100), answer], dim=1)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    labels[-1, -2:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, prompt


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_prototypes_are_built_from_the_prompt_positions_only(granularity):
    """One prototype per task is the mean of the unit queries it was given: with completion-only labels, the queries
    of the prompt positions alone (their mean embedding, or each prompt token's layer input), never the answer's."""
    model = sparta(tiny_llama(), task_names=["a"], router_granularity=granularity, router_prototypes=1)
    batch, prompt = _prompt_answer_batch((0, 12), (85, 97), seed=4)
    layers = sparta_layers(model)
    inputs = {}

    def keep_input(layer, args):
        inputs[layer] = args[0]

    hooks = [layer.register_forward_pre_hook(keep_input) for layer in layers]
    model.train()
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    if granularity == "sequence":
        embedded = model.get_input_embeddings().weight[prompt].float()
        expected = F.normalize(embedded.mean(dim=1), dim=-1).mean(dim=0)
    for layer in layers:
        router = layer.router("default")
        router = getattr(router, "owner", router)  # under sequence routing one layer may hold the adapter's state
        if granularity == "token":
            queries = F.normalize(inputs[layer][:, : prompt.shape[1]].float(), dim=-1).reshape(-1, layer.in_features)
            expected = queries.mean(dim=0)
        assert router.counts.tolist() == [[len(prompt) if granularity == "sequence" else prompt.numel()]]
        torch.testing.assert_close(router.prototypes[0, 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_prompt_only_inputs_route_to_their_task_when_answers_look_like_the_other_task(granularity):
    """Task a asks with tokens 0-11 and answers with 85-96; task b the other way round. Prototypes of the prompts
    send each task's prompts (test inputs carry no answer) to its own branch; prototypes of whole sequences would
    send them to the other task, whose long answers look like them."""
    model = sparta(tiny_llama(), task_names=["a"], router_granularity=granularity)
    batch_a, prompt_a = _prompt_answer_batch((0, 12), (85, 97), seed=4)
    batch_b, prompt_b = _prompt_answer_batch((85, 97), (0, 12), seed=5)
    model.train()
    with torch.no_grad():
        model(**batch_a)
        model.add_task("b")
        model(**batch_b)
    model.eval()
    layer = sparta_layers(model)[0]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    for expected, prompt in enumerate([prompt_a, prompt_b]):
        model(input_ids=prompt)
        chosen = layer.router_gates("default", captured["x"]).argmax(-1)
        assert (chosen == expected).all(), f"prompts of task {expected} routed to {chosen.flatten().tolist()}"
    hook.remove()


def test_spectral_router_routes_and_top_k_computes_one_branch(input_ids):
    model = sparta(tiny_llama(), router="spectral", init_weights=False, task_names=["a", "b", "c"], top_k=1)
    model.eval()
    layer = sparta_layers(model)[0]
    x = torch.randn(1, 1, layer.in_features)
    routing = layer.route("default", x)
    assert len(routing.tasks) == 1 and torch.allclose(routing.gates, torch.ones_like(routing.gates))
    assert logits(model, input_ids).isfinite().all()


def adapter_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_regularizers_reach_the_gradient_through_the_outputs_not_the_loss(input_ids, scale):
    """outputs.loss is the task loss; backpropagating it (or any loss of the outputs) adds scale * d(penalty)."""
    model = sparta(tiny_llama(), init_weights=False, task_names=["a", "b"], orth_lambda=3.0)
    model.set_task("b")
    model.eval()
    with torch.no_grad():
        task_loss = model(input_ids=input_ids, labels=input_ids).loss
    model.train()
    model.base_model.penalty_scale = scale
    loss = model(input_ids=input_ids, labels=input_ids).loss
    assert torch.allclose(loss, task_loss)
    loss.backward()
    attached = adapter_grads(model)

    model.eval()  # no attachment in eval mode: add the penalty by hand
    penalties = [3.0 * layer.orthogonality_loss("default") for layer in sparta_layers(model)]
    (model(input_ids=input_ids, labels=input_ids).loss + scale * sum(penalties)).backward()
    expected = adapter_grads(model)
    assert attached.keys() == expected.keys() and any("sparta_A_task" in name for name in attached)
    for name in attached:
        assert torch.allclose(attached[name], expected[name], atol=1e-6), name
    reported = model.base_model.last_regularization["orthogonality"]
    assert torch.allclose(reported, sum(penalties).detach())


def test_merge_single_task_and_conv1d_are_exact(input_ids):
    for model in [
        sparta(tiny_llama(), init_weights=False),
        get_peft_model(tiny_gpt2(), SpaRTAConfig(target_modules=["c_attn"], r_shared=2, r_task=4, init_weights=False)),
    ]:
        expected = model(input_ids=input_ids).logits.detach()
        model.merge_adapter()
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-5)
        model.unmerge_adapter()
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-5)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, SpaRTALayer) for m in merged.modules())
        assert not merged._forward_hooks and not merged._forward_pre_hooks
        assert torch.allclose(merged(input_ids=input_ids).logits, expected, atol=1e-5)


def test_merge_under_dynamic_routing_is_an_error_and_forced_merge_is_exact(input_ids):
    model = sparta(tiny_llama(), init_weights=False, task_names=["a", "b"])
    with pytest.raises(ValueError, match="set_task"):
        model.merge_adapter()
    assert not any(layer.merged for layer in sparta_layers(model))
    model.set_task("a")
    expected = logits(model, input_ids)
    model.merge_adapter()
    assert torch.allclose(logits(model, input_ids), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        model.add_task("c")


def test_disable_adapter_gives_base_output(input_ids):
    expected = logits(tiny_llama(), input_ids)
    model = sparta(tiny_llama(), init_weights=False)
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), expected)
    assert not torch.equal(logits(model, input_ids), expected)


def test_multiple_adapters_set_and_delete(input_ids):
    model = sparta(tiny_llama(), init_weights=False)
    model.add_adapter("other", SpaRTAConfig(target_modules=LLAMA_TARGETS, r_shared=2, r_task=4, init_weights=False))
    first = logits(model, input_ids)
    model.set_adapter("other")
    assert not torch.allclose(logits(model, input_ids), first)
    model.add_task("second")
    assert model.get_task_names("other") == ["task_0", "second"]
    assert model.get_task_names("default") == ["task_0"]
    model.delete_adapter("other")
    assert not any("other" in name for name in model.state_dict())
    for layer in sparta_layers(model):
        for attribute in layer.adapter_layer_names + layer.other_param_names:
            assert "other" not in getattr(layer, attribute)


def test_gradient_checkpointing_and_generation_with_kv_cache(input_ids):
    model = sparta(tiny_llama(), task_names=["a", "b"])
    model.gradient_checkpointing_enable()
    train_steps(model, input_ids, steps=1)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=4)
    assert out.shape == (2, 13)


@pytest.mark.parametrize("padded", [False, True])
def test_generation_routes_every_decode_step_by_the_prompt(padded):
    """Decode steps keep the prefill's routing, with or without an attention mask (transformers drops an all-ones
    one): a step's single new token never re-routes the sequence."""
    task_a, task_b = _two_task_inputs()
    model = sparta(tiny_llama(), task_names=["a"])
    train_steps(model, task_a, steps=1)
    model.add_task("b")
    train_steps(model, task_b, steps=1)
    prompts = torch.cat([task_a[:1], task_b[:1]])
    mask = torch.ones_like(prompts)
    if padded:
        mask[0, :3] = 0
    queries = []
    context = model.base_model.routing_context
    hook = sparta_layers(model)[0].register_forward_pre_hook(lambda *_: queries.append(context.sequence_query))
    model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    hook.remove()
    assert len(queries) == 4 and all(query is queries[0] for query in queries)


def _abstain_probe_inputs():
    task_a, task_b = _two_task_inputs()
    unrelated = torch.randint(40, 60, (4, 10), generator=torch.Generator().manual_seed(5))
    return task_a, task_b, unrelated


@pytest.mark.parametrize("r_shared", [2, 0])
def test_router_abstains_on_inputs_near_no_task(r_shared):
    """Inputs far from every task's prototypes get no task branch (base + shared only); task inputs still route."""
    task_a, task_b, unrelated = _abstain_probe_inputs()
    model = sparta(
        tiny_llama(), r_shared=r_shared, task_names=["a"], router_abstain_threshold=0.6, router_abstain_spread=None
    )
    train_steps(model, task_a, steps=2, lr=5e-2)
    model.add_task("b")
    train_steps(model, task_b, steps=2, lr=5e-2)
    layer = sparta_layers(model)[0]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    for expected, batch in enumerate([task_a, task_b, unrelated]):
        model(input_ids=batch)
        gates = layer.router_gates("default", captured["x"]).flatten(0, -2)
        if expected < 2:
            assert (gates.argmax(-1) == expected).all() and (gates.amax(-1) > 0.99).all()
        else:
            assert torch.equal(gates, torch.zeros_like(gates)), "unrelated inputs abstain"
    hook.remove()
    abstaining = logits(model, unrelated)
    model.peft_config["default"].router_abstain_threshold = None
    assert not torch.allclose(logits(model, unrelated), abstaining), "without abstention a task branch acts"
    for layer in sparta_layers(model):
        for b in layer.sparta_B_task["default"]:
            torch.nn.init.zeros_(b)
    torch.testing.assert_close(abstaining, logits(model, unrelated), atol=1e-6, rtol=1e-6)
    if r_shared == 0:
        with model.disable_adapter():
            assert torch.equal(abstaining, logits(model, unrelated)), "no shared branch: exactly the base model"


def test_router_abstains_below_every_task_floor_from_its_spread():
    """``router_abstain_spread``: fresh inputs of a trained task route to it, inputs unlike every task abstain (no
    task branch), with no threshold to choose from data."""
    generator = torch.Generator().manual_seed(11)
    ranges = {"a": (0, 12), "b": (85, 97)}
    draw = lambda name, rows: torch.randint(*ranges[name], (rows, 10), generator=generator)  # noqa: E731
    model = sparta(tiny_llama(), task_names=["a"], router_prototypes=2, router_abstain_spread=2.0)
    for task in ("a", "b"):
        if task == "b":
            model.add_task("b")
        for _ in range(2):  # fresh prompts each step: the router counts a repeated input once
            train_steps(model, draw(task, 32), steps=1, lr=5e-2)
    layer = sparta_layers(model)[0]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    unrelated = torch.randint(40, 60, (8, 10), generator=generator)
    for expected, batch in enumerate([draw("a", 8), draw("b", 8), unrelated]):
        model(input_ids=batch)
        gates = layer.router_gates("default", captured["x"]).flatten(0, -2)
        if expected < 2:
            assert ((gates.argmax(-1) == expected) & (gates.amax(-1) > 0)).float().mean() >= 0.9
        else:
            assert (gates.amax(-1) == 0).float().mean() >= 0.75, "unrelated inputs abstain"
    hook.remove()
    abstaining = logits(model, unrelated)
    model.peft_config["default"].router_abstain_spread = None
    assert not torch.allclose(logits(model, unrelated), abstaining), "without the floors a task branch acts"


def test_calibrated_abstain_spread_keeps_task_inputs_and_abstains_on_unrelated_ones():
    generator = torch.Generator().manual_seed(11)
    draw = lambda low, rows: torch.randint(low, low + 12, (rows, 10), generator=generator)  # noqa: E731
    model = sparta(tiny_llama(), task_names=["a"], router_prototypes=2)
    train_steps(model, draw(0, 32), steps=2, lr=5e-2)
    model.add_task("b")
    train_steps(model, draw(85, 32), steps=2, lr=5e-2)
    tasks = [{"input_ids": draw(0, 8)}, {"input_ids": draw(85, 8)}]
    unrelated = [{"input_ids": torch.randint(40, 60, (8, 10), generator=generator)}]
    spread = calibrate_abstain_spread(model, tasks, unrelated, max_task_abstain=0.1)
    assert spread is not None
    model.peft_config["default"].router_abstain_spread = spread
    layer = sparta_layers(model)[0]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    kept = []
    for batch in [*tasks, *unrelated]:
        model(**batch)
        kept.append((layer.router_gates("default", captured["x"]).flatten(0, -2).amax(-1) > 0).float().mean())
    hook.remove()
    assert kept[0] >= 0.9 and kept[1] >= 0.9 and kept[2] <= 0.25
    token = sparta(tiny_llama(), task_names=["a"], router_granularity="token")
    with pytest.raises(ValueError, match="sequence routing"):
        calibrate_abstain_spread(token, tasks, unrelated)


def test_router_abstains_with_a_single_task():
    task_a, _, unrelated = _abstain_probe_inputs()
    model = sparta(
        tiny_llama(), r_shared=0, task_names=["a"], router_abstain_threshold=0.6, router_abstain_spread=None
    )
    train_steps(model, task_a, steps=2, lr=5e-2)
    with model.disable_adapter():
        base_unrelated, base_task = logits(model, unrelated), logits(model, task_a)
    assert torch.equal(logits(model, unrelated), base_unrelated)
    assert not torch.allclose(logits(model, task_a), base_task), "the task's own inputs use its branch"


def test_router_metric_changed_at_run_time_applies_to_the_next_forward():
    task_a, task_b = _two_task_inputs()
    # soft gates, so that the two metrics' gates differ visibly
    model = sparta(tiny_llama(), task_names=["a"], router_abstain_spread=None, router_temperature=1.0)
    train_steps(model, task_a, steps=2)
    model.add_task("b")
    train_steps(model, task_b, steps=2)
    layer = sparta_layers(model)[0]
    captured = {}
    layer.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    mixed = torch.cat([task_a[:2], task_b[:2]])

    def gates_and_scores():
        model(input_ids=mixed)
        return layer.router_gates("default", captured["x"]), layer.router_scores("default", captured["x"])

    discriminant, scores = gates_and_scores()
    model.peft_config["default"].router_metric = "cosine"
    cosine, _ = gates_and_scores()
    temperature = model.peft_config["default"].router_temperature
    torch.testing.assert_close(cosine, torch.softmax(scores / temperature, dim=-1))
    assert not torch.allclose(discriminant, cosine)
