"""The guarded default: where None / "auto" would pick Triton, the first call per process and (device, dtype) checks the
Triton kernels against the fused torch path, warns once on an error or a mismatch and runs the torch path from then on.

No GPU here, so the selection is patched to treat CPU tensors as it treats CUDA ones. In this process the Triton
namespaces are replaced by torch stand-ins (correct, raising, or wrong); the tests marked `triton` run the real kernels
in the interpreter, one of them made to raise or to return wrong values.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from peft import get_peft_model

from peft_sparta import SpaRTAConfig
from peft_sparta.kernels import gated_lowrank, orthogonality_penalty
from peft_sparta.kernels.backend import ENV_VAR, resolve_backend
from peft_sparta.kernels.gated_lowrank import GatedLowRankTorch
from peft_sparta.kernels.orthogonality import OrthogonalityTorch
from tests.conftest import tiny_llama

from .conftest import TOLERANCES, dtype_supported


backend_module = importlib.import_module("peft_sparta.kernels.backend")
guard = importlib.import_module("peft_sparta.kernels.guard")
CHECK_WARNING = "first-use check"


@pytest.fixture
def guarded(monkeypatch):
    """The "auto" selection as on a CUDA machine with Triton, for CPU tensors; verdicts forgotten before and after."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(backend_module, "triton_is_default", lambda tensor: True)
    guard.reset()
    yield
    guard.reset()


class SeededDropoutTorch(GatedLowRankTorch):
    """A torch stand-in for the Triton namespace: its dropout keeps no mask and replays it from a seed, as the
    kernel does."""

    calls = 0

    @classmethod
    def dropout_forward(cls, x, p):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return cls.dropout_replay(x, p, None, seed), None, seed

    @classmethod
    def dropout_replay(cls, tensor, p, mask, seed):
        cls.calls += 1
        keep = torch.rand(tensor.shape, generator=torch.Generator().manual_seed(seed)) > p
        return tensor * keep.to(tensor.dtype) / (1.0 - p)

    @classmethod
    def gate_scale_forward(cls, h, gates, ranks, scales):
        cls.calls += 1
        return GatedLowRankTorch.gate_scale_forward(h, gates, ranks, scales)


class RaisingGated(SeededDropoutTorch):
    @classmethod
    def gate_scale_backward(cls, dz, h, gates, ranks, scales):
        cls.calls += 1
        raise RuntimeError("simulated kernel failure")


class WrongGated(SeededDropoutTorch):
    @classmethod
    def gate_scale_forward(cls, h, gates, ranks, scales):
        cls.calls += 1
        return 1.5 * GatedLowRankTorch.gate_scale_forward(h, gates, ranks, scales)


def use_namespaces(monkeypatch, gated_namespace, orthogonality_namespace=OrthogonalityTorch):
    gated_namespace.calls = 0
    namespaces = {"gated_lowrank_triton": gated_namespace, "orthogonality_triton": orthogonality_namespace}
    monkeypatch.setattr(guard, "triton_namespace", namespaces.__getitem__)


def check_warnings(caught) -> list[str]:
    return [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and CHECK_WARNING in str(w.message)
    ]


