"""The "Standard CL benchmark" (AG News, Amazon, Yelp, DBpedia, Yahoo Answers) as text-to-text classification in
the three task orders of the literature, through `datasets` (downloadable, or local files in the same column
layout)."""

from __future__ import annotations

import random
from pathlib import Path

from .tasks import Example, Task


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
