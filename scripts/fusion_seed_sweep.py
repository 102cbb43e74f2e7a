"""Rerun the slow fusion checks (issue 7's (a)-(e), plus (f)) on several simulated worlds.

The slow tests in ``tests/models/test_fusion.py`` fit one world, chosen by the
environment variable ``FLOWMODEL_FUSION_SEED`` (default 0, the world CI checks).
This script runs them once per seed, each in its own pytest process, and prints a
markdown table of which check passed on which world, with the key numbers each
test printed. It is how the robustness tables of ``docs/fusion.md`` are made::

    .venv/bin/python scripts/fusion_seed_sweep.py --seeds 0-9 --out fusion-sweep.md
    .venv/bin/python scripts/fusion_seed_sweep.py --world file --seeds 0-9

About 2 minutes per seed on 2 cores (``--world file``: the worked example's
checks in ``tests/models/test_fusion_world.py`` and ``test_fusion_sparse_cdr.py`` on
``simulate_world(seed=n)``, ``FLOWMODEL_WORLD_SEED``; about 1 minute). A seed whose pytest run crashes is
reported as such, not skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: world -> (test file, seed variable, default -k expression, printed lines worth keeping)
WORLDS = {
    # slow tests that do not depend on the seed (small fixed worlds, save/load) are left out
    "fusion": (
        ("tests/models/test_fusion.py",),
        "FLOWMODEL_FUSION_SEED",
        "not compare and not pointwise and not approximate and not stream",
        ("market share:", "within no-data", "cross-border:", "held-out CPC", "log-RMSE"),
    ),
    "file": (
        ("tests/models/test_fusion_world.py", "tests/models/test_fusion_sparse_cdr.py"),
        "FLOWMODEL_WORLD_SEED",
        "",
        ("no data:", "cross-border:", "CDR only:", "0..4"),
    ),
}
TEST, SEED_VAR, DESELECT, KEYS = WORLDS["fusion"]


def parse_seeds(text: str) -> list[int]:
    """``"0-4,7"`` -> ``[0, 1, 2, 3, 4, 7]``."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part.strip():
            out.append(int(part))
    return out


def run_seed(
    seed: int,
    python: str,
    select: str | None = None,
    logs: Path | None = None,
    world: str = "fusion",
) -> dict:
    """Run the slow fusion tests on one world; return {test: passed} and key printed lines."""
    test, seed_var, default_select, keys = WORLDS[world]
    select = default_select if select is None else select
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        cmd = [
            python,
            "-m",
            "pytest",
            "-m",
            "slow",
            *test,
            *(["-k", select] if select else []),
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml_path}",
        ]
        env = {**os.environ, seed_var: str(seed)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"seed{seed}.log").write_text(proc.stdout + proc.stderr)
        if not xml_path.exists():
            return {"error": proc.stdout[-2000:] + proc.stderr[-2000:]}
        tests = {}
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            name = case.get("name", "")
            failed = case.find("failure") is not None or case.find("error") is not None
            tests[name] = not failed
    lines = [ln.strip(" .F") for ln in proc.stdout.splitlines()]
    notes = [ln for ln in lines if ln.startswith(keys)]
    return {"tests": tests, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5 (default 0-9)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--logs", type=Path, help="keep each seed's pytest output here")
    parser.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default="fusion",
        help="fusion: the in-memory test world of test_fusion.py (default); "
        "file: simulate_world, the worked example's checks (test_fusion_world.py, "
        "test_fusion_sparse_cdr.py)",
    )
    parser.add_argument(
        "-k",
        dest="select",
        default=None,
        help=f"pytest -k expression (default for --world fusion: {DESELECT!r}; file: all)",
    )
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    results = {}
    for k, seed in enumerate(seeds, 1):
        print(f"[{k}/{len(seeds)}] seed {seed} ...", file=sys.stderr, flush=True)
        results[seed] = run_seed(seed, sys.executable, args.select, args.logs, args.world)
    names = sorted({t for r in results.values() for t in r.get("tests", {})})
    short = {
        n: n.removeprefix("test_").removeprefix("world_").split("_")[0]
        + n[n.find("[") :] * ("[" in n)
        for n in names
    }
    rows = ["| seed | " + " | ".join(short[n] for n in names) + " | notes |"]
    rows.append("|---" * (len(names) + 2) + "|")
    passed_all = 0
    for seed, res in results.items():
        if "error" in res:
            rows.append(f"| {seed} | run failed: {res['error'][-200:]!r} |")
            continue
        cells = ["pass" if res["tests"].get(n) else "**fail**" for n in names]
        passed_all += all(res["tests"].get(n) for n in names)
        rows.append(f"| {seed} | " + " | ".join(cells) + " | " + "; ".join(res["notes"]) + " |")
    per_test = [
        f"{short[n]}: {sum(r.get('tests', {}).get(n, False) for r in results.values())}/{len(seeds)}"
        for n in names
    ]
    table = "\n".join(rows)
    summary = f"worlds passing every check: {passed_all}/{len(seeds)}; per check: " + ", ".join(
        per_test
    )
    text = f"{table}\n\n{summary}\n"
    print(text)
    if args.out:
        from flowmodel.atomic import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
