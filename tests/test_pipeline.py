"""Run directory, manifest, skip/resume logic of flowmodel.pipeline (stage functions faked)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from flowmodel import pipeline
from flowmodel.atomic import atomic_path
from flowmodel.config import load_config
from flowmodel.exceptions import RunDirectoryError
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]

OUTPUTS = {
    "prepare": [pipeline.DATASET, pipeline.UNITS],
    "fit": [pipeline.POSTERIOR],
    "predict": [pipeline.FLOWS],
    "evaluate": [pipeline.METRICS],
    "report": [pipeline.REPORT],
}

CONFIG = """\
[run]
name = "tiny"
out_dir = "run"
seed = 3

[units]
path = "units.gpkg"

[rasters]
population = "pop.tif"

[flows.census]
path = "census.csv"

[model]
type = "gravity"
backend = "map"
draws = 10
"""


def make_project(root: Path, config: str = CONFIG) -> Path:
    """A config file and (fake) input files beside it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "units.gpkg").write_bytes(b"units v1")
    (root / "pop.tif").write_bytes(b"raster v1")
    (root / "census.csv").write_text("origin,destination,count\nA,B,1\n")
    path = root / "run.toml"
    path.write_text(config)
    return path


def install_fake_stages(
    monkeypatch: pytest.MonkeyPatch, fail: dict[str, BaseException] | None = None
) -> Counter:
    """Replace every stage function by a fake that writes deterministic outputs and counts calls."""
    calls: Counter = Counter()
    fail = fail or {}

    def make(name: str):
        def stage(ctx: pipeline.StageContext) -> dict[str, Path]:
            calls[name] += 1
            spec = pipeline.STAGES[name]
            upstream = {n: ctx.path(n).read_text() for n in spec.needs}
            content = json.dumps(
                {
                    "stage": name,
                    "config": spec.config(ctx.config),
                    "upstream": upstream,
                    "inputs": {
                        k: Path(p).read_bytes().decode()
                        for k, p in ctx.config.input_files().items()
                    }
                    if name == "prepare"
                    else {},
                },
                sort_keys=True,
                default=str,
            )
            out = {}
            for i, fname in enumerate(OUTPUTS[name]):
                if name in fail and i == len(OUTPUTS[name]) - 1:
                    raise fail[name]
                with atomic_path(ctx.path(fname)) as tmp:
                    tmp.write_text(content)
                out[fname] = ctx.path(fname)
            return out

        return stage

    for name in pipeline.STAGE_ORDER:
        monkeypatch.setattr(pipeline, f"stage_{name}", make(name))
    return calls


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def manifest(cfg_path: Path) -> dict:
    return json.loads((cfg_path.parent / "run" / "manifest.json").read_text())


def test_first_run_runs_everything_and_writes_run_directory(project: Path, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    cfg = load_config(project)
    results = pipeline.run_pipeline(cfg)
    assert [r.stage for r in results] == list(pipeline.STAGE_ORDER)
    assert all(r.action == "ran" for r in results)
    assert calls == Counter(dict.fromkeys(pipeline.STAGE_ORDER, 1))
    run = project.parent / "run"
    for name in (
        "config.toml",
        "config.resolved.json",
        "flowmodel.log",
        "manifest.json",
        "report.html",
    ):
        assert (run / name).exists(), name
    # the lock file stays (removing it would race); nobody holds its lock any more
    assert (run / pipeline.LOCK_FILE).exists() and pipeline.lock_holder(run) is None
    data = manifest(project)
    for stage in pipeline.STAGE_ORDER:
        entry = data["stages"][stage]
        assert entry["status"] == "done"
        assert entry["reason"] == "no previous run of this stage"
        assert len(entry["config_hash"]) == 16
        assert entry["outputs"]
    assert set(data["stages"]["prepare"]["inputs"]) == {
        "units.path",
        "rasters.population",
        "flows.census.path",
    }
    assert set(data["stages"]["predict"]["inputs"]) == {pipeline.DATASET, pipeline.POSTERIOR}
    assert "run prepare: no previous run" in (run / "flowmodel.log").read_text()


def test_rerun_skips_unchanged_stages_and_says_why(project: Path, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project))
    results = pipeline.run_pipeline(load_config(project))
    assert all(r.action == "skipped" for r in results)
    assert calls == Counter(dict.fromkeys(pipeline.STAGE_ORDER, 1))
    data = manifest(project)
    assert data["stages"]["fit"]["last_skip_reason"].startswith(
        "inputs and config unchanged since"
    )
    assert [h["action"] for h in data["history"][-5:]] == ["skipped"] * 5
    assert (
        "skip fit: inputs and config unchanged"
        in (project.parent / "run" / "flowmodel.log").read_text()
    )


