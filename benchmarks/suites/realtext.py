"""A continual suite of real text: eight tasks over the time-zone database (``tzdata``), the ISO 3166 / 3166-2 lists
of ``pycountry`` and the Unicode character database of Python's ``unicodedata``, for causal LMs.

The template suites are generated from word lists, so their tasks are easy to route and to learn; these tasks ask
about real names that the installed packages ship (city, zone and country names, character names, subdivision names
in their own spelling). Classification tasks (``labels`` set) are meant to be scored over their own labels
(``CausalLMHarness(score_labels=True)``), generation tasks by exact match of the greedy answer. A generation task's
answer follows from its input (a part of it, rewritten), so what a task asks can be learnt from its training
examples; classification tasks ask for knowledge about the item, which training can sharpen:

- ``tz_region`` (classification): a city of the time-zone database -> the region of its zone (Africa, America, Asia,
  Europe, Pacific).
- ``char_category`` (classification): a Unicode character name -> its general category (six of them, in words).
- ``tz_city`` (generation): a time-zone identifier ("America/Argentina/San_Juan") -> its city ("San Juan").
- ``subdivision_country`` (classification): an ISO 3166-2 subdivision name -> its country (six countries).
- ``char_base_letter`` (generation): the name of an accented Latin letter ("LATIN SMALL LETTER E WITH ACUTE") -> its
  base letter in its case ("e").
- ``country_region`` (classification): a country -> the region of its time zones (tz_region's labels).
- ``tz_area`` (generation): a time-zone identifier -> its area ("America"): its prompt is tz_city's with one word
  changed ("city" -> "area"), the hard case for routing.
- ``country_short_name`` (generation): a country's official name ("Kingdom of Bhutan") -> its short name ("Bhutan").

`realtext_held_out` gives two tasks that are never trained: ``subdivision_country_more`` (subdivision_country's
format, four other countries: new labels) and ``char_script`` (a letter itself -> its script: a format no trained task
has). `unrelated_texts` gives real text unrelated to every task (the Apache License 2.0 that ``tzdata`` ships), on
which drift is measured, in two disjoint halves (calibration and test).

Every task's items are split, deterministically from the seed and the task name, into train, calibration and test
parts that share no input: settings (steps, sizes, task choice) are chosen on the calibration part
(``Task.calibration``) and only reported on the test part. Unicode data come from ``unicodedata.ucd_3_2_0`` (the
same on every Python version); the ``tzdata`` and ``pycountry`` versions are in every task's metadata.
"""

from __future__ import annotations

import importlib.metadata
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from .tasks import Example, Task


#: Task order of `realtext_suite` by default: classification and generation alternate, and the one-word pair
#: (tz_city, tz_area) is four tasks apart.
REALTEXT_TASKS = (
    "tz_region", "char_category", "tz_city", "subdivision_country", "char_base_letter", "country_region", "tz_area",
    "country_short_name",
)  # fmt: skip

#: The tasks of `realtext_held_out`, never trained.
REALTEXT_HELD_OUT = ("subdivision_country_more", "char_script")

_REGIONS = ("Africa", "America", "Asia", "Europe", "Pacific")
_CATEGORIES = {
    "Lu": "uppercase letter", "Ll": "lowercase letter", "Nd": "digit", "Sm": "math symbol", "Sc": "currency symbol",
    "Po": "punctuation",
}  # fmt: skip
_SUBDIVISION_COUNTRIES = {"FR": "France", "IT": "Italy", "ES": "Spain", "JP": "Japan", "TR": "Turkey", "VN": "Vietnam"}
_HELD_OUT_SUBDIVISION_COUNTRIES = {"RU": "Russia", "TH": "Thailand", "CZ": "Czechia", "MA": "Morocco"}
_SCRIPTS = ("Latin", "Greek", "Cyrillic", "Armenian", "Georgian", "Hebrew", "Arabic")
_ACCENTED_LATIN_LETTER = re.compile(r"LATIN (CAPITAL|SMALL) LETTER [A-Z] WITH .+")