def train(steps: int = 3):
    """A few SGD steps of a tiny Llama with SpaRTA (dropout and the orthogonality penalty on): the losses and the
    trained parameters."""
    config = SpaRTAConfig(
        r_shared=2, r_task=3, target_modules=["q_proj", "v_proj"], init_weights=False, dropout=0.1, task_names=["t0"]
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_training(actual, expected):
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
    assert actual[1].keys() == expected[1].keys()
    for name, value in expected[1].items():
        torch.testing.assert_close(actual[1][name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def torch_path_training(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv(ENV_VAR, "torch")
        return train()


@pytest.mark.parametrize(
    "namespace,named",
    [(RaisingGated, "gated_lowrank raised RuntimeError: simulated kernel failure"), (WrongGated, "output differs")],
    ids=["raises", "wrong-values"],
)
def test_failed_check_warns_once_and_training_runs_the_torch_path(guarded, monkeypatch, namespace, named):
    expected = torch_path_training(monkeypatch)
    use_namespaces(monkeypatch, namespace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = train()
    messages = check_warnings(caught)
    assert len(messages) == 1, messages
    assert named in messages[0] and "torch.float32" in messages[0], messages[0]
    assert_same_training(actual, expected)
    calls = namespace.calls
    train(steps=1)
    assert namespace.calls == calls, "the failed Triton namespace was used after its check"


class WrongOrthogonality(OrthogonalityTorch):
    @staticmethod
    def orthogonality_forward(left, right, l1, store_grad):
        loss, grad = OrthogonalityTorch.orthogonality_forward(left, right, l1, store_grad)
        return 1.5 * loss, grad


def test_the_ops_register_their_checks_and_the_guard_runs_them(guarded, monkeypatch):
    """The guard imports no op: each op module registers its checks, which run in order on the first call."""
    assert [check.name for check in guard.CHECKS] == [
        "gated_lowrank", "gated_lowrank without gates", "dropout", "orthogonality_penalty",
    ]  # fmt: skip
    use_namespaces(monkeypatch, SeededDropoutTorch, WrongOrthogonality)
    with pytest.warns(RuntimeWarning, match="orthogonality_penalty: norm fro: loss differs"):
        assert resolve_backend(None, torch.ones(2)) == "torch"


def test_check_runs_once_per_dtype(guarded, monkeypatch):
    use_namespaces(monkeypatch, RaisingGated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.float32, torch.float64, torch.float64):
            assert resolve_backend(None, torch.ones(2, dtype=dtype)) == "torch"
    messages = check_warnings(caught)
    assert len(messages) == 2 and "torch.float32" in messages[0] and "torch.float64" in messages[1], messages


def test_passed_check_picks_triton_without_warning(guarded, monkeypatch):
    """Also when the first call comes under no_grad or inference_mode (the check needs autograd), or under autocast
    (a key of its own)."""
    use_namespaces(monkeypatch, SeededDropoutTorch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            assert resolve_backend(None, torch.ones(2)) == "triton"
        with torch.no_grad():
            assert resolve_backend("auto", torch.ones(2, dtype=torch.float64)) == "triton"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert resolve_backend(None, torch.ones(2)) == "triton"
    assert not check_warnings(caught)
    assert len(guard._verdicts) == 3


@pytest.mark.parametrize("where", ["config", "env"])
def test_explicit_triton_is_not_guarded(guarded, monkeypatch, where):
    use_namespaces(monkeypatch, RaisingGated)
    if where == "env":
        monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton" if where == "config" else None, torch.ones(2))
    assert RaisingGated.calls == 0


def test_default_off_cuda_runs_no_check(monkeypatch):
    """Without the patched selection (CPU tensors): the torch path, and no check at all."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    guard.reset()
    use_namespaces(monkeypatch, RaisingGated)
    assert resolve_backend(None, torch.ones(2)) == "torch"
    assert RaisingGated.calls == 0 and not guard._verdicts


# ---- the real kernels, in Triton's CPU interpreter -------------------------------------------------------------------


class CorruptedKernel:
    """Stands in for a JITFunction: launches the real kernel, then doubles its output (argument ``output``), or
    raises before launching."""

    def __init__(self, kernel, output: int | None):
        self.kernel, self.output = kernel, output

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.output is None:
                raise RuntimeError("simulated compilation failure")
            self.kernel[grid](*args, **kwargs)
            args[self.output].mul_(2)

        return launch


def gated_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 24, generator=generator, requires_grad=True)
    a_blocks = [torch.randn(r, 24, generator=generator).mul_(0.2).requires_grad_() for r in (2, 3)]
    b_blocks = [torch.randn(16, r, generator=generator).requires_grad_() for r in (2, 3)]
    gates = torch.rand(2, 5, 2, generator=generator, requires_grad=True)
    return x, a_blocks, b_blocks, gates


def gated_result(backend):
    x, a_blocks, b_blocks, gates = gated_case()
    out = gated_lowrank(x, a_blocks, b_blocks, [2.0, 0.5], gates, backend=backend)
    grads = torch.autograd.grad(out.sum(), [x, *a_blocks, *b_blocks, gates])
    loss = orthogonality_penalty(a_blocks[1], a_blocks[0], backend=backend)
    return [out, loss, *grads, *torch.autograd.grad(loss, a_blocks)]


@pytest.mark.triton
def test_interpreted_kernels_pass_the_check(triton_interpret, guarded):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend(None, torch.ones(2)) == "triton"
        actual = gated_result(None)
    assert not check_warnings(caught)
    for value, expected in zip(actual, gated_result("torch")):
        torch.testing.assert_close(value, expected, **TOLERANCES[torch.float32])


@pytest.mark.triton
@pytest.mark.parametrize(
    "dtype,autocast", [(torch.bfloat16, None), (torch.float16, None), (torch.float32, torch.bfloat16)]
)
def test_interpreted_kernels_pass_the_check_in_half_precision(triton_interpret, guarded, dtype, autocast):
    """The tolerances leave room for half-precision rounding: no false alarm."""
    if not dtype_supported(dtype):
        pytest.skip(f"{dtype} matmul/autograd not supported on this CPU build")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            assert resolve_backend(None, torch.ones(2, dtype=dtype)) == "triton"
    assert not check_warnings(caught)


@pytest.mark.triton
@pytest.mark.parametrize(
    "kernel,output,named",
    [
        ("_gate_scale_backward_kernel", None, "raised RuntimeError: simulated compilation failure"),
        ("_gate_scale_forward_kernel", 4, "gated_lowrank: output differs"),
        ("_dropout_kernel", 1, "dropout: kept elements are not scaled"),
    ],
    ids=["raises", "wrong-forward", "wrong-dropout"],
)
def test_broken_interpreted_kernel_fails_the_check(triton_interpret, guarded, monkeypatch, kernel, output, named):
    module = triton_interpret[0]
    expected = torch_path_training(monkeypatch)
    monkeypatch.setattr(module, kernel, CorruptedKernel(getattr(module, kernel), output))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = train()
        for value, reference in zip(gated_result(None), gated_result("torch")):
            torch.testing.assert_close(value, reference, rtol=0, atol=0)
    messages = check_warnings(caught)
    assert len(messages) == 1 and named in messages[0], messages
    assert_same_training(actual, expected)


@pytest.mark.triton
def test_explicit_triton_raises_the_kernel_error(triton_interpret, guarded, monkeypatch):
    module = triton_interpret[0]
    monkeypatch.setattr(module, "_gate_scale_forward_kernel", CorruptedKernel(module._gate_scale_forward_kernel, None))
    with pytest.raises(RuntimeError, match="simulated compilation failure"):
        gated_result("triton")
