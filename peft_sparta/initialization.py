"""Initial values of SpaRTA branches: LoRA's (B zero, A Kaiming), random B (tests), or spectral (A from the base
weight's right singular vectors, so that every branch starts exactly orthogonal to the others)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised scaling; 0 for a disabled (rank 0) branch."""
    if rank == 0:
        return 0.0
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@torch.no_grad()
def init_branch(
    a: torch.Tensor, b: torch.Tensor, init, base_weight: torch.Tensor, start: int, taken: Sequence[torch.Tensor]
) -> None:
    """Initialise the down-projection ``a`` and up-projection ``b`` of one branch in place (no-op on meta tensors).

    ``init`` is `SpaRTAConfig.init_weights`; for "spectral", ``a`` takes the right singular vectors ``start`` onwards
    of ``base_weight`` (out, in), completed past the spectrum by directions orthogonal to the ``taken`` rows (the
    adapter's existing down-projections).
    """
    if a.device.type == "meta":
        return
    if init == "spectral":
        a.copy_(spectral_rows(base_weight, start, a.shape[0], taken))
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)


def spectral_rows(weight: torch.Tensor, start: int, count: int, taken: Sequence[torch.Tensor]) -> torch.Tensor:
    """Right singular vectors start..start+count of ``weight``; past the spectrum, a random orthonormal complement of
    the rows found and of ``taken``."""
    _, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    rows = vh[start : start + count]
    missing = count - rows.shape[0]
    if missing > 0:
        existing = torch.cat([rows, *[row.detach() for row in taken]]).float()
        rows = torch.cat([rows, orthonormal_complement(existing, missing)])
    return rows


def orthonormal_complement(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` unit rows orthogonal to the span of ``rows`` and to each other, as far as the dimension allows
    (random with a fixed seed); rows beyond the dimension are random unit rows."""
    generator = torch.Generator().manual_seed(rows.shape[0] * 7919 + rows.shape[1])
    candidates = torch.randn(count, rows.shape[1], generator=generator).to(rows.device)
    if rows.shape[0] + count <= rows.shape[1]:
        basis, _ = torch.linalg.qr(rows.T)
        candidates = candidates - (candidates @ basis) @ basis.T
    orthonormal, _ = torch.linalg.qr(candidates.T)
    return torch.cat([orthonormal.T, F.normalize(candidates[orthonormal.shape[1] :], dim=-1)])
