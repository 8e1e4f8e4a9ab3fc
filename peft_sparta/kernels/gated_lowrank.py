"""Gated multi-branch low-rank product: the adapter delta of a SpaRTA layer.

    delta(x) = sum_i scale_i * gate_i(x) * B_i A_i dropout(x)

Block 0 is usually the shared branch (gate 1), the others are task branches gated by the router.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def gated_lowrank_reference(
    x: torch.Tensor,
    a_blocks: Sequence[torch.Tensor],
    b_blocks: Sequence[torch.Tensor],
    scales: Sequence[float],
    gates: torch.Tensor | None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Eager per-branch computation, the reference every fused implementation must match.

    Args:
        x: input of shape (..., in_features).
        a_blocks: down-projections, each (r_i, in_features).
        b_blocks: up-projections, each (out_features, r_i).
        scales: one scaling factor per block.
        gates: per-input block weights broadcastable to (..., n_blocks), or None for all ones.
        dropout_p: dropout probability applied to the adapter input.
        training: whether dropout is active.
    """
    x = F.dropout(x, p=dropout_p, training=training) if dropout_p > 0 else x
    result = None
    for index, (a, b, scale) in enumerate(zip(a_blocks, b_blocks, scales)):
        branch = F.linear(F.linear(x, a), b) * scale
        if gates is not None:
            branch = branch * gates[..., index : index + 1]
        result = branch if result is None else result + branch
    return result
