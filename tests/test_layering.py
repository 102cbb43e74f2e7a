"""The import-linter contracts in pyproject.toml are read and would catch a broken layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(
        REPO / "flowmodel", root / "flowmodel", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, check=False
    )


def _inject(root: Path, module: str, line: str) -> None:
    path = root / module
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest)


def test_the_repository_keeps_every_contract(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # the prepare stage's data builders back in the models: the data side would import PyMC
        (
            "flowmodel/dataset.py",
            "from flowmodel.models.fusion import FusionModel  # noqa",
            "The data side never imports PyMC",
        ),
        ("flowmodel/inputs/census.py", "import pymc  # noqa", "The data side never imports PyMC"),
        ("flowmodel/outputs/report.py", "import pymc  # noqa", "The data side never imports PyMC"),
        (
            "flowmodel/predict.py",
            "from flowmodel.config import RunConfig  # noqa",
            "The core never imports the command line",
        ),
        (
            "flowmodel/models/fusion.py",
            "from flowmodel.simulate import DEFAULT_TRUTH  # noqa",
            "Models consume only the FlowDataset",
        ),
        (
            "flowmodel/atomic.py",
            "import flowmodel.dataset  # noqa",
            "Leaf modules import nothing of flowmodel",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    _inject(root, module, line)
    result = _lint(root)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken
