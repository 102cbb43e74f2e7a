"""Run configurations: a TOML or YAML file validated by pydantic.

A run config names the inputs (admin units, rasters, census and CDR flow
tables), the model and its backend, what to predict and evaluate, and where the
dask workers come from. :func:`load_config` reads the file, applies
``--set key=value`` overrides, resolves relative paths against the folder of
the config file and validates everything, raising
:class:`~flowmodel.exceptions.ConfigError` with the file, the key, the
expected type and the fix.

Example (TOML)::

    [run]
    name = "kenya"
    out_dir = "runs/kenya"        # relative to this file's folder
    seed = 1

    [units]
    path = "data/kenya_units.gpkg"
    id_field = "unit_id"
    country_field = "country"

    [rasters]
    population = "data/population.tif"
    night_lights = "data/night_lights.tif"

    [flows.census]
    path = "data/census_od.csv"

    [model]
    type = "gravity"
    backend = "laplace"

    [model.options]
    constraint = "none"

Validation goes past keys and types: :func:`config_from_dict` also checks every
``[flows.<source>.options]`` against the signature and value rules of its
reader, ``[model.options]`` against the model constructor (which it calls, so
its own value rules run), ``[model.sample_kwargs]`` against the keywords the
fit backends accept, the names of sources referred to elsewhere, and the run
directory (not a file, writable, never overwriting an input). Unknown keys get
a "did you mean" from :mod:`difflib`.

The module imports only the standard library, pydantic and (lazily) PyYAML at
import, so ``flowmodel --help`` stays fast; the readers and model classes are
imported when a config is validated.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flowmodel.exceptions import ConfigError
from flowmodel.naming import is_cdr_source

__all__ = [
    "CovariatesSection",
    "DaskSection",
    "EvaluateSection",
    "FlowSource",
    "ModelSection",
    "PredictSection",
    "ReportSection",
    "RunConfig",
    "RunSection",
    "UnitsSection",
    "apply_overrides",
    "config_hash",
    "load_config",
    "parse_override",
    "validate_deep",
]

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

#: Upper bound of ``[model] draws``/``tune`` and ``[predict] draws`` (per chain): 100,000
#: draws of 4 chains already hold 400,000 values per parameter.
MAX_DRAWS = 100_000
#: Upper bound of ``[model] chains``.
MAX_CHAINS = 64
#: Seeds are unsigned 32-bit integers (what every backend accepts).
MAX_SEED = 2**32 - 1

#: Names of runs, flow sources, marginals and rasters: they become file, folder and
#: variable names, so no path separators, dots or spaces.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ------------------------------------------------------------------------ paths
def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's folder (validation context)."""
    if not str(value).strip():
        raise ValueError("expected a path, got an empty string")
    value = Path(os.path.expandvars(os.path.expanduser(str(value))))
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(value))


def _check_name(value: str, what: str) -> str:
    """Return ``value`` if it can name files and variables (letters, digits, ``_``, ``-``)."""
    if not NAME_PATTERN.match(value):
        clean = re.sub(r"[^A-Za-z0-9_-]+", "_", value).strip("_-") or "run"
        raise ValueError(
            f"{value!r} is not usable as {what}: use letters, digits, '_' and '-' only "
            f"(no '/', '\\', '..', dots or spaces; it names files and variables), "
            f"e.g. {clean!r}"
        )
    return value


#: A path resolved against the folder of the config file.
RelPath = Annotated[Path, AfterValidator(_resolve)]


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors (typos get caught)."""

    model_config = ConfigDict(extra="forbid", validate_default=False)


# --------------------------------------------------------------------- sections
class RunSection(_Section):
    """``[run]``: name, output folder and seed of a run.

    Attributes
    ----------
    name
        Name of the run (used in reports and the batch summary, and as the
        folder of the default ``out_dir``): letters, digits, ``_`` and ``-``.
    out_dir
        Run directory: config copy, log, per-stage outputs and ``manifest.json``.
        Default ``runs/<name>`` beside the config file. It must not be a file,
        must be writable, and no output may overwrite an input there.
    seed
        Seed of every random draw (fits, cross-validation folds), 0 to 2^32 - 1.
    """

    name: str = "flowmodel-run"
    out_dir: RelPath | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return _check_name(value, "a run name")


def _check_country(country: str | None, *, both: bool) -> None:
    """Check a units file's country: a code or a column (``country_field``), not both; not empty."""
    if country is None:
        return
    if both:
        raise ValueError(
            "give country (one code for every unit) or country_field (a column with the "
            "codes), not both"
        )
    if not country.strip():
        raise ValueError("country is empty: give the country's code, e.g. 'TZA'")


class UnitsFile(_Section):
    """One entry of ``[units] path`` given as a table: a file with its own settings.

    Files from different offices name their fields differently (Kenya's DHS
    provinces ``REG_ID``, Rwanda's districts ``Dist_ID`` in layer ``districts``,
    Tanzania's regions ``Region_Cod`` with no country column), so each entry may
    set what the ``[units]`` section sets for all; unset keys take the section's.
    """

    path: RelPath
    id_field: str | None = None
    country_field: str | None = None
    country: str | None = None
    layer: str | None = None
    name_field: str | None = None
    id_prefix: str = ""
    query: str | None = None

    @model_validator(mode="after")
    def _one_country_source(self) -> UnitsFile:
        _check_country(self.country, both=self.country_field is not None)
        return self


#: A ``[units] path`` list entry: a path, or a table with the file's own settings.
UnitsEntry = Annotated[
    Annotated[RelPath, Tag("units-path")] | Annotated[UnitsFile, Tag("units-table")],
    Discriminator(lambda v: "units-table" if isinstance(v, dict | UnitsFile) else "units-path"),
]


