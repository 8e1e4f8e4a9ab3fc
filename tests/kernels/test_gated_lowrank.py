"""Fused gated low-rank product (torch ops and Triton kernels in the interpreter) against the eager reference."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from peft_sparta.kernels import gated_lowrank, gated_lowrank_reference

from .conftest import TOLERANCES, dtype_supported


# The package's `gated_lowrank` attribute is the function; the module is reached by its import path.
gated_module = importlib.import_module("peft_sparta.kernels.gated_lowrank")
RANKS = (1, 3, 8)
OUT_FEATURES = 13


def make_case(n_tasks, in_features, gate_mode, dtype=torch.float32, seed=0, rows=None):
    """x, A and B blocks (shared + n_tasks task branches, ranks cycling through 1, 3, 8), scales, gates and a fixed
    output cotangent; everything requires grad. gate_mode: "token" (B, S, n), "sequence" (B, 1, n), "rows" (2-D x,
    gates (N, n)) or "none"."""
    generator = torch.Generator().manual_seed(seed)
    n_blocks = n_tasks + 1
    ranks = [RANKS[i % len(RANKS)] for i in range(n_blocks)]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()

    lead = (rows,) if gate_mode == "rows" else (2, 3)
    x = randn(*lead, in_features)
    a_blocks = [randn(r, in_features, scale=in_features**-0.5) for r in ranks]
    b_blocks = [randn(OUT_FEATURES, r, scale=r**-0.5) for r in ranks]
    scales = [2.0] + [0.5 + i / 4 for i in range(n_tasks)]
    gate_shape = {"token": (2, 3, n_blocks), "sequence": (2, 1, n_blocks), "rows": (rows, n_blocks)}.get(gate_mode)
    gates = None if gate_shape is None else torch.rand(*gate_shape, generator=generator).to(dtype).requires_grad_()
    cotangent = torch.randn(*lead, OUT_FEATURES, generator=generator).to(dtype)
    return x, a_blocks, b_blocks, scales, gates, cotangent


def run(fn, x, a_blocks, b_blocks, scales, gates, cotangent, **kwargs):
    """Output and the gradient of every input (None where it got none) after backward of <out, cotangent>."""
    leaves = [x, *a_blocks, *b_blocks] + ([gates] if gates is not None else [])
    for leaf in leaves:
        leaf.grad = None
    out = fn(x, a_blocks, b_blocks, scales, gates, **kwargs)
    (out * cotangent).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_matches(actual, expected, dtype=torch.float32):
    (out, grads), (ref_out, ref_grads) = actual, expected
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    assert len(grads) == len(ref_grads)
    for index, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        if ref_grad is None:
            assert grad is None, f"input {index} got a gradient the reference does not give"
        else:
            torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype], msg=lambda m, i=index: f"input {i}: {m}")


@pytest.mark.parametrize("gate_mode", ["token", "sequence", "none"])
@pytest.mark.parametrize("in_features", [1, 7, 31])
@pytest.mark.parametrize("n_tasks", [1, 2, 5])
def test_matches_reference_fp32(backend, gate_mode, in_features, n_tasks):
    case = make_case(n_tasks, in_features, gate_mode)
    expected = run(gated_lowrank_reference, *case)
    assert_matches(run(gated_lowrank, *case, backend=backend), expected)


@pytest.mark.parametrize("rows", [1, 5, 67])
def test_two_dimensional_input(backend, rows):
    case = make_case(2, 7, "rows", rows=rows)
    assert_matches(run(gated_lowrank, *case, backend=backend), run(gated_lowrank_reference, *case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate_mode", ["token", "none"])
def test_matches_reference_half_precision(backend, dtype, gate_mode):
    if not dtype_supported(dtype):
        pytest.skip(f"{dtype} matmul/autograd not supported on this CPU build")
    case = make_case(2, 31, gate_mode, dtype=dtype)
    assert_matches(run(gated_lowrank, *case, backend=backend), run(gated_lowrank_reference, *case), dtype)


def test_frozen_blocks_and_input_get_no_gradient(backend):
    """The training step: only the shared block and the current task train, x is a frozen activation."""
    x, a_blocks, b_blocks, scales, gates, cotangent = make_case(3, 7, "token")
    x.requires_grad_(False)
    gates.requires_grad_(False)
    for block in a_blocks[1:3] + b_blocks[1:3]:
        block.requires_grad_(False)
    case = (x, a_blocks, b_blocks, scales, gates, cotangent)
    expected = run(gated_lowrank_reference, *case)
    actual = run(gated_lowrank, *case, backend=backend)
    assert_matches(actual, expected)
    grads = actual[1]
    assert grads[0] is None and grads[2] is None and grads[3] is None and grads[6] is None and grads[7] is None
    assert all(grad is not None for grad in (grads[1], grads[4], grads[5], grads[8]))


def test_frozen_blocks_cost_no_weight_gradient_work(monkeypatch):
    """Backward computes weight gradients for the trainable blocks only, one GEMM per run of adjacent ones: dz = dy B,
    then one dB and one dA over the shared and the current block when they are adjacent (the training step), one per
    block when 4 frozen blocks sit between them; no product covers a frozen block's columns. A block alone in its
    run gets its GEMM's result as gradient, not a copy."""
    products = []
    real_matmul = torch.Tensor.__matmul__

    def matmul(a, b):  # keeps no reference, which would make autograd copy the gradient
        product = real_matmul(a, b)
        products.append((tuple(product.shape), product.untyped_storage().data_ptr()))
        return product

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    for n_tasks in (1, 5):
        x, a_blocks, b_blocks, scales, _, cotangent = make_case(n_tasks, 7, "none")
        x.requires_grad_(False)
        for block in a_blocks[1:-1] + b_blocks[1:-1]:
            block.requires_grad_(False)
        out = gated_lowrank(x, a_blocks, b_blocks, scales, None, backend="torch")
        products.clear()
        (out * cotangent).sum().backward()
        assert all(block.grad is None for block in a_blocks[1:-1] + b_blocks[1:-1])
        rank = sum(a.shape[0] for a in a_blocks)
        trainable = [a_blocks[0].shape[0], a_blocks[-1].shape[0]]
        shapes = [shape for shape, _ in products]
        shapes.remove((6, rank))  # dz
        runs = [sum(trainable)] if n_tasks == 1 else trainable
        assert sorted(shapes) == sorted([(OUT_FEATURES, r) for r in runs] + [(r, 7) for r in runs])
        if n_tasks > 1:
            storages = {storage for _, storage in products}
            for block in (a_blocks[0], a_blocks[-1], b_blocks[0], b_blocks[-1]):
                assert block.grad.untyped_storage().data_ptr() in storages


