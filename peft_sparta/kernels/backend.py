"""Which implementation of a kernel runs: backend names, the environment override and Triton's availability.

Triton is optional: nothing here imports it unless a caller asks for the "triton" backend, so the package imports (and
runs its fused torch path) on machines without it.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Literal, get_args

import torch

from .guard import triton_passes_check


Backend = Literal["auto", "eager", "torch", "triton"]
BACKENDS = get_args(Backend)
ENV_VAR = "SPARTA_KERNEL_BACKEND"


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (cached: the answer cannot change within a process)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_is_default(tensor: torch.Tensor) -> bool:
    """Whether None / "auto" would run Triton for ``tensor``: a CUDA tensor, and Triton installed."""
    return tensor.is_cuda and triton_available()


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Turn a requested backend into the one that runs: "eager", "torch" or "triton".

    None and "auto" defer to the environment variable SPARTA_KERNEL_BACKEND when it is set, else pick Triton for CUDA
    tensors when Triton imports and the fused torch path otherwise. That default is guarded (guard.py): the first call
    per process and (device, dtype) checks the Triton kernels against the fused torch path, and on any error or
    mismatch warns once and picks the torch path from then on. An explicit "triton" is not checked and fails loudly
    where it cannot run (no Triton, or CPU tensors outside TRITON_INTERPRET=1) instead of silently falling back.
    """
    source = "backend"
    if backend is None or backend == "auto":
        backend, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))} or None, got {backend!r}.")
    if backend == "auto":
        if not triton_is_default(tensor):
            return "torch"
        return "triton" if triton_passes_check(tensor) else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError("The 'triton' kernel backend needs Triton: pip install 'peft-sparta-cl[gpu]'.")
        import triton

        if not tensor.is_cuda and not triton.knobs.runtime.interpret:
            raise ValueError("The 'triton' kernel backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on CPU).")
    return backend
