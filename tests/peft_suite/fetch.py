"""Fetch PEFT's custom-model test-suite from the source distribution of the installed peft and add SpaRTA's rows.

The suite is not copied into this repository: `suite_dir()` downloads the sdist with pip (the package registry is
the one network access the test machines have), extracts tests/test_custom_models.py and the helpers it imports into
a cache folder, and patches the row lists to append the rows of sparta_rows.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import peft


SUITE_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
ROW_IMPORT = (
    "from .sparta_rows import SPARTA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, SPARTA_TEST_CASES, skip_merging_for\n"
    "_skip_if_merging_not_supported = skip_merging_for(_skip_if_merging_not_supported)\n"
)
# (anchor line start, code inserted before the first line that starts with it)
PATCHES = (
    ("ALL_PEFT_CONFIG_CLASSES = ", "TEST_CASES += SPARTA_TEST_CASES\n"),
    (
        "def _skip_tests_with_multiple_adapters_with_target_parameters(",
        "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES += SPARTA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES\n\n\n",
    ),
)
# testing_common imports diffusers at module level for its Stable Diffusion tests, which the custom-model suite
# does not run; where diffusers is not installed a stand-in module satisfies that import.
DIFFUSERS_STUB = "class StableDiffusionPipeline:\n    pass\n"


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_SPARTA_CACHE", Path.home() / ".cache" / "peft-sparta"))


def suite_dir() -> Path:
    """Folder holding the patched suite as package ``tests`` (with a stubs folder for missing optional imports)."""
    digest = hashlib.sha256(repr((ROW_IMPORT, PATCHES)).encode()).hexdigest()[:8]  # patches changed: extract again
    root = cache_root() / f"peft-{peft.__version__}-custom-models-{digest}"
    package = root / "tests"
    if not (package / "test_custom_models.py").exists():
        _extract(package)
    (package / "sparta_rows.py").write_text((Path(__file__).parent / "sparta_rows.py").read_text())
    return root


def _extract(package: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", f"peft=={peft.__version__}", "--no-binary", ":all:"]
        command += ["--no-deps", "-d", download, "-q"]
        subprocess.run(command, check=True, capture_output=True)
        (sdist,) = Path(download).glob("peft-*.tar.gz")
        with tarfile.open(sdist) as archive:
            sources = {
                name: archive.extractfile(f"peft-{peft.__version__}/tests/{name}").read().decode()
                for name in SUITE_FILES
            }
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for name, source in sources.items():
        (package / name).write_text(_patch(source) if name == "test_custom_models.py" else source)
    stubs = package.parent / "stubs" / "diffusers"
    stubs.mkdir(parents=True, exist_ok=True)
    (stubs / "__init__.py").write_text(DIFFUSERS_STUB)


def _patch(source: str) -> str:
    lines = source.splitlines(keepends=True)
    testing_utils_import = _single_line(lines, "from .testing_utils import")
    lines.insert(testing_utils_import + 1, ROW_IMPORT)
    for anchor, code in PATCHES:
        lines.insert(_single_line(lines, anchor), code)
    return "".join(lines)


def _single_line(lines: list[str], start: str) -> int:
    matches = [index for index, line in enumerate(lines) if line.startswith(start)]
    if len(matches) != 1:
        raise RuntimeError(
            f"PEFT {peft.__version__}'s test_custom_models.py has {len(matches)} lines starting with {start!r}; the "
            "suite's layout changed, update tests/peft_suite/fetch.py."
        )
    return matches[0]
