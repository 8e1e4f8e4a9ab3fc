#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one call of at most 8 minutes on one GPU, from the repository root:
#   1. the CUDA tests: the Triton kernels against the torch path (fp32, bf16, fp16) and an adapter moved to CUDA;
#   2. benchmarks.bench_train_step on CUDA in bf16 -> benchmarks/results/train-step-smollm-gpu.json (+ .md);
#   3. benchmarks.bench_generate on CUDA in bf16 -> benchmarks/results/generate-smollm-gpu.json (+ .md).
# The result files have the CPU files' format (step_s per "shape/method/tasks", the machine naming the GPU).
#
#   benchmarks/gpu_check.sh            # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run  # anywhere: checks every command and argument, times nothing
#
# The dry run collects the CUDA tests (each must exist) and parses every benchmark's arguments with the benchmark's
# own parser, without running it. PYTHON names the interpreter (default: python).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--dry-run]" >&2
    exit 2
fi
PYTHON=${PYTHON:-python}
RESULTS=benchmarks/results

CUDA_TESTS=(
    "tests/kernels/test_gated_lowrank.py::test_cuda_auto_backend_matches_reference"
    "tests/kernels/test_orthogonality.py::test_cuda_auto_backend_matches_reference"
    "tests/test_hub_and_loading.py::test_adapter_moves_between_cpu_and_cuda"
)
TRAIN_STEP=(benchmarks.bench_train_step --device cuda --shape smollm --tasks 1 4 16 --repeats 5
            --output "$RESULTS/train-step-smollm-gpu.json")
GENERATE=(benchmarks.bench_generate --device cuda --tasks 1 4 16 64 --batch 1 8 --rounds 5
          --output "$RESULTS/generate-smollm-gpu.json")

# Parse a benchmark's arguments with its own argparse parser and stop before it runs.
CHECK_ARGUMENTS='
import argparse, runpy, sys
module, arguments = sys.argv[1], sys.argv[2:]
parse = argparse.ArgumentParser.parse_args
def check(parser, args=None, namespace=None):
    parse(parser, arguments)
    print(f"arguments of {module} parse")
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = check
sys.argv = [module, *arguments]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'

step() {  # step SECONDS COMMAND...: echo it, and run it under a time limit unless this is a dry run
    local limit=$1
    shift
    echo "+ $*"
    if [[ $DRY_RUN == 0 ]]; then
        timeout "$limit" "$@"
    fi
}

if [[ $DRY_RUN == 1 ]]; then
    "$PYTHON" -m pytest --collect-only -q "${CUDA_TESTS[@]}" > /dev/null
    echo "the ${#CUDA_TESTS[@]} CUDA tests exist"
    "$PYTHON" -c "$CHECK_ARGUMENTS" "${TRAIN_STEP[@]}"
    "$PYTHON" -c "$CHECK_ARGUMENTS" "${GENERATE[@]}"
else
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with --dry-run")'
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
step 150 "$PYTHON" -m pytest -q -rs "${CUDA_TESTS[@]}"
step 120 "$PYTHON" -m "${TRAIN_STEP[@]}"
step 210 "$PYTHON" -m "${GENERATE[@]}"
