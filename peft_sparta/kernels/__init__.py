"""Kernels of the SpaRTA layer: the gated multi-branch low-rank product and the orthogonality penalty.

Each op has an eager reference (also the "eager" backend) and a fused implementation: a torch autograd Function on any
device, with Triton kernels on CUDA when Triton is installed (optional; imported only when used).
"""

from __future__ import annotations

from .gated_lowrank import gated_lowrank, gated_lowrank_reference
from .orthogonality import orthogonality_penalty, orthogonality_penalty_reference


__all__ = ["gated_lowrank", "gated_lowrank_reference", "orthogonality_penalty", "orthogonality_penalty_reference"]
