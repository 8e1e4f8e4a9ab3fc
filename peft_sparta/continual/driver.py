"""The sequence driver: `train_sequence` trains a task sequence with one method and measures the accuracy matrix,
the continual-learning metrics, the learning accuracy with the task's own branch forced, the accuracy on held-out
tasks that are never trained and, for SpaRTA, the routing accuracy."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model import find_sparta_tuner
from ..routers.recorder import RoutingRecorder
from .harness import Harness
from .methods import Method, SpaRTAMethod
from .metrics import average_accuracy, backward_transfer, forward_transfer, learning_accuracy


#: Names of the up-projection parameters (B) of SpaRTA's branches and of PEFT LoRA adapters.
UP_PROJECTION = re.compile(r"(sparta|lora)_B")


__all__ = ["ContinualArguments", "ContinualResult", "train_sequence"]


@dataclass
class ContinualArguments:
    """Training and evaluation settings shared by every method of a comparison."""

    steps: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    #: learning rate of the up-projections (SpaRTA's and LoRA's B) over that of the rest, as LoRA+ (Hayou et al.,
    #: 2024) sets it; 1 trains every parameter at ``learning_rate``
    up_lr_ratio: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    progress: bool = True
    measure_forward_transfer: bool = True
    #: after each task, also score it with its own branch forced (the task id given), to tell the accuracy the router
    #: loses from the accuracy training did not reach
    measure_forced_learning: bool = True
    record_routing: bool = True
    #: label space of the multi-task upper bound's loss: "union" (every task's labels, as at its evaluation) or
    #: "task" (each example's own task labels, as the sequential methods train)
    multitask_label_space: str = "union"
    #: unrelated texts (e.g. the repository's `benchmarks.suites.NEUTRAL_TEXTS`) on which to measure general-ability drift
    general_texts: Sequence[str] | None = None
    #: called as ``before_evaluation(model, seen)`` after each task's training, with the indices of the tasks trained
    #: so far, before any accuracy is measured: the place to choose settings on data that is not scored (e.g. the
    #: abstain threshold from held-out prompts)
    before_evaluation: Callable[[nn.Module, list[int]], None] | None = None


@dataclass
class ContinualResult:
    """What `train_sequence` measured. Accuracies are fractions in [0, 1]."""

    method: str
    task_names: list[str]
    accuracy_matrix: list[list[float | None]]
    base_accuracy: list[float]
    AA: float
    BWT: float | None
    FWT: float | None
    learning_accuracy: float | None
    routing_accuracy: float | None
    routing_accuracy_per_stage: list[float | None]
    routing_weights: list[list[float]] | None
    trainable_params: int
    wall_s: float
    final_losses: list[float]
    drift: float | None = None
    #: accuracy on each task right after its training with the method's own path for it forced (SpaRTA: the task's
    #: branch, `set_task`; a method without a router has only one path, so the entry is the matrix diagonal's)
    forced_learning_per_task: list[float] | None = None
    forced_learning_accuracy: float | None = None
    #: held-out tasks (never trained): accuracy after the whole sequence, the base model's, and the difference
    unseen_accuracy: dict[str, float] = field(default_factory=dict)
    unseen_base_accuracy: dict[str, float] = field(default_factory=dict)
    unseen_gain: dict[str, float] = field(default_factory=dict)
    #: held-out task -> mean router gate per task branch after the whole sequence (methods that route)
    unseen_routing_weights: dict[str, list[float]] | None = None

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


def _candidates(tasks, upto: int) -> list[str]:
    labels: list[str] = []
    for task in tasks[: upto + 1]:
        labels += [label for label in task.labels if label not in labels]
    return labels


def _held_out_candidates(tasks, task) -> list[str]:
    """A held-out task is scored among every trained task's labels and its own: the model is not told it is new."""
    return _candidates([*tasks, task], len(tasks))


