"""The layers in pyproject.toml hold, and lint-imports fails on a copy of the tree that breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "app", tree / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), "lint-imports is a dev dependency: uv sync --extra dev"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


def _add_import(tree: Path, module: str, line: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate wrong import\n")


def test_the_tree_keeps_its_layers(tmp_path: Path) -> None:
    done = _lint(_copy(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "named"),
    [
        (
            "app/isolation/sandbox.py",
            "import app.pipeline.checks",
            "app.isolation.sandbox -> app.pipeline.checks",
        ),
        ("app/agent/model_proxy.py", "import app.web.health", "app.agent.model_proxy -> app.web.health"),
        ("app/models.py", "import app.intake.adf", "app.models -> app.intake.adf"),
        ("app/intake/adf.py", "import app.integrations.github", "app.intake.adf -> app.integrations.github"),
        (
            "app/agent/guard/words.py",
            "import app.agent.guard.policy",
            "app.agent.guard.words -> app.agent.guard.policy",
        ),
    ],
    ids=[
        "isolation-imports-the-pipeline",
        "agent-imports-the-web",
        "ground-imports-intake",
        "undeclared-sideways",
        "guard-rule-imports-its-entry-point",
    ],
)
def test_a_wrong_import_fails_lint_imports(tmp_path: Path, module: str, line: str, named: str) -> None:
    tree = _copy(tmp_path)
    _add_import(tree, module, line)
    done = _lint(tree)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout and named in done.stdout, done.stdout
