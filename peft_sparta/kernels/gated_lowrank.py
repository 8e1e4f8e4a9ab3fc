"""Gated multi-branch low-rank product: the adapter delta of a SpaRTA layer.

    delta(x) = sum_i scale_i * gate_i(x) * B_i A_i dropout(x)

Block 0 is usually the shared branch (gate 1), the others are task branches gated by the router. Three
implementations: the eager per-branch reference (what tests compare against, and the "eager" backend), and one fused
`torch.autograd.Function` whose element-wise steps (input dropout, per-column gate and scale) come from an
implementation namespace that `gated_lowrank` picks once per call: `GatedLowRankTorch` below ("torch", any device) or
the module gated_lowrank_triton ("triton", CUDA; imported only then), which expose the same functions. At inference,
where no gradient is wanted, `gated_lowrank_stacked` computes the same product from blocks stacked once
(`stack_blocks`) with plain torch ops: two GEMMs, as LoRA's, and no autograd Function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn import functional as F

from .backend import resolve_backend
from .guard import compare, register_check


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


def _stack(blocks: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(list(blocks), dim=dim) if len(blocks) > 1 else blocks[0]


@functools.lru_cache(maxsize=256)
def _membership(
    ranks: tuple[int, ...], scales: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """P (n, R): P[i, c] = scale_i when column c belongs to block i, else 0, and its column sums (R,) (the factor of
    every column when there are no gates). Built once per layout: every training step of a layer asks for the same."""
    rows = [torch.full((1, rank), scale, dtype=dtype, device=device) for rank, scale in zip(ranks, scales)]
    membership = torch.block_diag(*rows)
    return membership, membership.sum(dim=0)


def _column_factors(gates: torch.Tensor | None, layout: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """C = g P (N, R), or P's column sums (R,) when there are no gates, for the `_membership` ``layout``."""
    membership, column_sums = layout
    return column_sums if gates is None else gates @ membership


