"""The resumable pipeline: prepare -> fit -> predict -> evaluate -> report.

A **run directory** (``[run] out_dir``) is the unit of state:

================================  ==============================================
``config.toml`` / ``.yaml``       copy of the config file as given
``config.resolved.json``          the validated config (overrides applied, absolute paths)
``flowmodel.log``                 log of every invocation
``manifest.json``                 per stage: status, config hash, input and output hashes, why it ran
``dataset.nc``, ``units.gpkg``    prepare: the FlowDataset, units with covariates
``posterior.nc``                  fit: the fitted model (DataTree + model config)
``flows.nc``, ``flows.csv``,      predict: predicted flows with intervals, long table,
``flows.gpkg``                    top-k flow lines
``totals.nc``, ``totals.csv``,    predict: in/out/net migration per unit and country,
``totals.gpkg``                   country pairs, total movers, with intervals
``metrics.json``, ``cv.csv``      evaluate: metrics, cross-validation folds
``report.html``, ``figures/``     report
================================  ==============================================

Each stage is a plain function ``stage_<name>(ctx) -> dict[str, Path]``. Before
a stage runs, :func:`run_pipeline` hashes its config sections and its input
files; a stage whose previous run finished with the same hashes, and whose
outputs are still there unchanged, is skipped (the log and the manifest say
why). A stage is marked ``running`` in the manifest before it starts and
``done`` only after all its outputs were written (atomically, with
:func:`flowmodel.outputs.io.atomic_path`), so a run killed mid-stage resumes from
the last finished stage and never reads a half-written file.

Safety of the run directory:

* **One process per run directory.** :func:`run_lock` holds an exclusive
  ``fcntl.flock`` on ``.flowmodel.lock`` for the life of the invocation; the
  kernel releases it when the process ends (even on ``kill -9``), so there is
  no stale lock to take over and no race between two processes starting
  together. ``flowmodel status`` asks the same lock whether a stage marked
  ``running`` is still running or was interrupted.
* **Inputs are never overwritten.** :func:`check_run_dir` refuses a run
  directory where an output would replace an input (``out_dir = "."`` beside a
  ``units.gpkg`` input), and a fresh run directory (no ``manifest.json``) that
  already holds files named like run outputs.
* **Content hashes.** Inputs and outputs are compared by SHA-256 of their
  contents (:func:`file_sha256`); a cached hash is reused only while the file's
  size, modification time, *change* time (``st_ctime``, which no user-space copy
  tool can set back), inode and device are all unchanged.
* **Leftovers.** Temporary files of writes interrupted by ``kill -9`` are removed
  when the next run starts; PyTensor's generated sources go to
  ``.flowmodel-cache/`` in the run directory instead of ``$TMPDIR``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowmodel.config import MODEL_CLASSES as _CONFIG_MODEL_CLASSES
from flowmodel.config import RunConfig, config_hash
from flowmodel.exceptions import ConfigError, InputFileError, RunDirectoryError
from flowmodel.naming import is_cdr_source

__all__ = [
    "DATASET",
    "FLOWS",
    "METRICS",
    "POSTERIOR",
    "REPORT",
    "STAGES",
    "STAGE_ORDER",
    "RunLockedError",
    "StageContext",
    "StageInputChangedError",
    "StageInputMissingError",
    "StageResult",
    "check_run_dir",
    "file_sha256",
    "lock_holder",
    "read_manifest",
    "run_files",
    "run_lock",
    "run_pipeline",
]

logger = logging.getLogger("flowmodel.pipeline")

STAGE_ORDER: tuple[str, ...] = ("prepare", "fit", "predict", "evaluate", "report")

DATASET = "dataset.nc"
UNITS = "units.gpkg"
POSTERIOR = "posterior.nc"
FLOWS = "flows.nc"
FLOWS_ZARR = "flows.zarr"
FLOWS_CSV = "flows.csv"
FLOW_LINES = "flows.gpkg"
TOTALS = "totals.nc"
TOTALS_CSV = "totals.csv"
TOTALS_GPKG = "totals.gpkg"
METRICS = "metrics.json"
CV_TABLE = "cv.csv"
REPORT = "report.html"
MANIFEST = "manifest.json"
LOG_FILE = "flowmodel.log"
RESOLVED_CONFIG = "config.resolved.json"
LOCK_FILE = ".flowmodel.lock"
CACHE_DIR = ".flowmodel-cache"
MANIFEST_VERSION = 1

#: Files every stage writes into the run directory (figures: any ``*.png``).
STAGE_FILES: tuple[str, ...] = (
    DATASET,
    UNITS,
    POSTERIOR,
    FLOWS,
    FLOWS_ZARR,
    FLOWS_CSV,
    FLOW_LINES,
    METRICS,
    CV_TABLE,
    REPORT,
)


class StageInputMissingError(InputFileError):
    """A stage was asked to run before the stage that makes its inputs."""


class StageInputChangedError(StageInputMissingError):
    """A stage's input from an earlier stage changed since that stage wrote it (truncated, edited)."""


class RunLockedError(ConfigError):
    """Another live flowmodel process is running in the same run directory."""


@dataclass(frozen=True)
class StageSpec:
    """What a stage depends on.

    Attributes
    ----------
    name
        Stage name (``prepare`` ... ``report``).
    needs
        Files of the run directory made by earlier stages that this stage reads.
    config
        Function of the config returning the parts this stage depends on (hashed).
    description
        One line for ``--help`` and the docs.
    """

    name: str
    needs: tuple[str, ...]
    config: Callable[[RunConfig], dict[str, Any]]
    description: str


def _cfg(cfg: RunConfig, *sections: str, **extra: Any) -> dict[str, Any]:
    return {**cfg.section_dict(*sections), **extra}


STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec(
        "prepare",
        (),
        # marginals join the hash only when given, so older run directories stay valid
        lambda c: _cfg(
            c,
            "units",
            "rasters",
            "flows",
            *(["marginals"] if c.marginals else []),
            *(["covariates"] if c.covariates else []),
            # the static value of a dated covariate is taken at [predict] period
            **({"predict_period": c.predict.period} if c.predict.period else {}),
        ),
        "read units, rasters and flow tables; build and save the FlowDataset",
    ),
    "fit": StageSpec(
        "fit",
        (DATASET,),
        lambda c: _cfg(c, "model", seed=c.run.seed),
        "fit the model to the observed flows; save the posterior",
    ),
    "predict": StageSpec(
        "predict",
        (DATASET, POSTERIOR),
        lambda c: _cfg(c, "predict", seed=c.run.seed),
        "predict flows with intervals for every pair; write flows.nc/csv/gpkg",
    ),
    "evaluate": StageSpec(
        "evaluate",
        (DATASET, POSTERIOR, FLOWS),
        lambda c: _cfg(c, "evaluate", "model", seed=c.run.seed),
        "metrics of predicted vs observed flows, optional cross-validation",
    ),
    "report": StageSpec(
        "report",
        (DATASET, POSTERIOR, FLOWS, METRICS),
        lambda c: _cfg(c, "report", name=c.run.name),
        "figures and a self-contained HTML report",
    ),
}

PRODUCER = {
    DATASET: "prepare",
    POSTERIOR: "fit",
    FLOWS: "predict",
    METRICS: "evaluate",
}


# ---------------------------------------------------------------------- hashing
#: A cached hash is reused only for files whose status changed at least this long
#: before they were hashed: an edit within one timestamp tick of the hashing (2 s
#: on the coarsest file systems) could otherwise keep every stat field the same.
HASH_CACHE_MARGIN_NS = 2_000_000_000

#: ``st_ctime`` is the status-change time on POSIX systems only (creation time on Windows).
_CTIME_IS_CHANGE_TIME = os.name == "posix"


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def file_sha256(path: str | os.PathLike[str], cache: dict[str, Any] | None = None) -> str:
    """SHA-256 of a file's contents (or of every file in a directory, e.g. a Zarr store).

    Parameters
    ----------
    path
        File or directory.
    cache
        Optional ``str(path) -> {size, mtime_ns, ctime_ns, inode, device,
        hashed_at_ns, sha256}`` cache (kept in the manifest). A cached hash is
        an optimisation that has to be earned: it is reused only when the
        file's size, modification time, status-change time, inode and device
        all equal the ones seen when it was hashed, and its status last changed
        at least :data:`HASH_CACHE_MARGIN_NS` before that. An edit that keeps
        the size and puts the modification time back (``cp -p``, ``rsync -t``,
        ``tar x``, ``touch -d``) still moves the change time, which no
        user-space tool can set, so the file is read again. On systems without
        a status-change time (Windows) every file is read every time.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(sub.relative_to(path)).encode())
            h.update(file_sha256(sub, cache).encode())
        return h.hexdigest()
    key = str(path.resolve())
    started = time.time_ns()  # before the stat: a change after it moves st_ctime
    stamp = _stamp(path.stat())
    if cache is not None and _CTIME_IS_CHANGE_TIME:
        hit = cache.get(key)
        if (
            isinstance(hit, Mapping)
            and all(hit.get(k) == v for k, v in stamp.items())
            and stamp["ctime_ns"] < int(hit.get("hashed_at_ns", 0)) - HASH_CACHE_MARGIN_NS
        ):
            return str(hit["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache is not None:
        cache[key] = {**stamp, "hashed_at_ns": started, "sha256": digest}
    return digest


# --------------------------------------------------------------------- manifest
def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the manifest of a run directory (an empty one when there is none yet).

    Returns
    -------
    dict
        ``{"version", "stages": {stage: {...}}, "history": [...], "file_cache"}``;
        each stage entry has ``status`` (``running``, ``done``, ``failed``,
        ``interrupted``), ``reason`` (why it last ran), ``config_hash``,
        ``inputs`` and ``outputs`` (name -> SHA-256), ``started``, ``finished``
        and ``duration_s``.
    """
    path = Path(run_dir) / MANIFEST
    empty: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "stages": {},
        "history": [],
        "file_cache": {},
    }
    if not path.exists():
        return empty
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("manifest %s unreadable (%s); every stage will run again", path, err)
        return empty
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        logger.warning("manifest %s has another format; every stage will run again", path)
        return empty
    for key, value in empty.items():
        data.setdefault(key, value)
    return data


