"""Triton kernels of the fused gated low-rank product: input dropout and the per-column gate/scale with its backward.

The two GEMMs of the product stay with cuBLAS; these kernels fuse the element-wise steps around them. The stacked
down-projection output h is (N, R) with the columns of block i in [bounds[i], bounds[i + 1]); block i's column factor
for row t is scales[i] * gates[t, i]. Each program owns a tile of rows and one block, so the gate-gradient reduction
over the block's columns needs no atomics and is deterministic.

The module is the "triton" implementation namespace of `GatedLowRankFunction` (gated_lowrank.py): it exposes the
functions of `GatedLowRankTorch` with the same signatures (dropout_forward, dropout_replay, gate_scale_forward,
gate_scale_backward). Imported lazily by the "triton" backend only (Triton is optional). With TRITON_INTERPRET=1 set
before this module is imported, the kernels run in Triton's CPU interpreter, which is how the tests exercise them
without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


DROPOUT_BLOCK_SIZE = 1024
ROW_BLOCK_SIZE = 64
MAX_COLUMN_BLOCK_SIZE = 128


@triton.jit(do_not_specialize=["seed"])
def _dropout_kernel(x_ptr, out_ptr, n_elements, p, seed, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    keep = tl.rand(seed, offsets) > p
    out = tl.where(keep, x / (1.0 - p), 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_scale_forward_kernel(
    h_ptr,
    gate_ptr,
    scale_ptr,
    bound_ptr,
    z_ptr,
    n_rows,
    n_gates,
    HAS_GATES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    block = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    start = tl.load(bound_ptr + block)
    end = tl.load(bound_ptr + block + 1)
    width = tl.load(bound_ptr + tl.num_programs(1))
    factor = tl.full((BLOCK_N,), 1.0, tl.float32) * tl.load(scale_ptr + block)
    if HAS_GATES:
        factor *= tl.load(gate_ptr + rows * n_gates + block, mask=row_mask, other=0.0).to(tl.float32)
    for col_start in range(start, end, BLOCK_R):
        cols = col_start + tl.arange(0, BLOCK_R)
        mask = row_mask[:, None] & (cols < end)[None, :]
        offsets = rows[:, None] * width + cols[None, :]
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(z_ptr + offsets, (h * factor[:, None]).to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_scale_backward_kernel(
    dz_ptr,
    h_ptr,
    gate_ptr,
    scale_ptr,
    bound_ptr,
    dgate_ptr,
    n_rows,
    n_gates,
    HAS_GATES: tl.constexpr,
    GATE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    block = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    start = tl.load(bound_ptr + block)
    end = tl.load(bound_ptr + block + 1)
    width = tl.load(bound_ptr + tl.num_programs(1))
    scale = tl.load(scale_ptr + block)
    factor = tl.full((BLOCK_N,), 1.0, tl.float32) * scale
    if HAS_GATES:
        factor *= tl.load(gate_ptr + rows * n_gates + block, mask=row_mask, other=0.0).to(tl.float32)
    gate_grad = tl.zeros((BLOCK_N,), tl.float32)
    for col_start in range(start, end, BLOCK_R):
        cols = col_start + tl.arange(0, BLOCK_R)
        mask = row_mask[:, None] & (cols < end)[None, :]
        offsets = rows[:, None] * width + cols[None, :]
        dz = tl.load(dz_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if GATE_GRAD:
            h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            gate_grad += tl.sum(dz * h, axis=1)
        tl.store(dz_ptr + offsets, (dz * factor[:, None]).to(dz_ptr.dtype.element_ty), mask=mask)
    if GATE_GRAD:
        tl.store(dgate_ptr + rows * n_gates + block, (gate_grad * scale).to(dgate_ptr.dtype.element_ty), mask=row_mask)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x * keep / (1 - p)`` with keep = (Philox uniform of (seed, flat index) > p).

    The mask is a pure function of (seed, element index), so the backward pass re-applies this same call to the
    gradient (and to x, to rebuild the dropped input) instead of storing the mask.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        grid = (triton.cdiv(x.numel(), DROPOUT_BLOCK_SIZE),)
        _dropout_kernel[grid](x, out, x.numel(), p, seed, BLOCK_SIZE=DROPOUT_BLOCK_SIZE)
    return out


def dropout_forward(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """``(x * m / (1 - p), None, seed)``: the dropped input, no stored mask, and the seed that regenerates m.

    The seed is drawn from torch's CPU generator, whose state activation checkpointing saves and restores.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return dropout(x, p, seed), None, seed


