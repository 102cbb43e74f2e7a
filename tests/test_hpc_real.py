"""Real schedulers: a `dask scheduler` with two `dask worker` processes, and a one-node SLURM.

Everything runs on this machine over loopback. The dask test starts the scheduler and the
workers as subprocesses and runs ``flowmodel run --scheduler`` against them; the SLURM test
starts munged, slurmctld and slurmd with ``scripts/ci/slurm-single-node.sh`` (private config,
key, ports and state in a temporary folder) and submits the job array written by
``scripts/make_slurm.py`` with ``sbatch``. Both tear down every process they started.

The SLURM test needs root and SLURM installed (``scripts/ci/slurm-single-node.sh install``,
Debian/Ubuntu; ``.ci/run`` does it): it skips otherwise, and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from flowmodel import pipeline
from tests.conftest import load_script

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPT = REPO / "scripts" / "ci" / "slurm-single-node.sh"
BIN = Path(sys.executable).parent
FLOWMODEL = BIN / "flowmodel"
COUNTRIES = ("XAN", "XBO", "XCE")

WORLD_CONFIG = """\
[run]
name = "{name}"
out_dir = "{out_dir}"
seed = 11

[units]
path = "world/units.gpkg"
layer = "units"
{countries}

[rasters]
population = "world/population.tif"
built_up = "world/built_up.tif"
night_lights = "world/night_lights.tif"

[flows.census]
path = "world/census_od.csv"
options = {{ sample_fraction = {fraction}, suppressed_min = 1, unmatched = "drop" }}

[model]
type = "gravity"
backend = "laplace"
draws = 200

[model.options]
source = "census"
origin_covariates = ["log_population"]
destination_covariates = ["log_population"]
country_effects = false

[predict]
top_k = 20
block_size = 5

[evaluate]
cv = "none"

[report]
enabled = {report}
truth = "world/truth.json"

[dask]
cluster = "none"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A 30-unit, three-country simulated world with a census in every country."""
    from flowmodel.simulate import simulate_world

    root = tmp_path_factory.mktemp("hpc")
    sim = simulate_world(
        root / "world",
        n_units=30,
        n_countries=3,
        seed=5,
        raster_size=100,
        census_countries=3,
        cdr_countries=1,
    )
    assert tuple(sim.truth["countries"]) == COUNTRIES
    return root, float(sim.truth["sample_fraction"])


def write_config(
    world: tuple[Path, float],
    name: str,
    *,
    countries: list[str] | None = None,
    report: bool = False,
) -> Path:
    root, fraction = world
    text = WORLD_CONFIG.format(
        name=name,
        out_dir=f"runs/{name}",
        countries=f"countries = {json.dumps(countries)}" if countries else "",
        fraction=fraction,
        report=str(report).lower(),
    )
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def flowmodel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(FLOWMODEL), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, f"flowmodel {' '.join(args)}: exit {res.returncode}\n{res.stderr}"
    return res


def wait_until(
    condition: Callable[[], object], *, timeout: float, what: str, poll: float = 0.1
) -> object:
    """Poll ``condition`` until it is truthy (bounded); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group ``proc`` leads (it was started in its own session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # a worker process that outlived its nanny
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=15)


# ------------------------------------------------------------------ dask scheduler
@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[dict[str, object]]:
    """``dask scheduler`` + two ``dask worker`` processes (1 thread each) on 127.0.0.1."""
    from distributed import Client

    logs = tmp_path / "dask-logs"
    logs.mkdir()
    scheduler_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches the nanny's child
        )
        log.close()
        procs.append(proc)
        return proc

    def alive() -> None:
        for proc in procs:
            if proc.poll() is not None:
                text = "\n".join(f.read_text()[-2000:] for f in sorted(logs.glob("*.log")))
                pytest.fail(f"a dask process exited with {proc.returncode}:\n{text}")

    try:
        start(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(scheduler_file),
        )
        wait_until(
            lambda: alive() or scheduler_file.exists(), timeout=60, what="the scheduler file"
        )
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:"), address
        for i in (1, 2):
            start(
                f"worker{i}",
                "worker",
                address,
                "--host",
                "127.0.0.1",
                "--name",
                f"worker{i}",
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--memory-limit",
                "2GB",
                "--dashboard-address",
                "127.0.0.1:0",
                "--local-directory",
                str(tmp_path / f"worker{i}"),
            )
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            workers = {
                info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()
            }
        alive()
        yield {"address": address, "workers": workers, "logs": logs}
    finally:
        for proc in reversed(procs):
            stop_group(proc)