def test_config_change_reruns_from_the_affected_stage(project: Path, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project))
    results = pipeline.run_pipeline(load_config(project, ["model.draws=20"]))
    actions = {r.stage: (r.action, r.reason) for r in results}
    assert actions["prepare"][0] == "skipped"
    assert actions["fit"] == ("ran", "config changed: model")
    assert actions["predict"] == ("ran", "input changed: posterior.nc")
    assert calls["prepare"] == 1 and calls["fit"] == 2 and calls["report"] == 2
    assert manifest(project)["stages"]["fit"]["reason"] == "config changed: model"


def test_input_file_change_reruns_prepare(project: Path, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project))
    (project.parent / "pop.tif").write_bytes(b"raster v2")
    results = pipeline.run_pipeline(load_config(project))
    assert results[0].reason == "input changed: rasters.population"
    assert calls["prepare"] == 2


def test_deleted_or_modified_output_reruns_its_stage(project: Path, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project))
    run = project.parent / "run"
    (run / pipeline.REPORT).unlink()
    (run / pipeline.METRICS).write_text("tampered")
    results = {r.stage: r for r in pipeline.run_pipeline(load_config(project))}
    assert results["evaluate"].reason == "output modified since the stage ran: metrics.json"
    assert results["report"].action == "ran"
    assert calls["evaluate"] == 2 and calls["fit"] == 1


def test_failed_stage_is_recorded_and_resumed(project: Path, monkeypatch) -> None:
    install_fake_stages(monkeypatch, fail={"predict": RuntimeError("disk full")})
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.run_pipeline(load_config(project))
    data = manifest(project)
    assert data["stages"]["predict"]["status"] == "failed"
    assert "RuntimeError: disk full" in data["stages"]["predict"]["error"]
    run = project.parent / "run"
    # nothing half-written: no flows.nc and no temporary files left behind
    assert not (run / pipeline.FLOWS).exists()
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    calls = install_fake_stages(monkeypatch)
    results = {r.stage: r for r in pipeline.run_pipeline(load_config(project))}
    assert calls["prepare"] == 0 and calls["fit"] == 0
    assert calls["predict"] == 1 and calls["report"] == 1
    assert results["predict"].reason.startswith("previous attempt failed (RuntimeError: disk full")


