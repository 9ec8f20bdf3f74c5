"""The layers as import contracts: pyproject.toml's [tool.importlinter], checked with import-linter.

Why: the layout only keeps its meaning if nothing imports upward (the runtime never reaches into the
export side or a front end), the runtime side never imports torch, transformers or a server or Ray,
and no package's modules import each other in a circle. The contracts say that once; these tests run
them (about a second), check that every part of the package sits in a layer, and prove the check is
not vacuous by planting an upward import and a torch import in a copy of the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGE = ROOT / "src" / "q3vl"
NOT_LAYERED = {"__init__", "__main__", "_version", "assets"}  # the public API and the entry shim sit on top


def lint(pythonpath: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on pyproject.toml's contracts, importing q3vl from `pythonpath`."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code, str(PYPROJECT)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(pythonpath)})


def contracts() -> list[dict]:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]


def test_every_contract_is_kept():
    result = lint(PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in contracts():
        assert f"{contract['name']} KEPT" in result.stdout, result.stdout


def test_every_part_of_the_package_is_in_a_layer():
    layered = {name.strip().removeprefix("q3vl.") for c in contracts() if c["type"] == "layers"
               for layer in c["layers"] for name in layer.split("|")}
    parts = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert parts - NOT_LAYERED - layered == set(), "add the new module or package to a layer in pyproject.toml"
    assert layered - parts == set(), "a layer names a part the package does not have"


@pytest.mark.parametrize(("module", "planted", "broken"), [
    ("preprocess/items.py", "import q3vl.serve", "front ends > torch side"),
    ("tasks.py", "import q3vl.export.heads", "front ends > torch side"),
    ("codes/embeddings.py", "import torch", "imports no torch"),
    ("preprocess/fetch.py", "from q3vl.preprocess import media", "no import cycles"),
])
def test_a_planted_violation_breaks_its_contract(tmp_path, module, planted, broken):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "q3vl", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "q3vl" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by tests/test_layers.py\n")
    result = lint(copy)
    assert result.returncode != 0, result.stdout
    assert broken in result.stdout.split("Broken contracts")[-1], result.stdout


def test_every_task_has_its_heads():
    """The task registry names no export code: the export side keys each task's heads by its name."""
    pytest.importorskip("onnx")
    from q3vl.export.heads import HEADS
    from q3vl.tasks import TASKS

    assert set(HEADS) == set(TASKS)


def test_every_task_has_a_runtime_class_and_a_reference():
    """The registry names no runtime or reference class (not even as a string): each layer keys its own."""
    pytest.importorskip("transformers")
    from q3vl.reference import REFERENCES, reference_for
    from q3vl.runtime import model_for
    from q3vl.tasks import TASKS

    assert set(REFERENCES) == set(TASKS)
    for name, task in TASKS.items():
        assert model_for(name).task is task
        assert f"q3vl.{model_for(name).__name__}" == task.class_name
        assert reference_for(name) is REFERENCES[name]