@pytest.fixture(scope="module")
def local_run(world) -> tuple[Path, Path]:
    """The world's config run in this machine's process, no dask (``cluster = "none"``)."""
    root, _ = world
    config = write_config(world, "whole-world")
    t0 = time.perf_counter()
    flowmodel("-q", "run", str(config), "--set", "run.out_dir=runs/local")
    print(f"local run {time.perf_counter() - t0:.1f} s")
    return config, root / "runs" / "local"


def assert_same_results(local: Path, other: Path) -> None:
    """dataset.nc identical, flows.nc and metrics.json equal (to 1e-12) in two run folders."""
    import xarray as xr

    with (
        xr.open_dataset(local / pipeline.DATASET, engine="h5netcdf") as a,
        xr.open_dataset(other / pipeline.DATASET, engine="h5netcdf") as b,
    ):
        xr.testing.assert_identical(a, b)  # zonal statistics: bit for bit
    with (
        xr.open_dataset(local / pipeline.FLOWS, engine="h5netcdf") as a,
        xr.open_dataset(other / pipeline.FLOWS, engine="h5netcdf") as b,
    ):
        assert set(a.data_vars) == set(b.data_vars) >= {"mean", "q05", "q95", "observed"}
        assert a.sizes == b.sizes and a.sizes["origin"] == 30
        assert np.isfinite(a["mean"].values).sum() == 30 * 29  # every off-diagonal pair
        # identical in practice (the fit runs here both times, its kernels compiled without
        # fast-math, so a cold numba cache on the first run changes nothing: with fast-math
        # its Laplace mode moved 1e-7); 1e-12 leaves room for the workers' single BLAS thread
        xr.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    m_local = json.loads((local / pipeline.METRICS).read_text())
    m_other = json.loads((other / pipeline.METRICS).read_text())
    assert m_local["sources"].keys() == m_other["sources"].keys() == {"census"}
    assert 0.5 < m_local["sources"]["census"]["GravityModel"]["cpc"] <= 1.0
    np.testing.assert_allclose(
        _numbers(m_other["sources"]), _numbers(m_local["sources"]), rtol=1e-12
    )


def test_dask_scheduler_run_equals_local_run(world, local_run, dask_cluster) -> None:
    from dask.utils import key_split
    from distributed import Client, get_task_stream

    root, _ = world
    config, local = local_run
    address = str(dask_cluster["address"])
    workers = dict(dask_cluster["workers"])  # type: ignore[arg-type]
    assert sorted(workers) == ["worker1", "worker2"]
    t0 = time.perf_counter()
    with Client(address, timeout="30s") as observer, get_task_stream(observer) as stream:
        remote = flowmodel(
            "-v", "run", str(config), "--set", "run.out_dir=runs/remote", "--scheduler", address
        )
    print(f"run on the dask scheduler {time.perf_counter() - t0:.1f} s")

    # the work ran on the two worker processes, not in the flowmodel process
    assert f"dask: connected to scheduler {address}" in remote.stderr
    assert "zonal statistics on a dask worker" in remote.stderr
    assert "prediction: origin blocks on dask workers" in remote.stderr
    by_prefix: dict[str, list[str]] = {}
    for task in stream.data:
        by_prefix.setdefault(key_split(task["key"]), []).append(task["worker"])
    assert len(by_prefix.get("zonal_covariates", [])) == 1, sorted(by_prefix)
    # one task per origin block (named after predict's _summarise; dask's name for a
    # from_delayed task varies between versions: "summarise-from-value" in 2026.8)
    blocks = [w for prefix, ws in by_prefix.items() if "summarise" in prefix for w in ws]
    assert len(blocks) == 6, sorted(by_prefix)  # 30 origins in blocks of 5
    assert set(blocks) == set(workers.values())  # both workers predicted
    assert {w for ws in by_prefix.values() for w in ws} <= set(workers.values())
    # ... and gave the local run's results
    assert_same_results(local, root / "runs" / "remote")


