"""The first-use check that guards the default ("auto") choice of the Triton kernels.

Where kernel_backend None / "auto" would run Triton (CUDA tensors, Triton installed), the first call per process and
(device, dtype, autocast dtype) runs every registered check: each op module registers, at import, checks that run its
Triton kernels on a small input, forward and backward, against the fused torch path (gated_lowrank.py: the gated
low-rank product with and without gates and the dropout kernel, its keep-mask regenerated from the seed;
orthogonality.py: the penalty in both norms). The package imports both op modules, so both are registered before any
check runs, and this module imports neither: the ops import the guard (through backend.py), not the reverse. Any
exception, or a result whose relative error exceeds the dtype's tolerance, gives one warning that names it, and the
fused torch path serves that (device, dtype) for the rest of the process. The check costs a few kernel compilations
once per process. An explicit "triton" never comes here, so its errors propagate.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


# Largest relative (Frobenius) error of a Triton result against the torch path's. Far above rounding (fp32 allows for
# TF32 in the torch path's GEMMs), far below what a wrong kernel gives (a missed tile or a wrong factor: > 10%).
TOLERANCES = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_verdicts: dict[tuple, bool] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class KernelCheck:
    """One check of the first-use guard: ``run(impl, device, dtype, tolerance)`` runs the Triton namespace ``impl``
    (the module ``triton_module`` of this package) against the fused torch path and returns None, or what differs.
    ``name`` is what the warning names when it fails."""

    name: str
    triton_module: str
    run: Callable[[Any, torch.device, torch.dtype, float], str | None]


#: The registered checks, in the order they run.
CHECKS: list[KernelCheck] = []


def register_check(name: str, triton_module: str, run: Callable[..., str | None]) -> None:
    """Register a check of the Triton kernels in ``triton_module`` (an op module calls this at import). A name
    registered again (a reloaded module) replaces its check in place."""
    check = KernelCheck(name, triton_module, run)
    for index, registered in enumerate(CHECKS):
        if registered.name == name:
            CHECKS[index] = check
            return
    CHECKS.append(check)


def triton_namespace(module: str):
    """The Triton implementation namespace ``module`` of this package (imported here, so that an import error is a
    failed check)."""
    package = __name__.rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.{module}")


def triton_passes_check(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve ``tensor``'s (device, dtype, autocast dtype): checked on the first call for
    that key, then remembered for the process; a failure warns once."""
    key = (tensor.device, tensor.dtype, _autocast_dtype(tensor.device))
    verdict = _verdicts.get(key)
    if verdict is None:
        with _lock:
            verdict = _verdicts.get(key)
            if verdict is None:
                failure = first_failure(tensor.device, tensor.dtype)
                if failure is not None:
                    warnings.warn(_message(key, failure), RuntimeWarning, stacklevel=2)
                verdict = _verdicts[key] = failure is None
    return verdict


def reset() -> None:
    """Forget the verdicts, so that the next call checks again (for tests)."""
    with _lock:
        _verdicts.clear()


def first_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernels match the fused torch path on ``device`` in ``dtype`` (under the caller's autocast
    state) in every registered check, else what went wrong first."""
    autocast = _autocast_dtype(device)
    tolerance = max(TOLERANCES.get(dtype, TOLERANCES[torch.float32]), TOLERANCES.get(autocast, 0.0))
    try:
        namespaces = {check.triton_module: triton_namespace(check.triton_module) for check in CHECKS}
    except Exception as error:
        return f"importing the kernels raised {_describe(error)}"
    with torch.inference_mode(False), torch.enable_grad():
        for check in CHECKS:
            try:
                problem = check.run(namespaces[check.triton_module], device, dtype, tolerance)
            except Exception as error:
                return f"{check.name} raised {_describe(error)}"
            if problem is not None:
                return f"{check.name}: {problem}"
    return None


def compare(names, actual, expected, tolerance: float) -> str | None:
    """None when every ``actual`` tensor is within ``tolerance`` (relative, Frobenius) of its ``expected`` one, else
    which differs (by name) and by how much."""
    for name, value, reference in zip(names, actual, expected):
        value, reference = value.detach().double(), reference.detach().double()
        if value.shape != reference.shape:
            return f"{name} has shape {tuple(value.shape)}, the torch path's {tuple(reference.shape)}"
        error = ((value - reference).norm() / reference.norm().clamp_min(1e-12)).item()
        if not error <= tolerance:  # also catches NaN
            return f"{name} differs from the torch path's by {error:.3g} (relative; tolerance {tolerance:g})"
    return None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _describe(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:500]}{'...' if len(text) > 500 else ''}"


def _message(key: tuple, failure: str) -> str:
    device, dtype, autocast = key
    where = f"{device} for {dtype}" + (f" under {autocast} autocast" if autocast is not None else "")
    return (
        f"peft_sparta: the Triton kernels failed their first-use check on {where} ({failure}). The fused torch path "
        "runs instead for the rest of this process. kernel_backend='triton' (or SPARTA_KERNEL_BACKEND=triton) runs "
        "Triton anyway and raises its errors; 'torch' skips this check."
    )