class UnitsSection(_Section):
    """``[units]``: the admin polygons (one file, or one file per country).

    Attributes
    ----------
    path
        GeoPackage / GeoJSON / Shapefile / GeoParquet, or a list of them (their
        units are concatenated, e.g. one file per country of a cross-border run).
        A list entry may be a table ``{path = ..., id_field = ..., country = ...,
        layer = ..., name_field = ..., country_field = ..., id_prefix = ...,
        query = ...}`` (:class:`UnitsFile`) for files whose fields differ; its
        unset keys take this section's. ``id_prefix`` (e.g. ``"TZA-"``) is put before the file's
        ids, for offices that number their units from 1 (ids must be unique
        across files; flow tables name the prefixed ids).
    id_field, country_field
        Columns holding the unit id and the country code.
    country
        The country code of every unit, for files of one country without a
        country column (instead of ``country_field``).
    layer
        Layer name for multi-layer files (GeoPackage).
    name_field
        Optional column with human-readable unit names.
    countries
        Keep only the units of these countries (default: all), e.g. one
        country of a multi-country file.
    fields
        Further fields to keep, e.g. ``["admin1"]``: levels that sources may be
        reported at (``origin_level = "admin1"``).
    query
        Keep only the features for which this pandas query on the file's own
        fields is true, e.g. ``"Region_Cod < '51'"``.
    """

    path: Annotated[
        Annotated[RelPath, Tag("units-one")]
        | Annotated[list[UnitsEntry], Tag("units-list"), Field(min_length=1)],
        Discriminator(lambda v: "units-list" if isinstance(v, list) else "units-one"),
    ]
    id_field: str = "unit_id"
    country_field: str = "country"
    country: str | None = None
    layer: str | None = None
    name_field: str | None = None
    countries: list[str] | None = None
    fields: list[str] = Field(default_factory=list)
    query: str | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _some_path(cls, value: Any) -> Any:
        if value == [] or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"expected a units file or a non-empty list of them, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_country_source(self) -> UnitsSection:
        _check_country(self.country, both="country_field" in self.model_fields_set)
        return self

    def paths(self) -> list[Path]:
        """All unit files, as a list."""
        return [f["path"] for f in self.files()]

    def files(self) -> list[dict[str, Any]]:
        """Return the keyword arguments of :func:`~flowmodel.inputs.units.load_units` per file."""
        items = self.path if isinstance(self.path, list) else [self.path]
        out = []
        for item in items:
            entry = item if isinstance(item, UnitsFile) else UnitsFile(path=item)
            country = entry.country
            if country is None and entry.country_field is None:
                country = self.country
            out.append(
                {
                    "path": entry.path,
                    "id_field": entry.id_field or self.id_field,
                    "country_field": (
                        None if country is not None else entry.country_field or self.country_field
                    ),
                    "country": country,
                    "layer": entry.layer if entry.layer is not None else self.layer,
                    "name_field": entry.name_field or self.name_field,
                    "fields": list(self.fields),
                    "id_prefix": entry.id_prefix,
                    "query": entry.query if entry.query is not None else self.query,
                }
            )
        return out


FlowKind = Literal["census_od", "census_persons", "cdr_events", "cdr_od", "table", "estimates"]


class FlowSource(_Section):
    """``[flows.<source>]``: one observed flow source (census, CDR, ...).

    Attributes
    ----------
    kind
        ``census_od`` (aggregated origin-destination table), ``census_persons``
        (IPUMS-style person records), ``cdr_events`` (raw events + towers; home
        detection and redaction run in memory), ``cdr_od`` (pre-aggregated,
        redacted CDR OD table), ``estimates`` (published estimates with standard
        errors: ``origin``, ``destination``, ``estimate``, ``se`` at any level,
        options ``origin_level`` / ``destination_level``, default country, and
        ``rel_sd`` when there is no ``se`` column) or ``table`` (a long table
        with ``origin``, ``destination``, ``count`` [, ``max``, ``period``]).
        Census tables and person records take ``origin_level`` /
        ``destination_level`` (``"unit"``, ``"country"`` or a units field such
        as ``"admin1"``) for codes at a coarser level. Default: inferred
        from the source name (``census`` -> ``census_od``; ``cdr`` ->
        ``cdr_events`` when ``towers`` is given, else ``cdr_od``; else ``table``).
    path
        The table (CSV, Excel workbook or Parquet) or the events file.
    towers
        Tower locations (``cell_id``, ``lon``, ``lat``) for ``cdr_events``.
    options
        Extra keyword arguments passed to the reader (column names, sample
        fraction, redaction threshold, periods, ...).
    period
        The time window the source observes, e.g. ``"2019-2024"`` for a 2024
        census asking where people lived five years before, or
        ``"2024-01/2024-03"`` for three months of phone data. Written into
        every output (attribute and CSV column); years or ISO dates also give
        the CF/ACDD ``time_coverage_start`` / ``time_coverage_end``. The
        primary (first non-CDR) source's period labels the predicted flows;
        default "unspecified (the census window)".
    """

    kind: FlowKind | None = None
    path: RelPath
    towers: RelPath | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    period: str | None = None

    def resolved_kind(self, source: str) -> str:
        """Return the kind, inferred from the source name when not given."""
        if self.kind is not None:
            return self.kind
        if source.startswith("census"):
            return "census_od"
        if is_cdr_source(source):
            return "cdr_events" if self.towers is not None else "cdr_od"
        return "table"

    @model_validator(mode="after")
    def _towers_for_events(self) -> FlowSource:
        if self.kind == "cdr_events" and self.towers is None:
            raise ValueError(
                "kind 'cdr_events' needs 'towers' (a CSV with cell_id, lon, lat); "
                "or use kind = 'cdr_od' for a pre-aggregated OD table"
            )
        if self.kind is not None and self.kind != "cdr_events" and self.towers is not None:
            raise ValueError(
                f"'towers' is read only by kind 'cdr_events', not {self.kind!r}; "
                "drop it or set kind = 'cdr_events'"
            )
        return self


