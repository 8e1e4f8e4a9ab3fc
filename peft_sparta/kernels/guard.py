"""The first-use check that guards the default ("auto") choice of the Triton kernels.

Where kernel_backend None / "auto" would run Triton (CUDA tensors, Triton installed), the first call per process and
(device, dtype, autocast dtype) runs the Triton kernels of both ops on a small input, forward and backward, against
the fused torch path: the gated low-rank product with and without gates, the dropout kernel (its keep-mask regenerated
from the seed) and the orthogonality penalty in both norms. Any exception, or a result whose relative error exceeds the
dtype's tolerance, gives one warning that names it, and the fused torch path serves that (device, dtype) for the rest
of the process. The check costs a few kernel compilations once per process. An explicit "triton" never comes here, so
its errors propagate.
"""

from __future__ import annotations

import importlib
import threading
import warnings

import torch

from .gated_lowrank import GatedLowRankFunction, GatedLowRankTorch
from .orthogonality import OrthogonalityPenaltyFunction, OrthogonalityTorch


# Largest relative (Frobenius) error of a Triton result against the torch path's. Far above rounding (fp32 allows for
# TF32 in the torch path's GEMMs), far below what a wrong kernel gives (a missed tile or a wrong factor: > 10%).
TOLERANCES = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DROPOUT_P = 0.25
_SEED = 1234

_verdicts: dict[tuple, bool] = {}
_lock = threading.Lock()


def triton_namespaces():
    """The Triton implementation namespaces of the two ops (imported here, so that an import error is a failed
    check)."""
    package = __name__.rsplit(".", 1)[0]
    return (
        importlib.import_module(f"{package}.gated_lowrank_triton"),
        importlib.import_module(f"{package}.orthogonality_triton"),
    )


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
    state), else what went wrong first."""
    autocast = _autocast_dtype(device)
    tolerance = max(TOLERANCES.get(dtype, TOLERANCES[torch.float32]), TOLERANCES.get(autocast, 0.0))
    try:
        gated_triton, orthogonality_triton = triton_namespaces()
    except Exception as error:
        return f"importing the kernels raised {_describe(error)}"
    checks = (
        ("gated_lowrank", lambda: _check_gated(gated_triton, device, dtype, tolerance, gated=True)),
        ("gated_lowrank without gates", lambda: _check_gated(gated_triton, device, dtype, tolerance, gated=False)),
        ("dropout", lambda: _check_dropout(gated_triton, device, dtype, tolerance)),
        ("orthogonality_penalty", lambda: _check_orthogonality(orthogonality_triton, device, dtype, tolerance)),
    )
    with torch.inference_mode(False), torch.enable_grad():
        for name, check in checks:
            try:
                problem = check()
            except Exception as error:
                return f"{name} raised {_describe(error)}"
            if problem is not None:
                return f"{name}: {problem}"
    return None


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
    return _compare(names, *results, tolerance)


def _check_dropout(impl, device, dtype, tolerance) -> str | None:
    """The Triton path keeps no mask: backward regenerates it from the seed. So the replay of ones is the mask scaled
    by 1 / (1 - p), the replay of x is x times it, and a second replay gives the same."""
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    mask = impl.dropout_replay(torch.ones_like(x), DROPOUT_P, None, _SEED).float()
    dropped = impl.dropout_replay(x, DROPOUT_P, None, _SEED)
    kept = mask != 0
    scale = 1.0 / (1.0 - DROPOUT_P)
    if not torch.allclose(mask[kept], torch.full_like(mask[kept], scale), rtol=tolerance, atol=0.0):
        return f"kept elements are not scaled by 1 / (1 - p) = {scale}"
    fraction = kept.float().mean().item()
    if not 0.6 < fraction < 0.9:
        return f"kept {fraction:.0%} of the elements with p={DROPOUT_P}"
    problem = _compare(["output"], [dropped], [x * mask.to(dtype)], tolerance)
    if problem is None and not torch.equal(impl.dropout_replay(x, DROPOUT_P, None, _SEED), dropped):
        problem = "replaying the same seed gives another mask"
    return problem


def _check_orthogonality(impl, device, dtype, tolerance) -> str | None:
    generator = torch.Generator().manual_seed(2)

    def randn(*shape, grad=True):
        return (torch.randn(*shape, generator=generator) * 0.2).to(device, dtype).requires_grad_(grad)

    left, trained, frozen = randn(6, 24), randn(5, 24), randn(7, 24, grad=False)
    dloss = torch.tensor(1.5, device=device, dtype=dtype)
    for l1 in (False, True):
        results = []
        for namespace in (impl, OrthogonalityTorch):
            loss = OrthogonalityPenaltyFunction.apply(left, namespace, l1, trained, frozen)
            results.append([loss, *torch.autograd.grad(loss, [left, trained], dloss)])
        problem = _compare(["loss", "d left", "d right"], *results, tolerance)
        if problem is not None:
            return f"norm {'l1' if l1 else 'fro'}: {problem}"
    return None


def _compare(names, actual, expected, tolerance) -> str | None:
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