def _write_json(path: Path, data: Any) -> None:
    from flowmodel.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
        )


# ---------------------------------------------------------------------- context
@dataclass
class StageContext:
    """What a stage function gets.

    Attributes
    ----------
    config
        The validated run config.
    run_dir
        The run directory (exists).
    progress
        Show progress bars.
    scheduler
        Dask scheduler address from the command line (overrides ``[dask]``).
    """

    config: RunConfig
    run_dir: Path
    progress: bool = False
    scheduler: str | None = None
    _client: Any = field(default=None, repr=False)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def path(self, name: str) -> Path:
        """Path of a file in the run directory."""
        return self.run_dir / name

    @property
    def client(self) -> Any:
        """The dask client of this run, started on first use (None for ``cluster = "none"``).

        While it exists it is dask's default client, so dask computations in the
        library (zonal statistics, blockwise prediction) run on its workers.
        """
        if self._client is None:
            from flowmodel.parallel import dask_client

            self._client = self._stack.enter_context(
                dask_client(self.config.dask, scheduler=self.scheduler)
            )
        return self._client

    def close(self) -> None:
        """Shut the dask client (and cluster) down, if one was started."""
        self._stack.close()
        self._client = None


@dataclass
class StageResult:
    """What happened to one stage in one invocation.

    Attributes
    ----------
    stage
        Stage name.
    action
        ``"ran"`` or ``"skipped"``.
    reason
        Why (e.g. ``"config changed: model"``, ``"inputs and config unchanged"``).
    duration_s
        Wall time of the stage function (0 when skipped).
    outputs
        Output name -> path.
    """

    stage: str
    action: str
    reason: str
    duration_s: float = 0.0
    outputs: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------ lock
def _try_lock(fd: int, *, exclusive: bool) -> bool:
    """Take a non-blocking lock on an open file; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: a byte-range lock far beyond the pid written at the start
        import msvcrt

        os.lseek(fd, 1 << 20, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as err:
        if err.errno in _NO_LOCKS:
            raise _LocksUnsupportedError(err) from err
        raise
    return True


#: errno of flock on a file system without file locks (Lustre mounted without -o flock, ...)
_NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOLCK}


class _LocksUnsupportedError(Exception):
    """flock is not available on the run directory's file system."""


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        os.lseek(fd, 1 << 20, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_pid(lock: Path) -> int:
    try:
        return int(lock.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str], *, wait_s: float = 1.0) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block.

    An exclusive ``fcntl.flock`` on ``<run_dir>/.flowmodel.lock`` (created if
    needed, never removed: removing a lock file lets a third process lock a new
    file while a second still holds the old one). Taking it is atomic, so of
    two processes starting together exactly one gets it; the kernel releases
    it when the holder exits or is killed, so a killed run leaves nothing to
    clean up. The file holds the holder's process id, for messages.

    Parameters
    ----------
    run_dir
        The run directory (must exist).
    wait_s
        How long to keep trying before giving up (covers the instant
        ``flowmodel status`` probes the lock).

    Raises
    ------
    RunLockedError
        Another live process holds the lock.
    """
    lock = Path(run_dir) / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while not _try_lock_or_fail(fd, run_dir):
            if time.monotonic() >= deadline:
                pid = _lock_pid(lock)
                who = f"pid {pid}" if pid else "pid unknown"
                raise RunLockedError(
                    f"{run_dir}: another flowmodel process ({who}) is running in this run "
                    "directory. Fix: wait for it to finish (flowmodel status CONFIG shows its "
                    "stage), or give this run another [run] out_dir."
                )
            time.sleep(0.05)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            _unlock(fd)
    finally:
        os.close(fd)


def _try_lock_or_fail(fd: int, run_dir: str | os.PathLike[str]) -> bool:
    try:
        return _try_lock(fd, exclusive=True)
    except _LocksUnsupportedError as err:
        raise RunDirectoryError(
            f"{run_dir}: its file system does not support file locks (flock: "
            f"{os.strerror(err.args[0].errno)}), so flowmodel cannot make sure that only one "
            "process works in it. Fix: put [run] out_dir on a file system with locks (a local "
            "disk, or e.g. Lustre mounted with -o flock)."
        ) from None


def lock_holder(run_dir: str | os.PathLike[str]) -> int | None:
    """Return the pid of the live process holding the run lock (0: unknown), or None when free."""
    lock = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, exclusive=False):
            _unlock(fd)
            return None
        return _lock_pid(lock)
    except _LocksUnsupportedError:
        return None  # no process can hold a lock there either
    finally:
        os.close(fd)


# ------------------------------------------------------------ run directory
def run_files(cfg: RunConfig) -> set[str]:
    """Names flowmodel writes in the run directory (stage outputs, manifest, log, lock, copies)."""
    names = {*STAGE_FILES, MANIFEST, LOG_FILE, RESOLVED_CONFIG, LOCK_FILE, CACHE_DIR}
    for suffix in (".toml", ".yaml", ".yml"):
        names.add(f"config{suffix}")
    return names


def _same_file(a: Path, b: Path) -> bool:
    if os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_run_dir(cfg: RunConfig) -> None:
    """Refuse a run directory where an output of the run would replace one of its inputs.

    Every file the run writes (:func:`run_files`, figures ``*.png``) is
    compared with every input file of the config (units, rasters, flow
    tables, towers, marginals, the report's truth file, the config file
    itself), through links too.

    Raises
    ------
    RunDirectoryError
        Naming the input, the output and the fix.
    """
    run_dir = cfg.out_dir
    names = run_files(cfg)
    inputs = dict(cfg.input_files())
    if cfg.report.truth is not None:
        inputs["report.truth"] = Path(cfg.report.truth)
    clashes = []
    for key, path in inputs.items():
        path = Path(path)
        written = path.name in names or path.suffix.lower() == ".png"
        if written and _same_file(path, run_dir / path.name):
            if cfg.source is not None and _same_file(path, Path(cfg.source)):
                continue  # the config copy skips the config itself
            clashes.append(f"{key} = {path}")
    if clashes:
        where = cfg.source or "config"
        raise RunDirectoryError(
            f"{where}: [run] out_dir = {run_dir}: the run writes files of the same name there, so "
            f"it would overwrite its input(s) {'; '.join(clashes)}. Fix: give the run a folder of "
            'its own, e.g. out_dir = "run" (or rename the input file).'
        )


def _check_foreign_files(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse a run directory without a manifest that holds files named like run outputs."""
    if (run_dir / MANIFEST).exists():
        return
    source = Path(cfg.source) if cfg.source is not None else None
    foreign = sorted(
        name
        for name in run_files(cfg) - {LOG_FILE, LOCK_FILE, CACHE_DIR, MANIFEST}
        if (run_dir / name).exists()
        and not (source is not None and _same_file(run_dir / name, source))
    )
    if foreign:
        raise RunDirectoryError(
            f"{cfg.source or 'config'}: [run] out_dir = {run_dir} has no {MANIFEST} but holds "
            f"{', '.join(foreign)}: files flowmodel did not write there, which the run would "
            'overwrite. Fix: give the run an empty folder of its own (e.g. out_dir = "run"), '
            "or move those files."
        )


@contextlib.contextmanager
def _compiler_sources(run_dir: Path) -> Iterator[None]:
    """Point PyTensor's generated Python sources at the run's cache instead of ``$TMPDIR``.

    PyTensor writes the source of every function it compiles for numba (the
    default for nutpie and used by the Laplace fit: tens to hundreds of small
    files per fit) to a new file in the system temporary directory, which it
    never removes, unless ``pytensor.config.generated_src_dir`` is set; then it
    writes each source once, content-addressed, in that folder. Set for the run
    (and, through ``PYTENSOR_FLAGS``, for its child processes).
    """
    folder = run_dir / CACHE_DIR / "pytensor-src"
    old_env = os.environ.get("PYTENSOR_FLAGS")
    pytensor = sys.modules.get("pytensor")
    if (old_env and "generated_src_dir" in old_env) or (
        pytensor is not None and pytensor.config.generated_src_dir
    ):
        yield  # the user chose a folder
        return
    if "," not in str(folder) and "=" not in str(folder):
        os.environ["PYTENSOR_FLAGS"] = (
            f"{old_env},generated_src_dir={folder}" if old_env else (f"generated_src_dir={folder}")
        )
    if pytensor is not None:
        pytensor.config.generated_src_dir = str(folder)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("PYTENSOR_FLAGS", None)
        else:
            os.environ["PYTENSOR_FLAGS"] = old_env
        loaded = sys.modules.get("pytensor")  # imported before or during the run
        if loaded is not None:
            loaded.config.generated_src_dir = ""


@contextlib.contextmanager
def _log_to(run_dir: Path, level: int) -> Iterator[None]:
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger("flowmodel")
    warn_log = logging.getLogger("py.warnings")
    old_level = root.level
    root.addHandler(handler)
    warn_log.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        warn_log.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)


def _copy_config(cfg: RunConfig, run_dir: Path) -> None:
    from flowmodel.atomic import atomic_path

    if cfg.source is not None and Path(cfg.source).exists():
        target = run_dir / f"config{Path(cfg.source).suffix.lower()}"
        if Path(cfg.source).resolve() != target.resolve():
            with atomic_path(target) as tmp:
                shutil.copyfile(cfg.source, tmp)
    resolved = {"source": str(cfg.source) if cfg.source else None, **cfg.section_dict()}
    _write_json(run_dir / RESOLVED_CONFIG, resolved)


