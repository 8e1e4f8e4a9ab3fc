"""The abstain threshold chosen from calibration scores: known answers."""

from __future__ import annotations

import pytest
import torch

from peft_sparta.continual import abstain_threshold


def test_threshold_is_the_midpoint_between_the_groups_or_none_when_they_overlap():
    tasks, unrelated = torch.tensor([0.97, 0.95, 0.99]), torch.tensor([0.80, 0.85])
    assert abstain_threshold(tasks, unrelated) == pytest.approx(0.90)
    overlapping_tasks, overlapping_unrelated = torch.tensor([0.90, 0.95]), torch.tensor([0.92])
    assert abstain_threshold(overlapping_tasks, overlapping_unrelated) is None
    # an overlap smaller than the margin is tolerated: the midpoint then sits inside it
    assert abstain_threshold(overlapping_tasks, overlapping_unrelated, margin=0.05) == pytest.approx(0.91)
