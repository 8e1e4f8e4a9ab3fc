"""Routing under use that used to give silently wrong results: concurrent inference, a router metric switched before
saving, non-finite training inputs, small tasks trained for several epochs, prompts after a cached prefix."""

from __future__ import annotations

import copy
import json
import threading
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from peft_sparta import SpaRTAConfig, SpaRTALoadError
from peft_sparta.config import DEFAULT_ABSTAIN_SPREAD
from peft_sparta.continual import RoutingRecorder
from peft_sparta.layer import sparta_layers
from tests.conftest import tiny_llama


#: Token ranges of the two tasks' prompts: far apart, so that the router tells them apart at once.
TASK_TOKENS = {"a": (3, 30), "b": (60, 90)}


def config(**kwargs) -> SpaRTAConfig:
    return SpaRTAConfig(r_shared=2, r_task=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def prompts(task: str, rows: int, length: int = 8, seed: int = 0) -> torch.Tensor:
    low, high = TASK_TOKENS[task]
    return torch.randint(low, high, (rows, length), generator=torch.Generator().manual_seed(seed))


def learn(model, batches) -> None:
    """Training-mode forwards that build the router state (no optimizer: the branches keep their values)."""
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    model.eval()


def two_task_model(**kwargs):
    model = get_peft_model(tiny_llama(), config(init_weights=False, task_names=["a"], **kwargs))
    learn(model, [prompts("a", 8, seed=1)])
    model.add_task("b")
    learn(model, [prompts("b", 8, seed=2)])
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- 1. concurrent inference -------------------------------------------------------------------------------------


def test_threads_running_inference_on_one_model_keep_their_own_routing():
    """Two threads with other batch sizes and tasks: thread A is held inside its first adapted layer until thread B
    has run a whole forward, then each thread keeps running; every output equals the single-threaded one."""
    model = two_task_model()
    inputs = {"a": prompts("a", 3, seed=5), "b": prompts("b", 5, seed=6)}
    expected = {task: logits(model, ids) for task, ids in inputs.items()}
    a_inside, b_done = threading.Event(), threading.Event()

    def hold_thread_a_once(module, args):
        if threading.current_thread().name == "a" and not a_inside.is_set():
            a_inside.set()
            b_done.wait(timeout=30)

    hook = sparta_layers(model)[0].register_forward_pre_hook(hold_thread_a_once)
    results, errors = {"a": [], "b": []}, []

    def run(task: str) -> None:
        try:
            if task == "b":
                a_inside.wait(timeout=30)
            for step in range(20):
                results[task].append(logits(model, inputs[task]))
                if task == "b" and step == 0:
                    b_done.set()
        except Exception as error:  # reported below, with the thread's task
            errors.append(f"thread {task}: {error!r}")
            b_done.set()

    threads = [threading.Thread(target=run, args=(task,), name=task) for task in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hook.remove()
    assert not errors
    for task, outputs in results.items():
        assert len(outputs) == 20
        assert all(torch.equal(output, expected[task]) for output in outputs), task


def test_backward_in_another_thread_recomputes_checkpointed_layers_with_the_forward_routing():
    """The autograd engine runs a CUDA backward in a thread of its own, where gradient checkpointing recomputes the
    layers: a thread that began no forward routes by the latest one (here: backward called from another thread)."""
    model = get_peft_model(tiny_llama(), config(router="learned", task_names=["a", "b"]))
    model.gradient_checkpointing_enable()
    model.train()
    ids = prompts("b", 2, seed=3)

    def gradients(backward_in_thread: bool) -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        if backward_in_thread:
            thread = threading.Thread(target=loss.backward)
            thread.start()
            thread.join()
        else:
            loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    same_thread = gradients(backward_in_thread=False)
    other_thread = gradients(backward_in_thread=True)
    assert all(torch.equal(a, b) for a, b in zip(same_thread, other_thread))


def test_a_copied_model_routes_as_the_original():
    model = two_task_model()
    copied = copy.deepcopy(model)
    ids = torch.cat([prompts("a", 2, seed=7), prompts("b", 2, seed=8)])
    assert torch.equal(logits(copied, ids), logits(model, ids))


# ---- 2. router_metric switched at run time, then saved ------------------------------------------------------------


def mixed_prompts() -> torch.Tensor:
    return torch.cat([prompts("a", 2, seed=30), prompts("b", 2, seed=31), prompts("a", 1, seed=32) + 30])


@pytest.mark.parametrize(("built_with", "saved_with"), [("discriminant", "cosine"), ("cosine", "discriminant")])
def test_an_adapter_saved_after_switching_router_metric_loads_to_the_same_outputs(tmp_path, built_with, saved_with):
    """A soft temperature and no floor, so that any change of the choice scores shows in the logits."""
    model = two_task_model(router_metric=built_with, router_temperature=5.0, router_abstain_spread=None)
    model.peft_config["default"].router_metric = saved_with
    learn(model, [prompts("b", 4, seed=3)])  # the current task keeps training under the new metric
    expected = logits(model, mixed_prompts())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.peft_config["default"].router_metric == saved_with
    assert torch.equal(logits(loaded, mixed_prompts()), expected)
    loaded.peft_config["default"].router_metric = built_with
    model.peft_config["default"].router_metric = built_with
    assert torch.equal(logits(loaded, mixed_prompts()), logits(model, mixed_prompts()))


def test_a_version_5_adapter_built_under_cosine_loads_without_a_query_spread(tmp_path):
    """Version 5 kept the query spread only for a router built with the discriminant metric; such an adapter loads
    with a zero spread, as its router held none. From version 6 on, a missing spread is an incomplete file."""
    model = two_task_model(router_metric="cosine", router_temperature=5.0, router_abstain_spread=None)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {key: value for key, value in weights.items() if ".query_" not in key}, tmp_path / "adapter_model.safetensors"
    )
    with pytest.raises(SpaRTALoadError, match="lack 2 tensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "format_version": 5}))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(logits(loaded, mixed_prompts()), logits(model, mixed_prompts()))
    for router in (loaded, model):
        router.peft_config["default"].router_metric = "discriminant"
    owner = sparta_layers(model)[0].sparta_router["default"]
    owner.query_scatter.zero_()
    owner.query_count.zero_()
    assert torch.equal(logits(loaded, mixed_prompts()), logits(model, mixed_prompts()))


# ---- 3. non-finite queries in a training forward ----------------------------------------------------------------


def router_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if ".sparta_router." in name}


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize(("bad_value", "grad"), [(float("nan"), False), (float("inf"), True)])
def test_a_non_finite_row_in_a_training_forward_is_left_out_of_the_router_state(granularity, bad_value, grad):
    """One row with NaN or inf embeddings: the router learns the other rows exactly as a batch without that row
    (its state and its routing of clean inputs), warns, and its state stays finite."""
    batch = torch.cat([prompts("b", 2, seed=40), prompts("b", 2, seed=41)])
    poisoned, clean = two_task_model(router_granularity=granularity), two_task_model(router_granularity=granularity)
    for model, rows in ((poisoned, batch), (clean, batch[[0, 2, 3]])):
        embeds = model.get_input_embeddings()(rows).detach()
        if model is poisoned:
            embeds[1] = bad_value
        model.train()
        with torch.set_grad_enabled(grad), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(inputs_embeds=embeds)
        model.eval()
        skipped = [w for w in caught if "not finite" in str(w.message)]
        assert (len(skipped) > 0) == (model is poisoned)
    poisoned_state, clean_state = router_state(poisoned), router_state(clean)
    assert all(torch.isfinite(tensor.float()).all() for tensor in poisoned_state.values())
    for name, tensor in clean_state.items():
        torch.testing.assert_close(poisoned_state[name], tensor)
    torch.testing.assert_close(logits(poisoned, mixed_prompts()), logits(clean, mixed_prompts()))


# ---- 4. a small task trained for several epochs ------------------------------------------------------------------


def test_the_router_state_and_floor_do_not_depend_on_how_often_the_same_prompts_were_seen():
    """12 prompts of task a seen 5 times (shuffled into other batches, padded otherwise) give the router the state of
    one epoch, and fresh prompts of task a route to it under the default floor (they all abstained)."""
    task_a = prompts("a", 12, length=16, seed=50)

    def trained(epochs: int):
        model = get_peft_model(tiny_llama(), config(init_weights=False, task_names=["b"]))
        learn(model, [prompts("b", 16, seed=51)])
        model.add_task("a")
        model.train()
        with torch.no_grad():
            for epoch in range(epochs):
                order = torch.randperm(12, generator=torch.Generator().manual_seed(epoch))
                for rows in order.split(4):
                    padding = torch.zeros(4, epoch, dtype=torch.long)
                    ids = torch.cat([padding, task_a[rows]], dim=1)
                    mask = torch.cat([torch.zeros_like(padding), torch.ones_like(task_a[rows])], dim=1)
                    model(input_ids=ids, attention_mask=mask)
        return model.eval()

    once, five_times = trained(epochs=1), trained(epochs=5)
    state_once, state_five = router_state(once), router_state(five_times)
    assert all(torch.equal(state_five[name], tensor) for name, tensor in state_once.items())
    fresh = prompts("a", 16, length=16, seed=52)
    with RoutingRecorder(five_times) as gates, RoutingRecorder(five_times, quantity="scores") as scores:
        logits(five_times, fresh)
    floor_a = sparta_layers(five_times)[0].sparta_router["default"].score_floors(DEFAULT_ABSTAIN_SPREAD)[1]
    assert (scores.take()[:, 1] >= floor_a).all(), "every fresh prompt of task a reaches its floor"
    assert torch.allclose(gates.take().sum(dim=-1), torch.ones(16)), "no fresh prompt of task a abstains"


# ---- 5. a prompt after a cached prefix ---------------------------------------------------------------------------


def test_prompts_after_a_cached_system_prompt_route_as_the_whole_sequence_would():
    """transformers' prompt-cache reuse: a system prompt is run once into a cache, each user prompt continues a copy.
    Each continuation routes to its own task, with the gates of one forward of system prompt + prompt, and warns
    that the cached prefix was computed under another routing."""
    system = torch.randint(40, 50, (1, 6), generator=torch.Generator().manual_seed(9))
    model = get_peft_model(tiny_llama(), config(init_weights=False, task_names=["a"]))
    for index, task in enumerate("ab"):
        if index:
            model.add_task(task)
        learn(model, [torch.cat([system.expand(8, -1), prompts(task, 8, seed=index + 1)], dim=1)])
    prefix = DynamicCache()
    with torch.no_grad():
        model(input_ids=system, cache=prefix, use_cache=True)
    for expected_task, task in enumerate("ab"):
        prompt = prompts(task, 1, seed=20 + expected_task)
        whole = torch.cat([system, prompt], dim=1)
        with RoutingRecorder(model) as recorder, torch.no_grad():
            model(input_ids=whole)
            with pytest.warns(UserWarning, match="reuse a cached prefix only among prompts of one task"):
                model(input_ids=prompt, cache=copy.deepcopy(prefix), attention_mask=torch.ones_like(whole))
        one_forward, continued = recorder.take()
        assert continued.argmax().item() == expected_task
        torch.testing.assert_close(continued, one_forward)


def test_decode_steps_after_a_continuation_keep_its_routing_and_chunked_prefill_routes_as_one_forward():
    model = two_task_model()
    whole = torch.cat([prompts("a", 2, length=4, seed=11), prompts("b", 2, length=12, seed=12)], dim=1)
    with RoutingRecorder(model) as recorder, torch.no_grad(), pytest.warns(UserWarning):
        model(input_ids=whole)
        cache = DynamicCache()
        model(input_ids=whole[:, :4], cache=cache, use_cache=True)
        model(input_ids=whole[:, 4:], cache=cache, use_cache=True)
        model(input_ids=torch.tensor([[5], [5]]), cache=cache, use_cache=True)
    one_forward, first_chunk, last_chunk, decode_step = recorder.take().split(2)
    assert first_chunk.argmax(dim=-1).tolist() == [0, 0] and one_forward.argmax(dim=-1).tolist() == [1, 1]
    torch.testing.assert_close(last_chunk, one_forward)
    assert torch.equal(decode_step, last_chunk)
