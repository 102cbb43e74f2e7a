"""Zonal statistics benchmark: flowmodel vs exactextract vs rasterstats.

Generates its own tiled float32 GeoTIFFs and random Voronoi polygons (admin-like
tilings of the raster), then times, each tool in a fresh subprocess (so peak RSS
is its own) and with a warm page cache:

- ``floor``: one blockwise read of the whole file (rasterio, block by block);
- ``flowmodel``: :func:`flowmodel.inputs.rasters.zonal_statistics` (sum);
- ``flowmodel-ee``: the same call with ``engine="exactextract"`` (exactextract
  behind flowmodel's reprojection, reader and checks; not in the default list);
- ``exactextract``: one ``exact_extract(raster, polygons, ["sum"])`` call with
  its default strategy (and ``raster-sequential`` with ``--ee-raster-sequential``);
- ``rasterstats``: ``zonal_stats(polygons, raster, stats=["sum"])``.

Usage::

    .venv/bin/python benchmarks/zonal.py --size 10000 --zones 500 20000
    .venv/bin/python benchmarks/zonal.py --size 32768 --zones 500 20000 --tools floor flowmodel

Results print as a table with ratios to flowmodel and to the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_raster(path: Path, size: int, *, seed: int = 0, tile: int = 256) -> Path:
    """Tiled, uncompressed float32 GeoTIFF in EPSG:4326 with a nodata band across it."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    transform = from_origin(30.0, 5.0, 10.0 / size, 10.0 / size)
    tmp = path.with_suffix(".tmp.tif")
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 1,
        "dtype": "float32",
        "crs": "EPSG:4326",
        "transform": transform,
        "nodata": -9999.0,
        "tiled": True,
        "blockxsize": tile,
        "blockysize": tile,
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, size, tile):
            h = min(tile, size - r0)
            block = rng.lognormal(3.0, 1.0, (h, size)).astype(np.float32)
            if r0 // tile % 17 == 3:
                block[: h // 4] = -9999.0
            dst.write(block, 1, window=Window(0, r0, size, h))
    tmp.rename(path)
    return path


def make_zones(path: Path, n: int, size: int, *, seed: int = 1) -> Path:
    """``n`` Voronoi cells of random points, clipped to the raster's extent (GeoPackage)."""
    import geopandas as gpd
    import shapely

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    x0, y1 = 30.0, 5.0
    extent = shapely.box(x0, y1 - 10.0, x0 + 10.0, y1)
    pts = shapely.points(rng.uniform(x0, x0 + 10, n), rng.uniform(y1 - 10, y1, n))
    cells = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(pts), extend_to=extent))
    cells = shapely.intersection(cells, extent)
    gdf = gpd.GeoDataFrame(
        {"unit_id": [f"z{i:05d}" for i in range(len(cells))]}, geometry=cells, crs="EPSG:4326"
    )
    gdf.to_file(path, layer="zones", engine="pyogrio")
    return path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(tool: str, raster: str, zones: str | None, threads: int) -> dict:
    """Run one tool in this process; return seconds, peak RSS and a checksum."""
    import rasterio

    if tool == "floor":
        t, cpu = time.perf_counter(), time.process_time()
        total = 0.0
        with rasterio.open(raster) as src:
            for _, window in src.block_windows(1):
                total += float(np.nansum(src.read(1, window=window)))
        return {
            "seconds": time.perf_counter() - t,
            "cpu_seconds": time.process_time() - cpu,
            "checksum": total,
            "rss_mb": _peak_rss_mb(),
        }
    import geopandas as gpd

    gdf = gpd.read_file(zones, engine="pyogrio")
    t, cpu = time.perf_counter(), time.process_time()
    if tool in ("flowmodel", "flowmodel-ee"):
        from flowmodel.inputs.rasters import zonal_statistics

        engine = "exactextract" if tool == "flowmodel-ee" else "flowmodel"
        out = zonal_statistics(
            gdf, raster, stats=("sum",), threads=threads, progress=False, engine=engine
        )
        values = out["sum"].to_numpy()
    elif tool in ("exactextract", "exactextract-rs"):
        from exactextract import exact_extract

        strategy = "raster-sequential" if tool == "exactextract-rs" else "feature-sequential"
        out = exact_extract(raster, gdf, ["sum"], output="pandas", strategy=strategy)
        values = out["sum"].to_numpy()
    elif tool == "rasterstats":
        from rasterstats import zonal_stats

        out = zonal_stats(gdf, raster, stats=["sum"], nodata=-9999.0)
        values = np.array([o["sum"] if o["sum"] is not None else 0.0 for o in out])
    else:
        raise SystemExit(f"unknown tool {tool}")
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "checksum": float(np.nansum(values)),
        "values_head": [float(v) for v in values[:5]],
        "rss_mb": _peak_rss_mb(),
    }


