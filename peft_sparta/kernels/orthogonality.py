"""Orthogonality penalty between the row spaces of two stacks of down-projections."""

from __future__ import annotations

import torch


def orthogonality_penalty_reference(left: torch.Tensor, right: torch.Tensor, norm: str = "fro") -> torch.Tensor:
    """``||left @ right^T||_F^2`` for norm "fro", the element-wise absolute sum (O-LoRA's form) for "l1".

    Both inputs are (rows, in_features); the penalty is zero exactly when every row of ``left`` is orthogonal to every
    row of ``right``.
    """
    overlap = left @ right.T
    if norm == "fro":
        return overlap.pow(2).sum()
    if norm == "l1":
        return overlap.abs().sum()
    raise ValueError(f"orth_norm must be 'fro' or 'l1', got {norm!r}.")