def train_sequence(
    model_factory_or_model,
    tasks,
    args: ContinualArguments | None = None,
    *,
    harness: Harness,
    method: Method | None = None,
    held_out: Sequence = (),
) -> ContinualResult:
    """Train ``tasks`` in order with ``method`` and measure the accuracy matrix, AA, BWT, FWT and routing accuracy.

    Args:
        model_factory_or_model: the base model, a callable returning it (called once), or a SpaRTA `PeftModel`
            (then ``method`` defaults to SpaRTA on that model: its single untrained branch, if named "task_0" or
            after the first task, takes the first task, and `add_task` adds one branch per further task).
        tasks: the task sequence (the repository's `benchmarks.suites.Task` or the same shape, see `Harness`).
        args: `ContinualArguments`.
        harness: a `Harness` (loss and task-free accuracy), e.g. `EmbeddingClassificationHarness` or
            `CausalLMHarness`.
        method: a `peft_sparta.continual.Method` (e.g. a baseline of the repository's `benchmarks.baselines`);
            required unless a SpaRTA model is passed.
        held_out: tasks that are never trained (their ``train`` examples are not used): scored before any training
            and after the whole sequence (``unseen_accuracy``, ``unseen_base_accuracy``, ``unseen_gain``), each among
            the labels of every trained task and its own.

    After training task i, every task j <= i is evaluated (and task i + 1, for the forward transfer), with the label
    names of tasks 0..max(i, j) as candidates; ``base_accuracy[j]`` is task j before any training with candidates
    0..j. SpaRTA models are evaluated with the router deciding (no task id); the routing accuracy at a stage is the
    fraction of test inputs of the tasks trained so far whose largest gate (mean over positions and layers) is their
    own task's branch. A multi-task method trains once on all tasks (T x steps steps) and yields one row.
    Right after task i, task i is also scored with its own branch forced (`Method.forced`) and the label candidates
    of the diagonal entry: ``learning_accuracy - forced_learning_accuracy`` is what routing loses, ``1 -
    forced_learning_accuracy`` what learning did not reach.
    """
    args = args or ContinualArguments()
    if not tasks:
        raise ValueError("train_sequence needs at least one task.")
    held_out = list(held_out)
    names = [task.name for task in tasks]
    clashes = sorted({task.name for task in held_out} & set(names))
    if clashes:
        raise ValueError(f"held-out tasks {clashes} are also in the trained sequence.")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = _resolve_model(model_factory_or_model)
    tuner = find_sparta_tuner(model)
    if method is None:
        if tuner is None:
            raise ValueError(
                "pass method= (e.g. benchmarks.baselines.make_method, in the repository) unless the model is SpaRTA's."
            )
        method = SpaRTAMethod(name="sparta")
    if tuner is not None:
        current = tuner.task_names
        if len(current) == 1 and current[0] in ("task_0", names[0]):
            branch_names = [current[0], *names[1:]]
        else:
            branch_names = list(names)
    else:
        model = method.build(model, names)
        branch_names = list(names)
    tuner = find_sparta_tuner(model)
    offset = 0
    if tuner is not None and branch_names[0] in tuner.task_names:
        offset = tuner.task_names.index(branch_names[0])

    harness.prepare(model, [*tasks, *held_out])
    model.eval()
    general_texts = list(args.general_texts) if args.general_texts else None
    reference = harness.general_reference(model, general_texts) if general_texts else None
    base_accuracy = [harness.accuracy(model, task, _candidates(tasks, j)) for j, task in enumerate(tasks)]
    unseen_base = {task.name: harness.accuracy(model, task, _held_out_candidates(tasks, task)) for task in held_out}

    rows: list[list[float | None]] = []
    routing_per_stage: list[float | None] = []
    routing_weights = None
    final_losses: list[float] = []
    forced: list[float] = []
    stages = [(-1, list(range(len(tasks))))] if method.multitask else [(i, [i]) for i in range(len(tasks))]
    for stage, trained in stages:
        index = len(tasks) - 1 if stage < 0 else stage
        model = method.begin_task(model, index, branch_names[index], len(tasks))
        model.train()
        steps = args.steps * len(trained)
        losses = _train_steps(model, tasks, trained, steps, args, harness, method, label=f"{method.name}")
        final_losses.append(losses)
        model.eval()
        if args.before_evaluation is not None:
            args.before_evaluation(model, list(range(index + 1)))
        row, gates_by_task = _evaluate(model, tasks, index, args, harness, method, multitask=method.multitask)
        rows.append(row)
        if args.measure_forced_learning and not method.multitask:
            forced.append(_forced_accuracy(model, tasks, index, row[index], harness, method, branch_names[index]))
        accuracy, weights = _routing_accuracy(gates_by_task, index, offset)
        routing_per_stage.append(accuracy)
        routing_weights = weights
    model.eval()
    unseen, unseen_weights = _evaluate_held_out(model, tasks, held_out, args, harness, method, offset)
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
        forced_learning_per_task=forced or None,
        forced_learning_accuracy=sum(forced) / len(forced) if forced else None,
        unseen_accuracy=unseen,
        unseen_base_accuracy=unseen_base,
        unseen_gain={name: unseen[name] - unseen_base[name] for name in unseen},
        unseen_routing_weights=unseen_weights,
    )
    result.model = model
    return result