def _child_once(tool: str, raster: Path, zones: Path | None, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, str(raster), str(zones or ""), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(tool: str, raster: Path, zones: Path | None, threads: int, repeat: int = 1) -> dict:
    """Best of ``repeat`` fresh-process runs (runs over 10 s are not repeated)."""
    best = _child_once(tool, raster, zones, threads)
    for _ in range(repeat - 1):
        if "error" in best or best["seconds"] > 10:
            break
        again = _child_once(tool, raster, zones, threads)
        if "error" not in again and again["seconds"] < best["seconds"]:
            again["rss_mb"] = max(again["rss_mb"], best["rss_mb"])
            best = again
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000, help="raster width = height")
    parser.add_argument("--zones", type=int, nargs="+", default=[500, 20_000])
    parser.add_argument(
        "--tools",
        nargs="+",
        default=["floor", "flowmodel", "exactextract", "rasterstats"],
        help="floor flowmodel flowmodel-ee exactextract exactextract-rs rasterstats",
    )
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="best of N (runs > 10 s: once)")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    raster = make_raster(args.workdir / f"bench_{args.size}.tif", args.size)
    gb = raster.stat().st_size / 1e9
    load = os.getloadavg()[0]
    print(
        f"raster {raster} {args.size}x{args.size} float32, {gb:.2f} GB; cpus {os.cpu_count()}, "
        f"threads {args.threads}, best of {args.repeat}; load average {load:.1f}"
    )
    # warm the page cache
    _child("floor", raster, None, args.threads)
    floor = (
        _child("floor", raster, None, args.threads, args.repeat) if "floor" in args.tools else None
    )
    if floor:
        print(
            f"floor (one blockwise read): {floor['seconds']:.2f} s "
            f"({floor['cpu_seconds']:.2f} CPU s), peak RSS {floor['rss_mb']:.0f} MB"
        )
    for n in args.zones:
        zones = make_zones(args.workdir / f"zones_{args.size}_{n}.gpkg", n, args.size)
        results = {}
        for tool in args.tools:
            if tool == "floor":
                continue
            results[tool] = _child(tool, raster, zones, args.threads, args.repeat)
        ref = results.get("flowmodel", {}).get("seconds")
        print(f"\n{n} zones")
        print(
            f"{'tool':<18}{'seconds':>9}{'CPU s':>8}{'x flowmodel':>13}{'x floor':>9}"
            f"{'peak RSS MB':>13}  checksum"
        )
        for tool, r in results.items():
            if "error" in r:
                print(f"{tool:<18} error: {r['error']}")
                continue
            ratio = r["seconds"] / ref if ref else float("nan")
            vs_floor = r["seconds"] / floor["seconds"] if floor else float("nan")
            print(
                f"{tool:<18}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}{ratio:>13.2f}{vs_floor:>9.2f}"
                f"{r['rss_mb']:>13.0f}  {r['checksum']:.6e}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tool, raster, zones, threads = sys.argv[2:6]
        print(json.dumps(run_one(tool, raster, zones or None, int(threads))))
    else:
        main()
