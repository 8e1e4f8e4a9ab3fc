"""PEFT's own custom-model test-suite (fetched from PEFT's sdist at a pinned version, checked by its sha256) passes
with SpaRTA rows added."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.peft_suite.fetch import SDIST_SHA256, check_sdist, suite_dir


def test_peft_custom_model_suite_passes_for_sparta(tmp_path):
    try:
        root = suite_dir()
    except subprocess.CalledProcessError as error:
        pytest.fail(f"could not download PEFT's source distribution: {error.stderr.decode()[-1000:]}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH"), str(root / "stubs")]))
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "pytest", "tests/test_custom_models.py", "-k", "SpaRTA", "-q"]
    command += ["-p", "no:cacheprovider", "--rootdir", str(root), "-o", "addopts=", "-W", "ignore"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 100, summary


def test_a_sdist_other_than_the_pinned_one_is_refused(tmp_path):
    sdist = tmp_path / "peft-0.21.2.tar.gz"
    sdist.write_bytes(b"not PEFT's source distribution")
    with pytest.raises(RuntimeError, match=f"pinned to peft 0.21.2 with sha256 {SDIST_SHA256}"):
        check_sdist(sdist)
