"""The real-text suite: deterministic disjoint splits, its tasks and label sets, the one-word pair, the held-out
tasks, well-formed prompts, the unrelated texts, label scoring in `CausalLMHarness`, and a benchmark smoke run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks import continual as bench
from benchmarks import suites
from peft_sparta.continual import CausalLMHarness


pytest.importorskip("pycountry")
pytest.importorskip("tzdata")

SIZES = {"train_per_label": 5, "calibration_per_label": 2, "test_per_label": 3}
SIZES.update(train_size=9, calibration_size=4, test_size=6)


@pytest.fixture(scope="module")
def realtext():
    return suites.realtext_suite(seed=3, **SIZES)


@pytest.fixture(scope="module")
def held_out():
    return suites.realtext_held_out(seed=3, calibration_per_label=2, test_per_label=3, calibration_size=4, test_size=6)


def texts(examples) -> set[str]:
    return {example.text for example in examples}


def test_splits_are_deterministic_per_seed_and_disjoint(realtext, held_out):
    again = suites.realtext_suite(seed=3, **SIZES)
    other = suites.realtext_suite(seed=4, **SIZES)
    for parts in ("train", "calibration", "test"):
        assert [getattr(task, parts) for task in realtext] == [getattr(task, parts) for task in again]
        assert [getattr(task, parts) for task in realtext] != [getattr(task, parts) for task in other]
    for task in realtext + held_out:
        train, calibration, test = texts(task.train), texts(task.calibration), texts(task.test)
        assert len(train) == len(task.train) and len(calibration) == len(task.calibration)
        assert len(test) == len(task.test), f"{task.name}: an input twice in one split"
        assert not train & calibration and not train & test and not calibration & test, task.name
    # a task depends on the seed and its name alone, not on the order or the other tasks
    alone = suites.realtext_suite(seed=3, tasks=["country_short_name", "tz_region"], **SIZES)
    assert alone == [realtext[suites.REALTEXT_TASKS.index(task.name)] for task in alone]


def test_tasks_label_sets_and_sizes(realtext):
    assert [task.name for task in realtext] == list(suites.REALTEXT_TASKS) and len(realtext) >= 8
    kinds = {task.name: task.metadata["kind"] for task in realtext}
    assert sorted(kinds.values()).count("classification") == 4 and sorted(kinds.values()).count("generation") == 4
    tasks = {task.name: task for task in realtext}
    assert tasks["tz_region"].labels == tasks["country_region"].labels == (
        "Africa", "America", "Asia", "Europe", "Pacific"
    )  # fmt: skip
    assert tasks["subdivision_country"].labels == ("France", "Italy", "Spain", "Japan", "Turkey", "Vietnam")
    assert len(tasks["char_category"].labels) == 6
    for task in realtext:
        if task.labels:
            for part, per_label in (("train", 5), ("calibration", 2), ("test", 3)):
                targets = [example.target for example in getattr(task, part)]
                assert {label: targets.count(label) for label in task.labels} == dict.fromkeys(task.labels, per_label)
        else:
            assert (len(task.train), len(task.calibration), len(task.test)) == (9, 4, 6)
        assert set(task.metadata["sources"]) == {"tzdata", "pycountry", "unicode"}
    with pytest.raises(ValueError, match="unknown real-text tasks"):
        suites.realtext_suite(tasks=["tz_region", "capitals"])
    with pytest.raises(ValueError, match="country_region's label 'Pacific' has 25 items.* ask for fewer"):
        suites.realtext_suite(tasks=["country_region"], train_per_label=14)


def test_answers_are_the_sources_answers(realtext):
    import pycountry

    tasks = {task.name: task for task in realtext}
    quoted = re.compile(r'"(.+)"')
    for task, answer in (
        ("tz_city", lambda zone: zone.rsplit("/", 1)[1].replace("_", " ")),
        ("tz_area", lambda zone: zone.split("/")[0]),
        ("char_base_letter", base_letter),
        ("country_short_name", lambda official: short_name(pycountry.countries.get(official_name=official))),
    ):
        for example in tasks[task].train + tasks[task].calibration + tasks[task].test:
            assert example.target == answer(quoted.search(example.text)[1]), (task, example)
    assert {example.target for example in tasks["tz_area"].train} <= {"Africa", "America", "Asia", "Europe", "Pacific"}


def base_letter(name: str) -> str:
    """The base letter of an accented Latin letter, read from its name."""
    case, letter = re.fullmatch(r"LATIN (CAPITAL|SMALL) LETTER ([A-Z]) WITH .+", name).groups()
    return letter.lower() if case == "SMALL" else letter


def short_name(country) -> str:
    return getattr(country, "common_name", None) or country.name


def test_one_word_pair_and_held_out_tasks(realtext, held_out):
    tasks = {task.name: task for task in realtext}
    city, area = tasks["tz_city"], tasks["tz_area"]
    assert area.metadata["one_word_from"] == "tz_city"
    for example in area.test:
        # tz_city's prompt for the same zone: the two prompts differ in one word
        as_city = re.sub(r'"[^"]+"', lambda _: re.search(r'"[^"]+"', example.text)[0], city.test[0].text)
        words, other = example.text.split(), as_city.split()
        assert len(words) == len(other)
        assert [(a, b) for a, b in zip(other, words) if a != b] == [("city", "area")]

    assert [task.name for task in held_out] == list(suites.REALTEXT_HELD_OUT)
    more, script = held_out
    assert not more.train and not script.train, "held-out tasks are never trained"
    assert more.metadata == {**more.metadata, "held_out": "new labels", "format_of": "subdivision_country"}
    assert not set(more.labels) & set(tasks["subdivision_country"].labels)
    assert template(more.test[0].text) == template(tasks["subdivision_country"].test[0].text)
    assert script.metadata["held_out"] == "new format"
    assert all(template(script.test[0].text) != template(task.test[0].text) for task in realtext)
    trained = set().union(*(texts(task.train + task.calibration + task.test) for task in realtext))
    assert not trained & set().union(*(texts(task.calibration + task.test) for task in held_out))


def template(text: str) -> str:
    """A prompt without its quoted item and its options: the task's format."""
    return re.sub(r'"[^"]*"', "<item>", text.split(" Options: ")[0])


