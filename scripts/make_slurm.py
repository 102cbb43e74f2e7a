#!/usr/bin/env python
"""Write a SLURM job-array script that runs ``flowmodel`` once per run config.

The script is written from a template (default ``scripts/slurm_template.sh``,
``string.Template`` placeholders such as ``$time``); nothing is submitted. Site
details (partition, account, module loads) belong in a per-cluster settings file
(TOML, ``--settings``), not in run configs::

    python scripts/make_slurm.py configs/*.toml --settings site.toml --out jobs/countries.sh
    sbatch jobs/countries.sh            # printed at the end; run it yourself

Settings keys (all optional; command-line options win): ``partition``,
``account``, ``time``, ``cpus``, ``mem``, ``max_parallel``, ``setup`` (shell
lines run before flowmodel, e.g. ``module load ...``), ``flowmodel`` (the
command), ``directives`` (extra ``#SBATCH`` options), ``logs``.

Exit codes: 0 written, 2 bad input (a config or settings file is invalid).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import string
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_TEMPLATE = HERE / "slurm_template.sh"
STAGES = ("run", "prepare", "fit", "predict", "evaluate", "report")
DEFAULTS: dict[str, Any] = {
    "partition": None,
    "account": None,
    "time": "04:00:00",
    "cpus": 4,
    "mem": "16G",
    "max_parallel": 20,
    "setup": "",
    "flowmodel": "flowmodel",
    "directives": [],
    "logs": None,
}


class SlurmWriterError(ValueError):
    """Bad input to the SLURM writer (config, settings, template)."""


def load_settings(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read a per-cluster settings file (TOML) over the defaults."""
    settings = dict(DEFAULTS)
    if path is None:
        return settings
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SlurmWriterError(
            f"{path}: cannot read settings ({err}). Fix: give a valid TOML file."
        ) from None
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise SlurmWriterError(f"{path}: unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    settings.update(data)
    return settings


def validate_configs(configs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Load every run config (keys and types; input files are checked on the cluster)."""
    from flowmodel.config import load_config
    from flowmodel.exceptions import ConfigError

    paths = []
    for config in configs:
        try:
            cfg = load_config(config, check_files=False)
        except ConfigError as err:
            raise SlurmWriterError(str(err)) from None
        paths.append(Path(cfg.source or config).resolve())
    if not paths:
        raise SlurmWriterError("no run configs given. Fix: pass one or more .toml/.yaml files.")
    return paths


def render(
    configs: Sequence[Path],
    configs_file: Path,
    *,
    job_name: str,
    stage: str = "run",
    settings: dict[str, Any] | None = None,
    template: str | os.PathLike[str] = DEFAULT_TEMPLATE,
    extra_args: Sequence[str] = (),
) -> str:
    """The job-array script text for ``configs`` (listed, one per line, in ``configs_file``)."""
    s = dict(DEFAULTS) | dict(settings or {})
    if stage not in STAGES:
        raise SlurmWriterError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    directives = [f"#SBATCH --partition={s['partition']}"] if s["partition"] else []
    if s["account"]:
        directives.append(f"#SBATCH --account={s['account']}")
    extra = s["directives"] if isinstance(s["directives"], list) else [s["directives"]]
    directives += [d if d.startswith("#SBATCH") else f"#SBATCH {d}" for d in extra]
    setup = s["setup"] if isinstance(s["setup"], str) else "\n".join(s["setup"])
    logs = Path(s["logs"]) if s["logs"] else configs_file.parent / "logs"
    values = {
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "job_name": job_name,
        "last": len(configs) - 1,
        "max_parallel": int(s["max_parallel"]),
        "time": s["time"],
        "cpus": int(s["cpus"]),
        "mem": s["mem"],
        "logs": str(logs),
        "directives": "\n".join(directives),
        "setup": setup or "# (no setup: flowmodel must be on PATH)",
        "configs_file": str(configs_file),
        "flowmodel": s["flowmodel"],
        "stage": stage,
        "extra_args": " ".join(shlex.quote(a) for a in extra_args),
    }
    try:
        text = string.Template(Path(template).read_text()).substitute(values)
    except KeyError as err:
        raise SlurmWriterError(
            f"{template}: unknown placeholder ${err.args[0]}; known: {sorted(values)}"
        ) from None
    except OSError as err:
        raise SlurmWriterError(f"{template}: cannot read the template ({err})") from None
    return text


def write_job(
    configs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    **kwargs: Any,
) -> tuple[Path, Path]:
    """Validate the configs, write ``out`` (the script) and ``out``'s config list; return both paths."""
    from flowmodel.atomic import atomic_path

    paths = validate_configs(configs)
    out = Path(out).resolve()
    listing = out.with_suffix(".configs.txt")
    kwargs.setdefault("job_name", out.stem)
    text = render(paths, listing, **kwargs)
    with atomic_path(listing) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in paths))
    with atomic_path(out) as tmp:
        tmp.write_text(text)
        tmp.chmod(0o755)
    logs = next(
        (
            line.split("=", 1)[1].rsplit("/", 1)[0]
            for line in text.splitlines()
            if line.startswith("#SBATCH --output=")
        ),
        None,
    )
    if logs:
        Path(logs).mkdir(parents=True, exist_ok=True)
    return out, listing


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the writer; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Write a SLURM job-array script (one task per run config). Does not submit.",
        epilog="example: python scripts/make_slurm.py scripts/examples/*.toml --out jobs/all.sh",
    )
    parser.add_argument("configs", nargs="+", help="run configs (.toml/.yaml)")
    parser.add_argument("--out", "-o", default="flowmodel_array.sh", help="script to write")
    parser.add_argument("--settings", help="per-cluster settings (TOML)")
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE), help="script template")
    parser.add_argument(
        "--stage", default="run", choices=STAGES, help="flowmodel command per task"
    )
    parser.add_argument("--job-name", help="job name (default: the script's name)")
    for key in ("partition", "account", "time", "mem", "logs"):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key)
    parser.add_argument("--cpus", type=int)
    parser.add_argument("--max-parallel", type=int, dest="max_parallel")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every task (flowmodel --set)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.settings)
        for key in ("partition", "account", "time", "mem", "logs", "cpus", "max_parallel"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        extra: list[str] = []
        for item in args.set:
            extra += ["--set", item]
        kwargs: dict[str, Any] = {
            "stage": args.stage,
            "settings": settings,
            "template": args.template,
            "extra_args": extra,
        }
        if args.job_name:
            kwargs["job_name"] = args.job_name
        script, listing = write_job(args.configs, args.out, **kwargs)
    except SlurmWriterError as err:
        print(f"make_slurm: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    n = len(listing.read_text().splitlines())
    print(f"wrote {script} ({n} array task(s); configs listed in {listing})")
    print(f"submit with:  sbatch {script}")
    print("watch with:   squeue -u $USER;  resubmitting resumes unfinished runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
