"""Shared fixtures: the real-data folder and small simulated datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Where the shared real data live: $FLOWMODEL_DATA or ../shared/data."""
    return Path(os.environ.get("FLOWMODEL_DATA", REPO.parent / "shared" / "data"))


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
