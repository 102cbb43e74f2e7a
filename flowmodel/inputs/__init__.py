"""What users bring: admin polygons, rasters, census and CDR (never imports PyMC)."""

from __future__ import annotations

from flowmodel.inputs.rasters import zonal_covariates, zonal_statistics
from flowmodel.inputs.units import concat_units, load_units

__all__ = ["concat_units", "load_units", "zonal_covariates", "zonal_statistics"]