def _numbers(tree: object) -> list[float]:
    """Every number in a JSON tree, in a fixed order."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    if isinstance(tree, bool) or not isinstance(tree, int | float):
        return []
    return [float(tree)]


# ------------------------------------------------------------------------- SLURM
def _slurm_unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; under CI=true the SLURM test must run (.ci/run installs SLURM)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A single-node SLURM (munged, slurmctld, slurmd) private to a temporary folder."""
    if os.name != "posix" or os.geteuid() != 0:
        _slurm_unavailable("the SLURM test needs root (slurmd starts jobs as their user)")
    if shutil.which("bash") is None:
        _slurm_unavailable("the SLURM test needs bash")
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(c)]
    if missing:
        _slurm_unavailable(
            f"SLURM is not installed ({', '.join(missing)} not on PATH). "
            f"Fix: {SLURM_SCRIPT.relative_to(REPO)} install (root, Debian/Ubuntu apt)"
        )
    folder = tmp_path_factory.mktemp("slurm")
    env = os.environ | {"SLURM_CONF": str(folder / "slurm.conf")}
    t0 = time.perf_counter()
    started = subprocess.run(
        ["bash", str(SLURM_SCRIPT), "start", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        print(f"SLURM up in {time.perf_counter() - t0:.1f} s")
        yield env
    finally:
        if (folder / "slurm.conf").exists():
            stopped = subprocess.run(
                ["bash", str(SLURM_SCRIPT), "stop", str(folder)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _squeue(env: dict[str, str], job: str) -> list[str]:
    res = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%i %T"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.split("\n")[:-1]


def _sbatch(env: dict[str, str], script: Path, *args: str) -> str:
    res = subprocess.run(
        ["sbatch", "--parsable", *args, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=script.parent,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def _task_states(env: dict[str, str], job: str) -> dict[int, tuple[str, str]]:
    """Array task -> (JobState, ExitCode) from ``scontrol show job`` (kept MinJobAge s)."""
    res = subprocess.run(
        ["scontrol", "-o", "show", "job", job],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    states = {}
    for line in res.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[int(fields["ArrayTaskId"])] = (fields["JobState"], fields["ExitCode"])
    return states


def _manifest(run_dir: Path) -> dict:
    path = run_dir / pipeline.MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"stages": {}, "history": []}


def test_slurm_job_array_runs_every_task_and_resumes_a_killed_one(world, slurm) -> None:
    import xarray as xr

    root, _ = world
    configs = [write_config(world, c, countries=[c], report=True) for c in COUNTRIES]
    runs = [root / "runs" / c for c in COUNTRIES]
    settings = root / "site.toml"
    settings.write_text(
        f'flowmodel = "{FLOWMODEL}"\ntime = "00:15:00"\ncpus = 1\nmem = "500M"\n'
        'setup = "export PYTHONHASHSEED=0"\n'
    )
    make_slurm = load_script("make_slurm")
    script = root / "jobs" / "countries.sh"
    assert (
        make_slurm.main([*map(str, configs), "--out", str(script), "--settings", str(settings)])
        == 0
    )

    # 1. the array, with task 1 cancelled (SIGTERM, as at the wall time) in the middle of fit
    t0 = time.perf_counter()
    job = _sbatch(slurm, script)
    killed = runs[1]

    def fitting() -> bool:
        stages = _manifest(killed)["stages"]
        return (
            stages.get("prepare", {}).get("status") == "done"
            and stages.get("fit", {}).get("status") == "running"
        )

    wait_until(fitting, timeout=240, what=f"task 1 to start fitting ({killed})", poll=0.05)
    res = subprocess.run(["scancel", f"{job}_1"], env=slurm, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: not _squeue(slurm, job), timeout=300, what=f"job array {job} to finish")
    t_first = time.perf_counter() - t0
    states = _task_states(slurm, job)
    assert states[0] == ("COMPLETED", "0:0") and states[2] == ("COMPLETED", "0:0"), states
    assert states[1][0] == "CANCELLED", states
    killed_stages = _manifest(killed)["stages"]
    assert killed_stages["prepare"]["status"] == "done"
    assert killed_stages["fit"]["status"] == "running"  # SIGTERM: no chance to record more
    assert not (killed / pipeline.POSTERIOR).exists()  # nothing half-written

    # 2. resubmit the same script: finished tasks skip everything, task 1 resumes at fit
    t0 = time.perf_counter()
    job2 = _sbatch(slurm, script)
    wait_until(lambda: not _squeue(slurm, job2), timeout=300, what=f"job array {job2} to finish")
    t_second = time.perf_counter() - t0
    print(f"SLURM array: first submission {t_first:.1f} s, resubmission {t_second:.1f} s")
    assert _task_states(slurm, job2) == dict.fromkeys(range(3), ("COMPLETED", "0:0"))
    logs = script.parent / "logs"
    for i, config in enumerate(configs):
        err = (logs / f"countries_{job2}_{i}.err").read_text()
        out = (logs / f"countries_{job2}_{i}.out").read_text()
        assert f"task {i} on " in out and f"run {config}" in out, out
        if i == 1:
            assert "[==] prepare: skipped" in err and "[->] fit: running" in err, err
            assert "4 stage(s) ran, 1 skipped" in err, err
        else:
            assert "0 stage(s) ran, 5 skipped" in err, err
    history = [(h["stage"], h["action"]) for h in _manifest(killed)["history"]]
    assert history.count(("prepare", "started")) == 1  # prepared once, in the killed task
    assert history.count(("fit", "started")) == 2  # the killed fit and the resumed one
    assert ("prepare", "skipped") in history

    # 3. every task's outputs
    for run, country in zip(runs, COUNTRIES, strict=True):
        manifest = _manifest(run)
        assert all(manifest["stages"][s]["status"] == "done" for s in pipeline.STAGE_ORDER)
        for name in (pipeline.DATASET, pipeline.POSTERIOR, pipeline.FLOWS, pipeline.METRICS):
            assert (run / name).is_file(), (run, name)
        assert (run / "report.html").stat().st_size > 10_000
        with xr.open_dataset(run / pipeline.FLOWS, engine="h5netcdf") as flows:
            units = [str(u) for u in flows["origin"].values]
            assert units and all(u.startswith(country) for u in units), units
            assert np.isfinite(flows["mean"].values).sum() == len(units) * (len(units) - 1)
        metrics = json.loads((run / pipeline.METRICS).read_text())
        assert 0.5 < metrics["sources"]["census"]["GravityModel"]["cpc"] <= 1.0
    summary = root / "summary.csv"
    batch = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "run_batch.py"),
            *map(str, configs),
            "--summary-only",
            "--summary",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert batch.returncode == 0, batch.stderr
    import pandas as pd

    table = pd.read_csv(summary)
    assert table["status"].tolist() == ["ok"] * 3
    assert table["name"].tolist() == list(COUNTRIES)


def _jobs_named(env: dict[str, str], name: str) -> dict[str, str]:
    """Job id -> JobState of this cluster's jobs called ``name``."""
    res = subprocess.run(
        ["scontrol", "-o", "show", "job"], capture_output=True, text=True, env=env, timeout=30
    )
    assert res.returncode == 0, res.stderr
    jobs = {}
    for line in res.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("JobName") == name:
            jobs[fields["JobId"]] = fields["JobState"]
    return jobs


def test_dask_jobqueue_workers_on_slurm_equal_local_run(world, local_run, slurm) -> None:
    """``[dask] cluster = "slurm"``: dask-jobqueue submits the workers as SLURM jobs."""
    pytest.importorskip("dask_jobqueue")
    import re

    root, _ = world
    config, local = local_run
    logs = root / "jobqueue-logs"
    before = _jobs_named(slurm, "dask-worker")
    # site settings that belong in ~/.config/dask/jobqueue.yaml: loopback only, logs here
    env = slurm | {
        "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(logs),
        "DASK_JOBQUEUE__SLURM__LOCAL_DIRECTORY": str(root / "jobqueue-scratch"),
    }
    overrides = {
        "run.out_dir": "runs/jobqueue",
        "dask.cluster": "slurm",
        "dask.n_workers": "2",
        "dask.cores": "1",
        "dask.memory": "1GB",
        "dask.walltime": "00:10:00",
        "dask.queue": "debug",
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    t0 = time.perf_counter()
    res = flowmodel("-v", "run", str(config), *sets, env=env)
    print(f"run with dask-jobqueue SLURM workers {time.perf_counter() - t0:.1f} s")
    match = re.search(
        r"dask: SLURM cluster, 2 worker job\(s\).*scheduler (tcp://\S+) ", res.stderr
    )
    assert match, res.stderr
    scheduler = match.group(1)
    assert "zonal statistics on a dask worker" in res.stderr
    assert "prediction: origin blocks on dask workers" in res.stderr
    # two worker jobs ran, registered with the run's scheduler, and were cancelled at its end
    jobs = {k: v for k, v in _jobs_named(slurm, "dask-worker").items() if k not in before}
    assert sorted(jobs.values()) == ["CANCELLED", "CANCELLED"], jobs
    for job in jobs:
        text = (logs / f"dask-worker-{job}.err").read_text()
        assert f"Registered to:      {scheduler}" in text, text[-2000:]
    assert_same_results(local, root / "runs" / "jobqueue")