def _period_label(value: str) -> str:
    """Check a period label (``2005-2010``, ``2020``, ``2024-01/2024-03``, ...)."""
    from flowmodel.exceptions import ModelConfigError
    from flowmodel.periods import parse_period

    try:
        return parse_period(value).label
    except ModelConfigError as err:
        raise ValueError(str(err).replace("Fix: ", "")) from None


#: A period label, checked (see :mod:`flowmodel.periods`).
PeriodLabel = Annotated[str, AfterValidator(_period_label)]


class RasterFile(_Section):
    """A ``[rasters]`` entry as a table: a raster (or one per date) and its ``scale``.

    ``population = { path = "afripop2020.tif", scale = 400 }`` or
    ``population = { dates = { 2000 = "afripop2000.tif", 2020 = "afripop2020.tif" },
    scale = 400 }``. ``scale`` is what one value stands for: WorldPop's 10' Africa
    rasters hold the *mean* persons per 30" cell of each block, so persons = value x
    400; read as they are, every population would be 1/400 of the truth.
    """

    path: RelPath | None = None
    dates: dict[PeriodLabel, RelPath] | None = None
    scale: float = Field(1.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _path_or_dates(self) -> RasterFile:
        if (self.path is None) == (self.dates is None):
            raise ValueError(
                "give path (one raster) or dates (a table date -> raster), exactly one of them"
            )
        if self.dates is not None and not self.dates:
            raise ValueError("dates is empty: give at least one date -> raster")
        return self


#: Keys that make a ``[rasters]`` table a :class:`RasterFile` (else it maps dates to rasters).
_RASTER_FILE_KEYS = frozenset(RasterFile.model_fields)

#: A ``[rasters]`` entry: a path, a table date -> path, or a :class:`RasterFile` table.
RasterEntry = Annotated[
    Annotated[RelPath, Tag("raster-path")]
    | Annotated[RasterFile, Tag("raster-file")]
    | Annotated[dict[PeriodLabel, RelPath], Tag("raster-dates")],
    Discriminator(
        lambda v: (
            "raster-file"
            if isinstance(v, RasterFile)
            or (isinstance(v, dict) and _RASTER_FILE_KEYS & {str(k) for k in v})
            else "raster-dates"
            if isinstance(v, dict)
            else "raster-path"
        )
    ),
]


class CovariatesSection(_Section):
    """``[covariates]``: unit covariates from a table (instead of, or beside, rasters).

    Attributes
    ----------
    path
        CSV or Parquet: ``id_field``, optional ``period_field`` (a period label or a
        year), then one column per covariate (``population`` may come from here
        instead of a raster). Rows with a period give covariates that change
        (``<var>_by_date``, interpolated log-linearly between dates by a model with
        periods); the static ``<var>`` of a dated covariate is its value at
        ``[predict] period``, else at the primary flow source's ``period``
        (log-linear), else its latest value.
    id_field, period_field
        Column names of the unit id and of the period.
    """

    path: RelPath
    id_field: str = "unit_id"
    period_field: str = "period"


class MarginalSource(_Section):
    """``[marginals.<name>]``: country-pair totals of the flow, for the fusion model.

    Attributes
    ----------
    path
        CSV or Parquet with ``origin_country``, ``destination_country``, ``value``
        (persons over the latent's window; country codes as in the units).
    rel_sd
        Error of the values on the log scale (0.1: about ±10%).
    """

    path: RelPath
    rel_sd: float = Field(0.1, gt=0)


ModelType = Literal["gravity", "radiation", "fusion"]
Backend = Literal["auto", "pymc", "nutpie", "numpyro", "laplace", "advi", "map"]


class ModelSection(_Section):
    """``[model]``: which model, how to fit it.

    Attributes
    ----------
    type
        ``gravity``, ``radiation`` or ``fusion``.
    backend
        Inference backend of ``model.fit`` (``auto`` picks by data size).
    draws, tune, chains
        Posterior draws per chain, tuning steps, chains (MCMC backends; ``draws``
        also sets the number of approximate-posterior draws of ``laplace``/``advi``).
        At most :data:`MAX_DRAWS` draws and tuning steps, :data:`MAX_CHAINS` chains.
    options
        Structural options passed to the model constructor (``constraint``,
        ``cost_func``, ``covariates``, ``likelihood``, ...).
    priors
        Prior overrides, ``name -> spec`` (see the model docs).
    sample_kwargs
        Extra keyword arguments of ``fit`` (e.g. ``target_accept``).
    """

    type: ModelType = "gravity"
    backend: Backend = "auto"
    draws: int = Field(1000, ge=1, le=MAX_DRAWS)
    tune: int = Field(1000, ge=0, le=MAX_DRAWS)
    chains: int = Field(4, ge=1, le=MAX_CHAINS)
    options: dict[str, Any] = Field(default_factory=dict)
    priors: dict[str, Any] = Field(default_factory=dict)
    sample_kwargs: dict[str, Any] = Field(default_factory=dict)


class PredictSection(_Section):
    """``[predict]``: predicted flows and their intervals.

    Attributes
    ----------
    quantiles
        Equal-tailed quantiles written beside the mean (``q05`` ... ``q95``).
    top_k
        Number of largest flows written as lines to ``flows.gpkg``.
    formats
        Output formats of the flows: ``netcdf`` (``flows.nc``), ``zarr``,
        ``csv`` (long table) and ``gpkg`` (top-k flow lines).
    draws
        Posterior draws used (thinned evenly; default all).
    block_size
        Origins per prediction block (default: about 64 MB per block).
    use_dask
        Stream the origin blocks through the run's dask cluster (default: on
        a remote or multi-worker cluster, or above 2,000 units).
    period
        The period to predict (``"2015-2020"``) with a model with periods
        (``[model.options.temporal]``); default its latest latent period.
    """

    quantiles: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 0.75, 0.95])
    top_k: int = Field(500, ge=1)
    formats: list[Literal["netcdf", "zarr", "csv", "gpkg"]] = Field(
        default_factory=lambda: ["netcdf", "csv", "gpkg"]
    )
    draws: int | None = Field(None, ge=1, le=MAX_DRAWS * MAX_CHAINS)
    block_size: int | None = Field(None, ge=1)
    use_dask: bool | None = None
    period: PeriodLabel | None = None

    @field_validator("quantiles")
    @classmethod
    def _in_unit_interval(cls, value: list[float]) -> list[float]:
        bad = [q for q in value if not 0.0 < q < 1.0]
        if bad:
            raise ValueError(f"quantiles must lie strictly between 0 and 1, got {bad}")
        return sorted(set(value))


