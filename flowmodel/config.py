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

This module imports only the standard library, pydantic and (lazily) PyYAML, so
the command line stays fast.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flowmodel.exceptions import ConfigError

__all__ = [
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
]

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")


# ------------------------------------------------------------------------ paths
def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's folder (validation context)."""
    value = Path(os.path.expandvars(os.path.expanduser(str(value))))
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(value))


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
        Name of the run (used in reports and the batch summary).
    out_dir
        Run directory: config copy, log, per-stage outputs and ``manifest.json``.
        Default ``runs/<name>`` beside the config file.
    seed
        Seed of every random draw (fits, cross-validation folds).
    """

    name: str = "flowmodel-run"
    out_dir: RelPath | None = None
    seed: int = 0


class UnitsSection(_Section):
    """``[units]``: the admin polygons (one file, or one file per country).

    Attributes
    ----------
    path
        GeoPackage / GeoJSON / Shapefile / GeoParquet, or a list of them (their
        units are concatenated, e.g. one file per country of a cross-border run).
    id_field, country_field
        Columns holding the unit id and the country code.
    layer
        Layer name for multi-layer files (GeoPackage).
    name_field
        Optional column with human-readable unit names.
    countries
        Keep only the units of these countries (default: all), e.g. one
        country of a multi-country file.
    """

    path: RelPath | list[RelPath]
    id_field: str = "unit_id"
    country_field: str = "country"
    layer: str | None = None
    name_field: str | None = None
    countries: list[str] | None = None

    def paths(self) -> list[Path]:
        """All unit files, as a list."""
        return list(self.path) if isinstance(self.path, list) else [self.path]


FlowKind = Literal["census_od", "census_persons", "cdr_events", "cdr_od", "table"]


class FlowSource(_Section):
    """``[flows.<source>]``: one observed flow source (census, CDR, ...).

    Attributes
    ----------
    kind
        ``census_od`` (aggregated origin-destination table), ``census_persons``
        (IPUMS-style person records), ``cdr_events`` (raw events + towers; home
        detection and redaction run in memory), ``cdr_od`` (pre-aggregated,
        redacted CDR OD table) or ``table`` (a long table with ``origin``,
        ``destination``, ``count`` [, ``max``, ``period``]). Default: inferred
        from the source name (``census`` -> ``census_od``; ``cdr`` ->
        ``cdr_events`` when ``towers`` is given, else ``cdr_od``; else ``table``).
    path
        The table (CSV or Parquet) or the events file.
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
        if source.startswith("cdr"):
            return "cdr_events" if self.towers is not None else "cdr_od"
        return "table"

    @model_validator(mode="after")
    def _towers_for_events(self) -> FlowSource:
        if self.kind == "cdr_events" and self.towers is None:
            raise ValueError(
                "kind 'cdr_events' needs 'towers' (a CSV with cell_id, lon, lat); "
                "or use kind = 'cdr_od' for a pre-aggregated OD table"
            )
        return self


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
    draws: int = Field(1000, ge=1)
    tune: int = Field(1000, ge=0)
    chains: int = Field(4, ge=1)
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
    """

    quantiles: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 0.75, 0.95])
    top_k: int = Field(500, ge=1)
    formats: list[Literal["netcdf", "zarr", "csv", "gpkg"]] = Field(
        default_factory=lambda: ["netcdf", "csv", "gpkg"]
    )
    draws: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1)
    use_dask: bool | None = None

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
        pairs), ``unit`` (leave one unit out) or ``country`` (leave one country
        out: as if its census were missing).
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

    cv: Literal["none", "pairs", "unit", "country"] = "none"
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
        GeoTIFF; ``flows`` maps a source name to a :class:`FlowSource`;
        ``marginals`` maps a name to a :class:`MarginalSource`.
    source
        The config file this was read from (None when built in Python).
    """

    run: RunSection = Field(default_factory=RunSection)
    units: UnitsSection
    rasters: dict[str, RelPath] = Field(default_factory=dict)
    flows: dict[str, FlowSource] = Field(default_factory=dict)
    marginals: dict[str, MarginalSource] = Field(default_factory=dict)
    model: ModelSection = Field(default_factory=ModelSection)
    predict: PredictSection = Field(default_factory=PredictSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    report: ReportSection = Field(default_factory=ReportSection)
    dask: DaskSection = Field(default_factory=DaskSection)
    source: Path | None = None

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

    def input_files(self) -> dict[str, Path]:
        """Every input file named by the config, keyed by its dotted config key."""
        files: dict[str, Path] = {}
        for i, path in enumerate(self.units.paths()):
            files[
                "units.path" if not isinstance(self.units.path, list) else f"units.path[{i}]"
            ] = path
        for role, path in self.rasters.items():
            files[f"rasters.{role}"] = path
        for name, src in self.flows.items():
            files[f"flows.{name}.path"] = src.path
            if src.towers is not None:
                files[f"flows.{name}.towers"] = src.towers
        for name, marg in self.marginals.items():
            files[f"marginals.{name}.path"] = marg.path
        return files

    def check_files(self) -> None:
        """Raise :class:`ConfigError` naming the key of every input file that does not exist."""
        missing = [(key, path) for key, path in self.input_files().items() if not path.exists()]
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
    text = path.read_text(encoding="utf-8")
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
    expected = _EXPECTED.get(kind)
    if expected is not None:
        return f"{path}: {shown}: expected {expected}, got {value!r}{via}. Fix: change the value's type."
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{path}: {shown}: {msg}{via}. Fix: change the value."


def load_config(
    path: str | os.PathLike[str],
    overrides: Iterable[str] = (),
    *,
    check_files: bool = True,
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
        Raise when an input file named by the config does not exist.

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
        data, base_dir=path.parent, source=path, check_files=check_files, _overridden=overridden
    )


def config_from_dict(
    data: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
    check_files: bool = False,
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
        Raise when an input file does not exist.

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
    return cfg


def config_hash(cfg: RunConfig | Mapping[str, Any], *sections: str) -> str:
    """SHA-256 (16 hex digits) of the named sections of a config (all when none given)."""
    data = cfg.section_dict(*sections) if isinstance(cfg, RunConfig) else dict(cfg)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