# ---------------------------------------------------------------------- decide
def _decide(
    spec: StageSpec,
    entry: Mapping[str, Any] | None,
    chash: str,
    inputs: Mapping[str, str],
    run_dir: Path,
    cache: dict[str, Any],
    force: bool,
    prev_cfg: Mapping[str, Any] | None,
    cur_cfg: Mapping[str, Any],
) -> str | None:
    """Why the stage must run, or None when it can be skipped."""
    if force:
        return "forced (--force)"
    if not entry:
        return "no previous run of this stage"
    status = entry.get("status")
    if status == "running":
        return f"previous attempt (started {entry.get('started')}) did not finish: resuming here"
    if status == "interrupted":
        return f"previous attempt (started {entry.get('started')}) was interrupted"
    if status == "failed":
        return f"previous attempt failed ({entry.get('error', 'unknown error')})"
    if entry.get("config_hash") != chash:
        changed = sorted(
            k
            for k in set(cur_cfg) | set(prev_cfg or {})
            if (prev_cfg or {}).get(k) != cur_cfg.get(k)
        )
        return (
            f"config changed: {', '.join(changed) if changed else 'sections hashed differently'}"
        )
    old_inputs = entry.get("inputs", {})
    changed = sorted(
        k for k in set(inputs) | set(old_inputs) if inputs.get(k) != old_inputs.get(k)
    )
    if changed:
        return f"input changed: {', '.join(changed)}"
    for name, digest in entry.get("outputs", {}).items():
        path = run_dir / name
        if not path.exists():
            return f"output missing: {name}"
        if file_sha256(path, cache) != digest:
            return f"output modified since the stage ran: {name}"
    return None


