"""Orthogonality penalty through the Gram matrix of frozen rows: against the float64 definition, value and gradient."""

from __future__ import annotations

import pytest
import torch

from peft_sparta.kernels.orthogonality_gram import gram_matrix, gram_orthogonality_penalty

from .conftest import DEFINITION_TOLERANCES, DLOSS, definition, dtype_supported, make_inputs


# (rows of left, frozen rows, in_features): more frozen rows than features (where layers use it), fewer, and one.
SHAPES = [(3, 40, 31), (8, 17, 7), (4, 3, 16), (1, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_definition(shape, dtype):
    """Loss and the gradient of ``left`` in its dtype; the frozen rows, given as two blocks, get none."""
    if not dtype_supported(dtype):
        pytest.skip(f"{dtype} matmul is not supported on this CPU build")
    left, right = make_inputs(*shape, dtype=dtype)
    right.requires_grad_(False)
    gram = gram_matrix([right[:1], right[1:]])
    loss = gram_orthogonality_penalty(left, gram)
    (loss * DLOSS).backward()
    expected_loss, expected_left, _ = definition(left, right, "fro")
    for name, value, expected in [("loss", loss.detach(), expected_loss), ("d left", left.grad, expected_left)]:
        assert value.dtype == dtype, f"{name} is {value.dtype}, not {dtype}"
        torch.testing.assert_close(
            value.double(), expected, **DEFINITION_TOLERANCES[dtype], msg=lambda m, n=name: f"{n}: {m}"
        )
    assert gram.grad is None and not gram.requires_grad


def test_nothing_but_the_input_is_kept_for_backward():
    left, right = make_inputs(4, 40, 16)
    gram = gram_matrix([right.detach()])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gram_orthogonality_penalty(left, gram)
    assert len(saved) == 1 and saved[0] is left


def test_a_gram_matrix_of_another_size_is_a_clear_error():
    left, right = make_inputs(4, 40, 16)
    with pytest.raises(ValueError, match=r"must be \(in_features, in_features\) = \(16, 16\), got \(40, 40\)"):
        gram_orthogonality_penalty(left, right @ right.T)
