"""`pip install flowmodel` with no extras, then `flowmodel demo`, in a fresh virtual environment.

The wheel is built from this checkout; the fresh environment installs it with
its dependencies resolved by pip (from pip's cache and the configured index,
or from a wheelhouse: set ``FLOWMODEL_PIP_ARGS="--no-index --find-links
DIR"`` for an offline CI runner). Without the ``fast`` extra there is no
nutpie, so the demo's ``backend = "auto"`` must fall back to PyMC's sampler
and say so. The demo is shrunk (few draws) to keep the test to minutes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

#: pip output meaning no package index (or wheelhouse) could provide the dependencies.
OFFLINE = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


def _run(args: list[str], *, cwd: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["FLOWMODEL_PROGRESS"] = "0"
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_plain_install_runs_the_demo(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    # --no-deps builds only flowmodel's own wheel here; the install below resolves every dependency
    built = _run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(wheels)],
        cwd=tmp_path,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(wheels.glob("flowmodel-*.whl"))

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    made = _run([base, "-m", "venv", str(venv)], cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    extra = shlex.split(os.environ.get("FLOWMODEL_PIP_ARGS", ""))
    # --no-compile: byte-compiling every dependency took half the install (91 s -> 44 s); the
    # modules the demo imports are compiled when imported
    installed = _run(
        [str(python), "-m", "pip", "install", "-q", "--no-compile", *extra, str(wheel)],
        cwd=tmp_path,
        timeout=900,
    )
    if installed.returncode != 0 and any(s in installed.stderr for s in OFFLINE):
        pytest.skip(
            "no package index or wheelhouse could provide the dependencies (offline); "
            "set FLOWMODEL_PIP_ARGS='--no-index --find-links DIR'"
        )
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = _run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('nutpie') is None)"],
        cwd=tmp_path,
        timeout=120,
    )
    assert probe.stdout.strip() == "True", "the plain install must not bring nutpie"

    out = tmp_path / "demo"
    demo = _run(
        [
            str(venv / "bin" / "flowmodel"),
            "demo",
            "--out",
            str(out),
            "--set",
            "model.draws=60",
            "--set",
            "model.tune=60",
            "--set",
            "model.chains=2",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    for name in ("report.html", "flows.nc", "flows.csv", "totals.nc", "totals.csv"):
        assert (out / name).exists(), name
    assert "PyMC's NUTS" in demo.stdout  # the note: auto fell back, and how to go faster
    assert "flowmodel[fast]" in demo.stdout
    assert "nutpie is not installed" in demo.stderr  # said before the long fit starts
    assert "estimated moves over 2019-2024" in demo.stdout
