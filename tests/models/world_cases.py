"""The worked example's world settings and model, shared by the slow file-world tests.

``tests/models/test_fusion_world.py`` (the default world) and
``tests/models/test_fusion_sparse_cdr.py`` (the same world with sparse CDR) fit this
model; they are two files so that ``make test``'s workers (``--dist loadfile``) can
run them side by side.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flowmodel.models.fusion import FusionModel
from flowmodel.models.gravity import GravityModel

#: ``FLOWMODEL_WORLD_SEED=<n>`` reruns the file-world tests on another world
SEED = int(os.environ.get("FLOWMODEL_WORLD_SEED", "0"))
SOURCES = ("census", "census_abroad", "cdr")


def example_model(sources: tuple[str, ...] = SOURCES, **options: Any) -> FusionModel:
    """The worked example's model (scripts/fusion_example.py, docs/fusion.md, the demo's).

    ``options``: further FusionModel options (the opt-in ones).
    """
    return FusionModel(
        **options,
        latent=GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population", "night_lights_per_capita"],
        ),
        sources=list(sources),
        # the simulated CDR is a panel: subscribers per resident (~4e-4) shape the shares,
        # the level is the default's (the covariate does not read as a share)
        market_share_covariate="cdr_subscribers_per_resident",
        priors={"period_scale": {"dist": "LogNormal", "mu": float(np.log(1 / 60)), "sigma": 1.5}},
    )