def test_keyboard_interrupt_marks_interrupted(project: Path, monkeypatch) -> None:
    install_fake_stages(monkeypatch, fail={"fit": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(load_config(project))
    assert manifest(project)["stages"]["fit"]["status"] == "interrupted"
    assert pipeline.lock_holder(project.parent / "run") is None


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import pytest
from test_pipeline import install_fake_stages
from flowmodel import pipeline
from flowmodel.config import load_config

mp = pytest.MonkeyPatch()
install_fake_stages(mp)
real_predict = pipeline.stage_predict

def killed_predict(ctx):
    # die in the middle of an atomic write, the way a real stage would (kill -9)
    from flowmodel.atomic import atomic_path

    with atomic_path(ctx.path(pipeline.FLOWS)) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)

mp.setattr(pipeline, "stage_predict", killed_predict)
pipeline.run_pipeline(load_config({config!r}))
"""


def test_run_killed_mid_stage_resumes_from_last_finished_stage(project: Path, monkeypatch) -> None:
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), config=str(project))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = project.parent / "run"
    data = manifest(project)
    assert data["stages"]["fit"]["status"] == "done"
    assert data["stages"]["predict"]["status"] == "running"
    # the kernel released the killed process's lock: status says interrupted, not running
    assert pipeline.lock_holder(run) is None
    status = {r["stage"]: r for r in pipeline.stage_status(load_config(project))}
    assert status["predict"]["status"] == "interrupted"
    assert "ended without finishing it" in status["predict"]["reason"]
    assert status["fit"]["status"] == "done"
    leftovers = [p.name for p in run.iterdir() if ".tmp" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".flows.")
    calls = install_fake_stages(monkeypatch)
    results = {r.stage: r for r in pipeline.run_pipeline(load_config(project))}
    # finished stages are not called again; the manifest says why predict ran
    assert calls == Counter({"predict": 1, "evaluate": 1, "report": 1})
    assert results["prepare"].action == results["fit"].action == "skipped"
    reason = manifest(project)["stages"]["predict"]["reason"]
    assert "did not finish: resuming here" in reason
    assert manifest(project)["stages"]["predict"]["status"] == "done"
    # the interrupted write's temporary file was removed when the run started
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    assert "left by an interrupted write" in (run / "flowmodel.log").read_text()


def test_single_stage_needs_upstream_outputs(project: Path, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    with pytest.raises(
        pipeline.StageInputMissingError, match=r"run 'flowmodel prepare .*run.toml' first"
    ):
        pipeline.run_pipeline(load_config(project), ["fit"])
    calls = install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project), ["prepare"])
    pipeline.run_pipeline(load_config(project), ["fit"])
    assert calls == Counter({"prepare": 1, "fit": 1})
    results = pipeline.run_pipeline(load_config(project), ["fit"], force=True)
    assert results[0].reason == "forced (--force)"


HOLD_LOCK = """
import sys
from flowmodel.pipeline import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_live_lock_refuses_second_process(project: Path, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    run = project.parent / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert pipeline.lock_holder(run) == holder.pid
        with pytest.raises(pipeline.RunLockedError, match=f"pid {holder.pid}"):
            pipeline.run_pipeline(load_config(project))
        # a stage the manifest marks running is running while its process holds the lock
        data = pipeline.read_manifest(run)
        data["stages"]["fit"] = {"status": "running", "pid": holder.pid}
        (run / pipeline.MANIFEST).write_text(json.dumps(data))
        status = {r["stage"]: r["status"] for r in pipeline.stage_status(load_config(project))}
        assert status["fit"] == f"running (pid {holder.pid})"
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert pipeline.lock_holder(run) is None  # released when the holder exited
    (run / pipeline.MANIFEST).unlink()
    pipeline.run_pipeline(load_config(project))


def _lock_contender(run_dirs: list[str], start, hold, results) -> None:
    """Try the run lock of each folder at the same instant as the other process."""
    for i, run_dir in enumerate(run_dirs):
        start.wait()
        try:
            with pipeline.run_lock(run_dir, wait_s=0):
                results.put((i, True))
                hold.wait()  # keep it until the other process has tried
        except pipeline.RunLockedError:
            results.put((i, False))
            hold.wait()


def test_lock_two_processes_at_a_barrier_exactly_one_wins(tmp_path: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a threaded pytest
    rounds = 100
    run_dirs = []
    for i in range(rounds):
        # half the rounds in a fresh folder (both create the lock file), half in a used one
        folder = tmp_path / f"run{i // 2 if i % 2 else i}"
        folder.mkdir(exist_ok=True)
        run_dirs.append(str(folder))
    start, hold = ctx.Barrier(2), ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_lock_contender, args=(run_dirs, start, hold, results))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in range(2 * rounds)]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    winners = Counter(i for i, won in got if won)
    assert sorted(Counter(i for i, _ in got).values()) == [2] * rounds
    assert all(winners[i] == 1 for i in range(rounds)), {
        i: winners[i] for i in range(rounds) if winners[i] != 1
    }


def test_unreadable_manifest_reruns_everything(project: Path, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project))
    (project.parent / "run" / "manifest.json").write_text("{not json")
    pipeline.run_pipeline(load_config(project))
    assert calls["prepare"] == 2