class EvaluateSection(_Section):
    """``[evaluate]``: metrics and cross-validation.

    Attributes
    ----------
    cv
        ``none`` (in-sample metrics only), ``pairs`` (k-fold over observed
        pairs), ``unit`` (leave one unit out), ``country`` (leave one country
        out: as if its census were missing) or ``last_period`` (hold out the
        latest observed round, fit on the rest and predict it, beside
        persistence and a gravity baseline; a model with periods).
    folds
        Number of folds (``pairs``), or at most this many held-out units /
        countries.
    backend
        Backend of the cross-validation refits (default ``laplace``).
    baselines
        Also score the GLM and radiation baselines.
    sources
        Flow sources to score (default: every non-CDR source, since CDR counts
        are on the subscriber scale; else every source).
    """

    cv: Literal["none", "pairs", "unit", "country", "last_period"] = "none"
    folds: int = Field(5, ge=2)
    backend: Backend | None = None
    baselines: bool = True
    sources: list[str] | None = None


class ReportSection(_Section):
    """``[report]``: the HTML report.

    Attributes
    ----------
    enabled
        Write ``report.html`` (and its figures).
    title
        Title of the report (default: the run name).
    top_k
        Number of flows drawn on the flow map.
    truth
        Optional JSON file of known parameters (the simulator's
        ``truth.json``): adds a true-vs-estimated table.
    """

    enabled: bool = True
    title: str | None = None
    top_k: int = Field(200, ge=1)
    truth: RelPath | None = None


class DaskSection(_Section):
    """``[dask]``: where raster statistics and prediction run.

    Attributes
    ----------
    cluster
        ``local`` (a ``LocalCluster`` on this machine), ``slurm`` (workers
        submitted as SLURM jobs with dask-jobqueue) or ``none`` (no cluster:
        dask's default threaded scheduler).
    scheduler
        Address of a running scheduler (``tcp://host:8786``); overrides
        ``cluster``. Also ``--scheduler`` on the command line.
    n_workers
        Local workers, or SLURM jobs to start. Default: 1 local worker.
    threads_per_worker
        Threads per local worker (default: all cores / n_workers).
    processes
        Local workers as processes (True) or threads in this process (False).
    memory_limit
        Memory limit per local worker (``"4GB"``, ``"auto"``).
    queue, account, cores, memory, walltime
        SLURM partition, account, cores and memory per job, wall time
        (``HH:MM:SS``).
    job_extra_directives
        Extra ``#SBATCH`` lines for the worker jobs (e.g. ``"--qos=short"``).
    """

    cluster: Literal["local", "slurm", "none"] = "local"
    scheduler: str | None = None
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    processes: bool = False
    memory_limit: str | int = "auto"
    queue: str | None = None
    account: str | None = None
    cores: int = Field(4, ge=1)
    memory: str = "16GB"
    walltime: str = "01:00:00"
    job_extra_directives: list[str] = Field(default_factory=list)

    @field_validator("walltime")
    @classmethod
    def _walltime_format(cls, value: str) -> str:
        parts = value.replace("-", ":").split(":")
        if not (2 <= len(parts) <= 4 and all(p.isdigit() for p in parts)):
            raise ValueError(f"walltime must look like HH:MM:SS or D-HH:MM:SS, got {value!r}")
        return value


