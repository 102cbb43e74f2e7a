"""flowmodel: subnational and cross-border migration flows, with uncertainty.

The public API is re-exported here lazily (so that ``flowmodel --help`` does not
import PyMC)::

    units = load_units("units.gpkg", id_field="unit_id", country_field="country")
    cov = zonal_covariates(units, {"population": "pop.tif"})
    ds = build_dataset(units, covariates=cov, flows={"census": table})
    model = GravityModel(origin_covariates=["log_population"])
    idata = model.fit(ds)
    flows = model.predict(ds)
"""

from __future__ import annotations

import importlib
from typing import Any

from flowmodel._version import __version__

_LAZY = {
    # data side
    "build_dataset": "flowmodel.dataset",
    "validate_dataset": "flowmodel.dataset",
    "save_dataset": "flowmodel.dataset",
    "load_dataset": "flowmodel.dataset",
    "load_units": "flowmodel.inputs.units",
    "concat_units": "flowmodel.inputs.units",
    "zonal_covariates": "flowmodel.inputs.rasters",
    "simulate_world": "flowmodel.simulate",
    "simulate_flow_dataset": "flowmodel.simulate",
    # model side
    "GravityModel": "flowmodel.models",
    "RadiationModel": "flowmodel.models",
    "FusionModel": "flowmodel.models",
    "FlowModel": "flowmodel.models",
    "compare": "flowmodel.models",
    # evaluation and outputs
    "evaluate": "flowmodel.evaluate",
    "flow_metrics": "flowmodel.evaluate",
    "cross_validate": "flowmodel.evaluate",
    "report": "flowmodel.outputs.report",
}

__all__ = ["__version__", "show_versions", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowmodel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def show_versions() -> str:
    """Print (and return) the versions of flowmodel, Python and the key dependencies.

    Paste the output into bug reports.
    """
    import platform
    from importlib import metadata

    names = [
        "numpy",
        "scipy",
        "pandas",
        "xarray",
        "dask",
        "distributed",
        "pymc",
        "pytensor",
        "pymc-extras",
        "arviz",
        "nutpie",
        "numpyro",
        "jax",
        "rasterio",
        "rioxarray",
        "exactextract",
        "geopandas",
        "pyogrio",
        "shapely",
        "pyproj",
        "h5netcdf",
        "zarr",
        "pyarrow",
        "statsmodels",
        "matplotlib",
        "dask-jobqueue",
        "jinja2",
    ]
    lines = [
        f"flowmodel: {__version__}",
        f"python: {platform.python_version()} ({platform.platform()})",
    ]
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        lines.append(f"{name}: {version}")
    text = "\n".join(lines)
    print(text)
    return text
