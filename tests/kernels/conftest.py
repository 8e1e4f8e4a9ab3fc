"""Fixtures for the kernel tests: Triton's CPU interpreter and per-dtype tolerances.

Triton decides when a function is decorated whether it is compiled or interpreted, its own library functions
(tl.sum, tl.rand, ...) included, and peft imports Triton before any test runs. So TRITON_INTERPRET=1 must be set before
the process starts: tests marked `triton` run in-process under `TRITON_INTERPRET=1 pytest`, and otherwise
`test_triton_kernels_in_interpreter` runs them in a child pytest with the variable set.
"""

from __future__ import annotations

import importlib

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