class RunConfig(_Section):
    """A whole run config: every section of the file.

    Attributes
    ----------
    run, units, rasters, flows, marginals, model, predict, evaluate, report, dask
        The sections (see their classes). ``rasters`` maps a covariate role
        (``population``, ``built_up``, ``night_lights``, or any name) to a
        GeoTIFF, or to a table ``date -> GeoTIFF`` (``[rasters.population]
        2000 = "pop2000.tif"``) for a covariate that changes, or to a
        :class:`RasterFile` table (``path`` or ``dates``, and ``scale``); ``flows`` maps a
        source name to a :class:`FlowSource`; ``marginals`` maps a name to a
        :class:`MarginalSource`.
    covariates
        Optional :class:`CovariatesSection`.
    source
        The config file this was read from (None when built in Python).
    """

    run: RunSection = Field(default_factory=RunSection)
    units: UnitsSection
    rasters: dict[str, RasterEntry] = Field(default_factory=dict)
    covariates: CovariatesSection | None = None
    flows: dict[str, FlowSource] = Field(default_factory=dict)
    marginals: dict[str, MarginalSource] = Field(default_factory=dict)
    model: ModelSection = Field(default_factory=ModelSection)
    predict: PredictSection = Field(default_factory=PredictSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    report: ReportSection = Field(default_factory=ReportSection)
    dask: DaskSection = Field(default_factory=DaskSection)
    source: Path | None = None

    @field_validator("rasters", "flows", "marginals")
    @classmethod
    def _plain_keys(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key in value:
            _check_name(key, f"a name in [{info.field_name}]")
        return value

    @model_validator(mode="after")
    def _default_out_dir(self, info: ValidationInfo) -> RunConfig:
        if self.run.out_dir is None:
            base = Path((info.context or {}).get("base_dir") or Path.cwd())
            self.run.out_dir = base / "runs" / self.run.name
        return self

    @property
    def out_dir(self) -> Path:
        """The run directory (absolute)."""
        assert self.run.out_dir is not None
        return self.run.out_dir

    def raster_paths(self) -> dict[str, Path | dict[str, Path]]:
        """``role -> raster`` or ``role -> {date -> raster}``, whichever form the entry has."""
        out: dict[str, Path | dict[str, Path]] = {}
        for role, entry in self.rasters.items():
            if isinstance(entry, RasterFile):
                out[role] = entry.path if entry.path is not None else dict(entry.dates or {})
            else:
                out[role] = entry
        return out

    def raster_scales(self) -> dict[str, float]:
        """``role -> scale`` of the rasters whose values stand for more than one unit."""
        return {
            role: entry.scale
            for role, entry in self.rasters.items()
            if isinstance(entry, RasterFile) and entry.scale != 1.0
        }

    def input_files(self) -> dict[str, Path]:
        """Every input file named by the config, keyed by its dotted config key."""
        files: dict[str, Path] = {}
        for i, path in enumerate(self.units.paths()):
            files[
                "units.path" if not isinstance(self.units.path, list) else f"units.path[{i}]"
            ] = path
        for role, path in self.raster_paths().items():
            if isinstance(path, dict):
                files.update({f"rasters.{role}.{date}": p for date, p in path.items()})
            else:
                files[f"rasters.{role}"] = path
        if self.covariates is not None:
            files["covariates.path"] = self.covariates.path
        for name, src in self.flows.items():
            files[f"flows.{name}.path"] = src.path
            if src.towers is not None:
                files[f"flows.{name}.towers"] = src.towers
        for name, marg in self.marginals.items():
            files[f"marginals.{name}.path"] = marg.path
        return files

    def check_files(self) -> None:
        """Raise :class:`ConfigError` naming the key of every input file that does not exist."""
        files = dict(self.input_files())
        if self.report.truth is not None:
            files["report.truth"] = self.report.truth
        missing = [(key, path) for key, path in files.items() if not path.exists()]
        if missing:
            where = self.source or "config"
            listed = "; ".join(f"{key} = {path}" for key, path in missing)
            raise ConfigError(
                f"{where}: input file(s) not found: {listed}. Fix: correct the path "
                "(relative paths resolve against the folder of the config file)."
            )

    def section_dict(self, *names: str) -> dict[str, Any]:
        """JSON-ready dict of the named sections (for hashing and the config copy)."""
        data = self.model_dump(mode="json", include=set(names) if names else None)
        data.pop("source", None)
        return data


# ---------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"model.draws=500"`` into ``(["model", "draws"], 500)``.

    The value is read as a TOML value when it parses as one (numbers, booleans,
    quoted strings, ``[lists]``, ``{inline = "tables"}``), else kept as a string;
    TOML dates and times (``02:00:00``) are kept as strings too.

    Raises
    ------
    ConfigError
        When ``item`` has no ``=`` or an empty key.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set model.draws=500"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, dt.date | dt.time):
        value = raw  # 02:00:00 is a wall time, 2024-01-01 a label: keep the text
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set key=value`` overrides (dotted keys) to a raw config dict, in place."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {item!r}: '{'.'.join(keys[: i + 1])}' is a value, not a table"
                )
            node = child
        node[keys[-1]] = value
    return data


# ------------------------------------------------------------------ reading
def _read_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found. Fix: check the path.")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(
            f"{path}: unknown config format '{suffix}'. Fix: use a .toml, .yaml or .yml file."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}). Fix: save the config "
            "as UTF-8."
        ) from None
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}. Fix: correct the syntax.") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            reason = " ".join(str(err).split())
            raise ConfigError(
                f"{path}: not valid YAML: {reason}. Fix: correct the syntax."
            ) from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections at the top level, got "
                f"{type(data).__name__}. Fix: start the file with sections such as 'run:'."
            )
    return data


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "path_type": "a path (string)",
    "missing": "a value (this key is required)",
}


_BOUNDS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


