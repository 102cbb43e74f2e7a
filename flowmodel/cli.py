"""The ``flowmodel`` command line.

Thin commands: read the config, call one pipeline function, report. Every heavy
import (numpy, xarray, PyMC, dask) happens inside the commands, so
``flowmodel --help`` answers at once.

Exit codes: 0 success; 2 bad input (a config, an input file or a dataset that
breaks the data contract: any :class:`~flowmodel.exceptions.FlowModelError`,
and command-line usage errors); 1 any other failure, a fit that produced no
usable posterior (:class:`~flowmodel.exceptions.FitFailedError`) included; 130
interrupted. The
reason is printed as one line on stderr (``-v`` adds the traceback).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flowmodel._version import __version__

if TYPE_CHECKING:
    from flowmodel.config import RunConfig

__all__ = ["app", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

HELP = """\
Migration flows with uncertainty from rasters, census and CDR.

\b
Examples:
  flowmodel demo --out demo-output     # simulated world -> demo-output/report.html
  flowmodel run kenya.toml             # prepare, fit, predict, evaluate, report
  flowmodel fit kenya.toml --set model.backend=laplace --set model.draws=500
  flowmodel run kenya.toml --scheduler tcp://10.0.0.5:8786
  flowmodel status kenya.toml          # which stages are done, and why

