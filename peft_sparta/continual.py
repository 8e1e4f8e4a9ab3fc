"""Continual-learning measurement: metrics over an accuracy matrix, the routing recorder, and the sequence driver.

Accuracy matrix convention: ``a[i][j]`` is the accuracy on task j (0-based) measured right after training task i.
Row i needs the entries j <= i for the average accuracy and the backward transfer, and the entry j = i + 1 (task i + 1
evaluated before it is trained) for the forward transfer. Entries that were not measured are ``None`` or NaN.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


__all__ = [
    "CausalLMHarness",
    "ContinualArguments",
    "ContinualResult",
    "EmbeddingClassificationHarness",
    "RoutingRecorder",
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "learning_accuracy",
    "train_sequence",
]


def _entry(matrix: Sequence[Sequence[Optional[float]]], i: int, j: int) -> float:
    row = matrix[i]
    value = row[j] if j < len(row) else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"accuracy matrix entry a[{i}][{j}] (task {j} after training task {i}) was not measured.")
    return float(value)


def _num_tasks(matrix: Sequence[Sequence[Optional[float]]]) -> int:
    if len(matrix) == 0:
        raise ValueError("the accuracy matrix is empty: train at least one task.")
    return len(matrix)


def average_accuracy(matrix: Sequence[Sequence[Optional[float]]]) -> float:
    """AA = mean_j a[T-1][j] over the T tasks: accuracy on every task after training the last one."""
    tasks = _num_tasks(matrix)
    return sum(_entry(matrix, tasks - 1, j) for j in range(tasks)) / tasks


def backward_transfer(matrix: Sequence[Sequence[Optional[float]]]) -> float:
    """BWT = mean_{j < T-1} (a[T-1][j] - a[j][j]) (Lopez-Paz & Ranzato, 2017). Forgetting is -BWT.

    NaN for a single task, where it is undefined.
    """
    tasks = _num_tasks(matrix)
    if tasks < 2:
        return math.nan
    return sum(_entry(matrix, tasks - 1, j) - _entry(matrix, j, j) for j in range(tasks - 1)) / (tasks - 1)


def forward_transfer(matrix: Sequence[Sequence[Optional[float]]], base_accuracy: Sequence[float]) -> float:
    """FWT = mean_{j >= 1} (a[j-1][j] - b[j]) (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory").

    ``a[j-1][j]`` is the accuracy on task j after training the tasks before it (task j not trained yet) and
    ``base_accuracy[j]`` (b_j) is the accuracy on task j of the model before any training (the base model with a
    no-op adapter), measured under the same conditions (same test set, same candidate labels). Positive FWT: earlier
    tasks helped task j zero-shot. NaN for a single task, where it is undefined.
    """
    tasks = _num_tasks(matrix)
    if len(base_accuracy) < tasks:
        raise ValueError(f"base_accuracy has {len(base_accuracy)} entries for {tasks} tasks.")
    if tasks < 2:
        return math.nan
    return sum(_entry(matrix, j - 1, j) - float(base_accuracy[j]) for j in range(1, tasks)) / (tasks - 1)


def learning_accuracy(matrix: Sequence[Sequence[Optional[float]]]) -> float:
    """Mean_j a[j][j]: accuracy on each task right after its own training (plasticity)."""
    tasks = _num_tasks(matrix)
    return sum(_entry(matrix, j, j) for j in range(tasks)) / tasks


# ---- routing recorder -----------------------------------------------------------------------------------------------


class RoutingRecorder:
    """Records, for every forward of a SpaRTA model, each input's gates over the task branches.

    Forward pre-hooks on the SpaRTA layers compute `SpaRTALayer.router_gates` from the layer input; per input the gates
    are averaged over its positions (the prompt mask of the routing context: valid tokens, or prompt tokens when labels
    are passed) and over the adapted layers. With sequence routing every layer gives the same gates.

        with RoutingRecorder(model) as recorder:
            model(**batch)
        recorder.take()  # (batch, tasks)

    ``training``: record only forwards in training mode (True; the gates the router would give at inference) or in
    eval mode (False); None records both. ``quantity="scores"`` records each task's router score (best cosine
    similarity, `SpaRTALayer.router_scores`) instead of the gates: the scores of your tasks' inputs and of text that
    should abstain show where to put ``router_abstain_threshold``.
    """

    def __init__(
        self, model, adapter_name: Optional[str] = None, training: Optional[bool] = None, quantity: str = "gates"
    ) -> None:
        from .layer import SpaRTALayer

        if quantity not in ("gates", "scores"):
            raise ValueError(f"quantity must be 'gates' or 'scores', got {quantity!r}.")
        self.quantity = quantity
        self.model = model
        self.layers = [module for module in model.modules() if isinstance(module, SpaRTALayer)]
        if not self.layers:
            raise ValueError("RoutingRecorder needs a model with SpaRTA layers.")
        self.adapter_name = adapter_name
        self.training = training
        self.enabled = True
        self._handles: list = []
        self._sum: Optional[torch.Tensor] = None
        self._count = 0
        self._records: list[torch.Tensor] = []

    def __enter__(self) -> "RoutingRecorder":
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._hook))
        self._register_model_hook()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _register_model_hook(self) -> None:
        # one record per model forward: the layers accumulate, the forward hook of the wrapped model closes the record
        base_model = getattr(self.model, "base_model", None)
        root = getattr(base_model, "model", None)
        root = root if isinstance(root, nn.Module) else self.model
        self._handles.append(root.register_forward_hook(self._close, always_call=True))

    def _adapter(self, layer) -> Optional[str]:
        names = [self.adapter_name] if self.adapter_name is not None else list(layer.active_adapters)
        names = [name for name in names if name in layer.sparta_A_task]
        return names[0] if names else None

    @torch.no_grad()
    def _hook(self, layer, args) -> None:
        if not self.enabled or not args or not torch.is_tensor(args[0]):
            return
        if self.training is not None and layer.training != self.training:
            return
        adapter_name = self._adapter(layer)
        if adapter_name is None or layer.disable_adapters:
            return
        x = args[0]
        read = layer.router_gates if self.quantity == "gates" else layer.router_scores
        per_input = self._reduce(layer, read(adapter_name, x).float(), x)
        if self._sum is not None and self._sum.shape != per_input.shape:
            return  # a layer whose input is not laid out (batch, ..., features) like the others
        self._sum = per_input if self._sum is None else self._sum + per_input
        self._count += 1

    @staticmethod
    def _reduce(layer, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if values.dim() == 1:
            return values.unsqueeze(0)
        flat = values.reshape(values.shape[0], -1, values.shape[-1])
        context = layer.routing_context
        mask = context.token_mask if context is not None else None
        if flat.shape[1] > 1 and mask is not None and tuple(mask.shape) == tuple(flat.shape[:2]):
            weights = mask.to(flat.device, flat.dtype).unsqueeze(-1)
            return (flat * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return flat.mean(dim=1)

    def _close(self, *args) -> None:
        if self._sum is not None and self._count:
            self._records.append((self._sum / self._count).cpu())
        self._sum, self._count = None, 0

    def take(self) -> torch.Tensor:
        """Gates or scores (inputs, tasks) of every input recorded since the last call, in forward order."""
        self._close()
        records, self._records = self._records, []
        if not records:
            return torch.zeros(0, 0)
        width = max(record.shape[-1] for record in records)
        return torch.cat([F.pad(record, (0, width - record.shape[-1])) for record in records])


# ---- harnesses ----------------------------------------------------------------------------------------------------


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

    model_adds_regularization = False

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
        inputs = self._encode(texts, _device(model))
        hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
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

    def mixed_loss(self, model, pairs, label_space: Optional[list[str]] = None) -> torch.Tensor:
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
    def accuracy(self, model, task, candidates: list[str], recorder: Optional[RoutingRecorder] = None) -> float:
        labels = self._label_matrix(candidates, _device(model))
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
    labels are -100 on the prompt (completion-only loss, so SpaRTA builds its router state from the prompt alone, as
    at inference) and the model itself adds SpaRTA's regularizers to ``outputs.loss``. At test time the answer is
    generated greedily from the prompt alone and compared, stripped, to the target (candidate labels are not used).
    """

    model_adds_regularization = True

    def __init__(self, tokenizer, max_length: int = 128, max_new_tokens: int = 8, eval_batch_size: int = 32):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.eval_batch_size = eval_batch_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @torch.no_grad()
    def general_reference(self, model, texts: list[str]) -> torch.Tensor:
        """Mean token NLL of the unrelated texts (a scalar tensor), the reference for `drift`."""
        model.eval()
        total = count = 0.0
        for text in texts:
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(_device(model))
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

    def mixed_loss(self, model, pairs, label_space: Optional[list[str]] = None) -> torch.Tensor:
        """Loss of (task, example) pairs: neither the task nor a label space enters the causal-LM loss."""
        return self.loss(model, [example for _, example in pairs], None)

    def loss(self, model, batch, task) -> torch.Tensor:
        tokenizer = self.tokenizer
        rows, labels = [], []
        for example in batch:
            prompt = tokenizer(self.prompt(example.text), add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + answer)[: self.max_length]
            rows.append(ids)
            labels.append(([-100] * len(prompt) + answer)[: self.max_length])
        width = max(len(row) for row in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
        device = _device(model)
        output = model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=label_ids.to(device)
        )
        return output.loss

    @torch.no_grad()
    def accuracy(self, model, task, candidates, recorder: Optional[RoutingRecorder] = None) -> float:
        tokenizer = self.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        correct = 0
        try:
            for batch in _batches(task.test, self.eval_batch_size):
                inputs = tokenizer([self.prompt(example.text) for example in batch], return_tensors="pt", padding=True)
                inputs = {key: value.to(_device(model)) for key, value in inputs.items()}
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


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---- the sequence driver --------------------------------------------------------------------------------------------


