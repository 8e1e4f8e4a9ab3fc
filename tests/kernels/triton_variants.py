"""The compile variants of the package's Triton kernels, derived from its launchers rather than listed by hand.

`record_variants` replaces every ``@triton.jit`` kernel of ``peft_sparta/kernels/*_triton.py`` by a recorder and runs
the public ops (`gated_lowrank`, `orthogonality_penalty`, forward and backward, backend "triton") over a grid of dtypes,
autocast, flags and sizes on CPU tensors. Each launch the launchers make is bound by Triton's own launch binder for a
CUDA target, which gives what a real launch would compile: the signature (pointer dtypes; integers specialised to
``constexpr`` 1 or to ``i32``/``i64``), the constexpr values (flags and block sizes) and the divisibility attributes.
So a new kernel, flag, block-size rule or dtype path is picked up without editing a list here.

`compile_variants` compiles variants ahead of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`` in a process pool, each up to a chosen stage (TTIR, TTGIR, LLVM IR, PTX or cubin, the last through ptxas), and
returns the compiler's message for each failure. This needs Triton's NVIDIA backend and its bundled ptxas, not a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from peft_sparta import kernels


# (dtype of the inputs and parameters, autocast dtype or None): under autocast the GEMM outputs (h, dz) are half
# precision while x and the gates stay fp32, which gives launches with mixed pointer dtypes.
DTYPE_MODES = (
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float16, None),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
)
# 1 and one past every power of two up to 256: a block size picked as min/max(next_power_of_2(size), bound) reaches
# each of its values on one of these; `record_variants` checks that every varying block size stays below the largest.
SIZES = (1, 2, 3, 5, 9, 17, 33, 65, 129, 257)
# Per-block shared memory a kernel may use (the opt-in maximum, bytes): A100, L4/RTX 4090, H100.
SHARED_MEMORY_LIMIT = {80: 166912, 89: 101376, 90: 232448}


def kernel_modules() -> list:
    """The modules peft_sparta/kernels/*_triton.py, imported."""
    folder = Path(kernels.__file__).parent
    return [importlib.import_module(f"{kernels.__name__}.{path.stem}") for path in sorted(folder.glob("*_triton.py"))]


def jit_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function of those modules, by "module:function"."""
    from triton.runtime.jit import JITFunction

    return {
        f"{module.__name__}:{name}": value
        for module in kernel_modules()
        for name, value in vars(module).items()
        if isinstance(value, JITFunction)
    }


@dataclass(frozen=True)
class Variant:
    """One compilation of one kernel: what `triton.compile` needs, in picklable form."""

    kernel: str  # "module:function"
    signature: tuple  # ((parameter, type), ...), type "*bf16", "i32", "constexpr", ...
    constexprs: tuple  # ((path, value), ...)
    attrs: tuple  # ((path, ((attribute, value), ...)), ...)
    options: tuple = ()  # launch options (num_warps, ...), as given to the launch

    def features(self) -> set[tuple]:
        """What this variant exercises, for choosing a subset that covers every feature at least once."""
        names = [name for name, _ in self.signature]
        found = {(self.kernel, "signature", name, kind) for name, kind in self.signature}
        found |= {(self.kernel, "constexpr", names[path[0]], value) for path, value in self.constexprs}
        found |= {(self.kernel, "attrs", names[path[0]], attr) for path, attr in self.attrs}
        return found

    def describe(self) -> str:
        names = [name for name, _ in self.signature]
        constants = ", ".join(f"{names[path[0]]}={value}" for path, value in self.constexprs)
        arguments = ", ".join(f"{name}: {kind}" for name, kind in self.signature if kind != "constexpr")
        return f"{self.kernel.rsplit(':', 1)[1]}({arguments}; {constants})"


@dataclass
class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the variant and launches nothing."""

    name: str
    fn: object
    backend: object
    found: dict
    binder: object = field(init=False)

    def __post_init__(self):
        from triton.runtime.jit import create_function_from_signature

        self.binder = create_function_from_signature(self.fn.signature, self.fn.params, self.backend)

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        # What JITFunction.run does before compiling, for the target of self.backend.
        bound, specialization, options = self.binder(*args, **kwargs)
        _, signature, constexprs, attrs = self.fn._pack_args(self.backend, kwargs, bound, specialization, options)
        param_names = {param.name for param in self.fn.params}
        variant = Variant(
            kernel=self.name,
            signature=tuple(signature.items()),
            constexprs=tuple(sorted(constexprs.items())),
            attrs=tuple(sorted((path, tuple(map(tuple, value))) for path, value in attrs.items())),
            options=tuple(sorted((key, value) for key, value in kwargs.items() if key not in param_names)),
        )
        self.found.setdefault(variant, None)


def _gated_launches(dtype, autocast, size, gate_mode, dropout_p, rows=37, n_blocks=2, in_features=8):
    """One training step of `gated_lowrank` (forward, backward to x, A, B and, if they train, the gates); the largest
    block has rank ``size``."""
    ranks = [size] * n_blocks
    x = torch.randn(rows, in_features, dtype=dtype, requires_grad=True)
    a_blocks = [torch.randn(rank, in_features, dtype=dtype, requires_grad=True) for rank in ranks]
    b_blocks = [torch.randn(6, rank, dtype=dtype, requires_grad=True) for rank in ranks]
    gates = None if gate_mode == "none" else torch.rand(rows, n_blocks, dtype=dtype)
    if gate_mode == "trained":
        gates.requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = kernels.gated_lowrank(x, a_blocks, b_blocks, [1.0] * n_blocks, gates, dropout_p, True, "triton")
        out.float().sum().backward()


def _orthogonality_launches(dtype, autocast, rows, others, norm, trained, in_features=8):
    """`orthogonality_penalty` of a (rows, in) block against a trained (others, in) and a frozen (3, in) one;
    ``trained``: "none" (no gradient: no stored dL/dO), "left" or "both"."""
    left = torch.randn(rows, in_features, dtype=dtype, requires_grad=trained != "none")
    right = [torch.randn(others, in_features, dtype=dtype, requires_grad=trained == "both")]
    right.append(torch.randn(3, in_features, dtype=dtype))
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = kernels.orthogonality_penalty(left, right, norm, "triton")
        if trained != "none":
            loss.backward()


def _drive_public_ops() -> None:
    """The grid of calls: every dtype mode x flag x size, plus the integer specialisations (one row, one block, rows
    and features divisible by 16)."""
    for (dtype, autocast), size, gate_mode, dropout_p in itertools.product(
        DTYPE_MODES, SIZES, ("none", "frozen", "trained"), (0.0, 0.1)
    ):
        _gated_launches(dtype, autocast, size, gate_mode, dropout_p)
    for (dtype, autocast), rows, n_blocks in itertools.product(DTYPE_MODES, (1, 64), (1, 16)):
        _gated_launches(dtype, autocast, 4, "trained", 0.1, rows=rows, n_blocks=n_blocks, in_features=16)
    for (dtype, autocast), rows, others, norm, trained in itertools.product(
        DTYPE_MODES, SIZES[:8], SIZES[:8], ("fro", "l1"), ("none", "left", "both")
    ):
        _orthogonality_launches(dtype, autocast, rows, others, norm, trained)
    for dtype, autocast in DTYPE_MODES:
        _orthogonality_launches(dtype, autocast, 32, 64, "fro", "both", in_features=1)
        _orthogonality_launches(dtype, autocast, 32, 64, "l1", "both", in_features=64)


def record_variants(drive=_drive_public_ops, cc: int = 80) -> list[Variant]:
    """The distinct variants that ``drive()`` launches, as bound for a CUDA device of compute capability ``cc``.

    The ops run with backend "triton" on CPU tensors (as under TRITON_INTERPRET=1, which the backend check allows),
    every kernel replaced by a recorder that launches nothing: the values are meaningless, only the launch arguments
    count.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", cc, 32))
    found: dict[Variant, None] = {}
    compiled_kernels = jit_kernels()  # imported before the interpreter knob is set, which decoration reads
    with contextlib.ExitStack() as stack:
        # setting the knob also sets TRITON_INTERPRET=1 in os.environ: restored with it, after it
        stack.enter_context(mock.patch.dict(os.environ))
        stack.enter_context(mock.patch.object(triton.knobs.runtime, "interpret", True))
        for name, fn in compiled_kernels.items():
            module = importlib.import_module(name.split(":")[0])
            recorder = _Recorder(name, fn, backend, found)
            stack.enter_context(mock.patch.object(module, name.split(":")[1], recorder))
        # the recorders write nothing: zeroed buffers keep the torch ops that read them fast (garbage is slow)
        stack.enter_context(mock.patch.object(torch, "empty", torch.zeros))
        stack.enter_context(mock.patch.object(torch, "empty_like", torch.zeros_like))
        drive()
    return list(found)


def check_block_sizes_saturate(variants: list[Variant]) -> list[str]:
    """Constexprs named BLOCK* whose value varies over the recorded launches and reaches the largest probed size: the
    choice may go beyond what SIZES probes, so SIZES should be extended (an empty list when all is well)."""
    values: dict[tuple[str, str], set] = {}
    for variant in variants:
        names = [name for name, _ in variant.signature]
        for path, value in variant.constexprs:
            if names[path[0]].startswith("BLOCK"):
                values.setdefault((variant.kernel, names[path[0]]), set()).add(value)
    return [
        f"{kernel} {name} takes {sorted(seen)}"
        for (kernel, name), seen in values.items()
        if len(seen) > 1 and max(seen) >= max(SIZES)
    ]


def covering_subset(variants: list[Variant]) -> list[Variant]:
    """A few variants that together exercise every feature (each parameter's type, each constexpr value, each
    attribute) of every kernel at least once: greedy set cover, deterministic."""
    remaining = set().union(*(variant.features() for variant in variants))
    chosen = []
    while remaining:
        best = max(variants, key=lambda variant: len(variant.features() & remaining))
        chosen.append(best)
        remaining -= best.features()
    return chosen


STAGES = ("ttir", "ttgir", "llir", "ptx", "cubin")


class _StageReached(Exception):
    """Raised by the stage hook in place of the first stage after the requested last one."""


def _compile(variant: Variant, cc: int, last_stage: str) -> str | None:
    """Compile one variant for sm_<cc> up to ``last_stage`` (one of STAGES); None on success, else the compiler's
    message."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = variant.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    source = ASTSource(
        fn=fn,
        signature=dict(variant.signature),
        constexprs=dict(variant.constexprs),
        attrs={path: [list(attr) for attr in value] for path, value in variant.attrs},
    )
    hook = None if last_stage == STAGES[-1] else functools.partial(_stop_after, last_stage)
    try:
        with mock.patch.object(triton.knobs.runtime, "add_stages_inspection_hook", hook):
            compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=dict(variant.options))
    except _StageReached:
        return None
    except Exception as error:  # the compiler's own error, reported as the test's failure
        return f"{type(error).__name__}: {error}"
    shared = compiled.metadata.shared
    if shared > SHARED_MEMORY_LIMIT[cc]:
        return f"needs {shared} bytes of shared memory per block, more than sm_{cc}'s {SHARED_MEMORY_LIMIT[cc]}"
    return None


def _stop_after(last_stage, backend=None, stages=None, options=None, language=None, capability=None):
    """Triton's stage hook: the stage after ``last_stage`` raises _StageReached instead of running. Called without
    stages, Triton asks for the hook's cache key."""
    if stages is None:
        return f"stop-after-{last_stage}", last_stage
    names = list(stages)
    if last_stage in names[:-1]:
        stages[names[names.index(last_stage) + 1]] = _reached
    return None


def _reached(src, metadata):
    raise _StageReached


def _compile_job(job):
    return _compile(*job)


def compile_variants(jobs: list[tuple[Variant, int, str]], workers: int | None = None) -> list[str]:
    """Compile ``(variant, cc, last_stage)`` jobs in a process pool; the failures, each with the compiler's message."""
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        results = list(pool.map(_compile_job, jobs, chunksize=1))
    return [
        f"{variant.describe()} for sm_{cc} (up to {stage}):\n{message}"
        for (variant, cc, stage), message in zip(jobs, results)
        if message is not None
    ]
