"""Task suites for the continual-learning benchmark, generated offline and deterministically from a seed.

- `classification_suite`: six text-classification tasks with distinct label sets (topic, sentiment, intent, question
  type, language of origin, emotion), built from templates and word lists. Each task has its own templates, so the
  tasks are separable by their input distribution, while the slot fillers are shared across tasks (sports or finance
  words appear in reviews, questions and diaries), so that training one task can disturb another: forgetting is
  measurable. No task id reaches the model: the input is the text alone and the label is scored among the label names
  of every task seen so far.
- `generation_suite`: five instruction tasks with short exact-match answers (number words to digits, addition,
  capital letters, plural, first letter), for causal LMs.
- `standard_cl_suite`: the "Standard CL benchmark" (AG News, Amazon, Yelp, DBpedia, Yahoo Answers) as
  text-to-text classification in the three task orders of the literature, through `datasets` (downloadable or local
  files in the same column layout).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


__all__ = [
    "NEUTRAL_TEXTS",
    "STANDARD_CL_ORDERS",
    "STANDARD_CL_TASKS",
    "Example",
    "Task",
    "classification_suite",
    "generation_suite",
    "standard_cl_suite",
]


@dataclass(frozen=True)
class Example:
    """One input and its target: a label name (classification) or the exact answer (generation)."""

    text: str
    target: str


@dataclass
class Task:
    """A task of a continual sequence. ``labels`` is the label set of a classification task, empty for generation."""

    name: str
    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)


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


# ---- shared word lists ----------------------------------------------------------------------------------------------

_DOMAINS = {
    "sports": [
        "striker", "goalkeeper", "stadium", "tournament", "referee", "championship", "marathon", "coach", "penalty",
        "league", "tennis racket", "playoff game",
    ],
    "finance": [
        "stock market", "shareholders", "interest rate", "bank loan", "quarterly earnings", "investors", "inflation",
        "bond yields", "merger", "tax bill", "budget deficit", "dividend",
    ],
    "science": [
        "telescope", "laboratory", "molecule", "vaccine trial", "physicist", "fossil", "genome", "experiment",
        "satellite", "particle collider", "chemist", "microscope",
    ],
    "cooking": [
        "recipe", "bakery", "chef", "sourdough bread", "tomato soup", "frying pan", "oven", "pastry", "spices",
        "dessert", "kitchen", "omelette",
    ],
}  # fmt: skip
_ALL_DOMAIN_WORDS = [word for words in _DOMAINS.values() for word in words]
_CITIES = ["tokyo", "chicago", "lagos", "sydney", "toronto", "mumbai", "cairo", "lima", "oslo", "seoul", "denver"]
_NAMES = ["anna", "omar", "li wei", "maria", "john", "fatima", "kenji", "sofia", "david", "amara", "lucas", "mei"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def _fill(rng: random.Random, template: str, **pools: list[str]) -> str:
    """Fill ``{slot}`` fields of a template; ``slot2``/``slot3`` draw distinct values from the pool of ``slot``."""
    values: dict[str, str] = {}
    for slot, pool in pools.items():
        needed = [name for name in (slot, f"{slot}2", f"{slot}3") if "{" + name + "}" in template]
        for name, value in zip(needed, rng.sample(pool, len(needed))):
            values[name] = value
    return template.format(**values)


_COMMON = {"city": _CITIES, "name": _NAMES, "day": _DAYS}


def _topic(rng: random.Random, label: str) -> str:
    templates = [
        "news report from {city}: officials discussed the {w} and the {w2} on {day}.",
        "{city} daily: {name} wrote a long column about the {w}, the {w2} and the {w3}.",
        "headline: {name} surprises everyone with a new {w} in {city}",
        "breaking story in {city} this {day}: the {w} near the {w2} drew a crowd.",
    ]
    return _fill(rng, rng.choice(templates), w=_DOMAINS[label], **_COMMON)


_POLARITY = {
    "positive": ["wonderful", "excellent", "fantastic", "delightful", "superb", "brilliant", "lovely", "impressive",
                 "outstanding", "perfect"],
    "negative": ["terrible", "awful", "disappointing", "horrible", "useless", "broken", "dreadful", "poor", "annoying",
                 "faulty"],
}  # fmt: skip


def _sentiment(rng: random.Random, label: str) -> str:
    templates = [
        "customer review: the {w} i ordered was {adj}, and the delivery to {city} was {adj2}.",
        "rated by {name}: honestly {adj}. the {w} was {adj2} overall.",
        "my verdict on the {w} and the {w2}: {adj}, just {adj2}.",
        "five minutes with the {w} and i can say it is {adj}. {name} agrees it is {adj2}.",
    ]
    return _fill(rng, rng.choice(templates), w=_ALL_DOMAIN_WORDS, adj=_POLARITY[label], **_COMMON)


_TIMES = ["6 am", "seven thirty", "noon", "5 pm", "half past eight", "midnight", "9 am", "quarter to six"]
_GENRES = ["jazz", "rock", "classical", "hip hop", "country", "reggae", "blues", "techno"]
_INTENTS = {
    "set an alarm": ["wake me up at {time}", "set an alarm for {time}", "ring the alarm at {time} tomorrow",
                     "i need to get up at {time}"],
    "play a song": ["play some {genre}", "put on the latest {genre} album", "start my {genre} playlist",
                    "i want to hear {genre} tunes"],
    "book a flight": ["get me a plane ticket to {city}", "book a seat on a plane to {city}",
                      "find flights to {city} on {day}", "reserve a flight from {city} to {city2}"],
    "weather forecast": ["will it rain in {city} on {day}", "how hot will it be in {city}",
                         "is it going to snow in {city}", "what is the forecast for {city} on {day}"],
}  # fmt: skip


def _intent(rng: random.Random, label: str) -> str:
    templates = ["hey assistant, {phrase} please.", "{name} asks the assistant: {phrase}.", "voice command: {phrase}!"]
    phrase = _fill(rng, rng.choice(_INTENTS[label]), time=_TIMES, genre=_GENRES, **_COMMON)
    return _fill(rng, rng.choice(templates).replace("{phrase}", phrase), **_COMMON)


_ROLES = ["scientist", "engineer", "writer", "teacher", "doctor", "artist"]
_QUESTIONS = {
    "person": ["who invented the {w}", "which {role} first described the {w}",
               "who was the first {role} to praise the {w}", "whose idea was the {w}"],
    "place": ["where was the {w} first found", "in which city is the {w} kept", "where can i see the {w}",
              "which country built the first {w}"],
    "date": ["when was the {w} introduced", "in what year did the {w} appear", "on which day does the {w} open",
             "what century saw the first {w}"],
    "quantity": ["how many people attended the {w}", "how much does the {w} cost", "how many {w} fans are there",
                 "what is the number of {w} sold"],
}  # fmt: skip


def _question(rng: random.Random, label: str) -> str:
    templates = ["trivia question: {phrase}?", "quiz time! {phrase}?", "{name} wonders: {phrase}?"]
    phrase = _fill(rng, rng.choice(_QUESTIONS[label]), w=_ALL_DOMAIN_WORDS, role=_ROLES)
    return _fill(rng, rng.choice(templates).replace("{phrase}", phrase), **_COMMON)


_LANGUAGES = {
    "french": ["bonjour", "fromage", "boulangerie", "croissant", "chateau", "merci", "baguette", "rendezvous",
               "soiree", "bibliotheque", "fenetre", "papillon"],
    "german": ["kindergarten", "wanderlust", "schadenfreude", "zeitgeist", "bratwurst", "danke", "fahrrad", "kuchen",
               "strasse", "lebensmittel", "schmetterling", "gemuetlichkeit"],
    "spanish": ["fiesta", "siesta", "tortilla", "gracias", "biblioteca", "mariposa", "playa", "cerveza", "ventana",
                "abuela", "zapato", "manana"],
    "italian": ["ciao", "gelato", "piazza", "grazie", "spaghetti", "bellissimo", "ragazzo", "finestra", "farfalla",
                "cappuccino", "buongiorno", "stazione"],
}  # fmt: skip


def _language(rng: random.Random, label: str) -> str:
    templates = [
        "dictionary entry: the word '{f}' appears next to '{f2}' in {name}'s notes about the {w}.",
        "vocabulary quiz: translate '{f}' and '{f2}'.",
        "spotted on a sign in {city}: '{f}', '{f2}', '{f3}'",
        "{name} keeps saying '{f}' since the trip to see the {w}.",
    ]
    return _fill(rng, rng.choice(templates), f=_LANGUAGES[label], w=_ALL_DOMAIN_WORDS, **_COMMON)


_EMOTIONS = {
    "joy": ["overjoyed", "cheerful", "elated", "thrilled", "happy", "glad"],
    "anger": ["furious", "outraged", "irritated", "livid", "enraged", "annoyed"],
    "fear": ["terrified", "frightened", "scared", "panicked", "nervous", "afraid"],
    "sadness": ["heartbroken", "miserable", "gloomy", "devastated", "depressed", "lonely"],
}


def _emotion(rng: random.Random, label: str) -> str:
    templates = [
        "dear diary, after the {w} on {day} i felt {e} and {e2}.",
        "{name} told me she was {e} about the {w}, even {e2}.",
        "journal entry: {e}, simply {e2}, since the {w} in {city}.",
        "tonight i am {e}; the {w} left me {e2}.",
    ]
    return _fill(rng, rng.choice(templates), e=_EMOTIONS[label], w=_ALL_DOMAIN_WORDS, **_COMMON)


_CLASSIFICATION_TASKS: dict[str, tuple[tuple[str, ...], Callable[[random.Random, str], str]]] = {
    "topic": (tuple(_DOMAINS), _topic),
    "sentiment": (tuple(_POLARITY), _sentiment),
    "intent": (tuple(_INTENTS), _intent),
    "question": (tuple(_QUESTIONS), _question),
    "language": (tuple(_LANGUAGES), _language),
    "emotion": (tuple(_EMOTIONS), _emotion),
}

#: Task order of `classification_suite` by default.
CLASSIFICATION_TASKS = tuple(_CLASSIFICATION_TASKS)


def _split(rng: random.Random, make: Callable[[random.Random], Example], train: int, test: int) -> tuple[list, list]:
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


_BOILERPLATE_PREFIXES = [
    "forwarded message from {name} in {city}, received on {day}, please read it carefully before you reply:",
    "the following note was copied from the shared inbox of the {city} office on {day} by {name}:",
    "automatic transcript, channel {city}, operator {name}, {day} session, start of the relevant excerpt:",
    "{name} pasted this into the team chat on {day} and asked everyone in {city} to take a look:",
]
_BOILERPLATE_SUFFIXES = [
    "end of the excerpt, sent from my phone.",
    "please do not reply to this automatic message.",
    "thanks, and have a nice {day}.",
    "archived by the {city} office.",
]


def _wrap_in_boilerplate(rng: random.Random, text: str) -> str:
    prefix = _fill(rng, rng.choice(_BOILERPLATE_PREFIXES), **_COMMON)
    suffix = _fill(rng, rng.choice(_BOILERPLATE_SUFFIXES), **_COMMON)
    return f"{prefix} {text} {suffix}"


def classification_suite(
    seed: int = 0,
    train_per_label: int = 48,
    test_per_label: int = 16,
    tasks: list[str] | None = None,
    boilerplate: bool = False,
) -> list[Task]:
    """The offline text-classification sequence (default: topic, sentiment, intent, question, language, emotion).

    Every task has its own label set (label names are unique across tasks) and its own templates; the result depends
    on ``seed`` alone. Train and test texts never overlap. With ``boilerplate`` every input is wrapped in a long
    prefix and suffix drawn from one pool for all tasks (like a shared system prompt or e-mail header): the tasks'
    inputs then differ in a smaller part of their tokens, a harder case for routing on mean-pooled input embeddings.
    """
    names = list(tasks) if tasks is not None else list(CLASSIFICATION_TASKS)
    unknown = [name for name in names if name not in _CLASSIFICATION_TASKS]
    if unknown:
        raise ValueError(f"unknown classification tasks {unknown}; available: {list(CLASSIFICATION_TASKS)}.")
    suite = []
    for index, name in enumerate(names):
        labels, generator = _CLASSIFICATION_TASKS[name]
        rng = random.Random(f"{seed}-{name}")
        train, test = [], []
        for label in labels:

            def make(r, label=label, generator=generator):
                text = generator(r, label)
                return Example(_wrap_in_boilerplate(r, text) if boilerplate else text, label)

            label_train, label_test = _split(rng, make, train_per_label, test_per_label)
            train += label_train
            test += label_test
        rng.shuffle(train)
        rng.shuffle(test)
        suite.append(Task(name=name, train=train, test=test, labels=labels))
    return suite


# ---- generation suite -----------------------------------------------------------------------------------------------

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
    word = rng.choice(_PLURAL_NOUNS + _ADJECTIVES + [w for w in _ALL_DOMAIN_WORDS if " " not in w])
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
        train, test = _split(rng, _GENERATION_TASKS[name], train_size, test_size)
        suite.append(Task(name=name, train=train, test=test))
    return suite


# ---- Standard CL benchmark ------------------------------------------------------------------------------------------

_AMAZON_YELP_LABELS = ("very negative", "negative", "neutral", "positive", "very positive")

#: name -> (Hub dataset id, label names in label-index order, fields joined into the text, label column)
STANDARD_CL_TASKS: dict[str, dict] = {
    "ag": {
        "dataset": "fancyzhx/ag_news",
        "labels": ("world", "sports", "business", "science"),
        "text": ("text",),
        "label": "label",
    },
    "amazon": {
        # 5-class Amazon reviews of Zhang et al. (2015); no canonical Hub copy: pass a local folder or another id
        "dataset": "amazon_reviews_full",
        "labels": _AMAZON_YELP_LABELS,
        "text": ("title", "content"),
        "label": "label",
    },
    "yelp": {
        "dataset": "Yelp/yelp_review_full",
        "labels": _AMAZON_YELP_LABELS,
        "text": ("text",),
        "label": "label",
    },
    "dbpedia": {
        "dataset": "fancyzhx/dbpedia_14",
        "labels": (
            "company", "educational institution", "artist", "athlete", "office holder", "mean of transportation",
            "building", "natural place", "village", "animal", "plant", "album", "film", "written work",
        ),
        "text": ("title", "content"),
        "label": "label",
    },
    "yahoo": {
        "dataset": "community-datasets/yahoo_answers_topics",
        "labels": (
            "society and culture", "science and mathematics", "health", "education and reference",
            "computers and internet", "sports", "business and finance", "entertainment and music",
            "family and relationships", "politics and government",
        ),
        "text": ("question_title", "question_content", "best_answer"),
        "label": "topic",
    },
}  # fmt: skip

#: The three task orders of the Standard CL benchmark as used by LFPT5, Progressive Prompts and O-LoRA (T5-large).
STANDARD_CL_ORDERS = {
    1: ("dbpedia", "amazon", "yahoo", "ag"),
    2: ("dbpedia", "amazon", "ag", "yahoo"),
    3: ("yahoo", "amazon", "ag", "dbpedia"),
}

_STANDARD_INSTRUCTIONS = {
    "ag": "What is the topic of the news?",
    "amazon": "What is the sentiment of the review?",
    "yelp": "What is the sentiment of the review?",
    "dbpedia": "What is the category of the article?",
    "yahoo": "What is the topic of the question?",
}


def standard_cl_suite(
    order: int | tuple[str, ...] = 1,
    data_dir: str | Path | None = None,
    train_per_label: int = 1000,
    test_per_label: int = 500,
    seed: int = 0,
    max_chars: int = 512,
    text_to_text: bool = False,
    datasets_override: dict[str, str] | None = None,
) -> list[Task]:
    """The Standard CL benchmark (Zhang et al., 2015 datasets) as a task sequence.

    Data comes from ``data_dir/<task>/{train,test}.jsonl`` (or ``.csv``/``.parquet``) when ``data_dir`` is given,
    with the columns of the Hub copies (e.g. ag: text, label; dbpedia: title, content, label; yahoo:
    question_title, question_content, best_answer, topic), else from the Hub through ``datasets.load_dataset`` (needs
    network access; Amazon's 5-class set has no canonical Hub copy, give it in ``datasets_override`` or locally).
    ``train_per_label``/``test_per_label`` examples per class are sampled with ``seed`` (the literature: 1000 / 500).
    With ``text_to_text`` the input carries the instruction and the label options (the T5 setting of O-LoRA); the
    target is the label name either way. Amazon and Yelp share their label names, so a sequence holding both is
    scored with one shared label set.
    """
    names = STANDARD_CL_ORDERS[order] if isinstance(order, int) else tuple(order)
    unknown = [name for name in names if name not in STANDARD_CL_TASKS]
    if unknown:
        raise ValueError(f"unknown Standard CL tasks {unknown}; available: {list(STANDARD_CL_TASKS)}.")
    suite = []
    for name in names:
        spec = STANDARD_CL_TASKS[name]
        splits = _load_standard_splits(name, spec, data_dir, (datasets_override or {}).get(name, spec["dataset"]))
        rng = random.Random(f"{seed}-{name}")
        train = _sample_per_label(splits["train"], spec, train_per_label, rng, max_chars)
        test = _sample_per_label(splits["test"], spec, test_per_label, rng, max_chars)
        if text_to_text:
            prefix = f"{_STANDARD_INSTRUCTIONS[name]} Options: {', '.join(spec['labels'])}.\nText: "
            train = [Example(prefix + example.text, example.target) for example in train]
            test = [Example(prefix + example.text, example.target) for example in test]
        suite.append(Task(name=name, train=train, test=test, labels=tuple(spec["labels"])))
    return suite


def _load_standard_splits(name: str, spec: dict, data_dir, dataset_id: str) -> dict:
    import datasets

    if data_dir is None:
        return datasets.load_dataset(dataset_id)
    folder = Path(data_dir) / name
    for suffix, builder in ((".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".parquet", "parquet")):
        files = {split: str(folder / f"{split}{suffix}") for split in ("train", "test")}
        if all(Path(path).exists() for path in files.values()):
            return datasets.load_dataset(builder, data_files=files)
    raise FileNotFoundError(f"no train/test files for task '{name}' in {folder} (expected train.jsonl, test.jsonl).")


def _sample_per_label(split, spec: dict, per_label: int, rng: random.Random, max_chars: int) -> list[Example]:
    labels = spec["labels"]
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(split[spec["label"]]):
        by_label.setdefault(int(label), []).append(index)
    chosen = []
    for label in sorted(by_label):
        if not 0 <= label < len(labels):
            raise ValueError(f"label index {label} out of range for {len(labels)} labels ({labels}).")
        indices = by_label[label]
        chosen += rng.sample(indices, min(per_label, len(indices)))
    rng.shuffle(chosen)
    rows = split.select(chosen)
    examples = []
    for row in rows:
        text = " ".join(str(row[column]).strip() for column in spec["text"] if row.get(column))
        examples.append(Example(text[:max_chars], labels[int(row[spec["label"]])]))
    return examples
