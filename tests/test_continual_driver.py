"""`train_sequence` on tiny models: every baseline runs and reports, SpaRTA's routing is recorded, the forced-branch
learning accuracy and the held-out tasks on a scripted harness, the routing accuracy and the LoRA+ parameter groups."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import suites
from benchmarks.baselines import METHODS, make_method
from peft_sparta import SpaRTAConfig
from peft_sparta.continual import (
    CausalLMHarness,
    ContinualArguments,
    EmbeddingClassificationHarness,
    Harness,
    Method,
    RoutingRecorder,
    train_sequence,
)
from peft_sparta.continual.driver import _routing_accuracy
from tests.conftest import FAST, HELD_OUT, tiny_bert, tiny_llama, word_tokenizer


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_and_reports(classification, name):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    method = make_method(name, ["query", "value"], r_shared=2, r_task=4)
    result = train_sequence(
        lambda: tiny_bert(vocab_size=len(tokenizer)), tasks, FAST, harness=harness, method=method, held_out=HELD_OUT
    )
    data = result.to_dict()
    json.dumps(data)  # serialisable, NaN turned to None
    rows = data["accuracy_matrix"]
    assert len(rows) == (1 if method.multitask else len(tasks))
    for i, row in enumerate(rows):
        assert len(row) == len(tasks)
        measured = [value for value in row if value is not None]
        assert all(0.0 <= value <= 1.0 for value in measured)
        if not method.multitask:
            assert len(measured) == min(i + 2, len(tasks))
    assert 0.0 <= data["AA"] <= 1.0
    assert data["trainable_params"] > 0
    if method.multitask:
        assert data["BWT"] is None
    else:
        assert -1.0 <= data["BWT"] <= 1.0 and -1.0 <= data["FWT"] <= 1.0
    routed = method.routes
    assert (data["routing_accuracy"] is not None) == routed
    if routed:
        assert 0.0 <= data["routing_accuracy"] <= 1.0
        assert len(data["routing_weights"]) == len(tasks)
        assert all(len(row) == len(tasks) for row in data["routing_weights"])
    # learning accuracy with each task's own branch forced: one per task; a method without a router has one path
    if method.multitask:
        assert data["forced_learning_accuracy"] is None and data["forced_learning_per_task"] is None
    else:
        forced = data["forced_learning_per_task"]
        assert len(forced) == len(tasks) and all(0.0 <= value <= 1.0 for value in forced)
        assert data["forced_learning_accuracy"] == pytest.approx(sum(forced) / len(tasks))
        if not method.routes:
            assert forced == [rows[i][i] for i in range(len(tasks))]
    # held-out tasks: scored for every method, against the base model before training
    names = [task.name for task in HELD_OUT]
    assert list(data["unseen_accuracy"]) == list(data["unseen_base_accuracy"]) == list(data["unseen_gain"]) == names
    for task in names:
        assert 0.0 <= data["unseen_accuracy"][task] <= 1.0
        expected = data["unseen_accuracy"][task] - data["unseen_base_accuracy"][task]
        assert data["unseen_gain"][task] == pytest.approx(expected)
    if method.routes:
        assert set(data["unseen_routing_weights"]) == set(names)
        assert all(len(gates) == len(tasks) for gates in data["unseen_routing_weights"].values())
    else:
        assert data["unseen_routing_weights"] is None


def test_trainable_rank_is_the_same_for_every_sequential_method(classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    counts = {}
    for name in ("sparta", "sparta_train_shared", "seq_lora", "o_lora", "sparta_no_shared"):
        method = make_method(name, ["query", "value"], r_shared=2, r_task=4)
        args = ContinualArguments(steps=1, batch_size=4, progress=False, measure_forward_transfer=False)
        counts[name] = train_sequence(
            lambda: tiny_bert(vocab_size=len(tokenizer)), tasks[:2], args, harness=harness, method=method
        ).trainable_params
    # by default SpaRTA's shared branch trains with the first task only: afterwards rank 4 trains, not 2 + 4
    assert counts.pop("sparta") == 2 * 2 * 4 * 64
    # rank 6 on query and value of 2 layers: 2 * 2 * 6 * (32 + 32)
    assert set(counts.values()) == {2 * 2 * 6 * 64}, counts


def test_o_lora_freezes_old_adapters_and_penalises_overlap(classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    method = make_method("o_lora", ["query"], r_shared=2, r_task=4)
    result = train_sequence(
        lambda: tiny_bert(vocab_size=len(tokenizer)), tasks[:2], FAST, harness=harness, method=method
    )
    model = result.model
    assert model.base_model.active_adapters == [tasks[0].name, tasks[1].name]
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {tasks[1].name}
    penalty = method.extra_loss(model)
    assert penalty is not None and penalty.item() > 0


def test_sparta_model_passed_directly_and_routing_recorded(classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    model = get_peft_model(
        tiny_bert(vocab_size=len(tokenizer)), SpaRTAConfig(r_shared=2, r_task=4, target_modules=["query"])
    )
    args = ContinualArguments(steps=3, batch_size=6, learning_rate=1e-2, progress=False, general_texts=["a b c"])
    result = train_sequence(model, tasks, args, harness=harness)
    assert model.base_model.task_names == ["task_0", *[t.name for t in tasks[1:]]]
    assert result.routing_accuracy is not None and len(result.routing_accuracy_per_stage) == len(tasks)
    assert result.routing_accuracy_per_stage[0] == 1.0  # one task: the router is the constant 1
    assert result.drift is not None and result.drift >= -1e-6
    # the recorder gives one row of gates per input, each a distribution over the tasks
    with RoutingRecorder(model) as recorder:
        harness.embed(model, [example.text for example in tasks[0].test])
    gates = recorder.take()
    assert gates.shape == (len(tasks[0].test), len(tasks))
    assert torch.allclose(gates.sum(dim=-1), torch.ones(len(tasks[0].test)), atol=1e-5)


def test_harnesses_implement_the_protocol(classification):
    _, tokenizer = classification
    assert isinstance(EmbeddingClassificationHarness(tokenizer), Harness)
    assert isinstance(CausalLMHarness(tokenizer), Harness)


def test_train_sequence_needs_a_method_for_a_plain_model(classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer)
    with pytest.raises(ValueError, match="method"):
        train_sequence(tiny_bert(vocab_size=len(tokenizer)), tasks, FAST, harness=harness)


# ---- forced-branch learning accuracy and held-out tasks on a scripted harness -----------------------------------------


class ScriptedModel(torch.nn.Module):
    """A model that knows which stage of the sequence it is at and which task, if any, is forced."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.stage, self.forced = -1, None