def _stage_inputs(
    spec: StageSpec,
    cfg: RunConfig,
    run_dir: Path,
    cache: dict[str, Any],
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    if spec.name == "prepare":
        cfg.check_files()
        return {key: file_sha256(path, cache) for key, path in cfg.input_files().items()}
    out = {}
    where = cfg.source or "CONFIG"
    for name in spec.needs:
        path = run_dir / name
        producer = PRODUCER.get(name, "an earlier stage")
        if not path.exists():
            raise StageInputMissingError(
                f"stage '{spec.name}' needs {path}, which does not exist. "
                f"Fix: run 'flowmodel {producer} {where}' first (or 'flowmodel run {where}')."
            )
        status = (manifest or {}).get("stages", {}).get(producer, {}).get("status", "done")
        if status != "done":
            # the file is complete (atomic writes) but belongs to an older run of that stage
            raise StageInputMissingError(
                f"stage '{spec.name}' needs {name} from stage '{producer}', whose last attempt "
                f"did not finish (status: {status}). Fix: run 'flowmodel {producer} {where}' "
                f"first (or 'flowmodel run {where}')."
            )
        out[name] = file_sha256(path, cache)
        written = (manifest or {}).get("stages", {}).get(producer, {}).get("outputs", {})
        if name in written and written[name] != out[name]:
            # truncated (a copy cut short, a full disk) or edited since the producer wrote it
            raise StageInputChangedError(
                f"stage '{spec.name}' needs {path}, which changed since stage '{producer}' wrote "
                f"it (its SHA-256 differs from the manifest's: truncated, damaged or edited). "
                f"Fix: run 'flowmodel {producer} {where}' again to rewrite it (or 'flowmodel run "
                f"{where}')."
            )
    return out


def _stage_function(name: str) -> Callable[[StageContext], Mapping[str, Path]]:
    # looked up at call time so tests (and plugins) can replace a stage
    return globals()[f"stage_{name}"]


def run_pipeline(
    config: RunConfig,
    stages: Sequence[str] | None = None,
    *,
    force: bool = False,
    scheduler: str | None = None,
    progress: bool = False,
    log_level: int = logging.INFO,
    on_stage: Callable[[str, str, str], None] | None = None,
) -> list[StageResult]:
    """Run (or resume) the pipeline in the config's run directory.

    Parameters
    ----------
    config
        Validated run config (:func:`flowmodel.config.load_config`).
    stages
        Stages to consider, in pipeline order (default: all five).
    force
        Run the stages even when inputs and config are unchanged.
    scheduler
        Dask scheduler address, overriding ``[dask]``.
    progress
        Show progress bars in long stages.
    log_level
        Level of the run's log file handler chain (the file gets everything
        from INFO up).
    on_stage
        Callback ``(stage, event, message)``, event one of ``start``, ``skip``,
        ``done`` (the CLI prints these).

    Returns
    -------
    list of StageResult
        One per stage, in order.

    Raises
    ------
    StageInputMissingError
        A stage's input from an earlier stage does not exist.
    RunLockedError
        Another live process runs in the same directory.
    """
    names = list(STAGE_ORDER if stages is None else stages)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; known: {', '.join(STAGE_ORDER)}")
    names = [s for s in STAGE_ORDER if s in names]
    if not config.report.enabled and "report" in names and stages is None:
        names.remove("report")
    run_dir = config.out_dir
    check_run_dir(config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(
            f"{config.source or 'config'}: [run] out_dir = {run_dir} cannot be created "
            f"({err.strerror}). Fix: choose a folder you can write to."
        ) from None
    results: list[StageResult] = []
    ctx = StageContext(config=config, run_dir=run_dir, progress=progress, scheduler=scheduler)
    started = time.time()
    with run_lock(run_dir):
        _check_foreign_files(config, run_dir)
        manifest_path = run_dir / MANIFEST
        if not manifest_path.exists():
            # claim the folder first: from here on its run files are flowmodel's
            _write_json(manifest_path, read_manifest(run_dir))
        stack = contextlib.ExitStack()
        stack.enter_context(_log_to(run_dir, log_level))
        stack.enter_context(_compiler_sources(run_dir))
        with stack:
            logger.info(
                "flowmodel run '%s' in %s: stages %s (config %s)",
                config.run.name,
                run_dir,
                ", ".join(names),
                config.source or "<python>",
            )
            from flowmodel.atomic import clean_stale_temp

            for stale in clean_stale_temp(run_dir, older_than=started, names=[FLOWS_ZARR]):
                logger.info("removed %s, left by an interrupted write", stale.name)
            _copy_config(config, run_dir)
            manifest = read_manifest(run_dir)
            results = _run_stages(config, names, manifest, ctx, force=force, on_stage=on_stage)
    return results


def _run_stages(
    config: RunConfig,
    names: Sequence[str],
    manifest: dict[str, Any],
    ctx: StageContext,
    *,
    force: bool,
    on_stage: Callable[[str, str, str], None] | None,
) -> list[StageResult]:
    """Run or skip each stage in order, keeping the manifest up to date (holding the run lock)."""
    run_dir = ctx.run_dir
    results: list[StageResult] = []
    cache: dict[str, Any] = manifest.setdefault("file_cache", {})
    manifest_path = run_dir / MANIFEST
    try:
        for name in names:
            spec = STAGES[name]
            cur_cfg = spec.config(config)
            chash = config_hash(cur_cfg)
            inputs = _stage_inputs(spec, config, run_dir, cache, manifest)
            entry = manifest["stages"].get(name)
            reason = _decide(
                spec,
                entry,
                chash,
                inputs,
                run_dir,
                cache,
                force,
                (entry or {}).get("config"),
                cur_cfg,
            )
            if reason is None:
                why = f"inputs and config unchanged since {entry.get('finished')}"  # type: ignore[union-attr]
                logger.info("skip %s: %s", name, why)
                manifest["history"].append(
                    {"time": _now(), "stage": name, "action": "skipped", "reason": why}
                )
                entry["last_skip_reason"] = why  # type: ignore[index]
                _write_json(manifest_path, manifest)
                outs = {k: run_dir / k for k in entry.get("outputs", {})}  # type: ignore[union-attr]
                results.append(StageResult(name, "skipped", why, 0.0, outs))
                if on_stage:
                    on_stage(name, "skip", why)
                continue
            logger.info("run %s: %s", name, reason)
            if on_stage:
                on_stage(name, "start", reason)
            manifest["stages"][name] = {
                "status": "running",
                "reason": reason,
                "started": _now(),
                "config_hash": chash,
                "config": cur_cfg,
                "inputs": inputs,
                "outputs": {},
                "pid": os.getpid(),
            }
            manifest["history"].append(
                {"time": _now(), "stage": name, "action": "started", "reason": reason}
            )
            _write_json(manifest_path, manifest)
            t0 = time.perf_counter()
            try:
                outputs = dict(_stage_function(name)(ctx) or {})
            except BaseException as err:
                status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                manifest["stages"][name].update(
                    status=status,
                    error=f"{type(err).__name__}: {err}".splitlines()[0][:300],
                    finished=_now(),
                )
                manifest["history"].append({"time": _now(), "stage": name, "action": status})
                _write_json(manifest_path, manifest)
                logger.error("stage %s %s: %s: %s", name, status, type(err).__name__, err)
                raise
            duration = time.perf_counter() - t0
            out_hashes = {}
            for key, path in outputs.items():
                path = Path(path)
                rel = os.path.relpath(path, run_dir)
                if not path.exists():
                    raise FileNotFoundError(
                        f"stage {name} reported output {key} at {path}, which is missing"
                    )
                out_hashes[rel] = file_sha256(path, cache)
            manifest["stages"][name].update(
                status="done",
                finished=_now(),
                duration_s=round(duration, 3),
                outputs=out_hashes,
            )
            manifest["stages"][name].pop("error", None)
            manifest["history"].append(
                {
                    "time": _now(),
                    "stage": name,
                    "action": "done",
                    "duration_s": round(duration, 3),
                }
            )
            manifest["history"] = manifest["history"][-500:]
            _write_json(manifest_path, manifest)
            logger.info("done %s in %.1f s", name, duration)
            if on_stage:
                on_stage(name, "done", f"{duration:.1f} s")
            results.append(
                StageResult(
                    name, "ran", reason, duration, {k: Path(v) for k, v in outputs.items()}
                )
            )
    finally:
        ctx.close()
    return results


# ======================================================================= stages
MODEL_CLASSES = _CONFIG_MODEL_CLASSES  # one table: flowmodel.config.MODEL_CLASSES


def _model_class(kind: str) -> type:
    import importlib

    module, name = MODEL_CLASSES[kind]
    return getattr(importlib.import_module(module), name)


def build_model(cfg: RunConfig) -> Any:
    """Build the unfitted model a config describes (``[model] type``, ``options``, ``priors``).

    For ``type = "fusion"`` the latent model is ``options.latent``: a table
    with ``type = "gravity"|"radiation"`` and that model's options (default: a
    gravity model with its default options).

    Raises
    ------
    flowmodel.exceptions.ModelConfigError
        From the model constructor, for an unknown or invalid option.
    """
    options = dict(cfg.model.options)
    priors = cfg.model.priors or None
    if cfg.model.type == "fusion":
        latent = options.pop("latent", None) or {}
        if isinstance(latent, Mapping) and "class" not in latent:
            latent = dict(latent)
            kind = str(latent.pop("type", "gravity"))
            if kind not in ("gravity", "radiation"):
                raise ConfigError(
                    f"{cfg.source or 'config'}: [model.options.latent] type: expected 'gravity' or "
                    f"'radiation', got {kind!r}. Fix: use one of those values."
                )
            latent = _model_class(kind)(**latent)
        options["latent"] = latent
    return _model_class(cfg.model.type)(**options, priors=priors)


def _load_units(cfg: RunConfig) -> Any:
    from flowmodel.inputs.units import concat_units, load_units

    files = cfg.units.files()
    frames = [load_units(**f) for f in files]
    units = concat_units(frames, [f["path"] for f in files])
    if cfg.units.countries:
        present = set(units["country"].astype(str))
        missing = sorted(set(cfg.units.countries) - present)
        if missing:
            raise ConfigError(
                f"{cfg.source or 'config'}: [units] countries: {missing} not in the units file(s) "
                f"(countries there: {sorted(present)}). Fix: use codes from the country field."
            )
        units = units.loc[units["country"].astype(str).isin(cfg.units.countries)].reset_index(
            drop=True
        )
    return units


@dataclass
class SourceTables:
    """What reading one ``[flows.<name>]`` source gives (see :func:`read_flow_source`)."""

    flows: Any
    covariates: Any = None
    totals: Any = None
    cdr: Any = None


def read_flow_source(
    name: str, source: Any, units: Any, *, population: Any = None, progress: bool = False
) -> SourceTables:
    """Read one ``[flows.<name>]`` source into a long flow table.

    Parameters
    ----------
    name
        Source name (``census``, ``cdr``, ...): the dataset variable is ``flow_<name>``.
    source
        The :class:`~flowmodel.config.FlowSource` section; ``options`` are
        passed to the reader (:func:`flowmodel.inputs.census.read_census_od`,
        :func:`~flowmodel.inputs.census.read_census_persons`,
        :func:`flowmodel.inputs.cdr.cdr_flows`,
        :func:`~flowmodel.inputs.cdr.read_cdr_od`, or :func:`pandas.read_csv`
        for ``kind = "table"``).
    units
        The units GeoDataFrame (codes, countries; CDR towers are assigned to
        units through it).
    population
        Unit populations (indexed by unit id) for CDR penetration covariates.
    progress
        Show progress bars.

    Returns
    -------
    SourceTables
        ``flows``: the long flow table (``origin, destination, count[, max]
        [, weighted][, exposure][, period]``; for ``kind = "estimates"`` the raw
        estimates table); ``covariates``: extra unit covariates (CDR subscribers
        per resident) or None; ``totals``: the CDR in/out totals summed before
        redaction (``flowmodel.inputs.cdr.CDRFlows.totals``) or None.
    """
    import pandas as pd

    kind = source.resolved_kind(name)
    options = dict(source.options)
    if kind == "estimates":
        from flowmodel.inputs.estimates import read_estimates

        return SourceTables(read_estimates(source.path, **options))
    if kind in ("census_od", "census_persons") and population is not None:
        options.setdefault("population", population)  # plausibility of the counts
    if kind == "census_od":
        from flowmodel.inputs.census import read_census_od

        return SourceTables(read_census_od(source.path, units=units, **options))
    if kind == "census_persons":
        from flowmodel.inputs.census import read_census_persons

        return SourceTables(read_census_persons(source.path, units, **options))
    if kind in ("cdr_events", "cdr_od"):
        from flowmodel.inputs import cdr

        if kind == "cdr_events":
            if population is not None:
                options.setdefault("population", population)
            options.setdefault("progress", progress)
            result = cdr.cdr_flows(source.path, source.towers, units, **options)
        else:
            result = cdr.read_cdr_od(source.path, units=units, **options)
        covariates = getattr(result, "covariates", None)
        if covariates is not None and len(covariates.columns) == 0:
            covariates = None
        totals = getattr(result, "totals", None)
        if totals is not None and len(totals) == 0:
            totals = None
        return SourceTables(result.flows, covariates, totals, result)
    path = Path(source.path)
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path, **options)
        else:
            table = pd.read_csv(path, **options)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputFileError(
            f"{path} (flows.{name}): cannot be read as a flow table ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}). Fix: give a CSV or Parquet table with origin, "
            "destination and count columns (options are passed to pandas.read_csv)."
        ) from None
    _check_table_counts(table, path, name)
    return SourceTables(table)


def _check_table_counts(table: Any, path: Path, name: str) -> None:
    """Check that a plain flow table's counts are whole numbers >= 0 or empty, naming rows."""
    import numpy as np
    import pandas as pd

    from flowmodel.exceptions import DataContractError

    if "count" not in table.columns:
        return
    raw = table["count"]
    counts = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    text = raw.astype(str).str.strip()
    problems = {
        "not numbers": np.isnan(counts) & raw.notna().to_numpy() & (text != "").to_numpy(),
        "negative": counts < 0,
        "not whole numbers": np.abs(counts - np.round(counts)) > 1e-9,
    }
    for what, bad in problems.items():
        if bad.any():
            rows = (np.flatnonzero(bad) + 1).tolist()
            raise DataContractError(
                f"{path} (flows.{name}): column 'count': {int(bad.sum())} value(s) are {what}, at "
                f"data row(s) {rows[:10]}{' ...' if len(rows) > 10 else ''} (values "
                f"{raw.iloc[np.flatnonzero(bad)[:5]].tolist()}). Fix: counts are unweighted "
                "whole numbers >= 0 (empty = unobserved); correct those rows."
            )


def _add_marginals(ds: Any, cfg: RunConfig) -> Any:
    """Add every ``[marginals.<name>]`` table as estimates ``estimate_<name>`` (country pairs)."""
    from flowmodel.dataset import marginals_to_dataset
    from flowmodel.exceptions import DataContractError, ModelConfigError
    from flowmodel.inputs.tables import parse_numbers, read_table

    for name, src in cfg.marginals.items():
        path = Path(src.path)
        table, label = read_table(path, f"marginals.{name}")
        if "value" in table.columns:
            table["value"] = parse_numbers(table["value"], label, "value")
        try:
            ds = marginals_to_dataset(ds, table, name=name, rel_sd=src.rel_sd)
        except (DataContractError, ModelConfigError) as err:
            raise DataContractError(f"{path} (marginals.{name}): {err}") from err
        logger.info(
            "marginals.%s: %d country pairs", name, int(ds[f"estimate_{name}"].notnull().sum())
        )
    return ds


def _add_estimates(ds: Any, estimates: Mapping[str, tuple[Any, Any]]) -> Any:
    """Add every ``kind = "estimates"`` source as ``estimate_<name>`` (a bad table names its file)."""
    from flowmodel.dataset import estimates_to_dataset
    from flowmodel.exceptions import DataContractError, ModelConfigError

    for name, (table, source) in estimates.items():
        try:
            ds = estimates_to_dataset(
                ds,
                table,
                name=name,
                origin_level=table.attrs["origin_level"],
                destination_level=table.attrs["destination_level"],
            )
        except (DataContractError, ModelConfigError) as err:
            raise DataContractError(f"{source.path} (flows.{name}): {err}") from err
    return ds


def _add_totals(ds: Any, totals: Mapping[str, Any], cfg: RunConfig) -> Any:
    """Keep the CDR in/out totals summed before redaction (the fusion model uses them)."""
    from flowmodel.dataset import totals_to_dataset

    for name, table in totals.items():
        universe = cfg.flows[name].options.get("universe", "covered")
        ds = totals_to_dataset(ds, table, source=name, universe=universe)
        logger.info("flows.%s: in/out totals kept for the model", name)
    return ds


def _period_covariates(ctx: StageContext, units: Any, covariates: Any) -> tuple[Any, Any]:
    """Covariates of ``[covariates]`` and of ``[rasters.<name>] <date> = path``.

    Returns the static covariates (the rasters' joined with the table's rows without
    a period; a dated covariate's latest value where no static one is given, so
    ``population`` may come from either) and the dated long table (``unit_id``,
    ``period``, covariates) or None.
    """
    import pandas as pd

    from flowmodel.exceptions import InputFileError

    cfg = ctx.config
    dated_parts = []
    by_date = {k: v for k, v in cfg.raster_paths().items() if isinstance(v, dict)}
    if by_date:
        from flowmodel.inputs.rasters import zonal_covariates_by_date

        rasters = {k: {d: str(p) for d, p in v.items()} for k, v in by_date.items()}
        scale = {k: v for k, v in cfg.raster_scales().items() if k in rasters} or None
        dated_parts.append(
            zonal_covariates_by_date(units, rasters, progress=ctx.progress, scale=scale)
        )
        logger.info("dated rasters: %s", ", ".join(f"{k} {sorted(v)}" for k, v in by_date.items()))
    static = []
    section = cfg.covariates
    if section is not None:
        path = Path(section.path)
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        if section.id_field not in table.columns:
            raise InputFileError(
                f"{path} ([covariates] path): no column '{section.id_field}' (columns: "
                f"{list(table.columns)}). Fix: name the unit id column, [covariates] id_field"
            )
        table = table.rename(columns={section.id_field: "unit_id"})
        table["unit_id"] = table["unit_id"].astype(str)
        if section.period_field in table.columns:
            table = table.rename(columns={section.period_field: "period"})
            with_date = table["period"].notna()
            dated_parts.append(table.loc[with_date])
            table = table.loc[~with_date].drop(columns="period")
        if len(table):
            static.append(table.set_index("unit_id"))
        n_dated = len(dated_parts[-1]) if dated_parts and "period" in table.columns else 0
        logger.info("covariates table %s: %d rows", path.name, len(table) + n_dated)
    dated = pd.concat(dated_parts, ignore_index=True) if dated_parts else None
    if dated is not None:
        from flowmodel.periods import parse_period, values_at

        # the static value is the one at the time of the flows the outputs describe
        # ([predict] period, else the primary source's window), so a model without
        # periods relates 2005-2010 moves to 2007 populations, not 2020's, and the
        # report's rates per resident use them; without a window, the latest date's
        window = _config_flows_period(cfg)
        if window:
            time = parse_period(window).midpoint
            at = values_at(dated, time)
            logger.info("dated covariates: static values at %s (%.1f)", window, time)
        else:
            dates = dated["period"].map(lambda x: parse_period(x).midpoint)
            at = dated.assign(_date=dates).sort_values("_date").groupby("unit_id").last()
            at = at.drop(columns=["period", "_date"])
        static.append(at)
    for frame in static:
        frame = frame.drop(columns=[c for c in ("geometry",) if c in frame.columns])
        if covariates is None:
            covariates = frame
        else:
            new = [c for c in frame.columns if c not in covariates.columns]
            covariates = covariates.join(frame[new])
    return covariates, dated


def _config_flows_period(cfg: RunConfig) -> str | None:
    """Return the window the outputs describe: ``[predict] period``, else the primary source's."""
    if cfg.predict.period:
        return cfg.predict.period
    first = _primary_name(cfg.flows)
    return cfg.flows[first].period if first is not None else None


def _add_periods(ds: Any, cfg: RunConfig, dated: Any) -> Any:
    """Add dated covariates (``<var>_by_date``) and each ``[flows.<name>] period`` attribute."""
    if dated is not None:
        from flowmodel.periods import add_dated_covariates

        ds = add_dated_covariates(ds, dated)
    for name, source in cfg.flows.items():
        if source.period and f"flow_{name}" in ds:
            ds[f"flow_{name}"].attrs["period"] = source.period
    return ds


def stage_prepare(ctx: StageContext) -> dict[str, Path]:
    """Read units, zonal raster covariates and flow sources; write ``dataset.nc`` and ``units.gpkg``."""
    from flowmodel.dataset import build_dataset, save_dataset
    from flowmodel.outputs.io import provenance_attrs, write_units

    cfg = ctx.config
    units = _load_units(cfg)
    logger.info("units: %d from %d file(s)", len(units), len(cfg.units.paths()))
    covariates = None
    static_rasters = {k: v for k, v in cfg.raster_paths().items() if not isinstance(v, dict)}
    if static_rasters:
        from flowmodel.inputs.rasters import zonal_covariates
        from flowmodel.parallel import is_remote

        rasters = {k: str(v) for k, v in static_rasters.items()}
        scale = {k: v for k, v in cfg.raster_scales().items() if k in rasters} or None
        if is_remote(cfg.dask, ctx.scheduler):
            # on a cluster the zonal statistics run as a task on a worker (its memory, its disk)
            logger.info("zonal statistics on a dask worker")
            covariates = ctx.client.submit(
                zonal_covariates, units, rasters, scale=scale, pure=False
            ).result()
        else:
            covariates = zonal_covariates(units, rasters, progress=ctx.progress, scale=scale)
        logger.info("covariates: %s", ", ".join(map(str, covariates.columns)))
    covariates, dated = _period_covariates(ctx, units, covariates)
    flows = {}
    estimates = {}
    totals = {}
    cdr_results = {}
    for name, source in cfg.flows.items():
        population = None
        if covariates is not None and "population" in covariates:
            population = covariates["population"]
        read = read_flow_source(name, source, units, population=population, progress=ctx.progress)
        extra = read.covariates
        if source.resolved_kind(name) == "estimates":
            estimates[name] = (read.flows, source)
            logger.info("estimates.%s: %d cells", name, len(read.flows))
            continue
        flows[name] = read.flows
        if read.totals is not None:
            totals[name] = read.totals
        if read.cdr is not None:
            cdr_results[name] = read.cdr
        logger.info("flows.%s: %d rows (%s)", name, len(flows[name]), source.resolved_kind(name))
        if extra is not None:
            covariates = (
                extra
                if covariates is None
                else covariates.join(
                    extra.drop(columns=[c for c in extra.columns if c in covariates.columns])
                )
            )
    sources = [str(p) for p in cfg.input_files().values()]
    ds = build_dataset(
        units,
        covariates=covariates,
        flows=flows or None,
        attrs={"run": cfg.run.name, "data_sources": "; ".join(sources)},
    )
    ds = _add_periods(ds, cfg, dated)
    ds = _add_marginals(ds, cfg)
    ds = _add_estimates(ds, estimates)
    ds = _add_totals(ds, totals, cfg)
    for name, result in cdr_results.items():
        # home detection's estimate of spurious moves per subscriber-period pair (a ratio of
        # national counts): the CDR observation model's background of spurious relocations
        rate = result.settings.get("spurious_rate_estimate")
        if rate and f"flow_{name}" in ds:
            ds[f"flow_{name}"].attrs["spurious_rate"] = float(rate)
    outputs = {"dataset": save_dataset(ds, ctx.path(DATASET))}
    attrs = provenance_attrs(config=cfg.section_dict(), seed=cfg.run.seed, data=ds)
    outputs["units"] = write_units(ds, ctx.path(UNITS), geometry=units, attrs=attrs)
    if cdr_results:
        from flowmodel.inputs.cdr import write_cdr_outputs

        # what home detection found (aggregates under the privacy rule) and chose, per source
        for name, result in cdr_results.items():
            for key, path in write_cdr_outputs(result, ctx.path(f"cdr_{name}")).items():
                outputs[f"cdr_{name}_{key}"] = Path(path)
    return outputs


def stage_fit(ctx: StageContext) -> dict[str, Path]:
    """Fit the configured model to ``dataset.nc``; write ``posterior.nc``."""
    from flowmodel.dataset import load_dataset

    cfg = ctx.config
    ds = load_dataset(ctx.path(DATASET))
    model = build_model(cfg)
    kwargs: dict[str, Any] = {
        "draws": cfg.model.draws,
        "tune": cfg.model.tune,
        "chains": cfg.model.chains,
    }
    kwargs.update(cfg.model.sample_kwargs)
    logger.info("fit %s model, backend %s", cfg.model.type, cfg.model.backend)
    model.fit(
        ds, backend=cfg.model.backend, random_seed=cfg.run.seed, progressbar=ctx.progress, **kwargs
    )
    return {"posterior": model.save(ctx.path(POSTERIOR))}


def _load_model(ctx: StageContext) -> Any:
    _model_class(ctx.config.model.type)  # registers the class (and the latent's module)
    for module, _ in MODEL_CLASSES.values():
        with contextlib.suppress(ImportError):
            __import__(module)
    from flowmodel.dataset import read_errors
    from flowmodel.models.base import load_model

    path = ctx.path(POSTERIOR)
    with read_errors(path, what="posterior file", fix=_rerun_fix("fit", ctx.config)):
        return load_model(path)


def _rerun_fix(stage: str, cfg: RunConfig) -> str:
    where = cfg.source or "CONFIG"
    return f"run 'flowmodel {stage} {where}' again to rewrite it"


def _primary_name(names: Any) -> str | None:
    """Return the primary of these source names: the first non-CDR one by name, else the first."""
    ordered = sorted(names)
    plain = [s for s in ordered if not is_cdr_source(s)]
    return (plain or ordered or [None])[0]


def _primary_source(ds: Any) -> str | None:
    """Return the source observed flows are reported against (:func:`_primary_name`)."""
    from flowmodel.dataset import flow_sources

    return _primary_name(flow_sources(ds))


def _observed(ds: Any, source: str | None, period: str | None = None) -> Any:
    if source is None:
        return None
    flow = ds[f"flow_{source}"]
    if period is not None:
        # a model with periods: the source's flows of the predicted window, if it saw it
        if "period" in flow.dims:
            labels = [str(p) for p in flow["period"].values]
            return flow.sel(period=period, drop=True) if period in labels else None
        return flow if flow.attrs.get("period") == period else None
    if "period" in flow.dims:
        flow = flow.sum("period", min_count=1)
    return flow


def _progress(ctx: StageContext) -> bool | None:
    """Bars when the run shows them; otherwise the process default (heartbeat lines in logs).

    ``flowmodel -q`` switches progress off for the process
    (:func:`flowmodel.progress.set_progress`), which the default follows.
    """
    return True if ctx.progress else None


def _label_sources(ds: Any, cfg: RunConfig) -> Any:
    """Copy each ``[flows.<source>] period`` into ``flow_<source>.attrs["period"]``."""
    for name, source in cfg.flows.items():
        if source.period and f"flow_{name}" in ds:
            ds[f"flow_{name}"].attrs["period"] = source.period
    return ds


def _output_period(cfg: RunConfig, source: str | None) -> str:
    """Return the period the predicted flows describe: the primary source's, else the default."""
    from flowmodel.outputs.io import DEFAULT_PERIOD

    src = cfg.flows.get(source) if source else None
    return src.period if src is not None and src.period else DEFAULT_PERIOD


def _output_attrs(
    ctx: StageContext, ds: Any, model: Any, source: str | None, period: str | None = None
) -> dict[str, Any]:
    """Provenance of the predict and report outputs: inputs by name and SHA-256, period.

    ``period``: the period a model with periods predicted (else the primary source's).
    """
    from flowmodel.outputs import io

    cfg = ctx.config
    # the prepare stage hashed the inputs (manifest); files are not read again
    known = read_manifest(ctx.run_dir)["stages"].get("prepare", {}).get("inputs", {})
    return io.provenance_attrs(
        model=model,
        config=cfg.section_dict(),
        seed=cfg.run.seed,
        data=ds,
        input_files=io.input_file_records(cfg.input_files(), hashes=known),
        period=period or _output_period(cfg, source),
        extra={"run": cfg.run.name, "observed_source": source or "none"},
    )


def stage_predict(ctx: StageContext) -> dict[str, Path]:
    """Predict every pair and the migration totals with intervals.

    Writes ``flows.nc`` (and csv / gpkg / zarr) and ``totals.nc`` (and
    ``totals.csv``, ``totals.gpkg``). ``observed`` is on the population scale
    (the primary source's count / its exposure), next to ``observed_sample``
    and ``exposure``; every file carries the primary source's period.
    """
    from flowmodel.dataset import load_dataset
    from flowmodel.outputs import io
    from flowmodel.totals import predict_totals

    cfg = ctx.config
    ds = _label_sources(load_dataset(ctx.path(DATASET)), cfg)
    model = _load_model(ctx)
    use_dask = use_dask_for_prediction(cfg, ds.sizes["unit"], ctx.scheduler)
    kwargs: dict[str, Any] = {"quantiles": tuple(cfg.predict.quantiles), "seed": cfg.run.seed}
    if cfg.predict.draws is not None:
        kwargs["draws"] = cfg.predict.draws
    # [predict] period: a model with periods predicts that window (default its latest)
    period = model.target_period(cfg.predict.period)
    if period is not None:
        kwargs["period"] = period
        logger.info("prediction: period %s", period)
    if use_dask:
        _ = ctx.client  # origin blocks run as tasks on the run's dask workers
        logger.info("prediction: origin blocks on dask workers")
        flows = model.predict(
            ds, use_dask=True, block_size=cfg.predict.block_size, **kwargs
        ).compute()
    else:
        flows = model.predict(
            ds,
            use_dask=False,
            block_size=cfg.predict.block_size,
            progress=_progress(ctx),
            **kwargs,
        )
    source = _primary_source(ds)
    observed = _observed(ds, source, period)
    exposure = ds.get(f"exposure_{source}") if source else None
    attrs = _output_attrs(ctx, ds, model, source, period)
    formats = cfg.predict.formats
    obs = {"observed": observed, "exposure": exposure}
    # flows.nc is always written: evaluate and report read it
    outputs: dict[str, Path] = {
        "flows": io.write_flows(flows, ctx.path(FLOWS), data=ds, attrs=attrs, **obs)
    }
    if "zarr" in formats:
        outputs["flows_zarr"] = io.write_flows(
            flows, ctx.path(FLOWS_ZARR), data=ds, attrs=attrs, **obs
        )
    if "csv" in formats:
        outputs["flows_csv"] = io.write_flows_csv(
            flows, ctx.path(FLOWS_CSV), data=ds, attrs=attrs, **obs
        )
    if "gpkg" in formats and "lon" in ds and "lat" in ds:
        outputs["flow_lines"] = io.write_flow_lines(
            flows, ds, ctx.path(FLOW_LINES), top_k=cfg.predict.top_k, attrs=attrs, **obs
        )
    logger.info("totals: in/out/net migration per unit and country, country pairs, movers")
    totals = predict_totals(
        model,
        ds,
        quantiles=tuple(cfg.predict.quantiles),
        draws=cfg.predict.draws,
        seed=cfg.run.seed,
        block_size=cfg.predict.block_size,
        progress=_progress(ctx),
        period=period,
    )
    outputs["totals"] = io.write_totals(totals, ctx.path(TOTALS), attrs=attrs)
    if "csv" in formats:
        outputs["totals_csv"] = io.write_totals_csv(totals, ctx.path(TOTALS_CSV), attrs=attrs)
    if "gpkg" in formats and ("lon" in ds or ctx.path(UNITS).exists()):
        # units.gpkg belongs to the prepare stage (a rewrite would make it rerun): the
        # totals go to their own GeoPackage, the units layer there carrying every column
        # of units.gpkg plus in/out/net migration, and a countries layer
        geometry = io.read_gpkg(ctx.path(UNITS))[0] if ctx.path(UNITS).exists() else None
        if geometry is not None and "geometry" not in getattr(geometry, "columns", []):
            geometry = None
        outputs["totals_gpkg"] = io.write_totals_gpkg(
            totals, ds, ctx.path(TOTALS_GPKG), geometry=geometry, attrs=attrs
        )
    return outputs


def use_dask_for_prediction(cfg: RunConfig, n_units: int, scheduler: str | None = None) -> bool:
    """Whether ``predict`` streams origin blocks through dask.

    ``[predict] use_dask`` when given; else yes on a remote cluster (a
    scheduler address or SLURM), with several local workers, or above
    :data:`flowmodel.predict.DASK_UNITS` units.
    """
    from flowmodel.parallel import is_remote

    if cfg.predict.use_dask is not None:
        return cfg.predict.use_dask
    if cfg.dask.cluster == "none" and scheduler is None and cfg.dask.scheduler is None:
        return False
    from flowmodel.predict import DASK_UNITS

    return is_remote(cfg.dask, scheduler) or (cfg.dask.n_workers or 1) > 1 or n_units > DASK_UNITS


def evaluation_sources(cfg: RunConfig, ds: Any) -> list[str]:
    """Return the sources scored by ``evaluate``.

    ``[evaluate] sources`` when given, else every non-CDR source (CDR counts
    are on the subscriber scale), else every source.
    """
    from flowmodel.dataset import flow_sources

    available = flow_sources(ds)
    if cfg.evaluate.sources:
        missing = sorted(set(cfg.evaluate.sources) - set(available))
        if missing:
            raise ConfigError(
                f"{cfg.source or 'config'}: [evaluate] sources: {missing} not in the dataset "
                f"(flow sources: {available}). Fix: name sources defined under [flows]."
            )
        return list(cfg.evaluate.sources)
    plain = [s for s in available if not is_cdr_source(s)]
    return plain or available


def _latest_round_first(ds: Any, sources: list[str]) -> list[str]:
    """Order ``sources`` so the one with the latest window comes first (``last_period``)."""
    from flowmodel.periods import observed_periods, parse_period

    def latest(source: str) -> float:
        labels = observed_periods(ds, source)
        return parse_period(labels[-1]).end if labels else float("-inf")

    return sorted(sources, key=latest, reverse=True)


def stage_evaluate(ctx: StageContext) -> dict[str, Path]:
    """In-sample metrics per source and optional cross-validation; write ``metrics.json`` (and ``cv.csv``)."""
    from flowmodel.atomic import atomic_path
    from flowmodel.dataset import load_dataset
    from flowmodel.evaluate import cross_validate, summarize_cv
    from flowmodel.evaluate import evaluate as evaluate_model

    cfg = ctx.config
    ds = load_dataset(ctx.path(DATASET))
    model = _load_model(ctx)
    quantiles = tuple(cfg.predict.quantiles)
    metrics: dict[str, Any] = {"run": cfg.run.name, "model": cfg.model.type, "sources": {}}
    sources = evaluation_sources(cfg, ds)
    for source in sources:
        table = evaluate_model(
            model, ds, source=source, quantiles=quantiles, baselines=cfg.evaluate.baselines
        )
        metrics["sources"][source] = {
            # a model with periods is scored per observed window: "<model> <period>"
            " ".join([str(row["model"]), *([str(row["period"])] if "period" in row else [])]): (
                _jsonable({k: v for k, v in row.items() if k not in ("model", "period")})
            )
            for row in table.to_dict("records")
        }
    outputs: dict[str, Path] = {}
    if cfg.evaluate.cv == "last_period" and sources:
        sources = _latest_round_first(ds, sources)
    if cfg.evaluate.cv != "none" and sources:
        cv = cross_validate(
            model,
            ds,
            scheme=cfg.evaluate.cv,
            folds=cfg.evaluate.folds,
            backend=cfg.evaluate.backend or "laplace",
            seed=cfg.run.seed,
            baselines=cfg.evaluate.baselines,
            source=sources[0],
            quantiles=quantiles,
        )
        with atomic_path(ctx.path(CV_TABLE)) as tmp:
            cv.to_csv(tmp, index=False)
        outputs["cv"] = ctx.path(CV_TABLE)
        summary = summarize_cv(cv)
        metrics["cv"] = {
            "scheme": cfg.evaluate.cv,
            "source": sources[0],
            "models": {
                str(row["model"]): _jsonable({k: v for k, v in row.items() if k != "model"})
                for row in summary.to_dict("records")
            },
        }
    _write_json(ctx.path(METRICS), metrics)
    outputs["metrics"] = ctx.path(METRICS)
    return outputs


def _backend_note(cfg: RunConfig, model: Any) -> str:
    """Say which sampler ran, and why when ``backend = "auto"`` chose it."""
    used = str((getattr(model, "fit_meta", {}) or {}).get("backend", cfg.model.backend))
    asked = cfg.model.backend
    if asked != "auto":
        return f"backend {used}"
    if used == "pymc":
        return (
            'backend "auto" chose PyMC\'s NUTS sampler because nutpie is not installed '
            "(pip install 'flowmodel[fast]' samples several times faster)"
        )
    return f'backend "auto" chose {used}'


def stage_report(ctx: StageContext) -> dict[str, Path]:
    """Figures and the self-contained HTML report; write ``report.html`` (and its PNGs)."""
    import pandas as pd

    from flowmodel.dataset import load_dataset
    from flowmodel.outputs.io import read_flows, read_gpkg
    from flowmodel.outputs.report import report

    cfg = ctx.config
    ds = _label_sources(load_dataset(ctx.path(DATASET)), cfg)
    flows = read_flows(ctx.path(FLOWS))
    model = _load_model(ctx)
    metrics = json.loads(ctx.path(METRICS).read_text())
    rows = [
        {"source": source, "model": name, **values}
        for source, models in metrics.get("sources", {}).items()
        for name, values in models.items()
    ]
    cv = (
        pd.read_csv(ctx.path(CV_TABLE))
        if ctx.path(CV_TABLE).exists() and "cv" in metrics
        else None
    )
    truth = json.loads(Path(cfg.report.truth).read_text()) if cfg.report.truth else None
    if truth is not None and isinstance(truth.get("true_flows"), str) and "mu" not in truth:
        # the simulator's true expected flows: the report scores their recovery
        true_flows = Path(cfg.report.truth).parent / truth["true_flows"]
        if true_flows.exists():
            truth["mu"] = pd.read_csv(true_flows, dtype={"origin": str, "destination": str})
    geometry = None
    if ctx.path(UNITS).exists():
        geometry, _ = read_gpkg(ctx.path(UNITS))
    source = _primary_source(ds)
    if ctx.path(TOTALS).exists():
        totals = read_flows(ctx.path(TOTALS))
    else:  # a run directory predicted before totals existed
        from flowmodel.totals import predict_totals

        totals = predict_totals(
            model,
            ds,
            quantiles=tuple(cfg.predict.quantiles),
            draws=cfg.predict.draws,
            seed=cfg.run.seed,
            progress=_progress(ctx),
        )
    notes = [
        f"Run '{cfg.run.name}', config {Path(cfg.source).name if cfg.source else '(python)'}, "
        f"model {cfg.model.type}, {_backend_note(cfg, model)}."
    ]
    path = report(
        ctx.run_dir,
        data=ds,
        predictions=flows,
        model=model,
        metrics=pd.DataFrame(rows) if rows else None,
        cv=cv,
        truth=truth,
        units_geometry=geometry,
        observed=_observed(ds, source),
        source=source,
        title=cfg.report.title or f"flowmodel: {cfg.run.name}",
        top_k=cfg.report.top_k,
        attrs=_output_attrs(ctx, ds, model, source),
        notes=notes,
        totals=totals,
        period=_output_period(cfg, source),
        cdr_folders={
            name: ctx.path(f"cdr_{name}")
            for name in sorted(cfg.flows)
            if ctx.path(f"cdr_{name}").is_dir()
        },
    )
    outputs = {"report": Path(path)}
    for png in sorted(ctx.run_dir.glob("*.png")):
        outputs[png.stem] = png
    return outputs


def _jsonable(value: Any) -> Any:
    """Metrics (numpy scalars, Series, dicts) as plain JSON values."""
    import numpy as np

    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dict") and not isinstance(value, np.ndarray):
        return _jsonable(value.to_dict())
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def stage_status(config: RunConfig) -> list[dict[str, Any]]:
    """Per-stage status of a run directory (for ``flowmodel status``), without running anything.

    A stage the manifest marks ``running`` is reported as ``running (pid N)``
    only while a process holds the run lock; otherwise its process ended
    without finishing it (killed, node lost) and it is reported as
    ``interrupted``: the next run resumes there.
    """
    manifest = read_manifest(config.out_dir)
    holder = lock_holder(config.out_dir)
    rows = []
    for name in STAGE_ORDER:
        entry = manifest["stages"].get(name, {})
        status = entry.get("status", "not run")
        reason = entry.get("last_skip_reason") or entry.get("reason")
        if status == "running":
            if holder is None:
                status = "interrupted"
                pid = entry.get("pid")
                reason = (
                    f"its process{f' (pid {pid})' if pid else ''} ended without finishing it "
                    f"(started {entry.get('started')}); the next run resumes here"
                )
            else:
                status = f"running (pid {holder})" if holder else "running"
        rows.append(
            {
                "stage": name,
                "status": status,
                "finished": entry.get("finished") if status != "interrupted" else None,
                "duration_s": entry.get("duration_s"),
                "reason": reason,
            }
        )
    return rows


# ========================================================================= demo
#: Sizes of ``flowmodel demo --size``: keyword arguments of ``simulate_world``.
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "small": {"n_units": 60, "n_countries": 6},
    "medium": {"n_units": 120, "n_countries": 6},
}

