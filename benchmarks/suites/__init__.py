"""Task suites for the continual-learning benchmark, generated offline and deterministically from a seed.

- `classification_suite`: six text-classification tasks with distinct label sets (topic, sentiment, intent, question
  type, language of origin, emotion), built from templates and word lists. Each task has its own templates, so the
  tasks are separable by their input distribution, while the slot fillers are shared across tasks (sports or finance
  words appear in reviews, questions and diaries), so that training one task can disturb another: forgetting is
  measurable. No task id reaches the model: the input is the text alone and the label is scored among the label names
  of every task seen so far.
- `generation_suite`: five instruction tasks with short exact-match answers (number words to digits, addition,
  capital letters, plural, first letter), for causal LMs.
- `translation_suite`: translation of the same eight words into French, Spanish and German as classification: the
  tasks' prompts differ in one word (the language), the hard case for routing.
- `classification_held_out`, `generation_held_out`, `translation_held_out`: each suite's tasks that are never
  trained (a trained task's format with a new label set, and a format no trained task has), scored after the whole
  sequence (``train_sequence(..., held_out=...)``).
- `long_sequence_suite`: fifteen text-classification tasks (the six of `classification_suite` and nine more built
  the same way) in three fixed task orders, for continual learning over long sequences.
- `realtext_suite`: eight tasks of real text that installed packages ship (tzdata's time zones, pycountry's ISO
  3166 / 3166-2 lists, the Unicode character names), classification and generation mixed, for causal LMs,
  with train / calibration / test parts; `realtext_held_out`: its two never-trained tasks; `unrelated_texts`: real
  text unrelated to them (the Apache License 2.0) for drift.
- `standard_cl_suite`: the "Standard CL benchmark" (AG News, Amazon, Yelp, DBpedia, Yahoo Answers) as
  text-to-text classification in the three task orders of the literature, through `datasets` (downloadable or local
  files in the same column layout).
"""

from __future__ import annotations

from .classification import CLASSIFICATION_TASKS, classification_held_out, classification_suite
from .generation import GENERATION_TASKS, generation_held_out, generation_suite
from .long_sequence import LONG_SEQUENCE_ORDERS, LONG_SEQUENCE_TASKS, long_sequence_suite
from .realtext import (
    REALTEXT_HELD_OUT,
    REALTEXT_TASKS,
    realtext_held_out,
    realtext_suite,
    unrelated_texts,
)
from .standard_cl import STANDARD_CL_ORDERS, STANDARD_CL_TASKS, standard_cl_suite
from .tasks import CALIBRATION_TEXTS, NEUTRAL_TEXTS, Example, Task
from .translation import TRANSLATION_TASKS, translation_held_out, translation_suite


__all__ = [
    "CALIBRATION_TEXTS",
    "CLASSIFICATION_TASKS",
    "GENERATION_TASKS",
    "LONG_SEQUENCE_ORDERS",
    "LONG_SEQUENCE_TASKS",
    "NEUTRAL_TEXTS",
    "REALTEXT_HELD_OUT",
    "REALTEXT_TASKS",
    "STANDARD_CL_ORDERS",
    "STANDARD_CL_TASKS",
    "TRANSLATION_TASKS",
    "Example",
    "Task",
    "classification_held_out",
    "classification_suite",
    "generation_held_out",
    "generation_suite",
    "long_sequence_suite",
    "realtext_held_out",
    "realtext_suite",
    "standard_cl_suite",
    "translation_held_out",
    "translation_suite",
    "unrelated_texts",
]
