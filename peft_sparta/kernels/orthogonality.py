"""Orthogonality penalty between the row spaces of a down-projection and a stack of others.

Two implementations: the eager per-block reference (what tests compare against, and the "eager" backend), and one
fused `torch.autograd.Function` whose GEMMs come from an implementation namespace that `orthogonality_penalty` picks
once per call: `OrthogonalityTorch` below ("torch", any device) or the module orthogonality_triton ("triton", CUDA;
imported only then), which expose the same functions. The Function keeps the other blocks as they are given instead
of saving a stacked copy of them for backward, so the penalty's memory does not grow with the number of frozen tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from .backend import resolve_backend
from .guard import compare, register_check


Norm = Literal["fro", "l1"]
NORMS = get_args(Norm)


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


class OrthogonalityTorch:
    """The two GEMM steps of `OrthogonalityPenaltyFunction` as torch ops, for any device.

    The module orthogonality_triton has the same functions with the same signatures (its launchers, which accumulate in
    fp32), so the Function calls whichever namespace it is given and never branches on the backend itself.
    """

    @staticmethod
    def orthogonality_forward(
        left: torch.Tensor, right: torch.Tensor, l1: bool, store_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """sum f(O) with O = left right^T, and G = dL/dO (fp32) when store_grad."""
        overlap = left @ right.T
        loss = overlap.abs().sum() if l1 else overlap.pow(2).sum()
        grad = (overlap.sign() if l1 else 2.0 * overlap).float() if store_grad else None
        return loss, grad

    @staticmethod
    def orthogonality_backward(grad: torch.Tensor, other: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
        """dloss * grad @ other, in other's dtype (grad may be a transposed view)."""
        return (dloss.float() * (grad @ other.float())).to(other.dtype)


def _stack(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    return (torch.cat(list(blocks)) if len(blocks) > 1 else blocks[0]).contiguous()


class OrthogonalityPenaltyFunction(torch.autograd.Function):
    r"""L = sum_{i,j} f(O_ij) with O = left [right_1; ...; right_n]^T; f(o) = o^2 ("fro") or |o| ("l1").

    Chain rule: G = dL/dO = 2 O (fro) or sign(O) (l1, sign(0) = 0 as torch's abs), so d left = dL * G right and
    d right = dL * G^T left, split into the blocks. Nothing is saved but references to the inputs: backward recomputes
    O (the forward's GEMM, M x N x in) instead of keeping G, so that the penalty adds no activation memory however
    many frozen branches it reads. Right blocks that need no gradient are held on ctx rather than saved: they are
    parameters or a layer's cached stack of frozen branches, alive anyway, which saved-tensor hooks (offloading,
    activation counts) should not handle as this step's activations. Several right blocks are stacked for each GEMM
    and the stack freed at once; a single block (such a cached stack) is used as it is. Gradients are computed only
    for the inputs that require them.

    ``impl`` is the namespace of the two GEMM steps, `OrthogonalityTorch` or the orthogonality_triton module, chosen by
    `orthogonality_penalty`; it is not a tensor and gets no gradient.
    """

    @staticmethod
    def forward(ctx, left, impl, l1, *right_blocks):
        need_blocks = ctx.needs_input_grad[3:]
        loss, _ = impl.orthogonality_forward(left.contiguous(), _stack(right_blocks), l1, False)
        ctx.impl, ctx.l1 = impl, l1
        ctx.constants = [None if needed else block for block, needed in zip(right_blocks, need_blocks)]
        ctx.save_for_backward(left, *[block if needed else None for block, needed in zip(right_blocks, need_blocks)])
        return loss.to(left.dtype)

    @staticmethod
    def backward(ctx, dloss):
        left, *trainable = ctx.saved_tensors
        blocks = [block if block is not None else constant for block, constant in zip(trainable, ctx.constants)]
        left, right = left.contiguous(), _stack(blocks)
        _, grad = ctx.impl.orthogonality_forward(left, right, ctx.l1, True)
        block_grads = ctx.needs_input_grad[3:]
        d_left = ctx.impl.orthogonality_backward(grad, right, dloss) if ctx.needs_input_grad[0] else None
        d_blocks = [None] * len(blocks)
        if any(block_grads):
            d_right = ctx.impl.orthogonality_backward(grad.T, left, dloss)
            sizes = [block.shape[0] for block in blocks]
            d_blocks = [d if needed else None for d, needed in zip(d_right.split(sizes), block_grads)]
        return d_left, None, None, *d_blocks


def orthogonality_penalty(
    left: torch.Tensor,
    right: torch.Tensor | Sequence[torch.Tensor],
    norm: str = "fro",
    backend: str | None = None,
) -> torch.Tensor:
    """The penalty of `orthogonality_penalty_reference` between ``left`` and ``right`` (one tensor, or the blocks to
    stack, e.g. every other branch of a layer), by the chosen backend.

    "eager" sums the reference over the blocks; "torch" and "triton" run `OrthogonalityPenaltyFunction` with torch ops
    or the Triton kernels (fp32 accumulation); None / "auto" pick as `gated_lowrank` does: SPARTA_KERNEL_BACKEND if
    set, else Triton for CUDA tensors when installed, else torch.
    """
    if norm not in NORMS:
        raise ValueError(f"orth_norm must be 'fro' or 'l1', got {norm!r}.")
    blocks = [right] if isinstance(right, torch.Tensor) else list(right)
    if not blocks:
        raise ValueError("orthogonality_penalty needs at least one block to compare against.")
    backend = resolve_backend(backend, left)
    if backend == "eager":
        return sum(orthogonality_penalty_reference(left, block, norm) for block in blocks)
    dtype = torch.promote_types(left.dtype, blocks[0].dtype)
    blocks = [block.to(dtype) for block in blocks]
    if backend == "triton":
        from . import orthogonality_triton as impl
    else:
        impl = OrthogonalityTorch
    return OrthogonalityPenaltyFunction.apply(left.to(dtype), impl, norm == "l1", *blocks)


# ---- the first-use guard's check of orthogonality_triton (guard.py) -----------------------------------------------


def _check_orthogonality(impl, device, dtype, tolerance) -> str | None:
    generator = torch.Generator().manual_seed(2)

    def randn(*shape, grad=True):
        return (torch.randn(*shape, generator=generator) * 0.2).to(device, dtype).requires_grad_(grad)

    left, trained, frozen = randn(6, 24), randn(5, 24), randn(7, 24, grad=False)
    dloss = torch.tensor(1.5, device=device, dtype=dtype)
    for l1 in (False, True):
        results = []
        for namespace in (impl, OrthogonalityTorch):
            loss = OrthogonalityPenaltyFunction.apply(left, namespace, l1, trained, frozen)
            results.append([loss, *torch.autograd.grad(loss, [left, trained], dloss)])
        problem = compare(["loss", "d left", "d right"], *results, tolerance)
        if problem is not None:
            return f"norm {'l1' if l1 else 'fro'}: {problem}"
    return None


register_check("orthogonality_penalty", "orthogonality_triton", _check_orthogonality)
