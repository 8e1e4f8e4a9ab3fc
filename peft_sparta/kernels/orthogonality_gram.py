"""Orthogonality penalty against many frozen rows through their Gram matrix.

``||left @ F^T||_F^2 = sum((left @ F^T F) * left)``: with the Gram matrix G = F^T F of the frozen rows F (N, d) kept
once per task, the penalty and its gradient cost two (r, d) x (d, d) products whatever N is, where the stacked product
of `orthogonality_penalty` costs three (r, d) x (d, N) ones. It is the cheaper form once the frozen branches hold
more rows than the layer has input features (N > d), and G is then also smaller than the stack. Frobenius norm only:
the element-wise ("l1") form needs every entry of ``left @ F^T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gram_matrix(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """G = F^T F (in_features, in_features) of the rows of ``blocks`` stacked into F, without autograd history."""
    with torch.no_grad():
        stacked = torch.cat(list(blocks))
        return stacked.T @ stacked


class GramOrthogonalityPenaltyFunction(torch.autograd.Function):
    r"""L = sum((left G) * left) = ||left F^T||_F^2 for a constant G = F^T F; d left = 2 dL * left G.

    Nothing is saved but the input references: backward recomputes left G (one (r, d) x (d, d) product) instead of
    keeping it, so the penalty adds no activation memory. G is held on ctx, not saved: it is a layer's cache, alive
    anyway, and gets no gradient (the frozen rows do not train).
    """

    @staticmethod
    def forward(ctx, left, gram):
        ctx.gram = gram
        ctx.save_for_backward(left)
        return ((left @ gram) * left).sum()

    @staticmethod
    def backward(ctx, dloss):
        (left,) = ctx.saved_tensors
        return 2.0 * dloss * (left @ ctx.gram), None


def gram_orthogonality_penalty(left: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The Frobenius orthogonality penalty of ``left`` (rows, in_features) against the rows whose Gram matrix is
    ``gram`` (`gram_matrix`), computed in their promoted dtype."""
    if gram.shape != (left.shape[-1], left.shape[-1]):
        raise ValueError(
            f"The Gram matrix must be (in_features, in_features) = {(left.shape[-1],) * 2}, got {tuple(gram.shape)}."
        )
    dtype = torch.promote_types(left.dtype, gram.dtype)
    return GramOrthogonalityPenaltyFunction.apply(left.to(dtype), gram.to(dtype))