def _train_steps(model, tasks, trained: list[int], steps: int, args, harness, method, label: str) -> float:
    """``steps`` optimizer steps on batches drawn (seeded, epoch by epoch) from the tasks ``trained``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, args), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    pool = [(index, example) for index in trained for example in tasks[index].train]
    rng = random.Random(f"{args.seed}-{'+'.join(tasks[i].name for i in trained)}")
    order: list = []
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


def _parameter_groups(model, args) -> list[dict]:
    """The trainable parameters in two groups: up-projections (``sparta_B*``, ``lora_B*``) at ``up_lr_ratio`` times
    the learning rate, the others at the learning rate."""
    up, other = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (up if UP_PROJECTION.search(name) else other).append(param)
    groups = [{"params": other}, {"params": up, "lr": args.learning_rate * args.up_lr_ratio}]
    return [group for group in groups if group["params"]]


def _evaluate(model, tasks, stage: int, args, harness, method, multitask: bool):
    """Row ``stage`` of the accuracy matrix (None beyond stage + 1) and, for SpaRTA, the gates per seen task."""
    record = args.record_routing and method.routes
    recorder = RoutingRecorder(model) if record and find_sparta_tuner(model) is not None else None
    last = stage + 1 if (args.measure_forward_transfer and not multitask) else stage
    row: list[float | None] = []
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


def _forced_accuracy(model, tasks, index: int, routed: float, harness, method, branch_name: str) -> float:
    """Task ``index`` scored as its diagonal entry is, but through the method's own path for it (`Method.forced`);
    a method that does not route has that one path only, so its diagonal entry ``routed`` is the answer."""
    if not method.routes:
        return routed
    with method.forced(model, branch_name):
        return harness.accuracy(model, tasks[index], _candidates(tasks, index))


def _evaluate_held_out(model, tasks, held_out, args, harness, method, offset: int):
    """Accuracy on each held-out task after the whole sequence and, for a routing SpaRTA model, its mean gates over
    the sequence's branches."""
    record = args.record_routing and method.routes and held_out and find_sparta_tuner(model) is not None
    recorder = RoutingRecorder(model) if record else None
    accuracy, weights = {}, {}
    for task in held_out:
        candidates = _held_out_candidates(tasks, task)
        if recorder is None:
            accuracy[task.name] = harness.accuracy(model, task, candidates)
            continue
        with recorder:
            recorder.enabled = False
            accuracy[task.name] = harness.accuracy(model, task, candidates, recorder=recorder)
        gates = recorder.take()
        weights[task.name] = [float(value) for value in gates.mean(dim=0)[offset:]] if gates.numel() else []
    return accuracy, (weights or None)


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
