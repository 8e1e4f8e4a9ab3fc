"""Five offline instruction tasks with short exact-match answers (number words to digits, addition, capital
letters, plural, first letter), for causal LMs, and two held-out tasks that are never trained (`generation_held_out`:
first_letter's prompt asking for the last letter, and a format of its own)."""

from __future__ import annotations

import random
from collections.abc import Callable

from .classification import ALL_DOMAIN_WORDS
from .tasks import Example, Task, split


_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_NOUNS = [
    "garden", "window", "pencil", "rocket", "basket", "candle", "dragon", "forest", "guitar", "hammer", "island",
    "jacket", "kitten", "ladder", "marble", "needle", "orange", "parrot", "rabbit", "saddle", "tunnel", "velvet",
    "wagon", "button", "carpet", "donkey", "engine", "falcon", "helmet", "lemon", "magnet", "napkin", "pepper",
    "puzzle", "silver", "ticket", "violin", "walnut", "anchor", "bridge", "castle", "desert", "feather", "glove",
]  # fmt: skip
_PLURAL_NOUNS = [
    "box", "church", "brush", "fox", "bus", "glass", "city", "baby", "party", "story", "cherry", "penny", "lady",
    "dish", "watch", "tax", "kiss", "berry", "pony", "lily", "match", "wish", "bench", "family",
    *_NOUNS,
]  # fmt: skip


def _number_words(n: int) -> str:
    if n >= 100:
        hundreds, rest = divmod(n, 100)
        return f"{_UNITS[hundreds]} hundred" + ("" if rest == 0 else " " + _number_words(rest))
    if n < 10:
        return _UNITS[n]
    if n < 20:
        return _TEENS[n - 10]
    tens, unit = divmod(n, 10)
    return _TENS[tens] + ("" if unit == 0 else "-" + _UNITS[unit])


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _digits(rng: random.Random) -> Example:
    n = rng.randrange(20, 1000)
    return Example(f"Write the number in digits: {_number_words(n)}", str(n))


def _add(rng: random.Random) -> Example:
    a, b = rng.randrange(10, 50), rng.randrange(10, 50)
    return Example(f"Compute the sum: {a} + {b} =", str(a + b))


_ADJECTIVES = ["red", "old", "tiny", "quiet", "happy", "green", "brave", "cold", "soft", "dark", "warm", "wild"]


def _upper(rng: random.Random) -> Example:
    word = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    return Example(f"Rewrite the word in capital letters: {word}", word.upper())


def _plural_task(rng: random.Random) -> Example:
    word = rng.choice(_PLURAL_NOUNS)
    template = rng.choice(["Give the plural of the noun: {}", "Plural form of '{}':", "Write '{}' in the plural:"])
    return Example(template.format(word), _plural(word))


def _first_letter(rng: random.Random) -> Example:
    word = rng.choice(_PLURAL_NOUNS + _ADJECTIVES + [w for w in ALL_DOMAIN_WORDS if " " not in w])
    return Example(f"What is the first letter of the word '{word}'?", word[0])


_GENERATION_TASKS: dict[str, Callable[[random.Random], Example]] = {
    "digits": _digits,
    "add": _add,
    "upper": _upper,
    "plural": _plural_task,
    "first_letter": _first_letter,
}
GENERATION_TASKS = tuple(_GENERATION_TASKS)


def generation_suite(
    seed: int = 0, train_size: int = 64, test_size: int = 24, tasks: list[str] | None = None
) -> list[Task]:
    """Five instruction tasks with short answers scored by exact match (the prompt alone identifies nothing but
    the request, as a user would write it). Deterministic in ``seed``; train and test prompts never overlap."""
    names = list(tasks) if tasks is not None else list(GENERATION_TASKS)
    unknown = [name for name in names if name not in _GENERATION_TASKS]
    if unknown:
        raise ValueError(f"unknown generation tasks {unknown}; available: {list(GENERATION_TASKS)}.")
    suite = []
    for name in names:
        rng = random.Random(f"{seed}-{name}")
        train, test = split(rng, _GENERATION_TASKS[name], train_size, test_size)
        suite.append(Task(name=name, train=train, test=test))
    return suite


# ---- held-out tasks: never trained, scored after the whole sequence -------------------------------------------------


def _last_letter(rng: random.Random) -> Example:
    word = rng.choice(_PLURAL_NOUNS + _ADJECTIVES + [w for w in ALL_DOMAIN_WORDS if " " not in w])
    return Example(f"What is the last letter of the word '{word}'?", word[-1])


def _larger(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 100), 2)
    return Example(f"Which number is larger, {a} or {b}?", str(max(a, b)))


#: name -> (generator, metadata): a trained task's format with new answers, and a format no trained task has.
_HELD_OUT_GENERATION = {
    "last_letter": (_last_letter, {"held_out": "new labels", "format_of": "first_letter"}),
    "larger": (_larger, {"held_out": "new format"}),
}


def generation_held_out(seed: int = 0, test_size: int = 24) -> list[Task]:
    """Tasks of the generation suite that are never trained (no train examples): ``last_letter`` (first_letter's
    prompt with one word changed, so other answers) and ``larger`` (a format no trained task has);
    ``metadata["held_out"]`` names the kind."""
    suite = []
    for name, (generator, metadata) in _HELD_OUT_GENERATION.items():
        _, test = split(random.Random(f"{seed}-{name}"), generator, 0, test_size)
        suite.append(Task(name=name, train=[], test=test, metadata=dict(metadata)))
    return suite


# ---- Standard CL benchmark ------------------------------------------------------------------------------------------
