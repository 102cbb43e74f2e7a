#!/usr/bin/env python
"""Run many run configs (e.g. one per country), resumably, and summarise them in one CSV.

Each config runs through :func:`flowmodel.pipeline.run_pipeline`, so finished
stages are skipped: after an interruption (Ctrl-C, a killed job, a node
failure) the same command resumes every run from its last finished stage. A
config that fails is recorded and the batch goes on (``--fail-fast`` stops).
The summary CSV is rewritten (atomically) after every config::

    python scripts/run_batch.py configs/*.toml --summary batch_summary.csv
    python scripts/run_batch.py configs/*.toml --summary-only    # after a SLURM array
    python scripts/run_batch.py configs/*.toml --index $SLURM_ARRAY_TASK_ID

With ``--index N`` only the N-th config runs and its one-row summary goes to
``SUMMARY.taskN.csv`` (``batch_summary.task3.csv``), so the tasks of an array
never overwrite each other's; summarise them all with ``--summary-only``.

Summary columns: ``config``, ``name``, ``status`` (``ok``, ``bad_input``,
``failed``, ``interrupted``, ``not_run``, ``incomplete``), ``stages_ran``,
``stages_skipped``, ``seconds``, ``error``, ``out_dir``, ``report``,
``model``, ``n_units``, ``source`` and the metrics of the model against that
source (``cpc``, ``log_rmse``, ``pearson_log``, ``coverage_90``, ...).

Exit codes: 0 all ok, 1 some run failed, 2 some config was bad input (and none
failed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRIC_KEYS = (
    "cpc",
    "log_rmse",
    "pearson_log",
    "spearman_log",
    "coverage_50",
    "coverage_90",
    "n_pairs",
)
COLUMNS = [
    "config",
    "name",
    "status",
    "stages_ran",
    "stages_skipped",
    "seconds",
    "error",
    "out_dir",
    "report",
    "model",
    "n_units",
    "source",
    *METRIC_KEYS,
]


def _metrics_row(out_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {}
    path = out_dir / "metrics.json"
    if not path.exists():
        return row
    metrics = json.loads(path.read_text())
    row["model"] = metrics.get("model")
    for source, models in metrics.get("sources", {}).items():
        # the fitted model's row (baselines are named *_baseline)
        name = next((m for m in models if not m.endswith("_baseline")), None)
        if name is None:
            continue
        row["source"] = source
        for key in METRIC_KEYS:
            row[key] = models[name].get(key)
        break
    return row


def summarise_run(config: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One summary row from a run directory, without running anything."""
    from flowmodel.config import load_config
    from flowmodel.exceptions import FlowModelError
    from flowmodel.pipeline import STAGE_ORDER, read_manifest

    row: dict[str, Any] = {"config": str(config)}
    try:
        cfg = load_config(config, overrides, check_files=False)
    except FlowModelError as err:
        return row | {"status": "bad_input", "error": " ".join(str(err).split())}
    out_dir = cfg.out_dir
    manifest = read_manifest(out_dir)
    stages = manifest["stages"]
    wanted = [s for s in STAGE_ORDER if s != "report" or cfg.report.enabled]
    statuses = [stages.get(s, {}).get("status") for s in wanted]
    if all(s == "done" for s in statuses):
        status = "ok"
    elif not any(statuses):
        status = "not_run"
    elif "failed" in statuses:
        status = "failed"
    elif "interrupted" in statuses:
        status = "interrupted"
    else:
        status = "incomplete"
    errors = [stages[s].get("error") for s in wanted if stages.get(s, {}).get("error")]
    row |= {
        "name": cfg.run.name,
        "status": status,
        "out_dir": str(out_dir),
        "error": errors[0] if errors else "",
    }
    report = out_dir / "report.html"
    row["report"] = str(report) if report.exists() else ""
    dataset = out_dir / "dataset.nc"
    if dataset.exists():
        try:
            import h5py

            with h5py.File(dataset, "r") as fh:
                row["n_units"] = int(fh["unit"].shape[0])
        except (OSError, KeyError):
            pass
    return row | _metrics_row(out_dir)


