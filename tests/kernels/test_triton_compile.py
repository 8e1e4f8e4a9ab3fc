"""Every Triton kernel of the package compiled ahead of time for real GPUs, on a machine without one.

The Triton interpreter (test_triton_interpreter.py) accepts code that the compiler rejects, so the launch variants are
also compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. The variants are derived from
the launchers (triton_variants.record_variants runs `gated_lowrank` and `orthogonality_penalty`, forward and backward,
over fp32 / bf16 / fp16, fp32 under bf16 / fp16 autocast, every flag and sizes that reach every block size, and binds
each launch as Triton would for a CUDA device). Compiled:

- for sm_80 (A100), every variant through Triton's front end and GPU passes (source -> TTIR -> TTGIR): the type,
  shape, constexpr-branch and layout errors the interpreter lets through;
- for sm_80, sm_89 (L4, RTX 4090) and sm_90 (H100), a covering subset (every parameter type, every constexpr value,
  including each block size, each integer specialisation and each divisibility attribute of every kernel at least
  once) all the way to cubin: LLVM, the NVPTX backend and ptxas, then the kernel's shared memory against the
  architecture's per-block limit.

Compiling every variant to cubin for every target would take many times longer, hence the split; the compilations run
in a process pool. It needs Triton's NVIDIA backend (with its bundled ptxas), not a GPU, and fails with the compiler's
message.
"""

from __future__ import annotations

import pytest

from . import triton_variants
from .conftest import interpreter_active


# Triton 3.9 warns on every compilation that its floating-point fusion default will change; a real launch compiles
# with the same default.
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")
TARGETS = (80, 89, 90)
FULL_SWEEP = (80, "ttgir")
SHOWN_FAILURES = 3


@pytest.fixture(scope="module")
def variants():
    triton = pytest.importorskip("triton")
    if interpreter_active():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions, which cannot be compiled")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    return triton_variants.record_variants()


def test_launchers_reach_every_kernel_and_block_size(variants):
    launched = {variant.kernel for variant in variants}
    missing = sorted(set(triton_variants.jit_kernels()) - launched)
    assert not missing, f"kernels no public op launched in the probe grid (extend _drive_public_ops): {missing}"
    unsaturated = triton_variants.check_block_sizes_saturate(variants)
    assert not unsaturated, f"block sizes that may grow beyond the probed sizes (extend SIZES): {unsaturated}"


def test_kernels_compile_for_gpus(variants, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # inherited by the workers: a cold, private cache
    cc, stage = FULL_SWEEP
    jobs = [(variant, cc, stage) for variant in variants]
    jobs += [(variant, target, "cubin") for target in TARGETS for variant in triton_variants.covering_subset(variants)]
    failures = triton_variants.compile_variants(jobs)
    if failures:
        summary = "\n\n".join(failures[:SHOWN_FAILURES])
        pytest.fail(f"{len(failures)} of {len(jobs)} Triton compilations failed; the first ones:\n\n{summary}")
