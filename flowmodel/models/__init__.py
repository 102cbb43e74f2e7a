"""Bayesian flow models in PyMC: one latent field, observation models per source, one engine.

Presets: :class:`GravityModel`, :class:`RadiationModel` (one source each) and
:class:`FusionModel` (several sources observing one latent field); their parts
live in :mod:`flowmodel.models.latent`, :mod:`flowmodel.models.observations`,
:mod:`flowmodel.models.likelihoods` and :mod:`flowmodel.models.inference`.
"""

from flowmodel.models.base import BACKENDS, Cells, FlowModel, ObservedPairs, compare, load_model
from flowmodel.models.fusion import FusionModel
from flowmodel.models.gravity import GravityModel
from flowmodel.models.radiation import RadiationModel

__all__ = [
    "BACKENDS",
    "Cells",
    "FlowModel",
    "FusionModel",
    "GravityModel",
    "ObservedPairs",
    "RadiationModel",
    "compare",
    "load_model",
]
