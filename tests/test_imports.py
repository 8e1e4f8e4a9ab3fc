"""No import cycles: every module imports first in a fresh process, and the import graph has no cycle.

Importing any module of the package runs the package's ``__init__`` first, which imports every module in one fixed
order, so that order would hide a cycle. Here each module of `peft_sparta` and of the repository's `benchmarks` is
imported first in a process of its own in which no module of the repository is loaded yet and the top-level
``__init__`` is bypassed, so that the module's own imports run in their own order. One interpreter loads the
third-party libraries once and forks a child per module, which keeps this fast.

A cycle that an import inside a function closes imports in every order, so the import graph is also read from the
source: every import statement of the package, wherever it is, with each subpackage (`kernels`, `routers`,
`continual`) also taken as one node, so that a module of a subpackage does not import a module that imports that
subpackage.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_sparta import continual


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peft_sparta", "benchmarks")


def module_names(package: str) -> dict[str, Path]:
    """Every module of ``package`` (a subpackage under its own name, for its ``__init__``) and its file."""
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def importable(name: str) -> bool:
    """The Triton kernel modules import only where Triton is installed."""
    if not name.endswith("_triton"):
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


IMPORT_FIRST = """
import os, sys, traceback, types
import huggingface_hub, peft, peft.tuners.lora, safetensors, torch, tqdm, transformers  # third-party, loaded once
from transformers import Trainer
assert not any(name.split(".")[0] in {packages!r} for name in sys.modules), "a module of the repository is loaded"
failed = []
for name in {names!r}:
    pid = os.fork()
    if pid == 0:
        package = name.split(".")[0]  # its top-level __init__ is bypassed: it imports everything in one order
        stub = sys.modules[package] = types.ModuleType(package)
        stub.__path__ = [os.path.join({root!r}, package)]
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("failed:", failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_first_in_a_fresh_process():
    names = [name for package in PACKAGES for name in module_names(package) if importable(name)]
    code = IMPORT_FIRST.format(names=names, packages=PACKAGES, root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


def runtime_nodes(node: ast.AST):
    """Every node under ``node`` that can run: all of them but the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        test = child.test if isinstance(child, ast.If) else None
        if test is not None and "TYPE_CHECKING" in {getattr(test, "id", None), getattr(test, "attr", None)}:
            yield from (grandchild for orelse in child.orelse for grandchild in [orelse, *runtime_nodes(orelse)])
            continue
        yield child
        yield from runtime_nodes(child)


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the file imports, from imports anywhere in it (also inside functions; not those
    under ``if TYPE_CHECKING:``, which never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a closed path of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def import_graph(package: str = "peft_sparta") -> dict[str, set[str]]:
    files = module_names(package)
    return {name: imported_modules(path, name, set(files)) - {name} for name, path in files.items()}


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with every module of a subpackage of the package merged into that subpackage's node."""
    subpackages = {name for name in graph if (ROOT / Path(*name.split("."))).is_dir() and name.count(".") == 1}

    def node(name: str) -> str:
        return next((package for package in subpackages if name.startswith(f"{package}.")), name)

    merged: dict[str, set[str]] = {}
    for name, targets in graph.items():
        merged.setdefault(node(name), set()).update(node(target) for target in targets)
    return {name: targets - {name} for name, targets in merged.items()}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "peft_sparta.kernels.guard" in graph and graph["peft_sparta.registration"] >= {"peft_sparta.hub"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle)
    cycle = find_cycle(subpackage_graph(graph))
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle)


def test_find_cycle_known_answers(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    merged = subpackage_graph({"peft_sparta.routers.recorder": {"peft_sparta.layer"}, "peft_sparta.layer": {
        "peft_sparta.routers"}, "peft_sparta.routers": set()})  # fmt: skip
    assert find_cycle(merged) == ["peft_sparta.layer", "peft_sparta.routers", "peft_sparta.layer"]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nelse:\n    from . import b\n"
    (tmp_path / "m.py").write_text(source)
    assert imported_modules(tmp_path / "m.py", "p.m", {"p.a", "p.b"}) == {"p.b"}


def test_public_continual_names():
    expected = {
        "CausalLMHarness", "ContinualArguments", "ContinualResult", "EmbeddingClassificationHarness", "Harness", "Method",
        "RoutingRecorder", "SpaRTAMethod", "abstain_threshold", "average_accuracy", "best_router_scores", "calibrate_abstain_spread", "calibrate_abstain_threshold", "choose_spread", "backward_transfer", "forward_transfer", "learning_accuracy",
        "train_sequence",
    }  # fmt: skip
    assert set(continual.__all__) == expected
    assert all(hasattr(continual, name) for name in expected)
