"""Shared fixtures: the real-data folder and small simulated datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Where the shared real data live: $FLOWMODEL_DATA or ../shared/data."""
    return Path(os.environ.get("FLOWMODEL_DATA", REPO.parent / "shared" / "data"))


def load_script(name: str) -> Any:
    """Import ``scripts/<name>.py`` as a module (the example drivers the docs quote)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_data(*parts: str) -> Path:
    """Return a shared-data path, skipping the test when absent (failing under CI=true)."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        msg = f"shared data not found at {path} (set FLOWMODEL_DATA to the shared data folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{msg}; under CI=true the data must be present")
        pytest.skip(msg)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def _mock_run_inference(model, backend, kwargs, *, random_seed, progressbar):
    """Stand-in for sampling in plumbing tests (PyMC's ``mock_sample`` pattern).

    The posterior mode (MAP) repeated as every draw of 2 chains x 20 draws: outputs,
    reports and the CLI run on finite, plausible parameters in seconds. Statistical
    properties are tested elsewhere with real fits (marked slow).
    """
    import xarray as xr

    from flowmodel.models import inference

    point = inference._fit_map(model, random_seed=random_seed, progressbar=False)
    post = point["posterior"].to_dataset()
    chains, draws = 2, 20
    post = xr.concat([post.isel(draw=0, drop=True)] * draws, dim="draw")
    post = xr.concat([post.isel(chain=0, drop=True)] * chains, dim="chain")
    post = post.assign_coords(chain=range(chains), draw=range(draws)).transpose(
        "chain", "draw", ...
    )
    out = xr.DataTree()
    out["posterior"] = xr.DataTree(post)
    return out


@pytest.fixture
def mock_sampling(monkeypatch):
    """Replace every inference backend by a fast stand-in (see :func:`_mock_run_inference`)."""
    monkeypatch.setattr("flowmodel.models.base.run_inference", _mock_run_inference)


#: Seconds each of the heaviest test files took (``pytest --durations=0``, 2 workers,
#: 2026-12-06; docs/performance.md). Only their order matters: ``make test`` runs files
#: on 2 workers (``--dist loadfile --no-loadscope-reorder``) in collection order, and
#: starting the longest first keeps one worker from running a 2-minute file alone at
#: the end (longest-processing-time-first scheduling).
HEAVY_FILES: dict[str, float] = {
    "tests/models/test_fusion_world.py": 231,
    "tests/models/test_fusion_sparse_cdr.py": 223,
    "tests/models/test_fusion.py": 177,
    "tests/models/test_periods.py": 123,
    "tests/models/test_sparse_fusion.py": 113,
    "tests/test_plain_install.py": 111,
    "tests/test_hpc_real.py": 90,
    "tests/test_eu_reports.py": 88,
    "tests/models/test_inference.py": 70,
    "tests/test_east_africa_run.py": 65,
    "tests/models/test_market_share_spatial.py": 55,
    "tests/models/test_spurious_background.py": 47,
    "tests/test_cli.py": 45,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the heaviest files first (a stable sort: tests keep their order within a file)."""

    def weight(item: pytest.Item) -> float:
        path = Path(str(item.path)).resolve()
        rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
        return -HEAVY_FILES.get(rel, 0.0)

    items.sort(key=weight)
