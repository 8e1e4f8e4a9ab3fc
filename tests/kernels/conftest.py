"""Fixtures and helpers of the kernel tests: Triton's CPU interpreter, per-dtype tolerances and the orthogonality
penalty's definition.

Triton decides when a function is decorated whether it is compiled or interpreted, its own library functions
(tl.sum, tl.rand, ...) included, and peft imports Triton before any test runs. So TRITON_INTERPRET=1 must be set before
the process starts: tests marked `triton` run in-process under `TRITON_INTERPRET=1 pytest`, and otherwise
`test_triton_kernels_in_interpreter` runs them in a child pytest with the variable set.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch


TRITON_MODULES = ("peft_sparta.kernels.gated_lowrank_triton", "peft_sparta.kernels.orthogonality_triton")

# Fused vs reference, same dtype: fp32 differs by summation order only; half precisions by their rounding of h, z and
# the scale/gate products, which the reference rounds at other points.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
}

#: the upstream gradient of the orthogonality penalty in its tests
DLOSS = 1.5
# Against the exact float64 definition: fp32 is off by summation order (~3e-7 seen), bf16/fp16 by the rounding of their
# inputs to O and of the results (~7e-3 / ~6e-4 seen, all backends); about 3x that, tighter than the shared TOLERANCES,
# so that a 10% error in any backend fails in every dtype.
DEFINITION_TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def make_inputs(m, n, k, dtype=torch.float32, seed=0):
    """The penalty's inputs: ``left`` (m, k) and ``right`` (n, k), random, requiring gradients."""
    generator = torch.Generator().manual_seed(seed)
    left = (torch.randn(m, k, generator=generator) * k**-0.5).to(dtype).requires_grad_()
    right = (torch.randn(n, k, generator=generator) * k**-0.5).to(dtype).requires_grad_()
    return left, right


def definition(left, right, norm):
    """Loss and gradients of ``DLOSS * sum_ij f(left_i . right_j)`` from the definition, one pair (i, j) at a time in
    float64, sharing no code with the implementations: f(o) = o^2 ("fro") or |o| ("l1"), and by the chain rule
    d left_i = DLOSS * sum_j f'(o_ij) right_j, d right_j = DLOSS * sum_i f'(o_ij) left_i, f'(o) = 2o or sign(o)."""
    left, right = left.detach().double(), right.detach().double()
    loss, d_left, d_right = 0.0, torch.zeros_like(left), torch.zeros_like(right)
    for i in range(left.shape[0]):
        for j in range(right.shape[0]):
            overlap = sum(a * b for a, b in zip(left[i].tolist(), right[j].tolist()))
            loss += overlap**2 if norm == "fro" else abs(overlap)
            slope = 2.0 * overlap if norm == "fro" else (math.copysign(1.0, overlap) if overlap else 0.0)
            d_left[i] += DLOSS * slope * right[j]
            d_right[j] += DLOSS * slope * left[i]
    return torch.tensor(loss, dtype=torch.float64), d_left, d_right


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)")


def dtype_supported(dtype: torch.dtype) -> bool:
    """Whether this CPU build runs matmul and autograd in dtype (half precisions are not everywhere)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, requires_grad=True)
        (a @ a).sum().backward()
    except RuntimeError:
        return False
    return True


def interpreter_active() -> bool:
    """Whether the Triton kernel modules are (or will be, on import) interpreted in this process."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module(TRITON_MODULES[0])
    return isinstance(module._gate_scale_forward_kernel, InterpretedFunction)


@pytest.fixture(scope="session")
def triton_interpret():
    """The Triton kernel modules, interpreted on CPU; skips without Triton, or outside a TRITON_INTERPRET=1 process
    (where the child run of `test_triton_kernels_in_interpreter` covers these tests)."""
    if not interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1 at process start; run by test_triton_kernels_in_interpreter")
    return [importlib.import_module(name) for name in TRITON_MODULES]


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.triton)])
def backend(request):
    """The fused backends; "triton" runs its kernels in the interpreter (skipped without Triton)."""
    if request.param == "triton":
        request.getfixturevalue("triton_interpret")
    return request.param
