"""The package layout: the Jenkins side (ct.pipeline and the shared top-level ct modules) runs
on the host's plain python3, so it must import without torch and never reach into ct.trainer. The
serving side (ct.serving, and ct.images which the trainer's increments share with it) runs in the
serving image: numpy, Pillow and ONNX Runtime, never torch, and nothing of the other two sides."""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import ct
import ct.pipeline
import ct.serving
import ct.trainer
from tests.conftest import REPO

IMAGES = ["ct.images"]  # shared by the trainer and the serving image: numpy and Pillow
SHARED = sorted(f"ct.{m.name}" for m in pkgutil.iter_modules(ct.__path__)
                if not m.ispkg and f"ct.{m.name}" not in IMAGES)
HOST_SIDE = SHARED + sorted(f"ct.pipeline.{m.name}" for m in pkgutil.iter_modules(
    ct.pipeline.__path__))
TRAINER = sorted(f"ct.trainer.{m.name}" for m in pkgutil.iter_modules(ct.trainer.__path__))
SERVING = IMAGES + sorted(f"ct.serving.{m.name}" for m in pkgutil.iter_modules(
    ct.serving.__path__))

# Imports the given modules with the packages named in argv[2] made unimportable (torch and numpy
# for the host side, as on a Jenkins host without them; torch for the serving image), then reports
# the modules those imports loaded from outside the standard library.
PROBE = """
import importlib, json, sys

class NoContainerPackages:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in json.loads(sys.argv[2]):
            raise ImportError(f"{name} is not installed on the host (test_layout)")
        return None

sys.meta_path.insert(0, NoContainerPackages())
before = set(sys.modules)
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
loaded = sorted(n for n in set(sys.modules) - before
                if n.split(".")[0] not in sys.stdlib_module_names)
print(json.dumps(loaded))
"""


def module_path(name: str) -> Path:
    return REPO.joinpath(*name.split(".")).with_suffix(".py")


def imported_names(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names, submodules included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_layout_is_what_the_tests_expect() -> None:
    assert {"ct.atomic", "ct.cpu_budget", "ct.data_version", "ct.workspace"} <= set(SHARED)
    assert {"ct.images", "ct.serving.app", "ct.serving.predict"} <= set(SERVING)
    assert {"ct.pipeline.gate", "ct.pipeline.notify"} <= set(HOST_SIDE)
    assert {"ct.trainer.run", "ct.trainer.tune", "ct.trainer.engine"} <= set(TRAINER)


def imports_without(modules: list[str], missing: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(modules), json.dumps(missing)],
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_host_side_modules_import_without_torch() -> None:
    loaded = imports_without(HOST_SIDE, ["torch", "numpy"])
    outside = [n for n in loaded if n.split(".")[0] != "ct"]
    assert outside == [], "host-side modules may use the standard library only"
    assert not [n for n in loaded if n.startswith("ct.trainer")]


def test_the_serving_side_imports_without_torch_and_nothing_of_the_other_sides() -> None:
    loaded = imports_without(SERVING, ["torch"])
    assert "numpy" in loaded and "PIL" in loaded
    assert not [n for n in loaded if n.startswith(("ct.trainer", "ct.pipeline"))]


def test_no_host_side_module_imports_the_trainer() -> None:
    for name in HOST_SIDE:
        names = imported_names(module_path(name))
        reaching = sorted(n for n in names if n == "ct.trainer" or n.startswith("ct.trainer."))
        assert reaching == [], f"{name} imports {reaching}"


def test_package_docstrings_list_what_is_there() -> None:
    doc = ct.__doc__ or ""
    listed = {word.strip("`:") for word in doc.split() if word.startswith("`ct.")}
    present = {f"ct.{m.name}" for m in pkgutil.iter_modules(ct.__path__)}
    assert listed == present
    for package, modules in ((ct.trainer, TRAINER), (ct.pipeline, HOST_SIDE[len(SHARED):]),
                             (ct.serving, SERVING[len(IMAGES):])):
        for name in modules:
            assert f"`{name.rsplit('.', 1)[1]}`" in (package.__doc__ or ""), name


def test_train_py_is_the_command_line_and_no_module_is_a_hub():
    """train.py parses flags and dispatches; every module of ct/ stays small enough to read in
    one sitting (split along a seam when one grows past the limit)."""
    assert len((REPO / "train.py").read_text().splitlines()) <= 200
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines())
             for path in sorted((REPO / "ct").rglob("*.py"))}
    assert len(sizes) > 20
    assert {name: lines for name, lines in sizes.items() if lines > 400} == {}
    tests = {path.name: len(path.read_text().splitlines())
             for path in (REPO / "tests").glob("*.py")}
    assert {name: lines for name, lines in tests.items() if lines > 450} == {}  # one concern each


def test_code_comments_and_test_names_cite_no_issue_numbers():
    """Readers of the code have no issue tracker: comments say why the code is as it is now."""
    issue = re.compile(r"\bissues?[\s_]*#?\s*\d+", re.I)
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.yaml", "*.yml", "*.css",
                            "Makefile", "Dockerfile*", ".ci/run"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    assert "train.py" in files and "scripts/lib.sh" in files
    hits = [f"{name}:{number}: {line.strip()}" for name in files
            for number, line in enumerate((REPO / name).read_text().splitlines(), 1)
            if issue.search(line)]
    assert hits == []
