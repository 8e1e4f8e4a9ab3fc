"""The harnesses' scorers on hand-made known answers: the nearest label embedding among the candidates, and the exact
match of a causal LM's first answer line."""

from __future__ import annotations

import string
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from benchmarks import suites
from peft_sparta.continual import (
    CausalLMHarness,
    EmbeddingClassificationHarness,
)
from tests.conftest import word_tokenizer


class TableEncoder(torch.nn.Module):
    """A sentence encoder stub: each word's hidden state is a hand-set vector (its attention mask is ignored here, as
    an encoder's hidden states at padding are arbitrary: the harness must mask them out)."""

    def __init__(self, tokenizer, vectors: dict[str, list[float]]):
        super().__init__()
        self.table = torch.nn.Embedding(len(tokenizer), 3)
        with torch.no_grad():
            self.table.weight.zero_()
            for word, vector in vectors.items():
                self.table.weight[tokenizer.convert_tokens_to_ids(word)] = torch.tensor(vector)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.table(input_ids))


def test_embedding_harness_accuracy_is_the_nearest_label_embedding_among_the_candidates():
    vectors = {
        "sports": [1.0, 0.0, 0.0], "music": [0.0, 1.0, 0.0], "food": [0.0, 0.0, 1.0],
        "goal": [0.9, 0.1, 0.0], "guitar": [0.1, 0.9, 0.0], "pizza": [0.0, 0.2, 0.8],
        "[PAD]": [0.0, 0.0, 50.0],  # padding that counted would pull every padded input to "food"
    }  # fmt: skip
    tokenizer = word_tokenizer(list(vectors))
    model = TableEncoder(tokenizer, vectors)
    harness = EmbeddingClassificationHarness(tokenizer, eval_batch_size=2)
    test = [
        suites.Example("goal goal goal", "sports"),  # nearest: sports, right
        suites.Example("guitar", "music"),  # padded to 3 tokens in its batch; nearest: music, right
        suites.Example("pizza", "music"),  # nearest: food, wrong
    ]
    task = suites.Task("hand", train=[], test=test, labels=["sports", "music", "food"])
    harness.prepare(model, [task])
    torch.testing.assert_close(harness.label_embeddings["food"], torch.tensor([0.0, 0.0, 1.0]))
    assert harness.accuracy(model, task, ["sports", "music", "food"]) == pytest.approx(2 / 3)
    # without "food" among the candidates, "pizza" is nearest to "music"
    assert harness.accuracy(model, task, ["sports", "music"]) == pytest.approx(3 / 3)
    # the candidates are every label seen so far; their order does not matter
    assert harness.accuracy(model, task, ["food", "music", "sports"]) == pytest.approx(2 / 3)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (newlines and spaces included), so that a decoded answer is exactly what was
    generated; right padding by default, as most causal-LM tokenizers."""
    characters = sorted(set(string.ascii_letters + string.digits + " \n:?.,"))
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *characters])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


class ScriptedGenerator(torch.nn.Module):
    """A causal-LM stub whose greedy generation is a script: prompt -> continuation (then EOS, then padding)."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.script, self.prompts = tokenizer, script, []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id):
        assert do_sample is False, "greedy decoding"
        assert (attention_mask[:, -1] == 1).all(), "prompts are left-padded, so generation continues each prompt"
        rows = []
        for row in input_ids:
            prompt = self.tokenizer.decode(row, skip_special_tokens=True)
            self.prompts.append(prompt)
            continuation = self.tokenizer(self.script[prompt], add_special_tokens=False)["input_ids"]
            rows.append((continuation + [eos_token_id])[:max_new_tokens])
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, new], dim=1)


def test_causal_lm_harness_accuracy_is_the_exact_match_of_the_first_answer_line():
    tokenizer = char_tokenizer()
    cases = [
        # (question, target, generated continuation, counted right)
        ("What is 40 plus 2?", "42", " 42\nQuestion: what is 1 plus 1?", True),  # extra text after a newline
        ("Capital of France?", "Paris", "   Paris  ", True),  # surrounding whitespace
        ("Two plus two?", "4", " 42", False),  # a prefix of the answer is not the answer
        ("Plural of dog?", "dogs", " Dogs", False),  # case counts
        ("Say yes.", "yes", "\n yes\nno", True),  # leading blank line
        ("Spell cat.", "c a t", " c a t", True),  # inner spaces are kept
        ("Hi?", "hello", " hel", False),  # an answer cut short
    ]
    script = {CausalLMHarness.prompt(question): answer for question, _, answer, _ in cases}
    model = ScriptedGenerator(tokenizer, script)
    harness = CausalLMHarness(tokenizer, max_new_tokens=40, eval_batch_size=4)
    task = suites.Task("hand", train=[], test=[suites.Example(q, target) for q, target, _, _ in cases], labels=[])
    expected = sum(right for *_, right in cases) / len(cases)
    assert harness.accuracy(model, task, []) == pytest.approx(expected)
    assert sorted(model.prompts) == sorted(script), "every test prompt, and nothing else, is generated from"
    assert tokenizer.padding_side == "right", "the tokenizer's padding side is restored"