DEMO_CONFIG = """\
# flowmodel demo: the simulated world of flowmodel.simulate.simulate_world.
# Paths are relative to this file. Run it again with: flowmodel run {config_name}
[run]
name = "demo-{size}"
out_dir = "."
seed = {seed}

[units]
path = "world/units.gpkg"
layer = "units"
id_field = "unit_id"
country_field = "country"
fields = ["admin1"]   # census tables may name admin-1 regions

[rasters]
population = "world/population.tif"
built_up = "world/built_up.tif"
night_lights = "world/night_lights.tif"

[flows.census]
# internal migrants: residence five years ago x current unit, within each census country
path = "world/census_od.csv"
# residence five years before the census: the window the census flows (and the outputs) cover
period = "2019-2024"
# "<5" marks 1-4 (zeros are printed as 0), so suppressed cells are censored to 1..4
options = {{ sample_fraction = {sample_fraction}, suppressed_min = 1, universe = "within", origin_level = "{census_level}" }}

[flows.census_abroad]
# immigrants: the census records only the *country* they lived in five years ago
kind = "census_od"
path = "world/census_immigrants.csv"
options = {{ origin = "previous_country", destination = "current_unit", origin_level = "country", universe = "abroad", sample_fraction = {sample_fraction}, suppressed_min = 1 }}

[flows.cdr]
path = "world/cdr_events.parquet"
towers = "world/cdr_towers.csv"
period = "2024-01/2024-03"
# event times are UTC; night/day hours of the home detection are local
options = {{ timezone = "{timezone}" }}

[model]
type = "fusion"
backend = "auto"   # NUTS: nutpie when installed (pip install 'flowmodel[fast]'), else PyMC's sampler
# the package's defaults: 4 chains (R-hat needs several; sigma_country has only 4 countries to
# learn from) x 1000 draws after 1000 tuning steps give every summary parameter a bulk ESS above
# 400 (the slowest: period_scale, which trades off with the spread of the market shares)
draws = 1000
tune = 1000
chains = 4

[model.options]
sources = ["census", "census_abroad", "cdr"]
# the simulated CDR is a panel: its subscribers per resident (~0.0004) say which units the
# operator covers better, not its market share, so the covariate shapes the shares (a slope on
# its standardised log) and the level keeps the default centre, market_share_default = 0.3
market_share_covariate = "cdr_subscribers_per_resident"

[model.options.latent]
type = "gravity"
origin_covariates = ["log_population"]
destination_covariates = ["log_population", "night_lights_per_capita"]
# country levels centred for NUTS (every fitted country has many pairs), non-centred for Laplace
noncentered = "auto"

# CDR: relocations per month; census: moves over 5 years -> about 1/60 per period
# (less where home detection misses moves): LogNormal(log(1/60), 1.5)
[model.priors]
period_scale = {{ dist = "LogNormal", mu = -4.0943, sigma = 1.5 }}

[predict]
quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
top_k = 300

[evaluate]
cv = "none"

[report]
title = "flowmodel demo: simulated world ({size})"
truth = "world/truth.json"   # adds a true-vs-estimated table

[dask]
cluster = "local"
n_workers = 1
"""


