"""Continual-learning metrics over an accuracy matrix: average accuracy, backward and forward transfer, learning
accuracy.

Accuracy matrix convention: ``a[i][j]`` is the accuracy on task j (0-based) measured right after training task i.
Row i needs the entries j <= i for the average accuracy and the backward transfer, and the entry j = i + 1 (task i + 1
evaluated before it is trained) for the forward transfer. Entries that were not measured are ``None`` or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


__all__ = ["average_accuracy", "backward_transfer", "forward_transfer", "learning_accuracy"]


def _entry(matrix: Sequence[Sequence[float | None]], i: int, j: int) -> float:
    row = matrix[i]
    value = row[j] if j < len(row) else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"accuracy matrix entry a[{i}][{j}] (task {j} after training task {i}) was not measured.")
    return float(value)


def _num_tasks(matrix: Sequence[Sequence[float | None]]) -> int:
    if len(matrix) == 0:
        raise ValueError("the accuracy matrix is empty: train at least one task.")
    return len(matrix)


def average_accuracy(matrix: Sequence[Sequence[float | None]]) -> float:
    """AA = mean_j a[T-1][j] over the T tasks: accuracy on every task after training the last one."""
    tasks = _num_tasks(matrix)
    return sum(_entry(matrix, tasks - 1, j) for j in range(tasks)) / tasks


def backward_transfer(matrix: Sequence[Sequence[float | None]]) -> float:
    """BWT = mean_{j < T-1} (a[T-1][j] - a[j][j]) (Lopez-Paz & Ranzato, 2017). Forgetting is -BWT.

    NaN for a single task, where it is undefined.
    """
    tasks = _num_tasks(matrix)
    if tasks < 2:
        return math.nan
    return sum(_entry(matrix, tasks - 1, j) - _entry(matrix, j, j) for j in range(tasks - 1)) / (tasks - 1)


def forward_transfer(matrix: Sequence[Sequence[float | None]], base_accuracy: Sequence[float]) -> float:
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


def learning_accuracy(matrix: Sequence[Sequence[float | None]]) -> float:
    """Mean_j a[j][j]: accuracy on each task right after its own training (plasticity)."""
    tasks = _num_tasks(matrix)
    return sum(_entry(matrix, j, j) for j in range(tasks)) / tasks
