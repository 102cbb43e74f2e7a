"""CDR home detection + relocation OD on a synthetic event log: events/s and peak RSS.

Target (issue 5): >= 1 million events/s end to end on 2 cores, peak RSS < 4 GB,
for a 10-million-event log.

Usage::

    .venv/bin/python benchmarks/cdr.py                       # 10 M events, 2 cores
    .venv/bin/python benchmarks/cdr.py --events 2000000 --cores 1

The log is written once to ``--data`` (default ``$TMPDIR/flowmodel-cdr-bench``) by a
child process, so that the measured process's peak RSS covers only the
pipeline: read Parquet in batches -> hash ids -> towers to units -> homes ->
relocation OD -> redaction. The log mimics an operator's: string subscriber ids
(16 hex characters), UTC timestamps, string cell ids; 200,000 subscribers over
3 months, 500 units, 2,000 towers, 55% night-time events, 10% of subscribers
relocating.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _grid_units(n_side_x: int = 25, n_side_y: int = 20):
    import geopandas as gpd
    import shapely

    boxes, ids, country = [], [], []
    for i in range(n_side_x):
        for j in range(n_side_y):
            boxes.append(
                shapely.box(30 + i * 0.2, -2 + j * 0.2, 30 + (i + 1) * 0.2, -2 + (j + 1) * 0.2)
            )
            ids.append(f"U{i:02d}{j:02d}")
            country.append("AAA" if i < n_side_x // 2 else "BBB")
    return gpd.GeoDataFrame(
        {"unit_id": ids, "country": country, "population": 50_000.0},
        geometry=boxes,
        crs="EPSG:4326",
    )


def generate(data: Path, n_events: int, seed: int = 0) -> None:
    """Write ``events.parquet``, ``towers.csv`` and ``units.gpkg`` into ``data``."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    data.mkdir(parents=True, exist_ok=True)
    units = _grid_units()
    units.to_file(data / "units.gpkg", layer="units", driver="GPKG")
    n_units, n_towers, n_subs, n_months = len(units), 2_000, 200_000, 3
    bounds = units.geometry.bounds.to_numpy()
    tower_unit = np.repeat(np.arange(n_units), n_towers // n_units)
    lon = rng.uniform(bounds[tower_unit, 0], bounds[tower_unit, 2])
    lat = rng.uniform(bounds[tower_unit, 1], bounds[tower_unit, 3])
    cells = np.array([f"C{k:05d}" for k in range(n_towers)])
    pd.DataFrame({"cell_id": cells, "lon": lon, "lat": lat}).to_csv(
        data / "towers.csv", index=False
    )
    home = np.repeat(rng.integers(0, n_units, n_subs)[:, None], n_months, axis=1)
    movers = rng.random(n_subs) < 0.10
    move_month = rng.integers(1, n_months, n_subs)
    new_home = rng.integers(0, n_units, n_subs)
    for m in range(n_months):
        home[:, m] = np.where(movers & (m >= move_month), new_home, home[:, m])
    per_unit = n_towers // n_units
    ids = pa.array([f"{v:016x}" for v in rng.integers(0, 2**63, n_subs)], type=pa.string())
    start = np.datetime64("2024-01-01T00:00:00", "s").astype(np.int64)
    writer = None
    chunk = 1_000_000
    for lo in range(0, n_events, chunk):
        n = min(chunk, n_events - lo)
        sub = rng.integers(0, n_subs, n)
        month = rng.integers(0, n_months, n)
        day = rng.integers(0, 28, n)
        night = rng.random(n) < 0.55
        hour = np.where(night, (rng.integers(0, 9, n) + 21) % 24, rng.integers(8, 18, n))
        t = start + (month * 31 + day) * 86400 + hour * 3600 + rng.integers(0, 3600, n) - 3 * 3600
        at_home = rng.random(n) < np.where(night, 0.85, 0.4)
        unit = np.where(at_home, home[sub, month], rng.integers(0, n_units, n))
        tower = unit * per_unit + rng.integers(0, per_unit, n)
        table = pa.table(
            {
                "subscriber_id": pc.take(ids, pa.array(sub)),
                "timestamp": pa.array(t, type=pa.timestamp("s", tz="UTC")),
                "cell_id": pa.array(cells[tower], type=pa.string()),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(data / "events.parquet", table.schema, compression="zstd")
        writer.write_table(table, row_group_size=256_000)
    writer.close()
    (data / "meta.json").write_text(json.dumps({"events": n_events, "seed": seed}))


def run(data: Path, cores: int, batch_size: int) -> dict:
    import geopandas as gpd
    import pyarrow as pa

    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(available[:cores]))
    pa.set_cpu_count(cores)
    pa.set_io_thread_count(cores)

    from flowmodel.inputs.cdr import cdr_flows

    units = gpd.read_file(data / "units.gpkg", layer="units")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = os.getloadavg()[0]
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = cdr_flows(
        data / "events.parquet",
        data / "towers.csv",
        units,
        timezone="Africa/Nairobi",
        batch_size=batch_size,
        progress=False,
    )
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    n = result.report["events"]
    return {
        "events": n,
        "wall_s": round(wall, 2),
        "events_per_s": round(n / wall),
        "cpu_s": round(cpu, 2),
        "events_per_cpu_s": round(n / cpu),
        "load_average_1min_at_start": round(load, 2),
        "peak_rss_mb": round(rss / 1024),
        "rss_before_mb": round(rss0 / 1024),
        "cores": cores,
        "batch_size": batch_size,
        # counts of subscribers are published rounded (docs/privacy.md)
        "subscribers_about": result.report["subscribers"],
        "relocations_about": result.report["relocations"],
        "night": result.settings.get("night"),
        "min_active_days": result.settings.get("min_active_days"),
        "od_rows": len(result.flows),
        "od_cells_above_threshold": int(result.flows["count"].notna().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1_000_000)
    parser.add_argument(
        "--data", type=Path, default=Path(tempfile.gettempdir()) / "flowmodel-cdr-bench"
    )
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args()
    meta = args.data / "meta.json"
    fresh = meta.exists() and json.loads(meta.read_text()).get("events") == args.events
    if args.generate_only:
        generate(args.data, args.events)
        return
    if not fresh:
        print(
            f"generating {args.events:,} events in {args.data} (child process) ...",
            file=sys.stderr,
        )
        cmd = [
            sys.executable,
            __file__,
            "--generate-only",
            "--events",
            str(args.events),
            "--data",
            str(args.data),
        ]
        subprocess.run(cmd, check=True)
    out = run(args.data, args.cores, args.batch_size)
    target = "MET" if out["events_per_s"] >= 1_000_000 and out["peak_rss_mb"] < 4096 else "MISSED"
    print(json.dumps(out, indent=2))
    print(
        f"{out['events']:,} events in {out['wall_s']} s on {out['cores']} core(s): "
        f"{out['events_per_s'] / 1e6:.2f} M events/s, peak RSS {out['peak_rss_mb']} MB "
        f"(target >= 1 M events/s, < 4096 MB: {target}); CPU {out['cpu_s']} s = "
        f"{out['events_per_cpu_s'] / 1e6:.2f} M events per CPU-second; "
        f"1-min load average at start {out['load_average_1min_at_start']} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
