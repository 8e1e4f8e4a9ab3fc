"""Translation as classification with near-identical prompts across tasks: every task asks for the same eight words
with the same templates, and only the name of the target language changes (one word of the prompt). The label set
of each task is the eight words in its language, so a task's inputs are told apart from another task's by that one
word alone: the hard case for a router that picks a task branch per input."""

from __future__ import annotations

import random

from .classification import _COMMON, _fill, _labelled_task, classification_held_out
from .tasks import Task


#: English word -> its translation per language; no translation is shared by two languages.
_WORDS = {
    "cat": {"french": "chat", "spanish": "gato", "german": "katze", "italian": "gatto"},
    "dog": {"french": "chien", "spanish": "perro", "german": "hund", "italian": "cane"},
    "house": {"french": "maison", "spanish": "casa", "german": "haus"},
    "water": {"french": "eau", "spanish": "agua", "german": "wasser", "italian": "acqua"},
    "bread": {"french": "pain", "spanish": "pan", "german": "brot", "italian": "pane"},
    "book": {"french": "livre", "spanish": "libro", "german": "buch"},
    "apple": {"french": "pomme", "spanish": "manzana", "german": "apfel", "italian": "mela"},
    "milk": {"french": "lait", "spanish": "leche", "german": "milch", "italian": "latte"},
}  # fmt: skip
_TEMPLATES = [
    "translate into {language}: {word}",
    "{name} asks: how do you say '{word}' in {language}?",
    "what is the {language} word for '{word}'? asked {name} in {city}.",
    "please give me the {language} for {word}, {name} wrote on {day}.",
]


def _translation_generator(language: str):
    """Texts asking for a word in ``language``, for the label (the translation) they are asked for."""
    english = {words[language]: word for word, words in _WORDS.items() if language in words}

    def generate(rng: random.Random, label: str) -> str:
        template = rng.choice(_TEMPLATES).replace("{language}", language).replace("{word}", english[label])
        return _fill(rng, template, **_COMMON)

    return generate


def _labels(language: str) -> tuple[str, ...]:
    return tuple(words[language] for words in _WORDS.values() if language in words)


#: Task order of `translation_suite` by default; Italian is held out (`translation_held_out`).
TRANSLATION_TASKS = ("to_french", "to_spanish", "to_german")


def translation_suite(
    seed: int = 0, train_per_label: int = 48, test_per_label: int = 16, tasks: list[str] | None = None
) -> list[Task]:
    """Translation into French, Spanish and German of the same eight English words, as classification over the
    translations (eight labels per task, no label shared by two tasks). Deterministic in ``seed``; train and test
    texts never overlap."""
    names = list(tasks) if tasks is not None else list(TRANSLATION_TASKS)
    unknown = [name for name in names if name not in TRANSLATION_TASKS]
    if unknown:
        raise ValueError(f"unknown translation tasks {unknown}; available: {list(TRANSLATION_TASKS)}.")
    return [
        _labelled_task(name, _labels(language), _translation_generator(language), seed, train_per_label,
                       test_per_label)
        for name, language in ((name, name.removeprefix("to_")) for name in names)
    ]  # fmt: skip


def translation_held_out(seed: int = 0, test_per_label: int = 16) -> list[Task]:
    """Tasks of the translation suite that are never trained: ``to_italian`` (the same prompts with "italian", over
    the six words whose Italian is not a Spanish word too) and the classification suite's ``animal`` (a format no
    trained task has)."""
    italian = _labelled_task(
        "to_italian", _labels("italian"), _translation_generator("italian"), seed, 0, test_per_label,
        metadata={"held_out": "new labels", "format_of": "to_french"},
    )  # fmt: skip
    return [italian, *classification_held_out(seed, test_per_label, tasks=["animal"])]
