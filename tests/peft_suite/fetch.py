"""Fetch PEFT's custom-model test-suite from PEFT's source distribution at a pinned version and add SpaRTA's rows.

The suite is not copied into this repository: `suite_dir()` downloads the sdist of peft `PEFT_VERSION` with pip (the
package registry is the one network access the test machines have), checks the file against `SDIST_SHA256` (PyPI's
digest of it), extracts tests/test_custom_models.py and the helpers it imports into a cache folder, and patches the
row lists to append the rows of sparta_rows.py. The suite runs against the installed peft, which pyproject.toml keeps
within the pinned minor version; to move the pin, change `PEFT_VERSION` and `SDIST_SHA256` together.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


#: The peft release whose test-suite runs, and the sha256 of its source distribution on PyPI.
PEFT_VERSION = "0.21.2"
SDIST_SHA256 = "b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e"
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
    root = cache_root() / f"peft-{PEFT_VERSION}-{SDIST_SHA256[:12]}-custom-models-{digest}"
    package = root / "tests"
    if not (package / "test_custom_models.py").exists():
        _extract(package)
    (package / "sparta_rows.py").write_text((Path(__file__).parent / "sparta_rows.py").read_text())
    return root


def _extract(package: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", f"peft=={PEFT_VERSION}", "--no-binary", ":all:"]
        command += ["--no-deps", "-d", download, "-q"]
        subprocess.run(command, check=True, capture_output=True)
        (sdist,) = Path(download).glob("peft-*.tar.gz")
        check_sdist(sdist)
        with tarfile.open(sdist) as archive:
            sources = {
                name: archive.extractfile(f"peft-{PEFT_VERSION}/tests/{name}").read().decode() for name in SUITE_FILES
            }
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for name, source in sources.items():
        (package / name).write_text(_patch(source) if name == "test_custom_models.py" else source)
    stubs = package.parent / "stubs" / "diffusers"
    stubs.mkdir(parents=True, exist_ok=True)
    (stubs / "__init__.py").write_text(DIFFUSERS_STUB)


def check_sdist(path: Path) -> None:
    """Raise unless ``path`` is the pinned sdist, byte for byte (its sha256 is `SDIST_SHA256`)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(
            f"{path.name} has sha256 {digest}, but PEFT's custom-model suite is pinned to peft {PEFT_VERSION} with "
            f"sha256 {SDIST_SHA256} (tests/peft_suite/fetch.py). The download is not PyPI's file for that release: "
            "retry it, or, when moving the pin to another peft, update PEFT_VERSION and SDIST_SHA256 together."
        )


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
            f"PEFT {PEFT_VERSION}'s test_custom_models.py has {len(matches)} lines starting with {start!r}; the "
            "suite's layout changed, update tests/peft_suite/fetch.py."
        )
    return matches[0]
