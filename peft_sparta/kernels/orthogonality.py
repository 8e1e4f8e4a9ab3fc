"""Orthogonality penalty between the row spaces of two stacks of down-projections."""

from __future__ import annotations

import torch

from .utils import resolve_backend


NORMS = ("fro", "l1")


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


def orthogonality_penalty(
    left: torch.Tensor, right: torch.Tensor, norm: str = "fro", backend: str | None = None
) -> torch.Tensor:
    """The penalty of `orthogonality_penalty_reference`, by the chosen backend.

    "triton" runs the fused Triton kernels (fp32 accumulation, see triton_orthogonality.py); "eager" and "torch" run the
    reference under autograd (two small GEMMs, nothing to fuse on CPU); None / "auto" pick as `gated_lowrank` does:
    SPARTA_KERNEL_BACKEND if set, else Triton for CUDA tensors when installed, else the reference.
    """
    if norm not in NORMS:
        raise ValueError(f"orth_norm must be 'fro' or 'l1', got {norm!r}.")
    if resolve_backend(backend, left) != "triton":
        return orthogonality_penalty_reference(left, right, norm)
    from .triton_orthogonality import OrthogonalityPenaltyFunction

    dtype = torch.promote_types(left.dtype, right.dtype)
    return OrthogonalityPenaltyFunction.apply(left.to(dtype), right.to(dtype), norm == "l1")