@dataclass
class ContinualArguments:
    """Training and evaluation settings shared by every method of a comparison."""

    steps: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    progress: bool = True
    measure_forward_transfer: bool = True
    record_routing: bool = True
    #: label space of the multi-task upper bound's loss: "union" (every task's labels, as at its evaluation) or
    #: "task" (each example's own task labels, as the sequential methods train)
    multitask_label_space: str = "union"
    #: unrelated texts (e.g. `peft_sparta.suites.NEUTRAL_TEXTS`) on which to measure general-ability drift
    general_texts: Optional[Sequence[str]] = None


@dataclass
class ContinualResult:
    """What `train_sequence` measured. Accuracies are fractions in [0, 1]."""

    method: str
    task_names: list[str]
    accuracy_matrix: list[list[Optional[float]]]
    base_accuracy: list[float]
    AA: float
    BWT: Optional[float]
    FWT: Optional[float]
    learning_accuracy: Optional[float]
    routing_accuracy: Optional[float]
    routing_accuracy_per_stage: list[Optional[float]]
    routing_weights: Optional[list[list[float]]]
    trainable_params: int
    wall_s: float
    final_losses: list[float]
    drift: Optional[float] = None

    def to_dict(self) -> dict:
        def clean(value):
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, list):
                return [clean(item) for item in value]
            return value

        return {key: clean(value) for key, value in asdict(self).items()}


