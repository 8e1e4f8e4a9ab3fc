"""Triton kernels of the orthogonality penalty ``sum f(left @ right^T)`` (f = square or abs) and its gradient.

Forward: each program computes one (BLOCK_M, BLOCK_N) tile of the overlap O = left right^T in fp32, writes its share
of the loss to a per-tile slot (summed afterwards: deterministic, no atomics) and, when a gradient will be needed, the
tile of dL/dO. Backward: two GEMMs of dL/dO against the other operand, by one kernel that reads dL/dO through strides
so that its transpose costs no copy. The module is the "triton" implementation namespace of the autograd Function in
orthogonality.py: its launchers have the names and signatures of `OrthogonalityTorch`'s functions. It is imported
lazily by the "triton" backend only (Triton is optional).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


BLOCK_K = 64


@triton.jit
def _orthogonality_forward_kernel(
    left_ptr,
    right_ptr,
    partial_ptr,
    grad_ptr,
    M,
    N,
    K,
    L1: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    overlap = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(
            left_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0
        )
        b = tl.load(
            right_ptr + cols[None, :] * K + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0
        )
        overlap += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if L1:
        loss = tl.sum(tl.abs(overlap))
        grad = tl.where(overlap > 0, 1.0, tl.where(overlap < 0, -1.0, 0.0))
    else:
        loss = tl.sum(overlap * overlap)
        grad = 2.0 * overlap
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), loss)
    if STORE_GRAD:
        tl.store(grad_ptr + rows[:, None] * N + cols[None, :], grad, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _orthogonality_backward_kernel(
    grad_ptr,
    other_ptr,
    out_ptr,
    dloss_ptr,
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n_start in range(0, N, BLOCK_N):
        ns = n_start + tl.arange(0, BLOCK_N)
        g = tl.load(
            grad_ptr + rows[:, None] * stride_gm + ns[None, :] * stride_gn,
            mask=(rows[:, None] < M) & (ns[None, :] < N),
            other=0.0,
        )
        o = tl.load(other_ptr + ns[:, None] * K + ks[None, :], mask=(ns[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc += tl.dot(g, o.to(tl.float32), input_precision="ieee")
    acc *= tl.load(dloss_ptr).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * K + ks[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (ks[None, :] < K),
    )


def _tile(size: int) -> int:
    return min(max(triton.next_power_of_2(size), 16), 64)


def orthogonality_forward(left: torch.Tensor, right: torch.Tensor, l1: bool, store_grad: bool):
    """The loss (fp32 scalar) and, if store_grad, dL/dO (M, N) in fp32."""
    (m, k), n = left.shape, right.shape[0]
    block_m, block_n = _tile(m), _tile(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    partial = torch.zeros(grid[0] * grid[1], dtype=torch.float32, device=left.device)
    grad = torch.zeros(m, n, dtype=torch.float32, device=left.device) if store_grad else None
    if m and n:
        _orthogonality_forward_kernel[grid](
            left,
            right,
            partial,
            grad if store_grad else partial,
            m,
            n,
            k,
            L1=l1,
            STORE_GRAD=store_grad,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=BLOCK_K,
        )
    return partial.sum(), grad


def orthogonality_backward(grad: torch.Tensor, other: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    """dloss * grad @ other for grad (M, N) given by strides (a transposed view works) and other (N, K) contiguous."""
    (m, n), k = grad.shape, other.shape[1]
    out = torch.empty(m, k, dtype=other.dtype, device=other.device)
    block_m, block_n = _tile(m), _tile(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, BLOCK_K))
    if m and k:
        _orthogonality_backward_kernel[grid](
            grad,
            other,
            out,
            dloss.reshape(1),
            m,
            n,
            k,
            grad.stride(0),
            grad.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=BLOCK_K,
        )
    return out