@dataclass(frozen=True)
class _Source:
    """How one task is made: its prompt template (``{item}`` is the input), its (input, answer) pool and, for a
    classification task, its labels."""

    template: str
    pool: Callable[[], list[tuple[str, str]]]
    labels: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()


def _options(labels) -> str:
    return "Options: " + ", ".join(labels) + "."


def _unique(pairs) -> list[tuple[str, str]]:
    """The (input, answer) pairs whose input has one answer only, sorted (the pools are sets in some sources)."""
    answers = defaultdict(set)
    for item, answer in pairs:
        answers[item].add(answer)
    return sorted((item, next(iter(found))) for item, found in answers.items() if len(found) == 1)


@cache
def _zone_tab() -> list[tuple[str, str]]:
    """(country code, zone name) of every zone in tzdata's zone.tab."""
    text = resources.files("tzdata").joinpath("zoneinfo").joinpath("zone.tab").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return [(row[0], row[2]) for row in rows]


def _tz_cities() -> list[tuple[str, str]]:
    return _unique((_zone_city(zone), _zone_area(zone)) for _, zone in _zone_tab() if _zone_area(zone) in _REGIONS)


def _zone_parts(part: Callable[[str], str]) -> Callable[[], list[tuple[str, str]]]:
    """(zone identifier, ``part`` of it) for the zones of `_REGIONS`."""

    def pool() -> list[tuple[str, str]]:
        return _unique((zone, part(zone)) for _, zone in _zone_tab() if zone.split("/", 1)[0] in _REGIONS)

    return pool


def _zone_city(zone: str) -> str:
    return zone.rsplit("/", 1)[1].replace("_", " ")


def _zone_area(zone: str) -> str:
    return zone.split("/", 1)[0]


def _country_name(country) -> str:
    return getattr(country, "common_name", None) or country.name


def _country_regions() -> list[tuple[str, str]]:
    """Countries whose zones all lie in one region of `_REGIONS`."""
    import pycountry

    regions = defaultdict(set)
    for code, zone in _zone_tab():
        regions[code].add(zone.split("/", 1)[0])
    return _unique(
        (_country_name(country), next(iter(regions[country.alpha_2])))
        for country in pycountry.countries
        if len(regions[country.alpha_2]) == 1 and regions[country.alpha_2] <= set(_REGIONS)
    )


def _country_short_names() -> list[tuple[str, str]]:
    """A country's official name -> its short name, for the countries that have both."""
    import pycountry

    return _unique(
        (country.official_name, _country_name(country))
        for country in pycountry.countries
        if getattr(country, "official_name", None)
    )


def _subdivisions(countries: dict[str, str]) -> Callable[[], list[tuple[str, str]]]:
    def pool() -> list[tuple[str, str]]:
        import pycountry

        return _unique(
            (subdivision.name, countries[subdivision.country_code])
            for subdivision in pycountry.subdivisions
            if subdivision.country_code in countries
        )

    return pool


@cache
def _characters() -> tuple[tuple[int, str, str], ...]:
    """(code point, name, category) of every named character of Unicode 3.2."""
    database = unicodedata.ucd_3_2_0
    found = []
    for point in range(0x30000):
        name = database.name(chr(point), "")
        if name:
            found.append((point, name, database.category(chr(point))))
    return tuple(found)


def _is_canonical(character: str) -> bool:
    """Whether ``character`` is its own compatibility normal form (not a ligature, a presentation or a width form)."""
    return unicodedata.ucd_3_2_0.normalize("NFKC", character) == character


def _character_categories() -> list[tuple[str, str]]:
    return _unique((name, _CATEGORIES[category]) for _, name, category in _characters() if category in _CATEGORIES)