class ScriptedMethod(Method):
    """A routing method on `ScriptedModel`: begin_task sets the stage, forced sets the forced task."""

    name = "scripted"
    routes = True

    def build(self, base_model, task_names):
        return base_model

    def begin_task(self, model, index, task_name, num_tasks):
        model.stage = index
        return model

    @contextmanager
    def forced(self, model, task_name):
        model.forced = task_name
        yield
        model.forced = None


class ScriptedHarness:
    """Accuracy from a script keyed by (stage, task, forced task) (0 when absent); records every text that reaches the
    loss and the candidates of every evaluation."""

    def __init__(self, script: dict):
        self.script = script
        self.trained_texts: list[str] = []
        self.candidates: dict[tuple, list[str]] = {}

    def prepare(self, model, tasks):
        self.prepared = [task.name for task in tasks]

    def mixed_loss(self, model, pairs, label_space=None):
        self.trained_texts += [example.text for _, example in pairs]
        return (model.weight**2).sum()

    def accuracy(self, model, task, candidates, recorder=None):
        key = (model.stage, task.name, model.forced)
        self.candidates[key] = list(candidates)
        return self.script.get(key, 0.0)


def scripted_task(name: str, labels: tuple[str, ...]) -> suites.Task:
    examples = [suites.Example(f"{name} text {index}", labels[index % len(labels)]) for index in range(4)]
    return suites.Task(name, train=examples, test=examples, labels=labels)


