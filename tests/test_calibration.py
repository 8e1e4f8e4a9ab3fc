"""The abstain threshold chosen from calibration scores: known answers."""

from __future__ import annotations

import pytest
import torch

from peft_sparta.continual import abstain_threshold, choose_spread


def test_threshold_is_the_midpoint_between_the_groups_or_none_when_they_overlap():
    tasks, unrelated = torch.tensor([0.97, 0.95, 0.99]), torch.tensor([0.80, 0.85])
    assert abstain_threshold(tasks, unrelated) == pytest.approx(0.90)
    overlapping_tasks, overlapping_unrelated = torch.tensor([0.90, 0.95]), torch.tensor([0.92])
    assert abstain_threshold(overlapping_tasks, overlapping_unrelated) is None
    # an overlap smaller than the margin is tolerated: the midpoint then sits inside it
    assert abstain_threshold(overlapping_tasks, overlapping_unrelated, margin=0.05) == pytest.approx(0.91)


def test_choose_spread_abstains_most_on_unrelated_inputs_within_the_task_budget():
    abstained = {2.0: (0.05, 1.0), 2.5: (0.01, 0.9), 3.0: (0.0, 0.9), 4.0: (0.0, 0.5)}
    assert choose_spread(abstained) == 3.0, "2 drops too many task inputs; 3 ties 2.5 on unrelated text, wider margin"
    assert choose_spread(abstained, max_task_abstain=0.1) == 2.0
    assert choose_spread({2.0: (0.5, 1.0)}) is None