def demo_config(
    out: str | os.PathLike[str],
    *,
    size: str = "small",
    seed: int = 0,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> RunConfig:
    """Simulate the demo world (unless already there) and write and load its config.

    Parameters
    ----------
    out
        Folder of the demo: ``out/world`` gets the simulated inputs,
        ``out/demo.toml`` the config and ``out`` itself the run outputs
        (``out/report.html``).
    size
        ``"small"`` or ``"medium"`` (see :data:`DEMO_SIZES`).
    seed
        Seed of the simulated world and of the fit.
    overrides
        ``--set key=value`` overrides for the demo config.
    force
        Simulate the world again even if ``out/world/truth.json`` exists. It is
        simulated again anyway when it was written for another size, seed or
        :data:`flowmodel.simulate.WORLD_VERSION`.

    Returns
    -------
    RunConfig
        The loaded demo config.
    """
    from flowmodel.atomic import atomic_path
    from flowmodel.config import load_config

    if size not in DEMO_SIZES:
        raise ConfigError(f"--size {size!r}: expected one of {sorted(DEMO_SIZES)}")
    out = Path(out)
    world = out / "world"
    stamp = world / ".demo-size"
    from flowmodel.simulate import WORLD_VERSION

    # a world written by another version of the simulator is simulated again
    wanted = json.dumps({"size": size, "seed": seed, "world_version": WORLD_VERSION})
    if (
        force
        or not (world / "truth.json").exists()
        or not stamp.exists()
        or stamp.read_text() != wanted
    ):
        from flowmodel.simulate import simulate_world

        logger.info("simulating the %s demo world in %s", size, world)
        simulate_world(world, seed=seed, **DEMO_SIZES[size])
        stamp.write_text(wanted)
    config = out / "demo.toml"
    truth = json.loads((world / "truth.json").read_text())
    text = DEMO_CONFIG.format(
        size=size,
        seed=seed,
        config_name=config,
        sample_fraction=truth.get("sample_fraction", 0.1),
        census_level="admin1" if truth.get("census_previous_level") == "admin1" else "unit",
        timezone=truth.get("timezone", "UTC"),
    )
    if not config.exists() or config.read_text() != text:
        with atomic_path(config) as tmp:
            tmp.write_text(text)
    cfg = load_config(config, overrides)
    import importlib.util

    if cfg.model.backend == "auto" and importlib.util.find_spec("nutpie") is None:
        logger.warning(
            "nutpie is not installed: the demo samples with PyMC's NUTS sampler (backend "
            "'auto'), several times slower than nutpie (%d chains x %d draws: expect tens of "
            "minutes on 2 cores). Faster: pip install 'flowmodel[fast]'; or a shorter run: "
            "flowmodel demo --set model.draws=500 --set model.tune=500",
            cfg.model.chains,
            cfg.model.draws + cfg.model.tune,
        )
    return cfg


def _posterior_estimates(path: Path) -> dict[str, tuple[float, float, float]]:
    """Posterior mean and 90% equal-tailed interval of the raw-scale parameters."""
    import numpy as np
    import xarray as xr

    out: dict[str, tuple[float, float, float]] = {}
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        post = tree["posterior"].to_dataset()

        def add(label: str, values: Any) -> None:
            draws = np.asarray(values, dtype=float).ravel()
            draws = draws[np.isfinite(draws)]
            if draws.size:
                lo, hi = np.quantile(draws, [0.05, 0.95])
                out[label] = (float(draws.mean()), float(lo), float(hi))

        for name in ("intercept_raw", "intercept"):
            if name in post:
                add("intercept", post[name].values)
                break
        beta = post["beta_raw"] if "beta_raw" in post else post.get("beta")
        if beta is not None and "term" in beta.dims:
            for term in beta["term"].values:
                add(f"beta[{term}]", beta.sel(term=term).values)
        for name in ("sigma_country", "tau", "radiation_exponent"):
            if name in post and set(post[name].dims) <= {"chain", "draw"}:
                add(name, post[name].values)
        if "phi" in post:
            phi = post["phi"]
            if "source" in phi.dims:
                for src in phi["source"].values:
                    add(f"phi[{src}]", phi.sel(source=src).values)
            else:
                add("phi", phi.values)
        if "period_scale" in post and set(post["period_scale"].dims) <= {"chain", "draw"}:
            add("period_scale", post["period_scale"].values)
        # the raw intercept extrapolates to covariates of 0; the log-rate at the covariate
        # means is what the data identify (the raw intercept's error is mostly slope error)
        meta = json.loads(tree.attrs.get("flowmodel_fit_meta", "{}") or "{}")
        latent = meta.get("latent", meta)
        terms, means = latent.get("terms"), latent.get("term_mean")
        if (
            "intercept_raw" in post
            and "beta_raw" in post
            and terms
            and means
            and list(post["beta_raw"]["term"].values.astype(str)) == list(terms)
        ):
            beta_raw = post["beta_raw"].transpose("chain", "draw", "term").values
            add("log-rate at covariate means", post["intercept_raw"].values + beta_raw @ means)
    return out


def _true_log_rate_at_means(path: Path, truth: Mapping[str, Any]) -> dict[str, float]:
    """Return the true log-rate at the fitted covariate means (``intercept + Σ beta · mean``)."""
    import xarray as xr

    with xr.open_datatree(path, engine="h5netcdf") as tree:
        meta = json.loads(tree.attrs.get("flowmodel_fit_meta", "{}") or "{}")
    latent = meta.get("latent", meta)
    terms, means = latent.get("terms") or [], latent.get("term_mean") or []
    beta = truth.get("beta")
    if (
        not isinstance(truth.get("intercept"), int | float)
        or not isinstance(beta, Mapping)
        or not terms
        or any(t not in beta for t in terms)
    ):
        return {}
    value = float(truth["intercept"]) + sum(
        float(beta[t]) * float(m) for t, m in zip(terms, means, strict=True)
    )
    return {"log-rate at covariate means": value}


def _market_share_line(path: Path, truth: Mapping[str, Any]) -> str:
    """Return one line on the recovery of the true CDR market shares, or ''."""
    import numpy as np
    import xarray as xr

    true = truth.get("market_share")
    if not isinstance(true, Mapping) or not path.exists():
        return ""
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        post = tree["posterior"].to_dataset()
        if "market_share" not in post or "market_unit" not in post["market_share"].dims:
            return ""
        share = post["market_share"].load()
    units = [str(u) for u in share["market_unit"].values if str(u) in true]
    if not units:
        return ""
    draws = share.sel(market_unit=units).stack(s=("chain", "draw")).values
    lo, hi = np.quantile(draws, [0.05, 0.95], axis=1)
    t = np.array([float(true[u]) for u in units])
    inside = float(np.mean((t >= lo) & (t <= hi)))
    return (
        f"  market share ({len(units)} CDR units): true mean {t.mean():.2f}, estimated "
        f"{draws.mean():.2f}; {inside:.0%} of true shares inside their 90% intervals"
    )


def _recovery_lines(run_dir: Path, truth: Mapping[str, Any], truth_path: Path) -> list[str]:
    """Recovery of the simulator's true expected flows, by the data available for each pair."""
    import pandas as pd
    import xarray as xr

    from flowmodel.dataset import load_dataset
    from flowmodel.outputs.io import read_flows
    from flowmodel.outputs.report import recovery_table

    name = truth.get("true_flows")
    if not isinstance(name, str) or not (truth_path.parent / name).exists():
        return []
    if not (run_dir / FLOWS).exists() or not (run_dir / DATASET).exists():
        return []
    table = pd.read_csv(truth_path.parent / name, dtype={"origin": str, "destination": str})
    mu = xr.DataArray.from_series(table.set_index(["origin", "destination"])["mu"])
    flows = read_flows(run_dir / FLOWS)
    ds = load_dataset(run_dir / DATASET)
    mu = mu.reindex_like(flows["mean"])
    realised = None
    if "flow" in table:
        realised = xr.DataArray.from_series(table.set_index(["origin", "destination"])["flow"])
        realised = realised.reindex_like(flows["mean"])
    groups = recovery_table(mu, flows, ds, truth, realised=realised)
    if groups.empty:
        return []
    lines = [
        "recovery of the true flows (all pairs, population scale; CPC and pred/true against "
        "the expected flows, 90% cov of the realised flows):"
    ]
    lines.append(f"  {'pairs':<14} {'n':>5}  {'CPC':>5}  {'pred/true':>9}  {'90% cov':>7}")
    for row in groups.itertuples(index=False):
        lines.append(f"  {row[0]:<14} {row[1]:>5}  {row[2]:5.3f}  {row[3]:9.2f}  {row[4]:7.1%}")
    return lines


def _totals_lines(run_dir: Path) -> list[str]:
    """Total and cross-border movers with 90% intervals, and which sampler ran."""
    import xarray as xr

    lines = []
    path = run_dir / TOTALS
    if path.exists():
        with xr.open_dataset(path, engine="h5netcdf") as totals:
            period = totals.attrs.get("period", "")
            for name, label in (("total_movers", "movers"), ("cross_border", "cross-border")):
                if f"{name}_mean" in totals and f"{name}_q05" in totals:
                    mean, lo, hi = (float(totals[f"{name}_{s}"]) for s in ("mean", "q05", "q95"))
                    lines.append(
                        f"  {label:<13} {mean:>12,.0f}  90% interval [{lo:,.0f}, {hi:,.0f}]"
                    )
        if lines:
            lines.insert(0, f"estimated moves over {period} (population scale, persons):")
    posterior = run_dir / POSTERIOR
    if posterior.exists():
        with xr.open_datatree(posterior, engine="h5netcdf") as tree:
            meta = json.loads(tree.attrs.get("flowmodel_fit_meta", "{}") or "{}")
        if meta.get("backend") == "pymc":
            lines.append(
                "sampler: PyMC's NUTS (nutpie is not installed; pip install 'flowmodel[fast]' "
                "samples several times faster)"
            )
        elif meta.get("backend"):
            lines.append(f"sampler: {meta['backend']}")
    return lines


def demo_summary(run_dir: str | os.PathLike[str], truth_path: str | os.PathLike[str]) -> str:
    """Text summary of a demo run: true vs estimated parameters, metrics, where the report is.

    Parameters
    ----------
    run_dir
        The demo's run directory.
    truth_path
        The simulator's ``truth.json``.
    """
    run_dir = Path(run_dir)
    lines = ["", "flowmodel demo: true vs estimated parameters (posterior mean, 90% interval)"]
    truth: dict[str, Any] = {}
    if Path(truth_path).exists():
        truth = json.loads(Path(truth_path).read_text())
    true_flat: dict[str, float] = {}
    for key, value in truth.items():
        if key == "beta" and isinstance(value, Mapping):
            true_flat.update({f"beta[{k}]": v for k, v in value.items()})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            true_flat[key] = value
        elif key == "phi" and isinstance(value, Mapping):
            true_flat.update({f"phi[{k}]": v for k, v in value.items()})
    period_effect = truth.get("period_effect")
    if isinstance(period_effect, Mapping) and period_effect:
        # the model's period_scale is the geometric mean of the per-period effects
        logs = [
            math.log(v) for v in period_effect.values() if isinstance(v, int | float) and v > 0
        ]
        if logs:
            true_flat["period_scale"] = math.exp(sum(logs) / len(logs))
    if isinstance(truth.get("phi"), int | float):
        # the simulator's dispersion is that of the true flows, which the census samples
        true_flat.setdefault("phi[census]", truth["phi"])
    try:
        estimates = _posterior_estimates(run_dir / POSTERIOR)
        true_flat.update(_true_log_rate_at_means(run_dir / POSTERIOR, truth))
    except (OSError, KeyError, ValueError) as err:
        estimates = {}
        lines.append(f"  (posterior unreadable: {err})")
    width = max([len(k) for k in estimates] + [10])
    lines.append(f"  {'parameter':<{width}}  {'true':>8}  {'estimate':>9}  90% interval")

    def num(value: float, width: int = 0) -> str:
        # small positive scales (period_scale ~ 0.005) need significant digits, not decimals
        text = f"{value:.3g}" if value != 0 and abs(value) < 0.1 else f"{value:.3f}"
        return f"{text:>{width}}"

    for name, (mean, lo, hi) in estimates.items():
        true = true_flat.get(name)
        shown = num(true, 8) if isinstance(true, int | float) else f"{'-':>8}"
        inside = "" if true is None else ("  ok" if lo <= true <= hi else "  (outside)")
        lines.append(f"  {name:<{width}}  {shown}  {num(mean, 9)}  [{num(lo)}, {num(hi)}]{inside}")
    share = _market_share_line(run_dir / POSTERIOR, truth)
    if share:
        lines.append(share)
    metrics_path = run_dir / METRICS
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        for source, models in metrics.get("sources", {}).items():
            lines.append(f"metrics against observed flow_{source}:")
            for model, values in models.items():
                keys = ("cpc", "log_rmse", "pearson_log", "coverage_90")
                shown = ", ".join(
                    f"{k}={values[k]:.3f}" for k in keys if isinstance(values.get(k), int | float)
                )
                lines.append(f"  {model:<22} {shown}")
    try:
        lines += _recovery_lines(run_dir, truth, Path(truth_path))
    except (OSError, KeyError, ValueError) as err:
        lines.append(f"  (true flows not scored: {err})")
    lines += _totals_lines(run_dir)
    report = run_dir / REPORT
    lines.append(f"report: {report.resolve() if report.exists() else '(not written)'}")
    lines.append(f"flows:  {(run_dir / FLOWS).resolve()}")
    if (run_dir / TOTALS).exists():
        lines.append(f"totals: {(run_dir / TOTALS).resolve()}")
    return "\n".join(lines)
