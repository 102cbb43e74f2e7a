"""Bayesian flow models in PyMC (DESIGN §4): gravity, radiation, fusion and their comparison."""

from typing import Any

from flowmodel.models.base import BACKENDS, FlowModel, ObservedPairs, compare, load_model
from flowmodel.models.gravity import GravityModel
from flowmodel.models.radiation import RadiationModel

__all__ = [
    "BACKENDS",
    "FlowModel",
    "FusionModel",
    "GravityModel",
    "ObservedPairs",
    "RadiationModel",
    "compare",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name == "FusionModel":  # imported lazily: fusion builds on the classes above
        from flowmodel.models.fusion import FusionModel

        return FusionModel
    raise AttributeError(f"module 'flowmodel.models' has no attribute {name!r}")
