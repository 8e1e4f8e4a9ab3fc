"""Harnesses: how `train_sequence` computes a task's loss and its task-free accuracy for one kind of model.

`Harness` states what the driver asks of a harness; `EmbeddingClassificationHarness` (sentence encoders, nearest
label-name embedding) and `CausalLMHarness` (causal LMs, exact match of the greedy answer) implement it. Tasks and
examples are duck-typed as in the repository's `benchmarks.suites`: a task has ``name``, ``train`` and ``test``
(lists of examples) and ``labels`` (its label names, empty for generation); an example has ``text`` and ``target``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from ..routers.context import IGNORE_INDEX
from ..routers.recorder import RoutingRecorder
from ..utils import module_device


__all__ = ["CausalLMHarness", "EmbeddingClassificationHarness", "Harness"]


@runtime_checkable
class Harness(Protocol):
    """What `train_sequence` asks of a harness: the loss of a mixed batch, the task-free accuracy of a task, and the
    general-ability drift on unrelated text."""

    def prepare(self, model: nn.Module, tasks: Sequence) -> None:
        """Called once with the untrained model (adapter a no-op) and every task, before any measurement."""

    def general_reference(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """The reference on unrelated ``texts`` that `drift` compares against, measured before training."""

    def drift(self, model: nn.Module, texts: list[str], reference: torch.Tensor) -> float:
        """General-ability drift on ``texts`` now against ``reference`` (0 for an unchanged model)."""

    def mixed_loss(self, model: nn.Module, pairs: list, label_space: list[str] | None = None) -> torch.Tensor:
        """Mean training loss of (task, example) pairs in one forward; ``label_space``, when given, replaces each
        task's own labels (the multi-task upper bound)."""

    def accuracy(
        self, model: nn.Module, task, candidates: list[str], recorder: RoutingRecorder | None = None
    ) -> float:
        """Accuracy on ``task.test`` without the task id (``candidates``: the label names to choose from).
        ``recorder``, when given, is started and disabled: enable it only around the forwards that route the test
        inputs, so that it records one row per input."""


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class EmbeddingClassificationHarness:
    """Task-free classification with a sentence encoder (e.g. all-MiniLM-L6-v2).

    The encoder embeds the text (mean pooling over the attention mask, L2-normalised, as sentence-transformers does);
    the prediction is the nearest label-name embedding among the labels of every task seen so far, so no task id is
    used. Label-name embeddings come from the frozen base encoder (computed once, before any training, with the
    adapter a no-op), so that every method is scored against the same fixed targets and a method that drifts the
    encoder towards the newest task's labels shows it as forgetting. Training loss: cross-entropy over the current
    task's label embeddings of cosine / temperature (old label names are not used: no rehearsal of any kind).
    """

    def __init__(self, tokenizer, max_length: int = 64, temperature: float = 0.05, eval_batch_size: int = 64):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.temperature = temperature
        self.eval_batch_size = eval_batch_size
        self.label_embeddings: dict[str, torch.Tensor] = {}

    def _encode(self, texts: list[str], device) -> dict:
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {key: value.to(device) for key, value in encoded.items()}

    def embed(self, model, texts: list[str]) -> torch.Tensor:
        inputs = self._encode(texts, module_device(model))
        hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        # pooled in the hidden dtype, as before: `masked_mean` pools in fp32, which would change half-precision runs
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0), dim=-1)

    @torch.no_grad()
    def prepare(self, model, tasks) -> None:
        """Embed every label name with the model before training (its adapter is a no-op then)."""
        missing = sorted({label for task in tasks for label in task.labels} - set(self.label_embeddings))
        if not missing:
            return
        was_training = model.training
        model.eval()
        for chunk in _batches(missing, self.eval_batch_size):
            for label, vector in zip(chunk, self.embed(model, chunk)):
                self.label_embeddings[label] = vector.float().cpu()
        model.train(was_training)

    @torch.no_grad()
    def general_reference(self, model, texts: list[str]) -> torch.Tensor:
        model.eval()
        chunks = _batches(texts, self.eval_batch_size)
        return torch.cat([self.embed(model, list(chunk)).float().cpu() for chunk in chunks])

    def drift(self, model, texts: list[str], reference: torch.Tensor) -> float:
        """General-ability drift on unrelated text: 1 - mean cosine between the embeddings now and before training."""
        return float(1.0 - (self.general_reference(model, texts) * reference).sum(dim=-1).mean())

    def _label_matrix(self, labels, device) -> torch.Tensor:
        return torch.stack([self.label_embeddings[label] for label in labels]).to(device)

    def loss(self, model, batch, task) -> torch.Tensor:
        return self.mixed_loss(model, [(task, example) for example in batch])

    def mixed_loss(self, model, pairs, label_space: list[str] | None = None) -> torch.Tensor:
        """Mean loss of (task, example) pairs in one encoder forward; each example is scored over its task's labels,
        or over ``label_space`` when given (the multi-task upper bound, which knows every task at once)."""
        embeddings = self.embed(model, [example.text for _, example in pairs]).float()
        losses = []
        for index, (task, example) in enumerate(pairs):
            labels = list(label_space) if label_space is not None else list(task.labels)
            logits = embeddings[index] @ self._label_matrix(labels, embeddings.device).T / self.temperature
            target = torch.tensor(labels.index(example.target), device=logits.device)
            losses.append(F.cross_entropy(logits.unsqueeze(0), target.unsqueeze(0)))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def accuracy(self, model, task, candidates: list[str], recorder: RoutingRecorder | None = None) -> float:
        labels = self._label_matrix(candidates, module_device(model))
        correct = 0
        for batch in _batches(task.test, self.eval_batch_size):
            if recorder is not None:
                recorder.enabled = True
            embeddings = self.embed(model, [example.text for example in batch])
            if recorder is not None:
                recorder.enabled = False
            predictions = (embeddings.float() @ labels.T).argmax(dim=-1).tolist()
            correct += sum(candidates[p] == example.target for p, example in zip(predictions, batch))
        return correct / len(task.test)