def _fields_of(loc: Sequence[str]) -> list[str]:
    """Known keys of the section at ``loc`` (for 'did you mean' hints)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if model is RunConfig and part == "flows":
            model = dict  # the next part is a source name
            continue
        if model is dict:
            model = FlowSource
            continue
        if model is UnitsSection and part == "path":
            model = UnitsFile  # the next part is the entry's index
            continue
        if part.isdigit():
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = (annotation, *getattr(annotation, "__args__", ()))
        model = next(
            (a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _format_error(err: Mapping[str, Any], path: Path | str, overridden: set[str]) -> str:
    # drop pydantic's union/validator tags such as "list[function-after[...]]"
    loc_str = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p))]
    key = ".".join(loc_str) if loc_str else "(top level)"
    if len(loc_str) >= 2:
        section = "[" + ".".join(loc_str[:-1]) + "]"
        shown = f"{section} {loc_str[-1]}"
    else:
        shown = key
    kind = err["type"]
    value = err.get("input")
    via = " (set by --set)" if key in overridden else ""
    if kind == "extra_forbidden":
        known = _fields_of(loc_str)
        close = difflib.get_close_matches(str(loc_str[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        if loc_str[:1] == ["model"] and len(loc_str) == 2 and not close:
            hint += "; put model options under [model.options]"
        return f"{path}: {shown}: unknown key{via}. Fix: {hint}"
    if kind == "missing":
        return f"{path}: {shown}: required key is missing. Fix: add it to the config file."
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{path}: {shown}: expected one of {expected}, got {value!r}{via}. Fix: use one of those values."
    bound = _BOUNDS.get(kind)
    if bound is not None:
        limit = next(iter(err.get("ctx", {}).values()), "?")
        return (
            f"{path}: {shown}: must be {bound} {limit}, got {value!r}{via}. Fix: change the value."
        )
    expected = _EXPECTED.get(kind)
    if expected is not None:
        return f"{path}: {shown}: expected {expected}, got {value!r}{via}. Fix: change the value's type."
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{path}: {shown}: {msg}{via}. Fix: change the value."


# ---------------------------------------------------------- deep validation
#: The reader of each flow kind, and the arguments the pipeline passes itself.
READERS: dict[str, tuple[str, str, frozenset[str]]] = {
    "census_od": ("flowmodel.inputs.census", "read_census_od", frozenset({"source", "units"})),
    "census_persons": (
        "flowmodel.inputs.census",
        "read_census_persons",
        frozenset({"source", "units"}),
    ),
    "cdr_events": ("flowmodel.inputs.cdr", "cdr_flows", frozenset({"events", "towers", "units"})),
    "cdr_od": ("flowmodel.inputs.cdr", "read_cdr_od", frozenset({"source", "units"})),
    "estimates": ("flowmodel.inputs.estimates", "read_estimates", frozenset({"source"})),
    "table": ("pandas", "read_csv", frozenset({"filepath_or_buffer"})),
    "table_parquet": ("pandas", "read_parquet", frozenset({"path"})),
}

#: The model class of each ``[model] type`` (imported when a config is validated).
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "gravity": ("flowmodel.models.gravity", "GravityModel"),
    "radiation": ("flowmodel.models.radiation", "RadiationModel"),
    "fusion": ("flowmodel.models.fusion", "FusionModel"),
}

#: Keywords of ``fit`` the backends read themselves (beyond those of ``pymc.sample``,
#: ``pymc.fit`` and ``pymc.find_MAP``, which they pass on): flowmodel's Laplace fit,
#: ADVI's iterations and start, the NUTS settings of nutpie / numpyro.
FIT_KEYWORDS = frozenset(
    {
        "draws",
        "tune",
        "chains",
        "cores",
        "target_accept",
        "nuts",
        "nuts_sampler_kwargs",
        "engine",
        "maxiter",
        "newton_maxiter",
        "step",
        "integrate",
        "n",
        "start",
        "start_sigma",
        "obj_optimizer",
    }
)
#: Keywords of ``fit`` the pipeline sets itself, and where they come from.
FIT_RESERVED = {
    "random_seed": "[run] seed",
    "seed": "[run] seed",
    "progressbar": "the command line (-q hides progress bars)",
    "backend": "[model] backend",
    "nuts_sampler": "[model] backend",
    "model": "[model] type",
    "compute_convergence_checks": "flowmodel (its own diagnostics)",
}


#: Options whose values are secrets: an error never shows them (the CDR hashing salt).
SECRET_OPTIONS = frozenset({"salt"})


def _rule_fraction(value: Any) -> str | None:
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    bad = [v for v in values if not (isinstance(v, int | float) and 0 < v <= 1)]
    if not bad:
        return None
    return (
        f"sample fractions must lie in (0, 1], got {bad}. Fix: give the share of the "
        "population sampled, e.g. 0.1 for a 10% sample"
    )


def _rule_timezone(value: Any) -> str | None:
    if value is None:
        return None
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(str(value))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        close = difflib.get_close_matches(str(value), sorted(zoneinfo.available_timezones()), n=1)
        hint = (
            f"did you mean {close[0]!r}?" if close else "use an IANA name such as 'Africa/Nairobi'"
        )
        return f"unknown time zone {value!r}. Fix: {hint}"
    return None


def _rule_encoding(value: Any) -> str | None:
    import codecs

    try:
        codecs.lookup(str(value))
    except LookupError:
        return f"unknown text encoding {value!r}. Fix: e.g. 'utf-8' or 'latin-1'"
    return None


def _rule_at_least(low: float) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        if value is None or (isinstance(value, int | float) and value >= low):
            return None
        return f"must be >= {low:g}, got {value!r}. Fix: change the value"

    return rule


def _rule_night(value: Any) -> str | None:
    if value is None:
        return None
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(h, int) and 0 <= h <= 23 for h in value)
    ):
        return f"expected two hours 0-23, got {value!r}. Fix: e.g. night = [19, 7]"
    return None


#: Value rules of reader options beyond their types, by parameter name (any reader).
OPTION_RULES: dict[str, Callable[[Any], str | None]] = {
    "sample_fraction": _rule_fraction,
    "timezone": _rule_timezone,
    "encoding": _rule_encoding,
    "night": _rule_night,
    "suppressed_min": _rule_at_least(0),
    "suppressed_max": _rule_at_least(0),
    "threshold": _rule_at_least(0),
    "min_active_days": _rule_at_least(1),
    "batch_size": _rule_at_least(1),
    "max_share": _rule_at_least(0),
}


def _import(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


@functools.cache
def _signature(func: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool, dict]:
    """Keyword parameters of ``func``, whether it takes ``**kwargs``, and its resolved type hints."""
    sig = inspect.signature(func)
    params = {
        name: p
        for name, p in sig.parameters.items()
        if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations (pandas' TYPE_CHECKING names): names only
        hints = {}
    return params, var_kw, hints


@functools.cache
def _adapter(hint: Any) -> Any:
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # a type pydantic cannot check: skip its value
        return None


def _unknown_key(key: str, known: Iterable[str], what: str) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
    return f"unknown {what}. Fix: {hint}"


def _check_keywords(
    values: Mapping[str, Any],
    func: Callable[..., Any],
    section: str,
    where: str,
    *,
    reserved: Mapping[str, str] | None = None,
    what: str,
    rules: Mapping[str, Callable[[Any], str | None]] | None = None,
) -> list[str]:
    """Check a table of keyword arguments against ``func``'s signature, types and value rules."""
    params, var_kw, hints = _signature(func)
    reserved = reserved or {}
    errors = []
    allowed = [n for n in params if n not in reserved]
    for key, value in values.items():
        shown = f"{where}: [{section}] {key}"
        if key in reserved:
            errors.append(f"{shown}: set by {reserved[key]}, not here. Fix: remove it.")
            continue
        if key not in params:
            if not var_kw:
                errors.append(f"{shown}: {_unknown_key(key, allowed, what)}")
            continue
        hint = hints.get(key)
        adapter = _adapter(hint) if hint is not None else None
        if adapter is not None:
            from pydantic import ValidationError as _VE

            try:
                adapter.validate_python(value)
            except _VE as err:
                if key in SECRET_OPTIONS:
                    value = "<hidden>"
                kinds = {e["type"] for e in err.errors()}
                if kinds == {"literal_error"}:
                    expected = " or ".join(
                        dict.fromkeys(
                            str(e.get("ctx", {}).get("expected", "")) for e in err.errors()
                        )
                    )
                    msg = (
                        f"expected one of {expected}, got {value!r}. Fix: use one of those values."
                    )
                else:
                    annotation = params[key].annotation
                    shown_type = annotation if isinstance(annotation, str) else str(hint)
                    msg = f"expected {shown_type}, got {value!r}. Fix: change the value."
                errors.append(f"{shown}: {msg}")
                continue
        rule = (rules or {}).get(key)
        problem = rule(value) if rule is not None else None
        if problem:
            errors.append(f"{shown}: {problem}" + ("" if problem.endswith(("?", ".")) else "."))
    return errors


