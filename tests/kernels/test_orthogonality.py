"""Orthogonality penalty: the Triton kernels (in the interpreter) and the dispatch against the reference."""

from __future__ import annotations

import pytest
import torch
from peft_sparta.kernels import orthogonality_penalty, orthogonality_penalty_reference

from .conftest import TOLERANCES, dtype_supported


# (rows of left, rows of right, in_features): ones, primes, and sizes crossing the 16/64-wide tiles.
SHAPES = [(1, 1, 1), (3, 8, 31), (8, 17, 7), (67, 5, 130)]


def make_inputs(m, n, k, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    left = (torch.randn(m, k, generator=generator) * k**-0.5).to(dtype).requires_grad_()
    right = (torch.randn(n, k, generator=generator) * k**-0.5).to(dtype).requires_grad_()
    return left, right


def run(fn, left, right, *args, **kwargs):
    left.grad = right.grad = None
    loss = fn(left, right, *args, **kwargs)
    (loss * 1.5).backward()
    return loss.detach(), left.grad, right.grad


def assert_matches(actual, expected, dtype=torch.float32):
    for value, ref in zip(actual, expected):
        if ref is None:
            assert value is None
        else:
            torch.testing.assert_close(value, ref, **TOLERANCES[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("norm", ["fro", "l1"])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(triton_interpret, shape, norm):
    left, right = make_inputs(*shape)
    expected = run(orthogonality_penalty_reference, left, right, norm)
    assert_matches(run(orthogonality_penalty, left, right, norm, backend="triton"), expected)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["fro", "l1"])
def test_triton_half_precision(triton_interpret, dtype, norm):
    """The kernel accumulates in fp32; compared with the reference run in fp32 on the same (rounded) inputs, since the
    reference in half precision accumulates in half precision."""
    if not dtype_supported(dtype):
        pytest.skip(f"{dtype} matmul/autograd not supported on this CPU build")
    left, right = make_inputs(8, 17, 31, dtype=dtype)
    left32, right32 = (t.detach().float().requires_grad_() for t in (left, right))
    expected = [t.to(dtype) for t in run(orthogonality_penalty_reference, left32, right32, norm)]
    actual = run(orthogonality_penalty, left, right, norm, backend="triton")
    assert all(t.dtype == dtype for t in actual)
    assert_matches(actual, expected, dtype)


@pytest.mark.triton
def test_triton_frozen_side_gets_no_gradient(triton_interpret):
    """As in the layer: old task branches are frozen, only the current one trains."""
    left, right = make_inputs(3, 8, 31)
    right.requires_grad_(False)
    expected = run(orthogonality_penalty_reference, left, right)
    assert "OrthogonalityPenaltyFunction" in orthogonality_penalty(left, right, backend="triton").grad_fn.name()
    actual = run(orthogonality_penalty, left, right, backend="triton")
    assert actual[2] is None
    assert_matches(actual, expected)


@pytest.mark.triton
def test_triton_zero_for_orthogonal_rows(triton_interpret):
    basis = torch.linalg.qr(torch.randn(31, 31, generator=torch.Generator().manual_seed(0)))[0].T
    loss = orthogonality_penalty(basis[:4], basis[4:12], backend="triton")
    assert loss.abs() < 1e-10


@pytest.mark.parametrize("backend", ["eager", "torch", "auto", None])
@pytest.mark.parametrize("norm", ["fro", "l1"])
def test_cpu_backends_are_the_reference(backend, norm, monkeypatch):
    monkeypatch.delenv("SPARTA_KERNEL_BACKEND", raising=False)
    left, right = make_inputs(3, 8, 31)
    expected = run(orthogonality_penalty_reference, left, right, norm)
    assert_matches(run(orthogonality_penalty, left, right, norm, backend=backend), expected)


@pytest.mark.parametrize("norm", ["fro", "l1"])
@pytest.mark.parametrize("trainable", [(True, False, False), (False, False, False), (True, True, True)])
def test_blocks_match_the_reference_on_their_stack(backend, norm, trainable):
    """As in the layer: the current branch against the shared one (often trainable) and frozen old ones."""
    generator = torch.Generator().manual_seed(3)
    left = (torch.randn(3, 31, generator=generator) * 0.2).requires_grad_()
    blocks = [(torch.randn(rows, 31, generator=generator) * 0.2) for rows in (1, 8, 5)]
    blocks = [block.requires_grad_(flag) for block, flag in zip(blocks, trainable)]
    reference_blocks = [block.detach().clone().requires_grad_(block.requires_grad) for block in blocks]
    expected = orthogonality_penalty_reference(left, torch.cat(reference_blocks), norm)
    (expected * 1.5).backward()
    expected_left_grad, left.grad = left.grad, None
    actual = orthogonality_penalty(left, blocks, norm, backend=backend)
    (actual * 1.5).backward()
    torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(left.grad, expected_left_grad, **TOLERANCES[torch.float32])
    for block, reference in zip(blocks, reference_blocks):
        if reference.requires_grad:
            torch.testing.assert_close(block.grad, reference.grad, **TOLERANCES[torch.float32])
        else:
            assert block.grad is None


def test_no_stacked_copy_is_saved_for_backward(backend):
    """Only the inputs themselves and the small dL/dO are kept: memory does not grow with a copy of every block."""
    left = torch.randn(4, 64, requires_grad=True)
    blocks = [torch.randn(32, 64) for _ in range(6)]
    storages = {t.untyped_storage().data_ptr() for t in (left, *blocks)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = orthogonality_penalty(left, blocks, backend=backend)
    copies = [t for t in saved if t.untyped_storage().data_ptr() not in storages]
    assert sum(t.numel() for t in copies) <= left.shape[0] * sum(b.shape[0] for b in blocks), [t.shape for t in copies]
    loss.backward()
    assert left.grad is not None


def test_invalid_arguments():
    left, right = make_inputs(3, 8, 31)
    with pytest.raises(ValueError, match="orth_norm"):
        orthogonality_penalty(left, right, "nuc")
    with pytest.raises(ValueError, match="'auto', 'eager', 'torch', 'triton'"):
        orthogonality_penalty(left, right, backend="numpy")
    with pytest.raises(ValueError, match="at least one block"):
        orthogonality_penalty(left, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm", ["fro", "l1"])
def test_cuda_auto_backend_matches_reference(norm, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("SPARTA_KERNEL_BACKEND", raising=False)
    left, right = (t.detach().cuda().requires_grad_() for t in make_inputs(67, 5, 130))
    assert "OrthogonalityPenaltyFunction" in orthogonality_penalty(left, right, norm).grad_fn.name()
    assert_matches(
        run(orthogonality_penalty, left, right, norm), run(orthogonality_penalty_reference, left, right, norm)
    )