class GatedLowRankTorch:
    """The element-wise steps of `GatedLowRankFunction` as torch ops, for any device.

    The module gated_lowrank_triton has the same functions with the same signatures, run as Triton kernels, so the
    Function calls whichever namespace it is given and never branches on the backend itself.
    """

    @staticmethod
    def dropout_forward(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """``(x * m / (1 - p), m, None)``: the dropped input and the bool keep-mask m that backward replays.

        ``torch.native_dropout`` is the kernel ``F.dropout`` itself uses, so m equals the reference's mask under the
        same RNG state. The Triton path returns a seed instead of a mask; this one has no seed.
        """
        x_dropped, mask = torch.native_dropout(x, p, True)
        return x_dropped, mask, None

    @staticmethod
    def dropout_replay(tensor: torch.Tensor, p: float, mask: torch.Tensor | None, seed: int | None) -> torch.Tensor:
        """Multiply by the forward's m / (1 - p): rebuilds x_d from x, or turns dL/dx_d into dL/dx (seed unused)."""
        return tensor * (mask.to(tensor.dtype) * (1.0 / (1.0 - p)))

    @staticmethod
    def gate_scale_forward(
        h: torch.Tensor, gates: torch.Tensor | None, ranks: tuple[int, ...], scales: tuple[float, ...]
    ) -> torch.Tensor:
        """z = h * (g P): every column of block i multiplied by scale_i * gate_i of its row."""
        return h * _column_factors(gates, _membership(ranks, scales, h.dtype, h.device))

    @staticmethod
    def gate_scale_backward(
        dz: torch.Tensor,
        h: torch.Tensor | None,
        gates: torch.Tensor | None,
        ranks: tuple[int, ...],
        scales: tuple[float, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dh = dz * (g P) and, when h is given, dg = (dz * h) P^T (the per-block column sums times the scale)."""
        layout = _membership(ranks, scales, dz.dtype, dz.device)
        dh = dz * _column_factors(gates, layout)
        return dh, (dz * h) @ layout[0].T if h is not None else None


def _runs(needed: Sequence[bool]) -> list[tuple[int, int]]:
    """The maximal runs [start, stop) of consecutive True entries: blocks whose weight gradients one GEMM computes."""
    runs, start = [], None
    for index, flag in enumerate([*needed, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index))
            start = None
    return runs


def _per_block(grads: torch.Tensor, ranks: tuple[int, ...], dim: int) -> Sequence[torch.Tensor]:
    """One run's weight gradient cut into its blocks along ``dim``; a run of one block is its gradient as it is."""
    return (grads,) if len(ranks) == 1 else grads.split(ranks, dim=dim)


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The autocast dtype in effect on ``device``, or None when autocast is off there."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class GatedLowRankFunction(torch.autograd.Function):
    r"""Fused ``y = ((D(x) A^T) * (g P)) B^T`` over stacked blocks, with frozen-block skipping.

    With x (N, in), blocks A_i (r_i, in), B_i (out, r_i), R = sum r_i, A = [A_1; ...; A_n] (R, in),
    B = [B_1, ..., B_n] (out, R), gates g (N, n) (all ones when None) and P (n, R) with P[i, c] = s_i on block i's
    columns, so that C = g P is the per-row, per-column factor s_i g_{t,i}:

        x_d = D(x) = x * m / (1 - p)     (m the dropout keep-mask; x_d = x without dropout)
        h = x_d A^T,   z = h * C,   y = z B^T

    Chain rule, given dy = dL/dy:

        dz = dy B                     dB_i = dy^T z_i                      (z_i: block i's columns of z)
        dh = dz * C                   dA_i = dh_i^T x_d
        dx = (dh A) * m / (1 - p)     dg_{t,i} = s_i * sum_{c in block i} dz_{t,c} h_{t,c}   ( = ((dz * h) P^T)_{t,i} )

    Memory: forward saves x, the gates, the blocks (parameters, no copy), the dropout mask (torch path, bool) or only
    an integer seed (Triton path), and, unless ``recompute``, the (N, R) activation that dB and dg need: z, or h when
    the gates need a gradient (z is then h * C again) -- the N x R elements LoRA keeps for its B. With ``recompute``
    backward rebuilds h from x instead: one more GEMM, N x R elements less. Work: weight gradients only for blocks
    whose tensor requires grad, one GEMM per run of adjacent such blocks (in training: the shared and the current
    branch, one dB and one dA GEMM as LoRA's); frozen task branches cost nothing but their columns in the stacked
    GEMMs; dx only when x requires grad.

    Dropout in backward: the torch path runs ``torch.native_dropout`` (the kernel ``F.dropout`` itself uses, so the
    mask equals the reference's under the same RNG state) and keeps its bool mask; the Triton path draws a seed from
    torch's CPU generator and the kernel derives each element's keep bit from Philox(seed, flat index), so backward
    regenerates the identical mask from the seed. Both draws come from torch's RNG, which activation checkpointing
    saves and restores, so a recomputed forward reproduces the mask.

    ``impl`` is the namespace of those element-wise steps, `GatedLowRankTorch` or the gated_lowrank_triton module,
    chosen by `gated_lowrank`; it is not a tensor and gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, gates, scales, dropout_p, impl, recompute, *weights):
        n = len(scales)
        ranks = tuple(a.shape[0] for a in weights[:n])
        x_dropped, mask, seed = impl.dropout_forward(x, dropout_p) if dropout_p > 0 else (x, None, None)
        h = F.linear(x_dropped, _stack(weights[:n], dim=0))
        z = impl.gate_scale_forward(h, gates, ranks, scales)
        need_gates = ctx.needs_input_grad[1]
        needed = need_gates or any(ctx.needs_input_grad[6 + n :])
        kept = (h if need_gates else z) if needed and not recompute else None
        ctx.save_for_backward(x, gates, mask, kept, *weights)
        ctx.ranks, ctx.scales, ctx.dropout_p, ctx.impl, ctx.seed = ranks, scales, dropout_p, impl, seed
        device = x.device.type
        ctx.autocast = (device, _autocast_dtype(device))
        return F.linear(z, _stack(weights[n:], dim=1))

    @staticmethod
    def backward(ctx, dy):
        # run under the forward's autocast state, so that recomputed activations match dy's dtype; entered only when
        # it differs from the current one, the common case costing no context switch
        device, dtype = ctx.autocast
        if dtype == _autocast_dtype(device):
            return GatedLowRankFunction._backward(ctx, dy)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            return GatedLowRankFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, gates, mask, kept, *weights = ctx.saved_tensors
        ranks, scales, impl, p = ctx.ranks, ctx.scales, ctx.impl, ctx.dropout_p
        n = len(ranks)
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_a, need_b = ctx.needs_input_grad[6 : 6 + n], ctx.needs_input_grad[6 + n :]
        starts = [sum(ranks[:i]) for i in range(n + 1)]
        a_grads, b_grads, dx, dgates = [None] * n, [None] * n, None, None

        def replay_dropout(tensor):
            return tensor if p == 0 else impl.dropout_replay(tensor, p, mask, ctx.seed)

        rebuild = kept is None and (any(need_b) or need_gates)
        x_dropped = replay_dropout(x) if any(need_a) or rebuild else None
        h = z = None
        if rebuild:
            h = F.linear(x_dropped, _stack(weights[:n], dim=0))
        elif need_gates:
            h = kept
        elif any(need_b):
            z = kept
        if any(need_b):
            z = impl.gate_scale_forward(h, gates, ranks, scales) if z is None else z
            for first, stop in _runs(need_b):
                b_grads[first:stop] = _per_block(dy.T @ z[:, starts[first] : starts[stop]], ranks[first:stop], dim=1)
        if need_x or any(need_a) or need_gates:
            dz = dy @ _stack(weights[n:], dim=1)
            dh, dgates = impl.gate_scale_backward(dz, h if need_gates else None, gates, ranks, scales)
            for first, stop in _runs(need_a):
                a_grads[first:stop] = _per_block(
                    dh[:, starts[first] : starts[stop]].T @ x_dropped, ranks[first:stop], dim=0
                )
            if need_x:
                dx = replay_dropout(dh @ _stack(weights[:n], dim=0))
        return dx, dgates, None, None, None, None, *a_grads, *b_grads


def _open_blocks(gates: torch.Tensor | None, n_blocks: int) -> list[int] | None:
    """Indices of the blocks whose gate is non-zero somewhere in the batch, or None to keep all of them.

    A zero gate still has a non-zero gradient (dL/dg_i = s_i sum dz h over block i), so blocks are only dropped when
    the gates need no gradient. The check reads the gates on the host (one device sync; a graph break under
    torch.compile).
    """
    if gates is None or (gates.requires_grad and torch.is_grad_enabled()):
        return None
    return gates.detach().reshape(-1, n_blocks).ne(0).any(dim=0).nonzero().flatten().tolist()


def gated_lowrank(
    x: torch.Tensor,
    a_blocks: Sequence[torch.Tensor],
    b_blocks: Sequence[torch.Tensor],
    scales: Sequence[float],
    gates: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """``sum_i scales[i] * gates[..., i] * B_i A_i dropout(x)``, computed by the chosen backend.

    Same arguments as `gated_lowrank_reference`; gates (None = all ones) must end in n_blocks and broadcast to
    x.shape[:-1] + (n_blocks,): (B, S, n) routes each token, (B, 1, n) each sequence, (N, n) rows of a 2-D x. Blocks
    whose gate is zero for the whole batch are dropped first (unless the gates need a gradient), so the cost follows
    the branches in use, not the number of tasks; if none is left, the result is a zero tensor without autograd
    history.

    backend: "eager" (the reference), "torch" (fused Function, torch ops), "triton" (fused Function, Triton kernels),
    or None / "auto": the env var SPARTA_KERNEL_BACKEND if set, else "triton" for CUDA tensors when Triton is
    installed and passes its first-use check (guard.py), else "torch". The fused backends cast the gates to x's dtype.

    recompute: the fused backends save the (N, sum r_i) down-projection for backward (what LoRA keeps) unless True,
    when backward recomputes it from x (one more GEMM; see `GatedLowRankFunction`). The eager backend ignores it.
    """
    n_blocks = len(a_blocks)
    if len(b_blocks) != n_blocks or len(scales) != n_blocks:
        raise ValueError(f"Got {n_blocks} A blocks, {len(b_blocks)} B blocks and {len(scales)} scales.")
    if gates is not None and gates.shape[-1] != n_blocks:
        raise ValueError(f"gates must end in n_blocks={n_blocks}, got shape {tuple(gates.shape)}.")
    backend = resolve_backend(backend, x)
    keep = _open_blocks(gates, n_blocks)
    if keep is not None and len(keep) < n_blocks:
        if not keep:
            lead = torch.broadcast_shapes(x.shape[:-1], gates.shape[:-1])
            return x.new_zeros(*lead, b_blocks[0].shape[0])
        a_blocks, b_blocks = [a_blocks[i] for i in keep], [b_blocks[i] for i in keep]
        scales, gates = [scales[i] for i in keep], gates[..., keep]
    if backend == "eager":
        return gated_lowrank_reference(x, a_blocks, b_blocks, scales, gates, dropout_p, training)
    lead = x.shape[:-1]
    flat_x = x.reshape(-1, x.shape[-1])
    flat_gates = None if gates is None else gates.to(x.dtype).expand(*lead, len(a_blocks)).reshape(-1, len(a_blocks))
    p = float(dropout_p) if training else 0.0
    scales = tuple(float(scale) for scale in scales)
    if backend == "triton":
        from . import gated_lowrank_triton as impl
    else:
        impl = GatedLowRankTorch
    out = GatedLowRankFunction.apply(flat_x, flat_gates, scales, p, impl, bool(recompute), *a_blocks, *b_blocks)
    return out.reshape(*lead, out.shape[-1])


class StackedBlocks(NamedTuple):
    """Blocks stacked once for inference (`stack_blocks`): what `gated_lowrank_stacked` multiplies.

    down: A = [A_1; ...; A_n] (R, in). up: [s_1 B_1, ..., s_n B_n] (out, R), each block's scale folded in.
    gate_columns: (n - ungated, R), row j is 1 on the columns of block ungated + j (the gated blocks), 0 elsewhere.
    fixed_columns: (R,), 1 on the columns of the first ``ungated`` blocks (gate 1 always), 0 elsewhere.
    """

    down: torch.Tensor
    up: torch.Tensor
    gate_columns: torch.Tensor
    fixed_columns: torch.Tensor


@torch.no_grad()
def stack_blocks(
    a_blocks: Sequence[torch.Tensor], b_blocks: Sequence[torch.Tensor], scales: Sequence[float], ungated: int = 0
) -> StackedBlocks:
    """Stack the blocks for `gated_lowrank_stacked`, as copies without autograd history: the first ``ungated`` blocks
    (the shared branch) always count with gate 1, the others take the gates given at each call."""
    ranks = [a.shape[0] for a in a_blocks]
    down = torch.cat([a.detach() for a in a_blocks])
    up = torch.cat([b.detach() * scale for b, scale in zip(b_blocks, scales)], dim=1)
    membership = torch.block_diag(*[down.new_ones(1, rank) for rank in ranks])
    return StackedBlocks(down, up, membership[ungated:], membership[:ungated].sum(dim=0))


def gated_lowrank_stacked(x: torch.Tensor, stacked: StackedBlocks, gates: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i scale_i * gate_i * B_i A_i x`` from `stack_blocks`' blocks, for inference: no dropout, no autograd
    Function, two GEMMs and, with gates, one per-column factor.

    gates: None when every block has gate 1, else the gates of the gated blocks, broadcastable to
    x.shape[:-1] + (n_gated,) as in `gated_lowrank`.
    """
    h = F.linear(x, stacked.down)
    if gates is not None:
        flat = gates.reshape(-1, gates.shape[-1]).to(stacked.gate_columns.dtype)
        factors = torch.addmm(stacked.fixed_columns, flat, stacked.gate_columns)
        h = h * factors.view(*gates.shape[:-1], factors.shape[-1]).to(h.dtype)
    return F.linear(h, stacked.up)


# ---- the first-use guard's checks of gated_lowrank_triton (guard.py) ----------------------------------------------

#: probability and seed of the dropout check
_CHECK_DROPOUT_P = 0.25
_CHECK_SEED = 1234


def _check_gated(impl, device, dtype, tolerance, gated: bool) -> str | None:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype).requires_grad_()

    rows, in_features, out_features, ranks = 37, 24, 16, (4, 8)
    x = randn(rows, in_features)
    a_blocks = [randn(rank, in_features, scale=in_features**-0.5) for rank in ranks]
    b_blocks = [randn(out_features, rank, scale=rank**-0.5) for rank in ranks]
    gates = torch.rand(rows, len(ranks), generator=generator).to(device, dtype).requires_grad_() if gated else None
    cotangent = torch.randn(rows, out_features, generator=generator).to(device, dtype)
    inputs = [x, *a_blocks, *b_blocks] + ([gates] if gated else [])
    names = ["output", "dx", *(f"dA{i}" for i in range(len(ranks))), *(f"dB{i}" for i in range(len(ranks)))]
    names += ["dgates"] if gated else []
    results = []
    for namespace in (impl, GatedLowRankTorch):
        out = GatedLowRankFunction.apply(x, gates, (2.0, 0.5), 0.0, namespace, False, *a_blocks, *b_blocks)
        results.append([out, *torch.autograd.grad(out, inputs, cotangent.to(out.dtype))])
    return compare(names, *results, tolerance)


def _check_dropout(impl, device, dtype, tolerance) -> str | None:
    """The Triton path keeps no mask: backward regenerates it from the seed. So the replay of ones is the mask scaled
    by 1 / (1 - p), the replay of x is x times it, and a second replay gives the same."""
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    mask = impl.dropout_replay(torch.ones_like(x), _CHECK_DROPOUT_P, None, _CHECK_SEED).float()
    dropped = impl.dropout_replay(x, _CHECK_DROPOUT_P, None, _CHECK_SEED)
    kept = mask != 0
    scale = 1.0 / (1.0 - _CHECK_DROPOUT_P)
    if not torch.allclose(mask[kept], torch.full_like(mask[kept], scale), rtol=tolerance, atol=0.0):
        return f"kept elements are not scaled by 1 / (1 - p) = {scale}"
    fraction = kept.float().mean().item()
    if not 0.6 < fraction < 0.9:
        return f"kept {fraction:.0%} of the elements with p={_CHECK_DROPOUT_P}"
    problem = compare(["output"], [dropped], [x * mask.to(dtype)], tolerance)
    if problem is None and not torch.equal(impl.dropout_replay(x, _CHECK_DROPOUT_P, None, _CHECK_SEED), dropped):
        problem = "replaying the same seed gives another mask"
    return problem


register_check("gated_lowrank", "gated_lowrank_triton", functools.partial(_check_gated, gated=True))
register_check("gated_lowrank without gates", "gated_lowrank_triton", functools.partial(_check_gated, gated=False))
register_check("dropout", "gated_lowrank_triton", _check_dropout)