def _base_letters() -> list[tuple[str, str]]:
    """The name of an accented Latin letter -> its base letter (the first of its canonical decomposition, so letters
    such as "D WITH STROKE", which do not decompose, are left out)."""
    database = unicodedata.ucd_3_2_0
    pairs = []
    for point, name, _ in _characters():
        base = database.normalize("NFD", chr(point))[0]
        if _ACCENTED_LATIN_LETTER.fullmatch(name) and base != chr(point):
            pairs.append((name, base))
    return _unique(pairs)


def _letter_scripts() -> list[tuple[str, str]]:
    """A letter -> its script (the first word of its name), for the scripts of `_SCRIPTS` (no compatibility forms,
    such as Arabic's isolated and final forms)."""
    scripts = {script.upper(): script for script in _SCRIPTS}
    return _unique(
        (chr(point), scripts[name.split(" ", 1)[0]])
        for point, name, category in _characters()
        if category in ("Lu", "Ll", "Lo") and name.split(" ", 1)[0] in scripts and _is_canonical(chr(point))
    )


_SOURCES = {
    "tz_region": _Source(
        'In which part of the world is the city of "{item}"? ' + _options(_REGIONS), _tz_cities, _REGIONS
    ),
    "char_category": _Source(
        'What kind of character is the Unicode character "{item}"? ' + _options(_CATEGORIES.values()),
        _character_categories, tuple(_CATEGORIES.values()),
    ),
    "tz_city": _Source('Write the city of the time zone "{item}".', _zone_parts(_zone_city)),
    "subdivision_country": _Source(
        'Which country is the region "{item}" in? ' + _options(_SUBDIVISION_COUNTRIES.values()),
        _subdivisions(_SUBDIVISION_COUNTRIES), tuple(_SUBDIVISION_COUNTRIES.values()),
    ),
    "char_base_letter": _Source('Write the base letter of the Unicode character named "{item}".', _base_letters),
    "country_region": _Source(
        'In which part of the world is the country "{item}"? ' + _options(_REGIONS), _country_regions, _REGIONS
    ),
    "tz_area": _Source(
        'Write the area of the time zone "{item}".', _zone_parts(_zone_area), metadata=(("one_word_from", "tz_city"),)
    ),
    "country_short_name": _Source(
        'Write the short name of the country officially called "{item}".', _country_short_names
    ),
    "subdivision_country_more": _Source(
        'Which country is the region "{item}" in? ' + _options(_HELD_OUT_SUBDIVISION_COUNTRIES.values()),
        _subdivisions(_HELD_OUT_SUBDIVISION_COUNTRIES), tuple(_HELD_OUT_SUBDIVISION_COUNTRIES.values()),
        metadata=(("held_out", "new labels"), ("format_of", "subdivision_country")),
    ),
    "char_script": _Source(
        'Which writing system is the letter "{item}" from? ' + _options(_SCRIPTS), _letter_scripts, _SCRIPTS,
        metadata=(("held_out", "new format"),),
    ),
}  # fmt: skip


def source_versions() -> dict[str, str]:
    """The versions of the data the tasks are made of (they can change between releases of the packages)."""
    return {
        "tzdata": importlib.metadata.version("tzdata"),
        "pycountry": importlib.metadata.version("pycountry"),
        "unicode": unicodedata.ucd_3_2_0.unidata_version,
    }


def _pick(rng: random.Random, items: list, sizes: tuple[int, int, int], what: str) -> tuple[list, list, list]:
    """``sizes`` (train, calibration, test) distinct items of ``items``, shuffled by ``rng``."""
    if sum(sizes) > len(items):
        raise ValueError(
            f"{what} has {len(items)} items, fewer than the {sum(sizes)} asked for (train, calibration, test = "
            f"{sizes}); ask for fewer."
        )
    shuffled = list(items)
    rng.shuffle(shuffled)
    train, calibration = sizes[0], sizes[0] + sizes[1]
    return shuffled[:train], shuffled[train:calibration], shuffled[calibration : sum(sizes)]