def test_every_prompt_is_well_formed(realtext, held_out):
    for task in realtext + held_out:
        for example in task.train + task.calibration + task.test:
            text = example.text
            assert "{" not in text and "}" not in text and "  " not in text and text == text.strip(), text
            assert re.fullmatch(r'[A-Z][^"]* "[^"]+"[^"]*[?.]( Options: [^"]+\.)?', text), text
            assert example.target and example.target == example.target.strip(), text
            if task.labels:
                assert example.target in task.labels
                assert text.endswith("Options: " + ", ".join(task.labels) + ".")


def test_unrelated_texts_are_real_disjoint_and_unrelated(realtext):
    test, calibration = suites.unrelated_texts("test"), suites.unrelated_texts("calibration")
    assert len(test) >= 12 and len(calibration) >= 12 and not set(test) & set(calibration)
    assert any("License" in text for text in test) and all(len(text.split()) >= 8 for text in test + calibration)
    assert not set(test + calibration) & set().union(*(texts(task.train + task.test) for task in realtext))
    with pytest.raises(ValueError, match="part must be"):
        suites.unrelated_texts("train")


# ---- label scoring of CausalLMHarness and a benchmark smoke run ------------------------------------------------------


def word_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts``, built locally (no download)."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_causal_lm(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def suite_tokenizer(tasks) -> PreTrainedTokenizerFast:
    words = [e.text + "\nAnswer: " + e.target for t in tasks for e in t.train + t.calibration + t.test]
    return word_tokenizer(words + list(suites.NEUTRAL_TEXTS) + suites.unrelated_texts("test"))