def _reader(kind: str, path: Path) -> tuple[Callable[..., Any], frozenset[str]]:
    if kind == "table" and path.suffix.lower() == ".parquet":
        kind = "table_parquet"
    module, name, reserved = READERS[kind]
    return _import(module, name), reserved


def _source_errors(cfg: RunConfig, where: str) -> list[str]:
    errors = []
    for name, src in cfg.flows.items():
        kind = src.resolved_kind(name)
        func, reserved = _reader(kind, src.path)
        errors += _check_keywords(
            src.options,
            func,
            f"flows.{name}.options",
            where,
            reserved=dict.fromkeys(reserved, f"[flows.{name}] path/towers and [units]"),
            what=f"option of {func.__module__}.{func.__name__} (kind {kind!r})",
            rules=OPTION_RULES,
        )
    return errors


def _named_sources(cfg: RunConfig, where: str) -> list[str]:
    """Source names given in [model.options] and [evaluate] must be [flows] sources."""
    known = list(cfg.flows)
    named: list[tuple[str, Any]] = []
    opts = cfg.model.options
    if isinstance(opts.get("sources"), list):
        named += [("model.options] sources", s) for s in opts["sources"]]
    if isinstance(opts.get("source"), str):
        named.append(("model.options] source", opts["source"]))
    if isinstance(opts.get("reference_source"), str):
        named.append(("model.options] reference_source", opts["reference_source"]))
    named += [("evaluate] sources", s) for s in cfg.evaluate.sources or []]
    errors = []
    if cfg.marginals and cfg.model.type != "fusion":
        names = ", ".join(sorted(cfg.marginals))
        errors.append(
            f"{where}: [marginals] {names}: country-pair totals are observations of the "
            f"fusion model only; a {cfg.model.type} model fits one flow source and would "
            'ignore them. Fix: [model] type = "fusion" (it adds every [marginals] entry '
            "to its sources as estimate_<name>), or drop [marginals]"
        )
    for key, value in named:
        if str(value) not in known:
            close = difflib.get_close_matches(str(value), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"name one of [flows]: {known}"
            errors.append(
                f"{where}: [{key}: {value!r} is not a flow source of this config. Fix: {hint}"
            )
    return errors


def _model_errors(cfg: RunConfig, where: str) -> list[str]:
    module, name = MODEL_CLASSES[cfg.model.type]
    cls = _import(module, name)
    options = dict(cfg.model.options)
    reserved = {
        "priors": "[model.priors]",
        "sampler_config": "[model] draws/tune/chains and [model.sample_kwargs]",
    }
    errors: list[str] = []
    latent = options.pop("latent", None) if cfg.model.type == "fusion" else None
    errors += _check_keywords(
        options, cls, "model.options", where, reserved=reserved, what=f"option of {name}"
    )
    if isinstance(latent, Mapping):
        latent = dict(latent)
        kind = latent.pop("type", "gravity")
        if kind in ("gravity", "radiation"):
            lmod, lname = MODEL_CLASSES[str(kind)]
            errors += _check_keywords(
                latent,
                _import(lmod, lname),
                "model.options.latent",
                where,
                reserved=reserved,
                what=f"option of {lname}",
            )
        else:
            errors.append(
                f"{where}: [model.options.latent] type: expected one of 'gravity' or "
                f"'radiation', got {kind!r}. Fix: use one of those values."
            )
    if cfg.model.sample_kwargs:
        errors += _sample_kwargs_errors(cfg.model.sample_kwargs, where)
    if errors:
        return errors
    # the constructors' own value rules (constraint names, covariate lists, latent, priors)
    from flowmodel.exceptions import FlowModelError
    from flowmodel.pipeline import build_model

    try:
        build_model(cfg)
    except FlowModelError as err:
        text = " ".join(str(err).split())
        if "Fix" not in text:
            text = f"{text.rstrip('.')}. Fix: change that value in [model.options]."
        return [text if text.startswith(str(where)) else f"{where}: [model.options] {text}"]
    except (TypeError, ValueError) as err:
        return [f"{where}: [model.options] {type(err).__name__}: {err}. Fix: change the value."]
    return []


def _integrate_ok(value: Any) -> bool:
    from flowmodel.models.inference import LAPLACE_INTEGRATE_MAX

    names = [value] if isinstance(value, str) else value
    return (
        isinstance(names, list)
        and 1 <= len(names) <= LAPLACE_INTEGRATE_MAX
        and all(isinstance(n, str) and n for n in names)
        and len(set(names)) == len(names)
    )


def _sample_kwargs_errors(kwargs: Mapping[str, Any], where: str) -> list[str]:
    import pymc as pm

    accepted = set(FIT_KEYWORDS)
    for func in (pm.sample, pm.fit, pm.find_MAP):
        accepted |= set(_signature(func)[0])
    accepted -= set(FIT_RESERVED)
    errors = []
    for key, value in kwargs.items():
        shown = f"{where}: [model.sample_kwargs] {key}"
        if key in FIT_RESERVED:
            errors.append(f"{shown}: set by {FIT_RESERVED[key]}, not here. Fix: remove it.")
        elif key not in accepted:
            errors.append(f"{shown}: {_unknown_key(key, accepted, 'keyword of the fit backends')}")
        elif key == "target_accept" and not (isinstance(value, int | float) and 0 < value < 1):
            errors.append(f"{shown}: must lie in (0, 1), got {value!r}. Fix: e.g. 0.9.")
        elif key == "integrate" and not _integrate_ok(value):
            from flowmodel.models.inference import LAPLACE_INTEGRATE_MAX

            errors.append(
                f"{shown}: names the scalar hyperparameters a Laplace fit integrates over, "
                f"1 to {LAPLACE_INTEGRATE_MAX} distinct names; got {value!r}. Fix: e.g. "
                'integrate = ["sigma_market_share", "period_scale"].'
            )
        elif key in ("draws", "tune", "chains") and not (
            isinstance(value, int) and 0 <= value <= (MAX_CHAINS if key == "chains" else MAX_DRAWS)
        ):
            errors.append(f"{shown}: expected an integer of [model] {key}'s range, got {value!r}.")
    return errors


def _out_dir_errors(cfg: RunConfig, where: str) -> list[str]:
    out = cfg.out_dir
    shown = f"{where}: [run] out_dir = {out}"
    if out.exists() and not out.is_dir():
        return [f"{shown} is a file, not a folder. Fix: name a folder (it is created if needed)."]
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return [f"{shown}: {probe} is a file, so the folder cannot be made. Fix: name a folder."]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"{shown}: {probe} is not writable. Fix: choose a folder you can write to."]
    return []


