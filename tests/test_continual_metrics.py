"""Continual-learning metrics (AA, BWT, FWT, learning accuracy) against hand-worked accuracy matrices."""

from __future__ import annotations

import math

import pytest

from peft_sparta.continual import (
    average_accuracy,
    backward_transfer,
    forward_transfer,
    learning_accuracy,
)


# a[i][j]: accuracy on task j after training task i; a[i][i+1] measured before task i+1 is trained.
MATRIX = [
    [0.90, 0.30, None],
    [0.70, 0.80, 0.40],
    [0.60, 0.75, 0.95],
]
BASE = [0.25, 0.20, 0.50]


def test_average_accuracy_is_mean_of_last_row():
    # (0.60 + 0.75 + 0.95) / 3
    assert average_accuracy(MATRIX) == pytest.approx(2.30 / 3)


def test_backward_transfer_hand_worked():
    # ((0.60 - 0.90) + (0.75 - 0.80)) / 2 = (-0.30 - 0.05) / 2
    assert backward_transfer(MATRIX) == pytest.approx(-0.175)


def test_forward_transfer_hand_worked():
    # ((a[0][1] - b1) + (a[1][2] - b2)) / 2 = ((0.30 - 0.20) + (0.40 - 0.50)) / 2
    assert forward_transfer(MATRIX, BASE) == pytest.approx(0.0)
    assert forward_transfer(MATRIX, [0.0, 0.0, 0.0]) == pytest.approx(0.35)


def test_learning_accuracy_is_mean_of_diagonal():
    assert learning_accuracy(MATRIX) == pytest.approx((0.90 + 0.80 + 0.95) / 3)


def test_no_forgetting_and_perfect_retention():
    matrix = [[1.0, 0.0], [1.0, 1.0]]
    assert average_accuracy(matrix) == 1.0
    assert backward_transfer(matrix) == 0.0
    assert forward_transfer(matrix, [0.0, 0.5]) == pytest.approx(-0.5)


def test_single_task_transfer_is_undefined():
    assert average_accuracy([[0.8]]) == pytest.approx(0.8)
    assert math.isnan(backward_transfer([[0.8]]))
    assert math.isnan(forward_transfer([[0.8]], [0.1]))


def test_missing_entries_raise():
    with pytest.raises(ValueError, match=r"a\[0\]\[1\]"):
        forward_transfer([[0.9, None], [0.5, 0.9]], [0.1, 0.1])
    with pytest.raises(ValueError, match="empty"):
        average_accuracy([])
    with pytest.raises(ValueError, match="base_accuracy"):
        forward_transfer(MATRIX, [0.1])
    with pytest.raises(ValueError, match=r"a\[1\]\[1\]"):
        average_accuracy([[0.9, 0.1], [0.5, float("nan")]])
