"""Six offline text-classification tasks with distinct label sets (topic, sentiment, intent, question type, language
of origin, emotion), built from templates and word lists. Each task has its own templates, so the tasks are separable
by their input distribution, while the slot fillers are shared across tasks (sports or finance words appear in
reviews, questions and diaries), so that training one task can disturb another: forgetting is measurable. No task id
reaches the model: the input is the text alone and the label is scored among the label names of every task seen so
far. Two held-out tasks (`classification_held_out`) are never trained: the topic task's templates with new labels,
and a format of its own."""

from __future__ import annotations

import random
from collections.abc import Callable

from .tasks import Example, Task, split


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
ALL_DOMAIN_WORDS = [word for words in _DOMAINS.values() for word in words]
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
    return _topic_with(rng, _DOMAINS[label])


def _topic_with(rng: random.Random, words: list[str]) -> str:
    """A news text about ``words`` (the topic task's templates)."""
    templates = [
        "news report from {city}: officials discussed the {w} and the {w2} on {day}.",
        "{city} daily: {name} wrote a long column about the {w}, the {w2} and the {w3}.",
        "headline: {name} surprises everyone with a new {w} in {city}",
        "breaking story in {city} this {day}: the {w} near the {w2} drew a crowd.",
    ]
    return _fill(rng, rng.choice(templates), w=words, **_COMMON)


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
    return _fill(rng, rng.choice(templates), w=ALL_DOMAIN_WORDS, adj=_POLARITY[label], **_COMMON)


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
    phrase = _fill(rng, rng.choice(_QUESTIONS[label]), w=ALL_DOMAIN_WORDS, role=_ROLES)
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
    return _fill(rng, rng.choice(templates), f=_LANGUAGES[label], w=ALL_DOMAIN_WORDS, **_COMMON)


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
    return _fill(rng, rng.choice(templates), e=_EMOTIONS[label], w=ALL_DOMAIN_WORDS, **_COMMON)


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
    return _labelled_tasks(
        "classification", _CLASSIFICATION_TASKS, names, seed, train_per_label, test_per_label, boilerplate
    )


def _labelled_tasks(
    kind: str, registry: dict, names, seed: int, train_per_label: int, test_per_label: int, boilerplate: bool
) -> list[Task]:
    """The tasks ``names`` of ``registry`` (name -> (labels, generator)), built by `_labelled_task`; an unknown
    name is an error that lists the ``kind`` of suite's tasks."""
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ValueError(f"unknown {kind} tasks {unknown}; available: {list(registry)}.")
    return [
        _labelled_task(name, *registry[name], seed, train_per_label, test_per_label, boilerplate) for name in names
    ]


def _labelled_task(
    name: str,
    labels: tuple[str, ...],
    generator: Callable[[random.Random, str], str],
    seed: int,
    train_per_label: int,
    test_per_label: int,
    boilerplate: bool = False,
    metadata: dict | None = None,
) -> Task:
    """A classification task of ``generator``'s texts, ``train_per_label`` + ``test_per_label`` distinct texts per
    label, deterministic in ``seed`` and ``name``."""
    rng = random.Random(f"{seed}-{name}")
    train, test = [], []
    for label in labels:

        def make(r, label=label):
            text = generator(r, label)
            return Example(_wrap_in_boilerplate(r, text) if boilerplate else text, label)

        label_train, label_test = split(rng, make, train_per_label, test_per_label)
        train += label_train
        test += label_test
    rng.shuffle(train)
    rng.shuffle(test)
    return Task(name=name, train=train, test=test, labels=labels, metadata=dict(metadata or {}))


# ---- generation suite -----------------------------------------------------------------------------------------------


# ---- held-out tasks: never trained, scored after the whole sequence -------------------------------------------------

_NEW_DOMAINS = {
    "health": ["hospital", "nurse", "clinic", "surgeon", "flu season", "blood test", "pharmacy", "patients"],
    "politics": ["parliament", "election", "senator", "campaign", "voters", "minister", "new law", "city council"],
    "education": ["school", "classroom", "exam", "university", "students", "homework", "lecture", "teacher strike"],
    "fashion": ["runway", "designer", "dress", "handbag", "fashion week", "silk scarf", "model", "boutique"],
}  # fmt: skip

_ANIMALS = {
    "bird": ["sparrow", "eagle", "owl", "parrot", "pigeon", "heron", "robin", "falcon"],
    "fish": ["salmon", "trout", "shark", "tuna", "carp", "cod", "herring", "goldfish"],
    "insect": ["beetle", "butterfly", "ant", "bee", "mosquito", "grasshopper", "wasp", "ladybug"],
    "mammal": ["elephant", "horse", "whale", "fox", "rabbit", "deer", "bear", "squirrel"],
}  # fmt: skip


def _topic_new_labels(rng: random.Random, label: str) -> str:
    """The topic task's templates with domains no trained task has."""
    return _topic_with(rng, _NEW_DOMAINS[label])


def _animal(rng: random.Random, label: str) -> str:
    templates = [
        "field notes, {day}: a {a} was spotted near the {w} outside {city}.",
        "{name} took a photo of a {a} and a {a2} at the park.",
        "wildlife log: two {a} sightings by {name} this {day}.",
        "the kids in {city} drew a {a} for the school fair.",
    ]
    return _fill(rng, rng.choice(templates), a=_ANIMALS[label], w=ALL_DOMAIN_WORDS, **_COMMON)


#: name -> (label names, generator, metadata): a trained task's format with a new label set, and a new format.
_HELD_OUT_CLASSIFICATION = {
    "topic_new_labels": (tuple(_NEW_DOMAINS), _topic_new_labels, {"held_out": "new labels", "format_of": "topic"}),
    "animal": (tuple(_ANIMALS), _animal, {"held_out": "new format"}),
}


def classification_held_out(
    seed: int = 0, test_per_label: int = 16, boilerplate: bool = False, tasks: list[str] | None = None
) -> list[Task]:
    """Tasks of the classification suite that are never trained (no train examples): ``topic_new_labels`` (the topic
    task's templates with four new domains as labels) and ``animal`` (a format and label set no trained task has),
    or the subset ``tasks``. Their label names differ from every trained task's; ``metadata["held_out"]`` names the
    kind."""
    names = list(tasks) if tasks is not None else list(_HELD_OUT_CLASSIFICATION)
    unknown = [name for name in names if name not in _HELD_OUT_CLASSIFICATION]
    if unknown:
        raise ValueError(f"unknown held-out tasks {unknown}; available: {list(_HELD_OUT_CLASSIFICATION)}.")
    return [
        _labelled_task(name, *_HELD_OUT_CLASSIFICATION[name][:2], seed, 0, test_per_label, boilerplate,
                       _HELD_OUT_CLASSIFICATION[name][2])
        for name in names
    ]  # fmt: skip