def _truth_errors(cfg: RunConfig, where: str) -> list[str]:
    truth = cfg.report.truth
    if truth is None or not truth.exists():
        return []
    try:
        data = json.loads(truth.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [
            f"{where}: [report] truth = {truth}: not a JSON file ({err}). Fix: give the "
            "simulator's truth.json or a JSON object of known parameters."
        ]
    if not isinstance(data, dict):
        return [
            f"{where}: [report] truth = {truth}: expected a JSON object, got "
            f"{type(data).__name__}. Fix: give a JSON object of known parameters."
        ]
    return []


def validate_deep(cfg: RunConfig, *, check_files: bool = True) -> None:
    """Check what pydantic's types cannot: options against their readers and constructors.

    Parameters
    ----------
    cfg
        A config that passed :class:`RunConfig` validation.
    check_files
        Also check the run directory and the report's truth file on disk.

    Raises
    ------
    ConfigError
        One line per problem, joined by `` | ``: unknown options (with "did you
        mean"), values of the wrong type or outside their rules, reserved
        keywords, source names that are not flow sources, a run directory that
        is a file or not writable.
    flowmodel.exceptions.RunDirectoryError
        An output of the run would overwrite an input.
    """
    where = str(cfg.source or "config")
    errors = _source_errors(cfg, where) + _named_sources(cfg, where)
    errors += _model_errors(cfg, where)
    if check_files:
        errors += _out_dir_errors(cfg, where) + _truth_errors(cfg, where)
    if errors:
        raise ConfigError(" | ".join(errors))
    from flowmodel.pipeline import check_run_dir

    check_run_dir(cfg)


def load_config(
    path: str | os.PathLike[str],
    overrides: Iterable[str] = (),
    *,
    check_files: bool = True,
    deep: bool = True,
) -> RunConfig:
    """Read, override and validate a run config.

    Parameters
    ----------
    path
        A ``.toml``, ``.yaml`` or ``.yml`` file.
    overrides
        ``key=value`` strings with dotted keys (``model.draws=200``), applied
        before validation (the command line's ``--set``).
    check_files
        Raise when an input file named by the config does not exist; check
        that the run directory is a writable folder and that no output would
        overwrite an input.
    deep
        Check reader options, model options and fit keywords against their
        signatures and value rules (:func:`validate_deep`; imports the readers
        and PyMC, about 3 s).

    Returns
    -------
    RunConfig
        Validated config; every path absolute (relative paths resolve against
        the folder of ``path``).

    Raises
    ------
    ConfigError
        On a missing or unparsable file, an unknown key, a value of the wrong
        type or a missing input file; the one-line message names the file, the
        key, the expected type and the fix.
    """
    path = Path(path).resolve()
    data = _read_raw(path)
    overrides = list(overrides)
    apply_overrides(data, overrides)
    overridden = {".".join(parse_override(item)[0]) for item in overrides}
    return config_from_dict(
        data,
        base_dir=path.parent,
        source=path,
        check_files=check_files,
        deep=deep,
        _overridden=overridden,
    )


def config_from_dict(
    data: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
    check_files: bool = False,
    deep: bool = True,
    _overridden: set[str] | None = None,
) -> RunConfig:
    """Validate a config given as a dict (the sections of a config file).

    Parameters
    ----------
    data
        Raw sections, as read from TOML/YAML.
    base_dir
        Folder relative paths resolve against (default: current directory).
    source
        File name shown in error messages.
    check_files
        Raise when an input file does not exist; check the run directory.
    deep
        Also check options against their readers' and constructors' signatures
        and value rules (:func:`validate_deep`).

    Raises
    ------
    ConfigError
        One line per problem, joined by `` | ``.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    data = dict(data)
    data.pop("source", None)
    try:
        cfg = RunConfig.model_validate(data, context={"base_dir": base})
    except ValidationError as err:
        shown = source or "config"
        lines = [_format_error(e, shown, _overridden or set()) for e in err.errors()]
        raise ConfigError(" | ".join(lines)) from None
    cfg.source = Path(source) if source is not None else None
    if check_files:
        cfg.check_files()
    if deep:
        validate_deep(cfg, check_files=check_files)
    return cfg


def config_hash(cfg: RunConfig | Mapping[str, Any], *sections: str) -> str:
    """SHA-256 (16 hex digits) of the named sections of a config (all when none given)."""
    data = cfg.section_dict(*sections) if isinstance(cfg, RunConfig) else dict(cfg)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