def _build(name: str, seed: int, per_label: tuple[int, int, int], sizes: tuple[int, int, int]) -> Task:
    """Task ``name``: a classification task takes ``per_label`` (train, calibration, test) items of each label, a
    generation task ``sizes`` items; deterministic in ``seed`` and ``name``."""
    source = _SOURCES[name]
    pool = source.pool()
    rng = random.Random(f"realtext-{seed}-{name}")
    if source.labels:
        parts = ([], [], [])
        for label in source.labels:
            items = [pair for pair in pool if pair[1] == label]
            for part, chosen in zip(parts, _pick(rng, items, per_label, f"{name}'s label {label!r}")):
                part.extend(chosen)
        for part in parts:
            rng.shuffle(part)
    else:
        parts = _pick(rng, pool, sizes, name)
    train, calibration, test = (
        [Example(source.template.format(item=item), answer) for item, answer in part] for part in parts
    )
    metadata = {**dict(source.metadata), "kind": "classification" if source.labels else "generation"}
    return Task(
        name=name, train=train, calibration=calibration, test=test, labels=source.labels,
        metadata={**metadata, "sources": source_versions()},
    )  # fmt: skip


def realtext_suite(
    seed: int = 0,
    train_per_label: int = 12,
    calibration_per_label: int = 4,
    test_per_label: int = 8,
    train_size: int = 64,
    calibration_size: int = 16,
    test_size: int = 32,
    tasks: list[str] | None = None,
) -> list[Task]:
    """The real-text tasks (``tasks``: names of `REALTEXT_TASKS`, in any order; all of them by default).

    A classification task has ``train_per_label`` + ``calibration_per_label`` + ``test_per_label`` examples per
    label, a generation task ``train_size`` + ``calibration_size`` + ``test_size`` examples; no input is in two
    parts. Deterministic in ``seed``; a task depends on ``seed`` and its name alone, so it is the same in any order.
    """
    names = list(tasks) if tasks is not None else list(REALTEXT_TASKS)
    unknown = [name for name in names if name not in REALTEXT_TASKS]
    if unknown:
        raise ValueError(f"unknown real-text tasks {unknown}; available: {list(REALTEXT_TASKS)}.")
    per_label = (train_per_label, calibration_per_label, test_per_label)
    sizes = (train_size, calibration_size, test_size)
    return [_build(name, seed, per_label, sizes) for name in names]


def realtext_held_out(
    seed: int = 0,
    calibration_per_label: int = 4,
    test_per_label: int = 8,
    calibration_size: int = 16,
    test_size: int = 32,
) -> list[Task]:
    """The real-text tasks that are never trained (`REALTEXT_HELD_OUT`): ``subdivision_country_more``
    (subdivision_country's prompt over four other countries) and ``char_script`` (a format of its own). They have
    calibration and test parts only."""
    return [
        _build(name, seed, (0, calibration_per_label, test_per_label), (0, calibration_size, test_size))
        for name in REALTEXT_HELD_OUT
    ]


@cache
def _license_sentences() -> tuple[str, ...]:
    """The sentences of the Apache License 2.0 that the tzdata wheel ships (8 to 60 words, no address)."""
    files = importlib.metadata.files("tzdata") or []
    found = [path for path in files if path.name == "LICENSE_APACHE"]
    if not found:
        raise FileNotFoundError(
            "the tzdata distribution ships no LICENSE_APACHE file; install tzdata from PyPI "
            "(pip install 'peft-sparta-cl[examples]')."
        )
    text = " ".join(found[0].read_text(encoding="utf-8").split())
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z\"])", text)
    return tuple(s for s in sentences if 8 <= len(s.split()) <= 60 and "http" not in s)


def unrelated_texts(part: str = "test") -> list[str]:
    """Real text unrelated to every task, on which general-ability drift is measured: the sentences of the Apache
    License 2.0 (shipped by ``tzdata``), alternately in the ``"test"`` part (drift) and the ``"calibration"`` part
    (for choosing settings, e.g. an abstain threshold)."""
    if part not in ("test", "calibration"):
        raise ValueError(f"part must be 'test' or 'calibration', not {part!r}.")
    return list(_license_sentences()[part == "calibration" :: 2])
