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


def test_invalid_arguments():
    left, right = make_inputs(3, 8, 31)
    with pytest.raises(ValueError, match="orth_norm"):
        orthogonality_penalty(left, right, "nuc")
    with pytest.raises(ValueError, match="'auto', 'eager', 'torch', 'triton'"):
        orthogonality_penalty(left, right, backend="numpy")


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