def _resolve_model(model_factory_or_model):
    if isinstance(model_factory_or_model, nn.Module):
        return model_factory_or_model
    if callable(model_factory_or_model):
        return model_factory_or_model()
    raise TypeError("train_sequence expects a model (base or SpaRTA PeftModel) or a callable that returns one.")


def _is_sparta_model(model) -> bool:
    from .model import SpaRTAModel

    return isinstance(getattr(model, "base_model", None), SpaRTAModel)


def _candidates(tasks, upto: int) -> list[str]:
    labels: list[str] = []
    for task in tasks[: upto + 1]:
        labels += [label for label in task.labels if label not in labels]
    return labels


def train_sequence(model_factory_or_model, tasks, args: Optional[ContinualArguments] = None, *, harness, method=None):
    """Train ``tasks`` in order with ``method`` and measure the accuracy matrix, AA, BWT, FWT and routing accuracy.

    Args:
        model_factory_or_model: the base model, a callable returning it (called once), or a SpaRTA `PeftModel`
            (then ``method`` defaults to SpaRTA on that model: its single untrained branch, if named "task_0" or
            after the first task, takes the first task, and `add_task` adds one branch per further task).
        tasks: the `peft_sparta.suites.Task` sequence.
        args: `ContinualArguments`.
        harness: `EmbeddingClassificationHarness` or `CausalLMHarness` (loss and task-free accuracy).
        method: a `peft_sparta.baselines.Method`; required unless a SpaRTA model is passed.

    After training task i, every task j <= i is evaluated (and task i + 1, for the forward transfer), with the label
    names of tasks 0..max(i, j) as candidates; ``base_accuracy[j]`` is task j before any training with candidates
    0..j. SpaRTA models are evaluated with the router deciding (no task id); the routing accuracy at a stage is the
    fraction of test inputs of the tasks trained so far whose largest gate (mean over positions and layers) is their
    own task's branch. A multi-task method trains once on all tasks (T x steps steps) and yields one row.
    """
    from tqdm.auto import tqdm

    from .baselines import SpaRTAMethod

    args = args or ContinualArguments()
    if not tasks:
        raise ValueError("train_sequence needs at least one task.")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = _resolve_model(model_factory_or_model)
    names = [task.name for task in tasks]
    if method is None:
        if not _is_sparta_model(model):
            raise ValueError("pass method= (see peft_sparta.baselines.make_method) unless the model is SpaRTA's.")
        method = SpaRTAMethod(name="sparta")
    if _is_sparta_model(model):
        current = model.base_model.task_names
        if len(current) == 1 and current[0] in ("task_0", names[0]):
            branch_names = [current[0], *names[1:]]
        else:
            branch_names = list(names)
    else:
        model = method.build(model, names)
        branch_names = list(names)
    offset = 0
    if _is_sparta_model(model) and branch_names[0] in model.base_model.task_names:
        offset = model.base_model.task_names.index(branch_names[0])

    harness.prepare(model, tasks)
    model.eval()
    general_texts = list(args.general_texts) if args.general_texts else None
    reference = harness.general_reference(model, general_texts) if general_texts else None
    base_accuracy = [harness.accuracy(model, task, _candidates(tasks, j)) for j, task in enumerate(tasks)]

    rows: list[list[Optional[float]]] = []
    routing_per_stage: list[Optional[float]] = []
    routing_weights = None
    final_losses: list[float] = []
    stages = [(-1, list(range(len(tasks))))] if method.multitask else [(i, [i]) for i in range(len(tasks))]
    for stage, trained in stages:
        index = len(tasks) - 1 if stage < 0 else stage
        model = method.begin_task(model, index, branch_names[index], len(tasks))
        model.train()
        steps = args.steps * len(trained)
        losses = _train_steps(model, tasks, trained, steps, args, harness, method, tqdm, label=f"{method.name}")
        final_losses.append(losses)
        model.eval()
        row, gates_by_task = _evaluate(model, tasks, index, args, harness, method, multitask=method.multitask)
        rows.append(row)
        accuracy, weights = _routing_accuracy(gates_by_task, index, offset)
        routing_per_stage.append(accuracy)
        routing_weights = weights
    model.eval()
    drift = harness.drift(model, general_texts, reference) if general_texts else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method.multitask:
        aa = sum(rows[-1]) / len(tasks)
        bwt = fwt = learn = None
    else:
        aa = average_accuracy(rows)
        bwt = backward_transfer(rows)
        fwt = forward_transfer(rows, base_accuracy) if args.measure_forward_transfer else None
        learn = learning_accuracy(rows)
    result = ContinualResult(
        method=method.name,
        task_names=names,
        accuracy_matrix=rows,
        base_accuracy=base_accuracy,
        AA=aa,
        BWT=bwt,
        FWT=fwt,
        learning_accuracy=learn,
        routing_accuracy=routing_per_stage[-1] if routing_per_stage else None,
        routing_accuracy_per_stage=routing_per_stage,
        routing_weights=routing_weights,
        trainable_params=trainable,
        wall_s=time.perf_counter() - started,
        final_losses=final_losses,
        drift=drift,
    )
    result.model = model
    return result


