"""Dask clients: local cluster, scheduler address, SLURM job scripts (never submitted)."""

from __future__ import annotations

import pytest

from flowmodel.config import DaskSection, config_from_dict
from flowmodel.exceptions import ConfigError
from flowmodel.parallel import dask_client, get_client, is_remote, slurm_cluster_kwargs


def test_local_cluster_runs_tasks_on_two_workers() -> None:
    import dask.array as da
    from distributed import get_task_stream

    section = DaskSection(n_workers=2, threads_per_worker=1, memory_limit="1GB")
    with dask_client(section) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        x = da.ones((400, 400), chunks=(20, 400))
        with get_task_stream(client) as stream:
            total = float((x * 2).sum().compute())
        assert total == 2 * 400 * 400
        workers = {task["worker"] for task in stream.data}
        assert len(workers) == 2, workers
        cluster = client.cluster
    assert cluster.status.name == "closed"


def test_no_cluster_means_no_client() -> None:
    assert get_client(DaskSection(cluster="none")) is None
    with dask_client(DaskSection(cluster="none")) as client:
        assert client is None


def test_unreachable_scheduler_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"\[dask\] scheduler: cannot reach the dask scheduler at 'tcp://127.0.0.1:9'",
    ):
        get_client(DaskSection(), scheduler="tcp://127.0.0.1:9", timeout="1s")


def test_scheduler_address_connects_without_owning_the_cluster() -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with dask_client(DaskSection(), scheduler=cluster.scheduler_address) as client:
            assert client.submit(sum, [1, 2]).result() == 3
        assert cluster.status.name == "running"  # only the client was closed


def test_is_remote() -> None:
    assert not is_remote(DaskSection())
    assert is_remote(DaskSection(), "tcp://x:8786")
    assert is_remote(DaskSection(cluster="slurm"))
    cfg = config_from_dict({"units": {"path": "/u.gpkg"}, "dask": {"scheduler": "tcp://h:1"}})
    assert is_remote(cfg)


def test_slurm_cluster_job_script_from_config() -> None:
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    section = DaskSection(
        cluster="slurm",
        queue="compute",
        account="mig",
        cores=8,
        memory="32GB",
        walltime="02:00:00",
        job_extra_directives=["--qos=short"],
    )
    kwargs = slurm_cluster_kwargs(section)
    assert kwargs == {
        "cores": 8,
        "memory": "32GB",
        "walltime": "02:00:00",
        "processes": 1,
        "queue": "compute",
        "account": "mig",
        "job_extra_directives": ["--qos=short"],
    }
    cluster = SLURMCluster(**kwargs, scheduler_options={"dashboard_address": None})
    try:
        script = cluster.job_script()  # written, never submitted
    finally:
        cluster.close()
    assert script.startswith("#!/usr/bin/env bash")
    for line in (
        "#SBATCH -p compute",
        "#SBATCH -A mig",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH -t 02:00:00",
        "#SBATCH --qos=short",
    ):
        assert line in script, line
    assert (
        "distributed.cli.dask_worker" in script
        or "dask worker" in script
        or "dask-worker" in script
    )


# ------------------------------------------------------------- SLURM array writer
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _script(name: str):
    from tests.conftest import load_script

    return load_script(name)


def _make_slurm():
    return _script("make_slurm")


