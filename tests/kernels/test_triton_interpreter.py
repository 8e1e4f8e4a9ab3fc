"""Runs the `triton`-marked kernel tests in a child process started with TRITON_INTERPRET=1 (see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import interpreter_active


def test_triton_kernels_in_interpreter():
    if interpreter_active():
        pytest.skip("this process already interprets the Triton kernels: the triton-marked tests ran here")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__).parent),
        "-m",
        "triton",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "needs TRITON_INTERPRET" not in result.stdout, result.stdout[-3000:]
