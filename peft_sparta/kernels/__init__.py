"""Kernels of the SpaRTA layer: the gated multi-branch low-rank product and the orthogonality penalty.

One file per op (Liger-Kernel's layout): ``<op>.py`` holds the eager reference (also the "eager" backend), the torch
implementation namespace, the autograd Function and the dispatcher; ``<op>_triton.py`` holds the Triton kernels and
launchers under the same function names (CUDA; Triton is optional and imported only when that backend runs).
backend.py resolves which implementation runs, and guard.py runs the checks the ops register (Triton kernels against
the fused torch path) before the default ("auto") first uses them. BACKENDS and NORMS are the accepted values the
config validates against.
"""

from __future__ import annotations

from .backend import BACKENDS, Backend
from .gated_lowrank import StackedBlocks, gated_lowrank, gated_lowrank_reference, gated_lowrank_stacked, stack_blocks
from .orthogonality import NORMS, Norm, orthogonality_penalty, orthogonality_penalty_reference


__all__ = [
    "BACKENDS",
    "NORMS",
    "Backend",
    "Norm",
    "StackedBlocks",
    "gated_lowrank",
    "gated_lowrank_reference",
    "gated_lowrank_stacked",
    "orthogonality_penalty",
    "orthogonality_penalty_reference",
    "stack_blocks",
]
