"""Orthogonality penalty: every backend (the Triton kernels in the interpreter) against the definition, and the
dispatch."""

from __future__ import annotations

import importlib

import pytest
import torch

from peft_sparta.kernels import NORMS, orthogonality_penalty, orthogonality_penalty_reference

from .conftest import DEFINITION_TOLERANCES, DLOSS, TOLERANCES, definition, dtype_supported, make_inputs


# The package's `orthogonality_penalty` attribute is the function; the module is reached by its import path.
orthogonality_module = importlib.import_module("peft_sparta.kernels.orthogonality")
# (rows of left, rows of right, in_features): ones, primes, and sizes crossing the 16/64-wide tiles.
SHAPES = [(1, 1, 1), (3, 8, 31), (8, 17, 7), (67, 5, 130)]
ALL_BACKENDS = ["eager", "torch", pytest.param("triton", marks=pytest.mark.triton)]


def run(fn, left, right, *args, **kwargs):
    left.grad = right.grad = None
    loss = fn(left, right, *args, **kwargs)
    (loss * DLOSS).backward()
    return loss.detach(), left.grad, right.grad


def assert_matches_definition(actual, left, right, norm, dtype=torch.float32):
    """``actual`` = (loss, d left, d right) equals the definition within dtype's tolerances; d right may be None when
    right is frozen."""
    for name, value, expected in zip(("loss", "d left", "d right"), actual, definition(left, right, norm)):
        if name == "d right" and not right.requires_grad:
            assert value is None, "a frozen right side got a gradient"
            continue
        assert value.dtype == dtype, f"{name} is {value.dtype}, not {dtype}"
        value = value.double().cpu()
        torch.testing.assert_close(value, expected, **DEFINITION_TOLERANCES[dtype], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_definition(backend, shape, norm, dtype):
    """Loss and both gradients, in the inputs' dtype, against the float64 definition on the same (rounded) inputs."""
    if not dtype_supported(dtype):
        pytest.skip(f"{dtype} matmul/autograd not supported on this CPU build")
    left, right = make_inputs(*shape, dtype=dtype)
    assert_matches_definition(run(orthogonality_penalty, left, right, norm, backend=backend), left, right, norm, dtype)


@pytest.mark.parametrize("backend", ["auto", None])
def test_auto_on_cpu_runs_the_fused_torch_path(backend, monkeypatch):
    """None / "auto" are no backend of their own: on CPU they pick the fused Function with the torch ops."""
    monkeypatch.delenv("SPARTA_KERNEL_BACKEND", raising=False)
    impls = []
    real_apply = orthogonality_module.OrthogonalityPenaltyFunction.apply
    monkeypatch.setattr(
        orthogonality_module.OrthogonalityPenaltyFunction,
        "apply",
        lambda *args: impls.append(args[1]) or real_apply(*args),
    )
    orthogonality_penalty(*make_inputs(3, 8, 31), backend=backend)
    monkeypatch.setenv("SPARTA_KERNEL_BACKEND", "eager")
    orthogonality_penalty(*make_inputs(3, 8, 31), backend=backend)
    assert impls == [orthogonality_module.OrthogonalityTorch]


@pytest.mark.triton
def test_triton_frozen_side_gets_no_gradient(triton_interpret):
    """As in the layer: old task branches are frozen, only the current one trains."""
    left, right = make_inputs(3, 8, 31)
    right.requires_grad_(False)
    assert "OrthogonalityPenaltyFunction" in orthogonality_penalty(left, right, backend="triton").grad_fn.name()
    assert_matches_definition(run(orthogonality_penalty, left, right, "fro", backend="triton"), left, right, "fro")


@pytest.mark.triton
def test_triton_zero_for_orthogonal_rows(triton_interpret):
    basis = torch.linalg.qr(torch.randn(31, 31, generator=torch.Generator().manual_seed(0)))[0].T
    loss = orthogonality_penalty(basis[:4], basis[4:12], backend="triton")
    assert loss.abs() < 1e-10


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("trainable", [(True, False, False), (False, False, False), (True, True, True)])
def test_blocks_match_the_reference_on_their_stack(backend, norm, trainable):
    """As in the layer: the current branch against the shared one (often trainable) and frozen old ones."""
    generator = torch.Generator().manual_seed(3)
    left = (torch.randn(3, 31, generator=generator) * 0.2).requires_grad_()
    blocks = [(torch.randn(rows, 31, generator=generator) * 0.2) for rows in (1, 8, 5)]
    blocks = [block.requires_grad_(flag) for block, flag in zip(blocks, trainable)]
    reference_blocks = [block.detach().clone().requires_grad_(block.requires_grad) for block in blocks]
    expected = orthogonality_penalty_reference(left, torch.cat(reference_blocks), norm)
    (expected * DLOSS).backward()
    expected_left_grad, left.grad = left.grad, None
    actual = orthogonality_penalty(left, blocks, norm, backend=backend)
    (actual * DLOSS).backward()
    torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(left.grad, expected_left_grad, **TOLERANCES[torch.float32])
    for block, reference in zip(blocks, reference_blocks):
        if reference.requires_grad:
            torch.testing.assert_close(block.grad, reference.grad, **TOLERANCES[torch.float32])
        else:
            assert block.grad is None


def test_nothing_but_the_inputs_is_kept_for_backward(backend):
    """Backward recomputes the overlap: the penalty keeps no activation, whatever the number of blocks, so a layer's
    penalty adds no memory per step however many frozen branches it reads."""
    left = torch.randn(4, 64, requires_grad=True)
    blocks = [torch.randn(32, 64) for _ in range(5)] + [torch.randn(8, 64, requires_grad=True)]
    storages = {t.untyped_storage().data_ptr() for t in (left, *blocks)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = orthogonality_penalty(left, blocks, backend=backend)
    assert [t.shape for t in saved if t.untyped_storage().data_ptr() not in storages] == []
    loss.backward()
    assert left.grad is not None and blocks[-1].grad is not None


def test_a_single_block_is_used_without_a_copy(monkeypatch):
    """A layer passes its stack of frozen branches as one block: forward and backward read that tensor itself."""
    seen = []
    real = orthogonality_module.OrthogonalityTorch.orthogonality_forward
    monkeypatch.setattr(
        orthogonality_module.OrthogonalityTorch,
        "orthogonality_forward",
        lambda left, right, *args: seen.append(right) or real(left, right, *args),
    )
    left, stack = make_inputs(3, 40, 31)
    stack.requires_grad_(False)
    orthogonality_penalty(left, [stack], backend="torch").backward()
    assert len(seen) == 2 and all(right is stack for right in seen)


def test_invalid_arguments():
    left, right = make_inputs(3, 8, 31)
    with pytest.raises(ValueError, match="orth_norm"):
        orthogonality_penalty(left, right, "nuc")
    with pytest.raises(ValueError, match="'auto', 'eager', 'torch', 'triton'"):
        orthogonality_penalty(left, right, backend="numpy")
    with pytest.raises(ValueError, match="at least one block"):
        orthogonality_penalty(left, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_auto_backend_matches_reference(norm, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("SPARTA_KERNEL_BACKEND", raising=False)
    left, right = (t.detach().cuda().requires_grad_() for t in make_inputs(67, 5, 130))
    assert "OrthogonalityPenaltyFunction" in orthogonality_penalty(left, right, norm).grad_fn.name()
    assert_matches_definition(run(orthogonality_penalty, left, right, norm), left, right, norm)
