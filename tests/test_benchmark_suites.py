"""The benchmark's task suites: deterministic, disjoint splits, distinct label sets, exact answers, held-out tasks, and the
Standard CL loader on local files in the Hub column layout."""

from __future__ import annotations

import json
import random
import re

import pytest

from benchmarks import suites


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