A rerun skips every stage whose inputs and config are unchanged; a run that was
killed resumes from the last finished stage. Exit codes: 0 ok, 2 bad input
(config, input files, data contract), 1 other failure.
"""

app = typer.Typer(
    name="flowmodel",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE: dict[str, Any] = {"verbosity": 0}


class DemoSize(StrEnum):
    """Sizes of the demo world."""

    small = "small"
    medium = "medium"


# ------------------------------------------------------------------ options
ConfigArg = Annotated[
    Path,
    typer.Argument(
        metavar="CONFIG",
        help="Run config (.toml, .yaml or .yml); relative paths in it resolve against its folder.",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config value by dotted key, e.g. --set model.draws=500 (repeatable).",
        show_default=False,
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        metavar="ADDRESS",
        help="Dask scheduler address (tcp://host:8786); overrides the [dask] section.",
        show_default=False,
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", "-f", help="Run the stage(s) even if inputs and config are unchanged."
    ),
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"flowmodel {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More output (-vv: debug).")
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only errors; no progress bars.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    _STATE["verbosity"] = -1 if quiet else verbose
    _setup_logging(_STATE["verbosity"])
    from flowmodel.progress import set_progress

    # -q silences every progress bar and heartbeat line, in every loop of the library
    set_progress(False if quiet else None)


class _CliFormatter(logging.Formatter):
    """``LEVEL name: message``; a captured Python warning reads ``WARNING Category: message``.

    ``warnings.formatwarning`` puts the library's file, line and source line in front
    of and after the message: noise on a terminal (the run's log keeps them).
    """

    _WARNING = re.compile(r"^.*?:\d+: (\w+): (.*?)(?:\n  .*)?\s*$", re.S)

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "py.warnings":
            match = self._WARNING.match(record.getMessage())
            if match:
                return f"{record.levelname} {match.group(1)}: {match.group(2).strip()}"
        return super().format(record)


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    log = logging.getLogger("flowmodel")
    for handler in list(log.handlers):
        if getattr(handler, "_flowmodel_cli", False):
            log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    handler._flowmodel_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(min(level, logging.INFO))
    # Python warnings (divergences, dropped terms, ...) go to the same stream and the run's log
    logging.captureWarnings(True)
    warn_log = logging.getLogger("py.warnings")
    for old in list(warn_log.handlers):
        if getattr(old, "_flowmodel_cli", False):
            warn_log.removeHandler(old)
    warn_log.addHandler(handler)
    warn_log.propagate = False


def _quiet() -> bool:
    return _STATE["verbosity"] < 0


def _say(message: str) -> None:
    if not _quiet():
        typer.echo(message, err=True)


def _error(message: str) -> None:
    first = " ".join(str(message).split())  # one line
    typer.echo(f"flowmodel: error: {first}", err=True)


@contextmanager
def _guard() -> Iterator[None]:
    """Turn exceptions into one-line messages and the documented exit codes."""
    from flowmodel.exceptions import FitFailedError, FlowModelError

    try:
        yield
    except typer.Exit:
        raise
    except FitFailedError as err:  # the inputs were fine; the fit produced no usable posterior
        if _STATE["verbosity"] > 0:
            traceback.print_exc()
        _error(str(err))
        raise typer.Exit(EXIT_FAILURE) from None
    except FlowModelError as err:
        if _STATE["verbosity"] > 0:
            traceback.print_exc()
        _error(str(err))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        _error("interrupted; rerun the same command to resume from the last finished stage")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as err:
        if _STATE["verbosity"] > 0:
            traceback.print_exc()
        _error(f"{type(err).__name__}: {err} (rerun with -v for the traceback)")
        raise typer.Exit(EXIT_FAILURE) from None


def _load(config: Path, overrides: list[str] | None) -> RunConfig:
    from flowmodel.config import load_config

    return load_config(config, overrides or [])


def _on_stage(stage: str, event: str, message: str) -> None:
    symbol = {"start": "->", "skip": "==", "done": "ok"}[event]
    verb = {"start": "running", "skip": "skipped", "done": "finished"}[event]
    _say(f"[{symbol}] {stage}: {verb} ({message})")


def _run_stages(
    config: Path,
    stages: list[str] | None,
    overrides: list[str] | None,
    scheduler: str | None,
    force: bool,
) -> None:
    with _guard():
        cfg = _load(config, overrides)
        from flowmodel.pipeline import run_pipeline

        results = run_pipeline(
            cfg,
            stages,
            force=force,
            scheduler=scheduler,
            progress=not _quiet() and sys.stderr.isatty(),
            on_stage=_on_stage,
        )
        ran = [r.stage for r in results if r.action == "ran"]
        _say(
            f"run '{cfg.run.name}': {len(ran)} stage(s) ran, {len(results) - len(ran)} skipped; "
            f"outputs in {cfg.out_dir}"
        )


def _stage_command(stage: str, summary: str) -> Callable[..., None]:
    def command(
        config: ConfigArg,
        set_: SetOpt = None,
        scheduler: SchedulerOpt = None,
        force: ForceOpt = False,
    ) -> None:
        _run_stages(config, [stage], set_, scheduler, force)

    command.__name__ = stage
    command.__doc__ = (
        f"{summary[0].upper()}{summary[1:]}.\n\n"
        f"Runs only the '{stage}' stage (skipped when its inputs and config are unchanged; "
        f"--force runs it anyway). Example: flowmodel {stage} kenya.toml"
    )
    return command


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run the whole pipeline: prepare, fit, predict, evaluate, report.

    Finished stages whose inputs and config are unchanged are skipped, so the
    same command resumes an interrupted run. Example: flowmodel run kenya.toml
    --set model.backend=laplace
    """
    _run_stages(config, None, set_, scheduler, force)


for _name, _summary in [
    ("prepare", "read units, rasters and flow tables into dataset.nc"),
    ("fit", "fit the model to dataset.nc and write posterior.nc"),
    ("predict", "predict every pair with intervals into flows.nc, flows.csv, flows.gpkg"),
    ("evaluate", "compute metrics (and cross-validation) into metrics.json"),
    ("report", "write report.html with figures"),
]:
    app.command(name=_name)(_stage_command(_name, _summary))


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config file as every command does, without running anything.

    Keys, types and bounds; reader options, model options and fit keywords
    against their signatures and value rules (with "did you mean"); input
    files; the run directory (a writable folder where no output overwrites an
    input). Every problem is listed on one line; exit code 2. Example:
    flowmodel validate kenya.toml
    """
    with _guard():
        cfg = _load(config, set_)
        typer.echo(
            f"{config}: ok (run '{cfg.run.name}', model {cfg.model.type}, out_dir {cfg.out_dir})"
        )


@app.command()
def status(config: ConfigArg, set_: SetOpt = None) -> None:
    """Show each stage's status in the run directory and why it last ran or was skipped.

    A stage is 'running (pid N)' only while that process holds the run lock; a
    stage whose process was killed is 'interrupted' (the next run resumes it).
    Example: flowmodel status kenya.toml
    """
    with _guard():
        from flowmodel.config import load_config
        from flowmodel.pipeline import stage_status

        cfg = load_config(config, set_ or [], check_files=False)
        for row in stage_status(cfg):
            done = f" at {row['finished']}" if row["finished"] else ""
            why = f" - {row['reason']}" if row["reason"] else ""
            typer.echo(f"{row['stage']:<9} {row['status']}{done}{why}")


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the simulated world and the run.")
    ] = Path("demo-output"),
    size: Annotated[
        DemoSize,
        typer.Option(
            "--size",
            help="small (60 units, about 3 min on 2 cores: NUTS, 2 chains) or medium (120 units).",
        ),
    ] = DemoSize.small,
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    force: ForceOpt = False,
) -> None:
    """Simulate a world with known parameters, run the whole pipeline on it, summarise.

    Writes the world (polygons, rasters, census, CDR, truth.json) to OUT/world,
    a config to OUT/demo.toml and the run (report.html, flows.nc, ...) to OUT,
    then prints true vs estimated parameters, the metrics and where the report
    is. Example: flowmodel demo --out demo-output --size small
    """
    with _guard():
        from flowmodel.pipeline import demo_config, demo_summary, run_pipeline

        _say(f"simulating a {size.value} world in {out / 'world'} ...")
        cfg = demo_config(out, size=size.value, overrides=set_ or [], force=force)
        run_pipeline(
            cfg,
            force=force,
            scheduler=scheduler,
            progress=not _quiet() and sys.stderr.isatty(),
            on_stage=_on_stage,
        )
        typer.echo(demo_summary(cfg.out_dir, out / "world" / "truth.json"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flowmodel`` console script; returns the exit code.

    Parameters
    ----------
    argv
        Arguments without the program name (default ``sys.argv[1:]``).
    """
    try:
        app(args=argv, prog_name="flowmodel", standalone_mode=True)
    except SystemExit as exc:
        _teardown_logging()
        code = exc.code
        if code is None:
            return EXIT_OK
        if isinstance(code, int):
            return code
        typer.echo(str(code), err=True)
        return EXIT_FAILURE
    _teardown_logging()
    return EXIT_OK


def _teardown_logging() -> None:
    """Remove the handlers :func:`_setup_logging` added (matters when main() is called in-process)."""
    for name in ("flowmodel", "py.warnings"):
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            if getattr(handler, "_flowmodel_cli", False):
                log.removeHandler(handler)
    logging.getLogger("py.warnings").propagate = True
    logging.captureWarnings(False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