def test_file_sha256_uses_cache_and_hashes_directories(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    cache: dict = {}
    digest = pipeline.file_sha256(f, cache)
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    entry = cache[str(f.resolve())]
    assert entry["sha256"] == digest and {"ctime_ns", "inode", "device"} <= set(entry)
    # a file changed just before it was hashed is read again (the racy window)
    entry["sha256"] = "cached"
    assert pipeline.file_sha256(f, cache) == digest
    # hashed long after its last change and unchanged since: the cached hash is reused
    cache[str(f.resolve())].update(sha256="cached", hashed_at_ns=time.time_ns() + 10**10)
    assert pipeline.file_sha256(f, cache) == "cached"
    os.utime(f, ns=(1, 1))
    assert pipeline.file_sha256(f, cache) == digest
    store = tmp_path / "flows.zarr"
    (store / "x").mkdir(parents=True)
    (store / "x" / "0").write_bytes(b"1")
    first = pipeline.file_sha256(store)
    (store / "x" / "0").write_bytes(b"2")
    assert pipeline.file_sha256(store) != first


def test_same_size_edit_with_restored_mtime_is_detected(project: Path, monkeypatch) -> None:
    """cp -p / rsync -t / tar x: same size, same mtime, other contents -> prepare reruns."""
    calls = install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project))
    census = project.parent / "census.csv"
    before = census.stat()
    # pretend the hashes were taken long ago, so that the stat cache would be trusted
    data = manifest(project)
    for entry in data["file_cache"].values():
        entry["hashed_at_ns"] = before.st_ctime_ns + 10**10
    (project.parent / "run" / "manifest.json").write_text(json.dumps(data))
    census.write_text("origin,destination,count\nA,B,7\n")  # same size
    os.utime(census, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = census.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    results = pipeline.run_pipeline(load_config(project))
    assert results[0].reason == "input changed: flows.census.path"
    assert calls["prepare"] == 2
    # and with nothing changed the cache is used and nothing reruns
    results = pipeline.run_pipeline(load_config(project))
    assert all(r.action == "skipped" for r in results)


def test_stage_status_lists_every_stage(project: Path, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    cfg = load_config(project)
    assert [r["status"] for r in pipeline.stage_status(cfg)] == ["not run"] * 5
    pipeline.run_pipeline(cfg, ["prepare"])
    rows = pipeline.stage_status(cfg)
    assert rows[0]["status"] == "done" and rows[1]["status"] == "not run"


def test_build_model_from_config(tmp_path: Path) -> None:
    pytest.importorskip("pymc")
    path = make_project(
        tmp_path,
        CONFIG
        + textwrap.dedent("""
        [model.options]
        cost_func = "exp"
    """),
    )
    model = pipeline.build_model(load_config(path))
    assert type(model).__name__ == "GravityModel"
    assert model.model_config["cost_func"] == "exp"


# ------------------------------------------------------------------- batch driver
def test_batch_runs_is_interrupted_and_resumes(tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    batch = load_script("run_batch")
    configs = [
        make_project(tmp_path / c, CONFIG.replace('name = "tiny"', f'name = "{c}"'))
        for c in ("ken", "uga", "tza")
    ]
    bad = make_project(tmp_path / "bad", CONFIG.replace('type = "gravity"', 'type = "gravty"'))
    summary = tmp_path / "summary.csv"
    # first attempt: interrupted (Ctrl-C / killed job) while fitting the second country
    fit_calls = Counter()

    def interrupting_fit(ctx):
        fit_calls[ctx.config.run.name] += 1
        if ctx.config.run.name == "uga":
            raise KeyboardInterrupt
        return real_fit(ctx)

    calls = install_fake_stages(monkeypatch)
    real_fit = pipeline.stage_fit
    monkeypatch.setattr(pipeline, "stage_fit", interrupting_fit)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch([*configs, bad], summary=summary, echo=lambda *_: None)
    table = pd.read_csv(summary)
    assert table["status"].tolist() == ["ok", "interrupted", "not_run", "bad_input"]
    assert calls["report"] == 1
    # second attempt: resumes; the finished country is not recomputed
    calls = install_fake_stages(monkeypatch)
    rows = batch.run_batch([*configs, bad], summary=summary, echo=lambda *_: None)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "bad_input"]
    assert calls == Counter(
        prepare=1, fit=2, predict=2, evaluate=2, report=2
    )  # uga resumed at fit, tza fresh
    table = pd.read_csv(summary)
    assert table.loc[0, "stages_ran"] == 0 and table.loc[0, "stages_skipped"] == 5
    assert table.loc[1, "stages_ran"] == 4
    assert "[model] type: expected one of" in table.loc[3, "error"]
    assert table["name"].tolist()[:3] == ["ken", "uga", "tza"]
    # summary only (after a SLURM array): nothing runs
    calls = install_fake_stages(monkeypatch)
    rows = batch.run_batch(configs, summary=summary, summary_only=True)
    assert not calls and all(r["status"] == "ok" for r in rows)


def test_batch_command_line_exit_codes(tmp_path: Path, monkeypatch, capsys) -> None:
    batch = load_script("run_batch")
    good = make_project(tmp_path / "good")
    bad = make_project(tmp_path / "bad", CONFIG + "[model]\n")  # duplicate table: bad TOML
    install_fake_stages(monkeypatch)
    summary = tmp_path / "s.csv"
    assert batch.main([str(good), "--summary", str(summary), "-q"]) == 0
    assert batch.main([str(good), str(bad), "--summary", str(summary), "-q"]) == 2
    install_fake_stages(monkeypatch, fail={"predict": RuntimeError("boom")})
    assert batch.main([str(good), "--summary", str(summary), "--force", "-q"]) == 1
    assert batch.main([str(good), str(bad), "--index", "5", "--summary", str(summary)]) == 2


def test_stage_refuses_inputs_of_an_unfinished_upstream_stage(project: Path, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project))
    install_fake_stages(monkeypatch, fail={"fit": RuntimeError("diverged")})
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(load_config(project, ["model.draws=99"]))
    # posterior.nc is still the complete file of the earlier fit, but no longer matches the config
    calls = install_fake_stages(monkeypatch)
    with pytest.raises(
        pipeline.StageInputMissingError,
        match=r"stage 'fit', whose last attempt did not finish \(status: failed\)",
    ):
        pipeline.run_pipeline(load_config(project), ["predict"])
    assert not calls


def test_demo_world_is_simulated_again_for_another_simulator_version(tmp_path: Path) -> None:
    from flowmodel.simulate import WORLD_VERSION

    cfg = pipeline.demo_config(tmp_path, size="small")
    truth = tmp_path / "world" / "truth.json"
    assert json.loads(truth.read_text())["world_version"] == WORLD_VERSION
    assert cfg.flows["census"].options["suppressed_min"] == 1
    first = truth.stat().st_mtime_ns
    pipeline.demo_config(tmp_path, size="small")  # same size, seed and version: reused
    assert truth.stat().st_mtime_ns == first
    stamp = tmp_path / "world" / ".demo-size"
    stamp.write_text(json.dumps({"size": "small", "seed": 0}))  # a world of an older version
    pipeline.demo_config(tmp_path, size="small")
    assert truth.stat().st_mtime_ns != first
    assert json.loads(stamp.read_text())["world_version"] == WORLD_VERSION


def test_compiled_sources_go_to_the_run_cache_not_tmpdir(project: Path, monkeypatch, tmp_path):
    """PyTensor writes the source of every numba-compiled function; not into $TMPDIR."""
    import tempfile

    pytensor = pytest.importorskip("pytensor")
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    install_fake_stages(monkeypatch)
    real_fit = pipeline.stage_fit

    def compiling_fit(ctx):
        import pytensor.tensor as pt

        x = pt.dvector("x")
        f = pytensor.function([x], pt.exp(x) + 2.5, mode="NUMBA")
        assert f([0.0])[0] == 3.5
        return real_fit(ctx)

    monkeypatch.setattr(pipeline, "stage_fit", compiling_fit)
    before = pytensor.config.generated_src_dir
    pipeline.run_pipeline(load_config(project), ["prepare", "fit"])
    assert list(tmp.iterdir()) == []
    cache = project.parent / "run" / pipeline.CACHE_DIR / "pytensor-src"
    assert any(p.suffix == ".py" for p in cache.iterdir())
    assert pytensor.config.generated_src_dir == before  # restored after the run
    assert "generated_src_dir" not in os.environ.get("PYTENSOR_FLAGS", "")


def test_stage_input_changed_since_its_stage_wrote_it(project: Path, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    pipeline.run_pipeline(load_config(project), ["prepare"])
    dataset = project.parent / "run" / pipeline.DATASET
    dataset.write_bytes(dataset.read_bytes()[:10])  # a copy cut short
    with pytest.raises(
        pipeline.StageInputChangedError,
        match=r"needs .*dataset\.nc, which changed since stage 'prepare' wrote it.*"
        r"run 'flowmodel prepare .*run\.toml' again",
    ):
        pipeline.run_pipeline(load_config(project), ["fit"])
    # the whole pipeline repairs it: prepare sees its output modified and runs again
    results = {r.stage: r for r in pipeline.run_pipeline(load_config(project), ["prepare", "fit"])}
    assert results["prepare"].reason == "output modified since the stage ran: dataset.nc"
    assert results["fit"].action == "ran"


def test_out_dir_beside_the_inputs_never_overwrites_them(tmp_path: Path, monkeypatch) -> None:
    """The demo's layout with the inputs beside the config: refused before anything is written."""
    calls = install_fake_stages(monkeypatch)
    project = make_project(tmp_path, CONFIG.replace('out_dir = "run"', 'out_dir = "."'))
    (tmp_path / "units.gpkg").rename(tmp_path / "dataset.nc")  # an input named like an output
    text = project.read_text().replace('path = "units.gpkg"', 'path = "dataset.nc"')
    project.write_text(text)
    before = (tmp_path / "dataset.nc").read_bytes()
    with pytest.raises(RunDirectoryError, match=r"overwrite its input\(s\) units\.path = "):
        load_config(project)
    cfg = load_config(project, deep=False)
    with pytest.raises(RunDirectoryError, match=r"dataset\.nc"):
        pipeline.run_pipeline(cfg)
    assert (tmp_path / "dataset.nc").read_bytes() == before and not calls
    assert not (tmp_path / pipeline.MANIFEST).exists()
    # inputs in a sub-folder (the demo's world/): out_dir = "." is fine
    sub = make_project(tmp_path / "demo" / "world", CONFIG)
    text = CONFIG.replace('out_dir = "run"', 'out_dir = "."')
    for name in ("units.gpkg", "pop.tif", "census.csv"):
        text = text.replace(f'"{name}"', f'"world/{name}"')
    (tmp_path / "demo" / "demo.toml").write_text(text)
    assert sub.exists()
    pipeline.run_pipeline(load_config(tmp_path / "demo" / "demo.toml"))
    assert (tmp_path / "demo" / pipeline.REPORT).exists()


def test_fresh_run_directory_with_foreign_files_is_refused(project: Path, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    run = project.parent / "run"
    run.mkdir()
    (run / "units.gpkg").write_text("the user's own file")
    with pytest.raises(RunDirectoryError, match=r"has no manifest\.json but holds units\.gpkg"):
        pipeline.run_pipeline(load_config(project))
    assert (run / "units.gpkg").read_text() == "the user's own file" and not calls


def test_stale_temp_files_are_removed_only_by_pattern(tmp_path: Path) -> None:
    from flowmodel.atomic import clean_stale_temp, is_temp_name

    for name in (".flows.abc12_x9.tmp.nc", ".flows.zarr.old", ".bashrc.old", "keep.tmp", ".x.tmp"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".dataset.k2j4h5g6.tmp.nc").mkdir()
    removed = {p.name for p in clean_stale_temp(tmp_path, names=["flows.zarr"])}
    assert removed == {".flows.abc12_x9.tmp.nc", ".flows.zarr.old", ".dataset.k2j4h5g6.tmp.nc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bashrc.old", ".x.tmp", "keep.tmp"]
    assert is_temp_name(".posterior.a1b2c3d4.tmp.nc") and not is_temp_name("posterior.nc")
    (tmp_path / ".flows.abcdefgh.tmp.nc").write_text("x")
    assert clean_stale_temp(tmp_path, older_than=0) == []  # a live writer's file is newer


def test_file_system_without_locks_is_a_named_error(project: Path, monkeypatch) -> None:
    import errno
    import fcntl

    install_fake_stages(monkeypatch)

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunDirectoryError, match=r"does not support file locks.*-o flock"):
        pipeline.run_pipeline(load_config(project))
    assert pipeline.lock_holder(project.parent / "run") is None


def test_prepare_depends_on_the_predicted_period_only_when_one_is_given(tmp_path: Path) -> None:
    """The static value of a dated covariate is taken at [predict] period: prepare reruns."""
    from flowmodel.config import config_from_dict
    from flowmodel.pipeline import STAGES

    def parts(extra: dict) -> dict:
        cfg = config_from_dict({"units": {"path": "u.gpkg"}, **extra}, base_dir=tmp_path)
        return STAGES["prepare"].config(cfg)

    plain = parts({})
    assert "predict_period" not in plain  # older run directories stay valid
    assert parts({"predict": {"period": "2015-2020"}})["predict_period"] == "2015-2020"
    assert parts({"predict": {"period": "2015-2020"}}) != parts(
        {"predict": {"period": "2020-2025"}}
    )