@pytest.mark.parametrize(
    "backend", ["eager", "torch", pytest.param("triton", marks=pytest.mark.triton)], indirect=True
)
def test_zero_gate_blocks_are_skipped(backend, monkeypatch):
    """Blocks gated to zero for the whole batch are dropped before computing: no gradient, fewer GEMM columns."""
    x, a_blocks, b_blocks, scales, gates, cotangent = make_case(5, 7, "token")
    gates = gates.detach()
    gates[..., 1:4] = 0
    gates[0, 0, 2] = 0.5  # block 2 is open for one token, so it stays
    case = (x, a_blocks, b_blocks, scales, gates, cotangent)
    expected = run(gated_lowrank_reference, *case)
    seen = []
    real_apply = gated_module.GatedLowRankFunction.apply
    monkeypatch.setattr(
        gated_module.GatedLowRankFunction, "apply", lambda *args: seen.append(args) or real_apply(*args)
    )
    out, _ = run(gated_lowrank, *case, backend=backend)
    torch.testing.assert_close(out, expected[0], **TOLERANCES[torch.float32])
    for block in (1, 3):
        assert a_blocks[block].grad is None and b_blocks[block].grad is None
        torch.testing.assert_close(expected[1][1 + block], torch.zeros_like(a_blocks[block]))
    for block in (0, 2, 4, 5):
        torch.testing.assert_close(a_blocks[block].grad, expected[1][1 + block], **TOLERANCES[torch.float32])
    if backend != "eager":
        (args,) = seen
        assert len(args) == 6 + 2 * 4 and args[1].shape == (6, 4)