def _train_steps(model, tasks, trained: list[int], steps: int, args, harness, method, tqdm, label: str) -> float:
    """``steps`` optimizer steps on batches drawn (seeded, epoch by epoch) from the tasks ``trained``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    pool = [(index, example) for index in trained for example in tasks[index].train]
    rng = random.Random(f"{args.seed}-{'+'.join(tasks[i].name for i in trained)}")
    order: list = []
    add_regularization = _is_sparta_model(model) and not harness.model_adds_regularization
    union = len(trained) > 1 and args.multitask_label_space == "union"
    label_space = _candidates(tasks, len(tasks) - 1) if union else None
    recent: list[float] = []
    task_label = tasks[trained[0]].name if len(trained) == 1 else "all tasks"
    bar = tqdm(range(steps), desc=f"{label} | {task_label}", disable=not args.progress, leave=False)
    for _ in bar:
        if len(order) < args.batch_size:
            fresh = list(pool)
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[: args.batch_size], order[args.batch_size :]
        loss = harness.mixed_loss(model, [(tasks[index], example) for index, example in batch], label_space)
        if add_regularization:
            loss = loss + model.base_model.regularization_loss()
        extra = method.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        recent = (recent + [float(loss.detach())])[-10:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    return sum(recent) / len(recent) if recent else math.nan


def _evaluate(model, tasks, stage: int, args, harness, method, multitask: bool):
    """Row ``stage`` of the accuracy matrix (None beyond stage + 1) and, for SpaRTA, the gates per seen task."""
    record = args.record_routing and method.is_sparta and getattr(method, "routing", "router") == "router"
    recorder = RoutingRecorder(model) if record and _is_sparta_model(model) else None
    last = stage + 1 if (args.measure_forward_transfer and not multitask) else stage
    row: list[Optional[float]] = []
    gates_by_task: dict[int, torch.Tensor] = {}
    for j, task in enumerate(tasks):
        if j > last:
            row.append(None)
            continue
        candidates = _candidates(tasks, max(stage, j))
        if recorder is not None and j <= stage:
            with recorder:
                recorder.enabled = False
                row.append(harness.accuracy(model, task, candidates, recorder=recorder))
            gates_by_task[j] = recorder.take()
        else:
            row.append(harness.accuracy(model, task, candidates))
    return row, gates_by_task


def _routing_accuracy(gates_by_task: dict, stage: int, offset: int):
    """Fraction of inputs whose top gate is their own task's branch (an input the router abstains on, all gates zero,
    counts as misrouted); and the mean gates per task (rows: true task)."""
    if not gates_by_task:
        return None, None
    correct = total = 0
    weights = []
    for j in sorted(gates_by_task):
        gates = gates_by_task[j]
        if gates.numel() == 0:
            return None, None
        routed = gates.amax(dim=-1) > 0
        correct += int(((gates.argmax(dim=-1) == offset + j) & routed).sum())
        total += gates.shape[0]
        weights.append([float(v) for v in gates.mean(dim=0)[offset:]])
    return correct / total, weights