def test_label_scoring_picks_the_label_with_the_largest_answer_log_likelihood(realtext):
    task = next(task for task in realtext if task.name == "subdivision_country")
    tokenizer = suite_tokenizer([task])
    model = tiny_causal_lm(tokenizer)
    harness = CausalLMHarness(tokenizer, eval_batch_size=12, score_labels=True)
    # each pair's score is -(mean answer-token loss) x (answer tokens), the pair alone or padded in a batch
    pairs = [(task.test[0].text, label) for label in task.labels]
    batched = harness.answer_log_likelihoods(model, pairs)
    for (text, label), score in list(zip(pairs, batched))[:3]:
        inputs = harness._answer_batch([(text, label)])
        with torch.no_grad():
            loss = model(**inputs).loss
        assert float(score) == pytest.approx(-float(loss) * int((inputs["labels"] != -100).sum()), rel=1e-4)
    every_pair = [(example.text, label) for example in task.test for label in task.labels]
    scores = CausalLMHarness(tokenizer, eval_batch_size=len(every_pair)).answer_log_likelihoods(model, every_pair)
    predicted = [task.labels[int(row.argmax())] for row in scores.view(len(task.test), len(task.labels))]
    expected = [label == example.target for label, example in zip(predicted, task.test)]
    accuracy = harness.accuracy(model, task, ["unused"])
    assert accuracy == pytest.approx(sum(expected) / len(expected))
    assert 0 < accuracy < 1, "a random model is neither always right nor always wrong here"
    # without score_labels, the same task is scored by exact match of the greedy answer, as before
    assert CausalLMHarness(tokenizer, max_new_tokens=2).accuracy(model, task, []) == 0.0


def test_benchmark_runs_the_realtext_suite_on_a_tiny_model(tmp_path, monkeypatch):
    tasks = suites.realtext_suite(seed=0) + suites.realtext_held_out(seed=0)
    tokenizer = suite_tokenizer(tasks)
    monkeypatch.setattr(bench.offline, "load_smollm2", lambda: (tiny_causal_lm(tokenizer), tokenizer))
    stem = tmp_path / "continual-realtext"
    argv = [
        "--suite", "realtext", "--methods", "sparta", "--tasks", "tz_region", "tz_city", "--steps", "2",
        "--batch-size", "4", "--train-per-label", "2", "--test-per-label", "1", "--train-size", "4",
        "--test-size", "3", "--threads", "1", "--out", str(stem), "--no-progress", "--no-plots",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        results = bench.run(bench.parse_args(argv))
        calibration = bench.run(bench.parse_args([*argv[:-4], "--evaluate-on", "calibration", "--base-only",
                                                  "--out", str(tmp_path / "calibration"), "--no-progress"]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["tasks"] == ["tz_region", "tz_city"]
    assert [entry["name"] for entry in saved["held_out"]] == list(suites.REALTEXT_HELD_OUT)
    row = saved["methods"]["sparta"]
    assert row["drift"] is not None and list(row["unseen_gain"]) == list(suites.REALTEXT_HELD_OUT)
    settings = row["run"]["settings"]
    assert settings["test_sizes"] == [5, 3] and settings["held_out_test_sizes"] == [4, 7]
    assert settings["evaluated_on"] == "test" and set(settings["sources"]) == {"tzdata", "pycountry", "unicode"}
    assert results["methods"]["sparta"]["routing_accuracy"] is not None
    # --evaluate-on calibration --base-only: the untrained model on the calibration splits, nothing trained
    assert calibration["methods"] == {}
    assert list(calibration["base_model"]["accuracy"]) == ["tz_region", "tz_city", *suites.REALTEXT_HELD_OUT]
    assert calibration["latest_run"]["settings"]["test_sizes"] == [20, 16], "the calibration splits were scored"
    report = (tmp_path / "calibration.md").read_text()
    assert "## Base model (no training)" in report and "## Held-out tasks" not in report