def test_training_step_cost_does_not_grow_with_tasks(monkeypatch):
    """With one-hot task gates (shared + current task open), 1 and 15 old tasks run the same two-block product."""
    widths = []
    real_apply = gated_module.GatedLowRankFunction.apply
    monkeypatch.setattr(
        gated_module.GatedLowRankFunction, "apply", lambda *args: widths.append(len(args)) or real_apply(*args)
    )
    for n_tasks in (1, 16):
        x, a_blocks, b_blocks, scales, _, cotangent = make_case(n_tasks, 7, "none")
        gates = torch.zeros(2, 3, n_tasks + 1)
        gates[..., 0] = gates[..., -1] = 1
        run(gated_lowrank, x, a_blocks, b_blocks, scales, gates, cotangent, backend="torch")
    assert widths == [6 + 4, 6 + 4]


def test_all_gates_zero_gives_zeros():
    x, a_blocks, b_blocks, scales, _, _ = make_case(2, 7, "none")
    out = gated_lowrank(x, a_blocks, b_blocks, scales, torch.zeros(2, 1, 3), backend="torch")
    assert out.shape == (2, 3, OUT_FEATURES) and not out.any()


def test_zero_gate_with_gate_gradient_is_kept(backend):
    """A zero gate's gradient is not zero, so blocks are kept when the gates require grad."""
    x, a_blocks, b_blocks, scales, gates, cotangent = make_case(2, 7, "token")
    gates = gates.detach()
    gates[..., 1] = 0
    gates.requires_grad_()
    case = (x, a_blocks, b_blocks, scales, gates, cotangent)
    expected = run(gated_lowrank_reference, *case)
    actual = run(gated_lowrank, *case, backend=backend)
    assert_matches(actual, expected)
    assert actual[1][-1][..., 1].abs().sum() > 0


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("gate_mode", ["token", "none"])
def test_bf16_autocast_matches_reference(gate_mode, recompute):
    """Forward under bf16 autocast, backward outside it (as trainers do): backward must compute in bf16 too, from the
    saved bf16 activation or one it recomputes."""
    x, a_blocks, b_blocks, scales, gates, cotangent = make_case(2, 31, gate_mode)
    leaves = [x, *a_blocks, *b_blocks] + ([gates] if gates is not None else [])
    results = []
    for fn, kwargs in [(gated_lowrank_reference, {}), (gated_lowrank, {"backend": "torch", "recompute": recompute})]:
        for leaf in leaves:
            leaf.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, a_blocks, b_blocks, scales, gates, **kwargs)
        (out.float() * cotangent).sum().backward()
        results.append((out.detach().float(), [leaf.grad for leaf in leaves]))
    # the reference multiplies by fp32 gates after its bf16 GEMMs, the fused path rounds the product to bf16: compare
    # at twice the bf16 tolerance
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, atol=0.1, rtol=0.1)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=0.1, rtol=0.1)


def test_torch_dropout_mask_equals_reference():
    """Same RNG state, same mask: the torch path uses the kernel F.dropout itself uses and replays its mask."""
    case = make_case(2, 31, "token")
    torch.manual_seed(7)
    expected = run(gated_lowrank_reference, *case, dropout_p=0.3, training=True)
    torch.manual_seed(7)
    actual = run(gated_lowrank, *case, dropout_p=0.3, training=True, backend="torch")
    assert_matches(actual, expected)
    torch.manual_seed(7)
    evaluation = run(gated_lowrank, *case, dropout_p=0.3, training=False, backend="torch")
    assert_matches(evaluation, run(gated_lowrank_reference, *case))


@pytest.mark.triton
def test_triton_dropout_replays_its_mask(triton_interpret, monkeypatch):
    """The Triton mask is Philox(seed, index): recover it from the recorded seed, then the fused output and every
    gradient must equal the reference run on x * mask / (1 - p), and backward must reuse the forward's seed."""
    gate_scale = triton_interpret[0]
    p = 0.3
    x, a_blocks, b_blocks, scales, gates, cotangent = make_case(2, 31, "token")
    seeds = []
    real_dropout = gate_scale.dropout
    monkeypatch.setattr(gate_scale, "dropout", lambda t, prob, seed: seeds.append(seed) or real_dropout(t, prob, seed))
    actual = run(
        gated_lowrank, x, a_blocks, b_blocks, scales, gates, cotangent, dropout_p=p, training=True, backend="triton"
    )
    assert len(seeds) == 3 and len(set(seeds)) == 1  # forward, rebuilt x_d, dx
    keep = real_dropout(torch.ones_like(x.detach()).reshape(-1, x.shape[-1]), p, seeds[0]).reshape(x.shape)
    assert 0 < (keep == 0).float().mean() < 1
    expected = run(
        lambda x, *args: gated_lowrank_reference(x * keep, *args), x, a_blocks, b_blocks, scales, gates, cotangent
    )
    assert_matches(actual, expected)