def write_summary(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write the summary table (CSV) atomically."""
    import pandas as pd

    from flowmodel.atomic import atomic_path

    frame = pd.DataFrame(list(rows))
    for col in COLUMNS:
        if col not in frame:
            frame[col] = None
    frame = frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def run_batch(
    configs: Sequence[str | os.PathLike[str]],
    *,
    summary: str | os.PathLike[str] = "batch_summary.csv",
    overrides: Sequence[str] = (),
    stages: Sequence[str] | None = None,
    force: bool = False,
    fail_fast: bool = False,
    scheduler: str | None = None,
    summary_only: bool = False,
    echo: Any = print,
) -> list[dict[str, Any]]:
    """Run (or resume) every config in turn and write the summary after each one.

    Parameters
    ----------
    configs
        Run config files.
    summary
        Summary CSV to write.
    overrides
        ``key=value`` overrides applied to every config.
    stages
        Stages to run (default all).
    force
        Rerun stages even when unchanged.
    fail_fast
        Stop at the first failing config (bad input or failure).
    scheduler
        Dask scheduler address for every run.
    summary_only
        Do not run anything; summarise the run directories as they are.
    echo
        Where progress lines go.

    Returns
    -------
    list of dict
        The summary rows, one per config, in order.
    """
    from flowmodel.config import load_config
    from flowmodel.exceptions import FlowModelError
    from flowmodel.pipeline import run_pipeline

    rows: list[dict[str, Any]] = [summarise_run(c, overrides) for c in configs]
    if summary_only:
        write_summary(rows, summary)
        return rows
    for i, config in enumerate(configs):
        t0 = time.perf_counter()
        echo(f"[{i + 1}/{len(configs)}] {config}")
        extra: dict[str, Any] = {}
        try:
            cfg = load_config(config, overrides)
            results = run_pipeline(cfg, stages, force=force, scheduler=scheduler)
            extra = {
                "stages_ran": sum(r.action == "ran" for r in results),
                "stages_skipped": sum(r.action == "skipped" for r in results),
            }
            status_override = None
        except FlowModelError as err:
            status_override = ("bad_input", " ".join(str(err).split()))
        except KeyboardInterrupt:
            rows[i] = summarise_run(config, overrides) | {
                "status": "interrupted",
                "seconds": round(time.perf_counter() - t0, 2),
            }
            write_summary(rows, summary)
            raise
        except Exception as err:
            status_override = ("failed", f"{type(err).__name__}: {' '.join(str(err).split())}")
        row = (
            summarise_run(config, overrides)
            | extra
            | {"seconds": round(time.perf_counter() - t0, 2)}
        )
        if status_override is not None:
            row["status"], row["error"] = status_override
        elif stages is not None and row["status"] != "failed":
            row["status"] = "ok"  # the requested stages finished
        rows[i] = row
        write_summary(rows, summary)
        echo(f"    {row['status']}" + (f": {row['error']}" if row.get("error") else ""))
        if fail_fast and row["status"] != "ok":
            break
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the batch driver; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Run many flowmodel configs resumably; write a summary CSV."
    )
    parser.add_argument("configs", nargs="+", help="run configs (.toml/.yaml)")
    parser.add_argument("--summary", default="batch_summary.csv", help="summary CSV to write")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config"
    )
    parser.add_argument(
        "--stage", action="append", dest="stages", help="run only this stage (repeatable)"
    )
    parser.add_argument("--force", action="store_true", help="rerun stages even when unchanged")
    parser.add_argument(
        "--fail-fast", action="store_true", help="stop at the first failing config"
    )
    parser.add_argument("--scheduler", help="dask scheduler address for every run")
    parser.add_argument(
        "--summary-only", action="store_true", help="only summarise existing run directories"
    )
    parser.add_argument(
        "--index",
        type=int,
        help="run only configs[INDEX] (e.g. $SLURM_ARRAY_TASK_ID); summary in SUMMARY.taskINDEX.csv",
    )
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configs = args.configs
    if args.index is not None:
        if not 0 <= args.index < len(configs):
            print(
                f"run_batch: error: --index {args.index} outside 0..{len(configs) - 1}",
                file=sys.stderr,
            )
            return 2
        configs = [configs[args.index]]
        summary = Path(args.summary)
        args.summary = str(summary.with_name(f"{summary.stem}.task{args.index}{summary.suffix}"))
    echo = (lambda *_: None) if args.quiet else print
    try:
        rows = run_batch(
            configs,
            summary=args.summary,
            overrides=args.set,
            stages=args.stages,
            force=args.force,
            fail_fast=args.fail_fast,
            scheduler=args.scheduler,
            summary_only=args.summary_only,
            echo=echo,
        )
    except KeyboardInterrupt:
        print("run_batch: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    statuses = [r.get("status") for r in rows]
    echo(f"summary: {args.summary} ({statuses.count('ok')} ok of {len(rows)})")
    if args.summary_only:
        return 0
    if "failed" in statuses:
        return 1
    if "bad_input" in statuses:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
