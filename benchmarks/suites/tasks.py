"""What every suite is made of: examples, tasks, the deterministic train/test split, and the unrelated sentences on
which general-ability drift is measured."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One input and its target: a label name (classification) or the exact answer (generation)."""

    text: str
    target: str


@dataclass
class Task:
    """A task of a continual sequence. ``labels`` is the label set of a classification task, empty for generation;
    ``calibration``, when a suite has one, holds examples in neither ``train`` nor ``test``, on which to choose
    settings."""

    name: str
    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)
    calibration: list[Example] = field(default_factory=list)


#: Everyday sentences that resemble no task of the suites, for measuring general-ability drift.
NEUTRAL_TEXTS = [
    "The library opens at nine and closes early on public holidays.",
    "My neighbour planted three apple trees along the fence last spring.",
    "Please remember to water the plants while I am away.",
    "The train was crowded, so we stood near the doors the whole way.",
    "She painted the bedroom a pale shade of blue.",
    "A small dog waited patiently outside the post office.",
    "We usually take the long path around the lake on weekends.",
    "The old bridge was repaired after the winter storms.",
    "He keeps his bicycle in the hallway because the shed is full.",
    "The museum added a new wing for children's exhibitions.",
    "Our meeting moved to the second floor conference room.",
    "The river was calm and the boats drifted slowly downstream.",
    "Grandfather tells the same story about the lighthouse every summer.",
    "The printer ran out of paper in the middle of the report.",
    "Bright lanterns hung above the narrow street during the festival.",
    "The cat sleeps on the windowsill whenever the sun comes out.",
]

#: Unrelated everyday sentences of the same kind as `NEUTRAL_TEXTS` but disjoint from them: the unrelated side of a
#: calibration split (settings chosen on them are scored on `NEUTRAL_TEXTS` and the tasks' test sets).
CALIBRATION_TEXTS = [
    "The bakery on the corner opens at seven and sells out of rye bread by noon.",
    "He folded the laundry while the kettle came to a boil.",
    "Our neighbours planted tomatoes along the fence this spring.",
    "The train was delayed because of leaves on the tracks.",
    "She keeps a notebook of the birds she sees on her morning walk.",
    "The museum added a new wing for textiles and old maps.",
    "After the storm, the river rose almost to the footbridge.",
    "They painted the kitchen a pale yellow last weekend.",
    "The library extended its opening hours during the exam period.",
    "A small dog waited patiently outside the pharmacy.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Fog covered the harbour until the late morning.",
]


# ---- shared word lists ----------------------------------------------------------------------------------------------


def split(rng: random.Random, make: Callable[[random.Random], Example], train: int, test: int) -> tuple[list, list]:
    """``train`` + ``test`` distinct examples (no text in both splits)."""
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < train + test:
        attempts += 1
        if attempts > 200 * (train + test):
            raise ValueError(f"cannot draw {train + test} distinct examples from these templates; ask for fewer.")
        example = make(rng)
        if example.text not in seen:
            seen.add(example.text)
            examples.append(example)
    return examples[:train], examples[train:]