def dropout_replay(tensor: torch.Tensor, p: float, mask: torch.Tensor | None, seed: int | None) -> torch.Tensor:
    """Multiply by the forward's m / (1 - p), regenerated from its seed (mask unused: this path stores none)."""
    return dropout(tensor, p, seed)


def _launch_config(h: torch.Tensor, ranks: tuple[int, ...], scales: tuple[float, ...]):
    """Per-block fp32 scales, int32 column bounds (last entry = R, the row stride), grid and column tile size."""
    bounds = [0]
    for rank in ranks:
        bounds.append(bounds[-1] + rank)
    scale_tensor = torch.tensor(scales, dtype=torch.float32, device=h.device)
    bound_tensor = torch.tensor(bounds, dtype=torch.int32, device=h.device)
    block_r = min(triton.next_power_of_2(max(ranks)), MAX_COLUMN_BLOCK_SIZE)
    grid = (triton.cdiv(h.shape[0], ROW_BLOCK_SIZE), len(ranks))
    return scale_tensor, bound_tensor, grid, block_r


def gate_scale_forward(
    h: torch.Tensor, gates: torch.Tensor | None, ranks: tuple[int, ...], scales: tuple[float, ...]
) -> torch.Tensor:
    """z[t, c] = h[t, c] * scales[i] * gates[t, i] for every column c of block i; h is (N, R), gates (N, n) or None."""
    h = h.contiguous()
    z = torch.empty_like(h)
    if h.shape[0]:
        scale_tensor, bound_tensor, grid, block_r = _launch_config(h, ranks, scales)
        gate_arg = gates.contiguous() if gates is not None else h
        _gate_scale_forward_kernel[grid](
            h,
            gate_arg,
            scale_tensor,
            bound_tensor,
            z,
            h.shape[0],
            len(ranks),
            HAS_GATES=gates is not None,
            BLOCK_N=ROW_BLOCK_SIZE,
            BLOCK_R=block_r,
        )
    return z


def gate_scale_backward(
    dz: torch.Tensor,
    h: torch.Tensor | None,
    gates: torch.Tensor | None,
    ranks: tuple[int, ...],
    scales: tuple[float, ...],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dh = dz * column factor, and, when h is given, dgates[t, i] = scales[i] * sum over block i's columns of dz * h.

    dz is overwritten with dh (it is a temporary of the backward pass), which saves an (N, R) buffer. The gate gradient
    is accumulated in fp32 and returned in the gates' dtype.
    """
    dz = dz.contiguous()
    gate_grad = torch.empty_like(gates) if h is not None else None
    if dz.shape[0]:
        scale_tensor, bound_tensor, grid, block_r = _launch_config(dz, ranks, scales)
        gate_arg = gates.contiguous() if gates is not None else dz
        _gate_scale_backward_kernel[grid](
            dz,
            h.contiguous() if h is not None else dz,
            gate_arg,
            scale_tensor,
            bound_tensor,
            gate_grad if gate_grad is not None else dz,
            dz.shape[0],
            len(ranks),
            HAS_GATES=gates is not None,
            GATE_GRAD=h is not None,
            BLOCK_N=ROW_BLOCK_SIZE,
            BLOCK_R=block_r,
        )
    return dz, gate_grad