@pytest.mark.triton
def test_triton_dropout_rate(triton_interpret):
    gate_scale = triton_interpret[0]
    out = gate_scale.dropout(torch.ones(64, 128), 0.25, 1234)
    assert abs((out == 0).float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))
    assert not torch.equal(out, gate_scale.dropout(torch.ones(64, 128), 0.25, 1235))


@pytest.mark.parametrize("recompute", [False, True])
def test_activation_checkpointing_with_dropout(backend, recompute):
    """checkpoint() replays the forward with the saved RNG state: the same mask, the same gradients."""
    case = make_case(2, 7, "sequence")
    torch.manual_seed(3)
    expected = run(gated_lowrank, *case, dropout_p=0.3, training=True, backend=backend, recompute=recompute)

    def checkpointed(x, a_blocks, b_blocks, scales, gates, **kwargs):
        return checkpoint(gated_lowrank, x, a_blocks, b_blocks, scales, gates, use_reentrant=False, **kwargs)

    torch.manual_seed(3)
    actual = run(checkpointed, *case, dropout_p=0.3, training=True, backend=backend, recompute=recompute)
    assert_matches(actual, expected)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("gate_mode", ["token", "sequence", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_and_recomputed_activations_agree(backend, dtype, gate_mode, dropout_p):
    """Keeping the down-projection for backward or recomputing it from x (``recompute``) gives the same output and
    the same gradients, bit for bit: the same ops on the same operands, with the same dropout mask."""
    if not dtype_supported(dtype):
        pytest.skip(f"{dtype} matmul/autograd not supported on this CPU build")
    case = make_case(3, 31, gate_mode, dtype=dtype)
    results = []
    for recompute in (False, True):
        torch.manual_seed(11)
        results.append(
            run(gated_lowrank, *case, dropout_p=dropout_p, training=True, backend=backend, recompute=recompute)
        )
    (saved_out, saved_grads), (recomputed_out, recomputed_grads) = results
    assert torch.equal(saved_out, recomputed_out)
    for index, (saved, recomputed) in enumerate(zip(saved_grads, recomputed_grads)):
        assert torch.equal(saved, recomputed), f"input {index}"
    if dropout_p == 0:
        assert_matches(results[0], run(gated_lowrank_reference, *case), dtype)


@pytest.mark.parametrize("gate_mode", ["token", "none"])
def test_saved_activation_costs_what_lora_keeps(gate_mode):
    """Beyond its inputs the Function keeps one (N, R) activation (R = sum of the ranks, what LoRA keeps for its B),
    or none when it recomputes it; with frozen B blocks and gates needing no gradient it keeps none either way."""
    x, a_blocks, b_blocks, scales, gates, cotangent = make_case(3, 31, gate_mode)
    rows, rank = x.shape[:-1].numel(), sum(a.shape[0] for a in a_blocks)

    def kept(**kwargs):
        inputs = {t.untyped_storage().data_ptr() for t in (x, *a_blocks, *b_blocks)}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = gated_lowrank(x, a_blocks, b_blocks, scales, gates, backend="torch", **kwargs)
        out.backward(cotangent)
        # (N, R) tensors other than the inputs; the flattened gates (N, n) are a copy of an input
        return [t.shape for t in saved if t.untyped_storage().data_ptr() not in inputs and t.shape[-1] == rank]

    assert kept() == [(rows, rank)]
    assert kept(recompute=True) == []
    for block in b_blocks:
        block.requires_grad_(False)
    if gates is not None:
        gates.requires_grad_(False)
    assert kept() == []


@pytest.mark.parametrize("gate_mode", ["token", "none"])
def test_torch_compile_traces_one_graph(gate_mode):
    """The Function traces into a single graph (dynamo + AOTAutograd) and matches the reference, dropout mask
    included."""
    case = make_case(2, 7, gate_mode)
    torch.manual_seed(5)
    expected = run(gated_lowrank_reference, *case, dropout_p=0.2, training=True)
    torch._dynamo.reset()
    compiled = torch.compile(gated_lowrank, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    assert_matches(run(compiled, *case, dropout_p=0.2, training=True, backend="torch"), expected)


@pytest.mark.slow
def test_torch_compile_inductor():
    """Inductor-generated code for forward and backward (a cold C++ compile takes ~20 s on two cores)."""
    case = make_case(2, 7, "token")
    expected = run(gated_lowrank_reference, *case)
    torch._dynamo.reset()
    assert_matches(run(torch.compile(gated_lowrank, fullgraph=True), *case, backend="torch"), expected)


def test_backend_dispatch(monkeypatch):
    case = make_case(1, 7, "token")[:5]
    calls = []
    real_apply = gated_module.GatedLowRankFunction.apply
    monkeypatch.setattr(
        gated_module.GatedLowRankFunction, "apply", lambda *args: calls.append(args[4]) or real_apply(*args)
    )
    torch_ops = gated_module.GatedLowRankTorch
    monkeypatch.delenv("SPARTA_KERNEL_BACKEND", raising=False)
    gated_lowrank(*case)  # auto on CPU: fused torch path
    gated_lowrank(*case, backend="auto")
    monkeypatch.setenv("SPARTA_KERNEL_BACKEND", "eager")
    gated_lowrank(*case)
    assert calls == [torch_ops, torch_ops]
    gated_lowrank(*case, backend="torch")  # an explicit backend wins over the environment
    assert calls == [torch_ops, torch_ops, torch_ops]
    with pytest.raises(ValueError, match="'auto', 'eager', 'torch', 'triton'"):
        gated_lowrank(*case, backend="cuda")
    monkeypatch.setenv("SPARTA_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPARTA_KERNEL_BACKEND"):
        gated_lowrank(*case)


@pytest.mark.triton
def test_triton_backend_runs_the_triton_kernels(triton_interpret, monkeypatch):
    gate_scale = triton_interpret[0]
    launched = []
    for name in ("gate_scale_forward", "gate_scale_backward"):
        real = getattr(gate_scale, name)
        monkeypatch.setattr(
            gate_scale, name, lambda *args, _real=real, _name=name: launched.append(_name) or _real(*args)
        )
    run(gated_lowrank, *make_case(1, 7, "token"), backend="triton")
    assert launched == ["gate_scale_forward", "gate_scale_forward", "gate_scale_backward"]


def test_imports_and_runs_without_triton():
    """Triton is optional: with it unimportable the package imports, the auto backend runs, "triton" explains."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from peft_sparta.kernels import gated_lowrank, orthogonality_penalty\n"
        "x = torch.randn(4, 5); a = [torch.randn(2, 5)]; b = [torch.randn(3, 2)]\n"
        "assert gated_lowrank(x, a, b, [1.0]).shape == (4, 3)\n"
        "assert orthogonality_penalty(a[0], x).ndim == 0\n"
        "try:\n    gated_lowrank(x, a, b, [1.0], backend='triton')\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs Triton" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_auto_backend_matches_reference(dtype, monkeypatch):
    """On CUDA the default backend is Triton (compiled kernels, unless this process interprets them)."""
    pytest.importorskip("triton")
    monkeypatch.delenv("SPARTA_KERNEL_BACKEND", raising=False)
    x, a_blocks, b_blocks, scales, gates, cotangent = make_case(2, 31, "token", dtype=dtype)
    move = [t.detach().cuda().requires_grad_() for t in (x, *a_blocks, *b_blocks, gates)]
    case = (move[0], move[1:4], move[4:7], scales, move[7], cotangent.cuda())
    out = gated_lowrank(*case[:5])
    assert "GatedLowRankFunction" in out.grad_fn.name()
    assert_matches(run(gated_lowrank, *case), run(gated_lowrank_reference, *case), dtype)
