"""A long task sequence: fifteen offline text-classification tasks in three fixed task orders.

Continual-learning methods that look fine on five or six tasks can fall apart on long sequences: a router chooses
among more branches, orthogonality constraints run out of room, and forgetting accumulates over more stages. This
suite is the six tasks of `classification_suite` (same generators, same texts for a seed) and nine more built the
same way: each task has its own templates, so the tasks are separable by their input, while the slot fillers (names,
cities, days, the classification suite's domain words) are shared by every task, so that training one task can
disturb another. Every label name is unique across the fifteen tasks (scoring is the nearest label-name embedding
among every label seen so far). The three orders of `LONG_SEQUENCE_ORDERS` are fixed, as the orders of the Standard
CL benchmark are, so results per order and their spread over orders are comparable between runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .classification import _CLASSIFICATION_TASKS, _COMMON, ALL_DOMAIN_WORDS, _fill, _labelled_tasks
from .tasks import Task


def _cue_generator(templates: list[str], cues: dict[str, list[str]]) -> Callable[[random.Random, str], str]:
    """Texts of ``templates`` whose ``{c}`` and ``{c2}`` are two distinct cue phrases of the label (``cues[label]``);
    the other slots, in the templates or the cues, take the fillers shared by every task (``{w}``: a domain word)."""

    def generate(rng: random.Random, label: str) -> str:
        template = rng.choice(templates)
        for slot, cue in zip(("{c}", "{c2}"), rng.sample(cues[label], 2)):
            template = template.replace(slot, cue)
        return _fill(rng, template, w=ALL_DOMAIN_WORDS, **_COMMON)

    return generate


_WEATHER = {
    "sunny": ["clear blue skies", "bright sunshine", "a cloudless sky", "warm sunny spells", "dry heat",
              "plenty of sun"],
    "rainy": ["heavy showers", "steady drizzle", "thunderstorms with downpours", "wet roads and puddles",
              "persistent rain", "soaking downpours"],
    "snowy": ["heavy snowfall", "a blizzard", "snow flurries", "drifting snow", "freezing snow showers",
              "a thick blanket of snow"],
}  # fmt: skip
_WEATHER_TEMPLATES = [
    "weather report for {city} on {day}: {c} expected, so the {w} may be moved indoors.",
    "{name}'s forecast: {c} and {c2} all over {city} this {day}.",
    "local weather update: {c} over {city}; anyone heading to the {w} should plan ahead.",
    "outlook for {day} in {city}: {c} at first, then {c2}.",
]

_URGENCY = {
    "urgent": ["immediately", "as soon as possible", "before noon today", "right now, it cannot wait",
               "within the hour", "as an emergency"],
    "low priority": ["whenever you have time", "with no rush at all", "sometime next month", "whenever it suits you",
                     "when things are quiet", "later, it can wait"],
}  # fmt: skip
_URGENCY_TEMPLATES = [
    "subject: the {w}. hi team, {name} here, please deal with it {c}.",
    "email from {name} in {city}: re the {w}, reply {c}.",
    "memo to the {city} office: the {w} needs attention {c}.",
    "{name} wrote on {day}: please review the {w} and the {w2} {c}.",
]

_PRODUCTS = {
    "electronics": ["laptop", "pair of headphones", "smartphone", "digital camera", "tablet", "game console",
                    "flat-screen tv"],
    "clothing": ["winter jacket", "pair of jeans", "wool sweater", "raincoat", "pair of sneakers", "leather belt",
                 "summer dress"],
    "furniture": ["sofa", "bookshelf", "dining table", "armchair", "wardrobe", "office desk", "bed frame"],
}  # fmt: skip
_PRODUCT_TEMPLATES = [
    "for sale in {city}: {c}, barely used, contact {name}.",
    "classified ad: second-hand {c} and {c2}, pick up on {day}.",
    "marketplace listing: {c} in good condition, or swap for anything about the {w}.",
    "{name} is selling their {c} near {city}, price negotiable.",
]

_DAYTIME = {
    "morning": ["at sunrise", "over breakfast", "with my first coffee", "just after waking up", "before work began",
                "as the dawn broke"],
    "afternoon": ["after lunch", "at three o'clock", "around teatime", "during the post-lunch slump",
                  "as the school day ended", "between lunch and dinner"],
    "night": ["long after dark", "under the stars", "while the city slept", "in the small hours", "just before bed",
              "by moonlight"],
}  # fmt: skip
_DAYTIME_TEMPLATES = [
    "diary of {name}, {day}: {c}, i thought about the {w} again.",
    "{c}, {name} and i walked past the {w} in {city}.",
    "photo caption: the {w} in {city}, {c}.",
    "it was {c} when {name} finally called about the {w}.",
]

_FORMALITY = {
    "formal": ["dear {name}, i am writing to inform you about the {w}. yours sincerely.",
               "to whom it may concern: kindly find enclosed the report on the {w}.",
               "we would be grateful if you could confirm the {w} in writing.",
               "it is with great pleasure that we invite you to the {w} in {city}.",
               "please accept our sincere apologies regarding the {w}.",
               "we hereby acknowledge receipt of your letter concerning the {w}."],
    "casual": ["hey {name}! the {w} was so cool lol",
               "yo, u coming to the {w} on {day}?",
               "omg {name}, did u see the {w}?? haha",
               "sup! grabbing food near the {w}, wanna join?",
               "lol the {w} in {city} was wild, ttyl",
               "btw the {w} thing is totally happening, see ya"],
}  # fmt: skip
_FORMALITY_TEMPLATES = ["letter excerpt, {day}: {c}", "{name2} sent this: {c}", "copied from a note in {city}: {c}"]

_SPAM = {
    "spam": ["congratulations! you have won a free {w}, click the link to claim it",
             "limited offer: cheap {w} tickets, act now",
             "you are our lucky winner, send your bank details to receive the {w}",
             "earn money fast from home with the secret of the {w}",
             "exclusive deal just for you: buy one {w} and get two free",
             "your account is suspended, verify your password to keep the {w}"],
    "genuine": ["thanks for lending me the {w} on {day}",
                "see you at the {w} on {day}, {name} will drive",
                "can you send me the photos from the {w}?",
                "i left my keys near the {w}, could you check?",
                "dinner at my place after the {w}? bring {name}",
                "the {w} got moved to {day}, just so you know"],
}  # fmt: skip
_SPAM_TEMPLATES = ["inbox preview: {c}", "new message to {name2}: {c}", "sms received in {city}: {c}"]

_TRAVEL = {
    "train travel": ["the night train", "a sleeper carriage", "the express from platform four",
                     "a high-speed rail line", "the local commuter train", "a railway pass"],
    "road trip": ["a rental car", "the coastal highway", "a camper van", "a long drive on the motorway",
                  "a convertible", "the interstate"],
    "sea voyage": ["the overnight ferry", "a cruise ship", "a small sailing boat", "a cargo ship", "a catamaran",
                   "a ferry across the strait"],
}  # fmt: skip
_TRAVEL_TEMPLATES = [
    "travel diary: we took {c} from {city} to {city2} on {day}.",
    "{name} booked {c} for the trip to see the {w}.",
    "holiday notes: first {c}, then {c2}, all the way to {city}.",
    "postcard from {city}: the journey on {c} was long, but the {w} was worth it.",
]

_SYMPTOMS = {
    "headache": ["my head is pounding", "a throbbing pain behind my eyes", "pressure in my temples",
                 "a migraine that will not stop", "my skull aches", "my forehead hurts"],
    "toothache": ["my molar hurts when i chew", "a sharp pain in my gums", "my tooth is sensitive to cold",
                  "my jaw throbs near a cavity", "a cracked filling aches", "my wisdom tooth is sore"],
    "backache": ["my lower back is stiff", "pain along my spine", "i cannot bend over", "a pulled muscle in my back",
                 "my lumbar area aches", "sitting hurts my lower back"],
}  # fmt: skip
_SYMPTOM_TEMPLATES = [
    "patient message: doctor, {c} since {day}.",
    "{name} called the practice: {c}, worse after the {w}.",
    "health forum post from {city}: {c} and {c2}, any advice?",
    "symptom checker input by {name}: {c}.",
]

_GARDEN = {
    "tree": ["an oak", "a maple", "a young birch", "a pine", "a willow", "a cherry sapling"],
    "flower": ["some roses", "a row of tulips", "daisies", "a sunflower", "orchids", "lilies"],
    "vegetable": ["carrots", "potatoes", "a cabbage", "lettuce", "onions", "spinach"],
}
_GARDEN_TEMPLATES = [
    "garden journal, {day}: planted {c} next to the {w}.",
    "{name} from {city} asks how often to water {c}.",
    "allotment notes: {c} and {c2} are doing well this year, says {name}.",
    "nursery receipt, {city}: {c}, compost and a watering can.",
]

#: The nine tasks the long sequence adds to the classification suite's six: name -> (templates, cues per label).
_NEW_TASKS = {
    "weather": (_WEATHER_TEMPLATES, _WEATHER),
    "urgency": (_URGENCY_TEMPLATES, _URGENCY),
    "product": (_PRODUCT_TEMPLATES, _PRODUCTS),
    "daytime": (_DAYTIME_TEMPLATES, _DAYTIME),
    "formality": (_FORMALITY_TEMPLATES, _FORMALITY),
    "spam": (_SPAM_TEMPLATES, _SPAM),
    "travel": (_TRAVEL_TEMPLATES, _TRAVEL),
    "symptom": (_SYMPTOM_TEMPLATES, _SYMPTOMS),
    "garden": (_GARDEN_TEMPLATES, _GARDEN),
}
_LONG_SEQUENCE_TASKS: dict[str, tuple[tuple[str, ...], Callable[[random.Random, str], str]]] = {
    **_CLASSIFICATION_TASKS,
    **{name: (tuple(cues), _cue_generator(templates, cues)) for name, (templates, cues) in _NEW_TASKS.items()},
}

#: The fifteen task names in their natural order (order 1).
LONG_SEQUENCE_TASKS = tuple(_LONG_SEQUENCE_TASKS)

#: Three fixed orders of the fifteen tasks: 1 the natural one, 2 and 3 fixed permutations of it.
LONG_SEQUENCE_ORDERS = {
    1: LONG_SEQUENCE_TASKS,
    2: (
        "weather", "topic", "spam", "emotion", "garden", "intent", "formality", "language", "travel", "sentiment",
        "symptom", "question", "product", "daytime", "urgency",
    ),
    3: (
        "symptom", "question", "garden", "sentiment", "travel", "urgency", "language", "daytime", "topic",
        "formality", "emotion", "product", "spam", "intent", "weather",
    ),
}  # fmt: skip


def long_sequence_suite(
    seed: int = 0,
    train_per_label: int = 48,
    test_per_label: int = 16,
    order: int | Sequence[str] = 1,
    boilerplate: bool = False,
) -> list[Task]:
    """The fifteen-task sequence in task order ``order`` (1, 2 or 3, see `LONG_SEQUENCE_ORDERS`) or the task names
    ``order`` (a subset or another order).

    Each task has ``train_per_label`` + ``test_per_label`` distinct texts per label (train and test never overlap)
    and depends on ``seed`` and its name alone, so a task is the same in every order, and the six tasks shared with
    `classification_suite` are the same as there. ``boilerplate`` wraps every input as `classification_suite` does.
    """
    if isinstance(order, int):
        if order not in LONG_SEQUENCE_ORDERS:
            raise ValueError(f"unknown task order {order}; available: {sorted(LONG_SEQUENCE_ORDERS)}.")
        names = LONG_SEQUENCE_ORDERS[order]
    else:
        names = tuple(order)
    return _labelled_tasks(
        "long-sequence", _LONG_SEQUENCE_TASKS, names, seed, train_per_label, test_per_label, boilerplate
    )