class CausalLMHarness:
    """Instruction/generation tasks for a causal LM, scored by exact match of the greedy answer.

    The prompt is the task input followed by ``"\\nAnswer:"``; the target is ``" " + answer`` and EOS. In training the
    labels are `IGNORE_INDEX` (-100) on the prompt (completion-only loss, so SpaRTA builds its router state from the
    prompt alone, as at inference). At test time
    the answer is generated greedily from the prompt alone and compared, stripped, to the target (candidate labels are
    not used). With ``score_labels``, a task with labels (classification) is scored instead by the most likely of its
    own labels: the one whose answer tokens (``" " + label`` and EOS, as trained) have the largest summed
    log-probability after the prompt, the router deciding from the prompt alone as in training.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int = 128,
        max_new_tokens: int = 8,
        eval_batch_size: int = 32,
        score_labels: bool = False,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.score_labels = score_labels
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @torch.no_grad()
    def general_reference(self, model, texts: list[str]) -> torch.Tensor:
        """Mean token NLL of the unrelated texts (a scalar tensor), the reference for `drift`."""
        model.eval()
        total = count = 0.0
        for text in texts:
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(module_device(model))
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        return torch.tensor(total / max(count, 1.0))

    def drift(self, model, texts: list[str], reference: torch.Tensor) -> float:
        """General-ability drift on unrelated text: mean token NLL now minus before training."""
        return float(self.general_reference(model, texts) - reference)

    @staticmethod
    def prompt(text: str) -> str:
        return f"{text}\nAnswer:"

    def prepare(self, model, tasks) -> None:
        return None

    def mixed_loss(self, model, pairs, label_space: list[str] | None = None) -> torch.Tensor:
        """Loss of (task, example) pairs: neither the task nor a label space enters the causal-LM loss."""
        return self.loss(model, [example for _, example in pairs], None)

    def _answer_batch(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """Right-padded ``prompt(text) + " " + answer + EOS`` rows of (text, answer) pairs, with their token labels:
        `IGNORE_INDEX` on the prompt and the padding, the token ids on the answer."""
        tokenizer = self.tokenizer
        rows, labels = [], []
        for text, target in pairs:
            prompt = tokenizer(self.prompt(text), add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + answer)[: self.max_length]
            rows.append(ids)
            labels.append(([IGNORE_INDEX] * len(prompt) + answer)[: self.max_length])
        width = max(len(row) for row in rows)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
            "labels": torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in labels]),
        }

    def loss(self, model, batch, task) -> torch.Tensor:
        device = module_device(model)
        inputs = self._answer_batch([(example.text, example.target) for example in batch])
        return model(**{key: value.to(device) for key, value in inputs.items()}).loss

    @torch.no_grad()
    def answer_log_likelihoods(self, model, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """Summed log-probability of each (text, answer) pair's answer tokens (with EOS) after its prompt."""
        device = module_device(model)
        scores = []
        for chunk in _batches(pairs, self.eval_batch_size):
            inputs = {key: value.to(device) for key, value in self._answer_batch(list(chunk)).items()}
            logits = model(**inputs).logits[:, :-1].float()
            targets = inputs["labels"][:, 1:]
            answer = targets != IGNORE_INDEX
            picked = logits.log_softmax(dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((picked * answer).sum(dim=-1).cpu())
        return torch.cat(scores)

    @torch.no_grad()
    def accuracy(self, model, task, candidates, recorder: RoutingRecorder | None = None) -> float:
        if self.score_labels and task.labels:
            return self._label_accuracy(model, task, recorder)
        return self._generation_accuracy(model, task, recorder)

    def _record_prompts(self, model, texts: list[str], recorder: RoutingRecorder) -> None:
        """One forward of the left-padded prompts with ``recorder`` enabled: one routing row per input."""
        tokenizer = self.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = tokenizer([self.prompt(text) for text in texts], return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        recorder.enabled = True
        model(**{key: value.to(module_device(model)) for key, value in inputs.items()})
        recorder.enabled = False

    def _label_accuracy(self, model, task, recorder: RoutingRecorder | None) -> float:
        """Fraction of test inputs whose most likely label among ``task.labels`` is their target."""
        labels = list(task.labels)
        correct = 0
        for batch in _batches(task.test, self.eval_batch_size):
            if recorder is not None:
                self._record_prompts(model, [example.text for example in batch], recorder)
            pairs = [(example.text, label) for example in batch for label in labels]
            scores = self.answer_log_likelihoods(model, pairs).view(len(batch), len(labels))
            predictions = scores.argmax(dim=-1).tolist()
            correct += sum(labels[p] == example.target for p, example in zip(predictions, batch))
        return correct / len(task.test)

    def _generation_accuracy(self, model, task, recorder: RoutingRecorder | None) -> float:
        tokenizer = self.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        correct = 0
        try:
            for batch in _batches(task.test, self.eval_batch_size):
                inputs = tokenizer([self.prompt(example.text) for example in batch], return_tensors="pt", padding=True)
                inputs = {key: value.to(module_device(model)) for key, value in inputs.items()}
                if recorder is not None:
                    recorder.enabled = True
                    model(**inputs)
                    recorder.enabled = False
                generated = model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                correct += sum(
                    answer.strip().split("\n")[0].strip() == example.target for answer, example in zip(answers, batch)
                )
        finally:
            tokenizer.padding_side = side
        return correct / len(task.test)
