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