def test_slurm_writer_produces_valid_array_script(tmp_path, capsys, monkeypatch) -> None:
    import shutil
    import subprocess

    make_slurm = _make_slurm()
    monkeypatch.setenv(
        "PATH", str(tmp_path / "nobin")
    )  # no sbatch reachable: nothing can be submitted
    settings = tmp_path / "site.toml"
    settings.write_text(
        'partition = "short"\naccount = "geo"\nsetup = "module load python/3.12"\n'
        'directives = ["--requeue"]\n'
    )
    configs = sorted(str(p) for p in (REPO / "scripts" / "examples").glob("*.toml"))
    out = tmp_path / "jobs" / "countries.sh"
    code = make_slurm.main(
        [
            *configs,
            "--out",
            str(out),
            "--settings",
            str(settings),
            "--time",
            "01:30:00",
            "--cpus",
            "8",
            "--mem",
            "24G",
            "--max-parallel",
            "4",
            "--set",
            "model.draws=200",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"submit with:  sbatch {out}" in stdout
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    expected = [
        f"#SBATCH --array=0-{len(configs) - 1}%4",
        "#SBATCH --job-name=countries",
        "#SBATCH --time=01:30:00",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=24G",
        "#SBATCH --partition=short",
        "#SBATCH --account=geo",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path}/jobs/logs/%x_%A_%a.out",
    ]
    for line in expected:
        assert line in lines, line
    # every #SBATCH line comes before the first command (sbatch ignores later ones)
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    assert 'flowmodel -v run "$CONFIG" --set model.draws=200' in text
    assert "module load python/3.12" in text
    listing = out.with_suffix(".configs.txt").read_text().splitlines()
    assert listing == configs
    assert (tmp_path / "jobs" / "logs").is_dir()
    bash = shutil.which("bash", path="/bin:/usr/bin")
    if bash:
        assert subprocess.run([bash, "-n", str(out)], capture_output=True).returncode == 0
        # the task picks its config by array index
        probe = (
            text.split("export OMP_NUM_THREADS")[0]
            .split("set -euo pipefail")[1]
            .replace("module load python/3.12", "")
        )
        res = subprocess.run(
            [bash, "-c", probe + 'echo "$CONFIG"'],
            capture_output=True,
            text=True,
            env={"SLURM_ARRAY_TASK_ID": "1", "PATH": "/bin:/usr/bin"},
        )
        assert res.stdout.strip() == configs[1]


def test_slurm_writer_rejects_bad_config(tmp_path, capsys) -> None:
    make_slurm = _make_slurm()
    bad = tmp_path / "bad.toml"
    bad.write_text('[units]\npath = "u.gpkg"\n[model]\ndraws = "lots"\n')
    code = make_slurm.main([str(bad), "--out", str(tmp_path / "job.sh")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("make_slurm: error: ") and "[model] draws: expected an integer" in err
    assert not (tmp_path / "job.sh").exists()
    settings = tmp_path / "s.toml"
    settings.write_text('partion = "x"\n')
    good = REPO / "scripts" / "examples" / "single_country.toml"
    assert (
        make_slurm.main([str(good), "--settings", str(settings), "--out", str(tmp_path / "j.sh")])
        == 2
    )
    assert "unknown setting(s) ['partion']" in capsys.readouterr().err


def test_batch_array_tasks_write_their_own_summaries(tmp_path, monkeypatch) -> None:
    import pandas as pd
    from test_pipeline import CONFIG, install_fake_stages, make_project

    batch = _script("run_batch")
    configs = [
        str(make_project(tmp_path / c, CONFIG.replace('name = "tiny"', f'name = "{c}"')))
        for c in ("ken", "uga")
    ]
    calls = install_fake_stages(monkeypatch)
    summary = tmp_path / "countries.csv"
    for index in (1, 0):  # two array tasks, in any order
        assert batch.main([*configs, "--index", str(index), "--summary", str(summary), "-q"]) == 0
    assert not summary.exists()  # neither task overwrote the other's row
    assert pd.read_csv(tmp_path / "countries.task0.csv")["name"].tolist() == ["ken"]
    assert pd.read_csv(tmp_path / "countries.task1.csv")["name"].tolist() == ["uga"]
    assert calls["fit"] == 2
    assert batch.main([*configs, "--summary-only", "--summary", str(summary), "-q"]) == 0
    assert pd.read_csv(summary)["status"].tolist() == ["ok", "ok"]


def test_single_node_slurm_script_usage_errors(tmp_path) -> None:
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = REPO / "scripts" / "ci" / "slurm-single-node.sh"
    res = subprocess.run([bash, str(script), "begin"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage:" in res.stderr
    res = subprocess.run(
        [bash, str(script), "stop", str(tmp_path)], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert f"{tmp_path}/slurm.conf not found: nothing to stop" in res.stderr