def test_forced_learning_accuracy_and_unseen_gain_known_answers():
    tasks = [scripted_task("a", ("a1", "a2")), scripted_task("b", ("b1", "b2"))]
    held_out = [scripted_task("new_labels", ("n1", "n2")), scripted_task("new_format", ("f1", "a1"))]
    script = {
        # right after each task, router deciding (the diagonal) and with the task's own branch forced
        (0, "a", None): 0.75, (0, "a", "a"): 1.0, (1, "b", None): 0.5, (1, "b", "b"): 0.75,
        # held-out tasks before any training (the base model) and after the whole sequence
        (-1, "new_labels", None): 0.25, (-1, "new_format", None): 0.5,
        (1, "new_labels", None): 0.75, (1, "new_format", None): 0.375,
    }  # fmt: skip
    harness = ScriptedHarness(script)
    args = ContinualArguments(steps=1, batch_size=2, progress=False)
    result = train_sequence(ScriptedModel(), tasks, args, harness=harness, method=ScriptedMethod(), held_out=held_out)
    assert result.learning_accuracy == pytest.approx((0.75 + 0.5) / 2)
    assert result.forced_learning_per_task == [1.0, 0.75]
    assert result.forced_learning_accuracy == pytest.approx((1.0 + 0.75) / 2)
    assert result.unseen_base_accuracy == {"new_labels": 0.25, "new_format": 0.5}
    assert result.unseen_accuracy == {"new_labels": 0.75, "new_format": 0.375}
    assert result.unseen_gain == pytest.approx({"new_labels": 0.5, "new_format": -0.125})
    # the forced entry is scored as the diagonal one is (same candidates); the router is released afterwards
    assert harness.candidates[(1, "b", "b")] == harness.candidates[(1, "b", None)] == ["a1", "a2", "b1", "b2"]
    # a held-out task is scored among every trained label and its own, before and after training alike
    assert harness.candidates[(-1, "new_format", None)] == ["a1", "a2", "b1", "b2", "f1"]
    assert harness.candidates[(1, "new_format", None)] == ["a1", "a2", "b1", "b2", "f1"]
    assert harness.prepared == ["a", "b", "new_labels", "new_format"]


def test_held_out_tasks_are_never_trained():
    tasks = [scripted_task("a", ("a1", "a2")), scripted_task("b", ("b1", "b2"))]
    held_out = [scripted_task("unseen", ("u1", "u2"))]
    harness = ScriptedHarness({})
    args = ContinualArguments(steps=3, batch_size=2, progress=False)
    train_sequence(ScriptedModel(), tasks, args, harness=harness, method=ScriptedMethod(), held_out=held_out)
    trained = set(harness.trained_texts)
    assert trained == {example.text for task in tasks for example in task.train}
    assert not trained & {example.text for example in held_out[0].train}
    with pytest.raises(ValueError, match="also in the trained sequence"):
        train_sequence(ScriptedModel(), tasks, args, harness=harness, method=ScriptedMethod(), held_out=tasks[:1])


def test_causal_lm_harness_sequence():
    tasks = suites.generation_suite(seed=0, train_size=4, test_size=3, tasks=["add", "upper"])
    texts = [CausalLMHarness.prompt(e.text) + " " + e.target for t in tasks for e in t.train + t.test]
    tokenizer = word_tokenizer(texts + suites.NEUTRAL_TEXTS)
    harness = CausalLMHarness(tokenizer, max_new_tokens=3, eval_batch_size=4)

    def factory():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    args = ContinualArguments(steps=2, batch_size=4, learning_rate=1e-2, progress=False, general_texts=["a b"])
    for name in ("sparta", "seq_lora"):
        method = make_method(name, ["q_proj", "v_proj"], r_shared=2, r_task=4, task_type="CAUSAL_LM")
        result = train_sequence(factory, tasks, args, harness=harness, method=method)
        assert len(result.accuracy_matrix) == 2 and result.drift is not None
        if name == "sparta":
            assert result.routing_accuracy is not None


def test_routing_accuracy_counts_abstained_inputs_as_misrouted():
    gates_by_task = {0: torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1: torch.tensor([[0.1, 0.9]])}
    accuracy, _ = _routing_accuracy(gates_by_task, stage=1, offset=0)
    assert accuracy == 2 / 3


@pytest.mark.parametrize("tuner", ["sparta", "lora"])
def test_up_lr_ratio_gives_every_up_projection_and_only_those_its_learning_rate(tuner):
    from peft import LoraConfig

    from peft_sparta.continual.driver import _parameter_groups

    targets = ["q_proj", "v_proj"]
    config = SpaRTAConfig(target_modules=targets, r_shared=2, r_task=4) if tuner == "sparta" else None
    model = get_peft_model(tiny_llama(), config or LoraConfig(target_modules=targets, r=4))
    groups = _parameter_groups(model, ContinualArguments(learning_rate=1e-3, up_lr_ratio=16.0))
    names = {id(param): name for name, param in model.named_parameters()}
    up = {names[id(param)] for param in groups[1]["params"]}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert groups[1]["lr"] == pytest.approx(1.6e-2) and "lr" not in groups[0]
    assert up == {name for name in trainable if f"{tuner}_B" in name} and up
    assert up | {names[id(param)] for param in groups[0]["params"]} == trainable
