"""The flowmodel command line: help, exit codes, one-line errors, end to end on a tiny world."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import CONFIG, install_fake_stages, make_project

from flowmodel import pipeline
from flowmodel._version import __version__
from flowmodel.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_is_light() -> None:
    code = (
        "import sys, flowmodel.cli; "
        "heavy = [m for m in ('pymc', 'pytensor', 'xarray', 'numpy', 'pandas', 'dask', 'geopandas') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_help_lists_commands_and_examples(capsys) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == EXIT_OK
    for command in (
        "run",
        "prepare",
        "fit",
        "predict",
        "evaluate",
        "report",
        "demo",
        "status",
        "validate",
    ):
        assert f"  {command} " in out
    assert "flowmodel run kenya.toml" in out and "Exit codes" in out
    code, out, _ = run_cli(capsys, "fit", "--help")
    assert code == EXIT_OK and "--set KEY=VALUE" in out and "--scheduler ADDRESS" in out


def test_version(capsys) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == EXIT_OK and out.strip() == f"flowmodel {__version__}"


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("flowmodel")
    if not exe.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Usage: flowmodel" in proc.stdout


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        (
            CONFIG + "[predict]\nquantiles = 0.5\n",
            [],
            r"\[predict\] quantiles: expected a list, got 0\.5",
        ),
        (
            CONFIG.replace('type = "gravity"', 'type = "logit"'),
            [],
            r"\[model\] type: expected one of 'gravity', 'radiation' or 'fusion', got 'logit'",
        ),
        (
            CONFIG.replace('path = "pop.tif"', 'path = "gone.tif"').replace(
                'population = "pop.tif"', 'population = "gone.tif"'
            ),
            [],
            r"input file\(s\) not found: rasters\.population = .*gone\.tif",
        ),
        (
            CONFIG,
            ["--set", "model.chains=zero"],
            r"\[model\] chains: expected an integer, got 'zero' \(set by --set\)",
        ),
        (CONFIG, ["--set", "nonsense"], r"--set 'nonsense': expected KEY=VALUE"),
        (CONFIG + "[dask]\nmemory = 16\n", [], r"\[dask\] memory: expected a string, got 16"),
        ("[units\n", [], r"not valid TOML"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, capsys, monkeypatch, config, args, message
) -> None:
    import re

    calls = install_fake_stages(monkeypatch)
    path = make_project(tmp_path, config)
    code, _, err = run_cli(capsys, "run", str(path), *args)
    assert code == EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("flowmodel: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not calls


def test_missing_config_file_exits_2(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "nope.toml"))
    assert code == EXIT_BAD_INPUT and "config file not found" in err


def test_usage_errors_exit_2(capsys) -> None:
    code, _, err = run_cli(capsys, "run")
    assert code == 2 and "Missing argument 'CONFIG'" in err
    code, _, err = run_cli(capsys, "nosuchcommand")
    assert code == 2


def test_run_then_rerun_skips(tmp_path: Path, capsys, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    path = make_project(tmp_path)
    code, _, err = run_cli(capsys, "run", str(path))
    assert code == EXIT_OK
    assert "[->] prepare: running (no previous run of this stage)" in err
    assert "5 stage(s) ran, 0 skipped" in err
    code, _, err = run_cli(capsys, "run", str(path), "--set", "predict.top_k=10")
    assert code == EXIT_OK
    assert "[==] fit: skipped (inputs and config unchanged since" in err
    assert "[->] predict: running (config changed: predict)" in err
    assert calls == Counter(prepare=1, fit=1, predict=2, evaluate=2, report=2)
    code, out, _ = run_cli(capsys, "status", str(path))
    assert code == EXIT_OK
    assert out.splitlines()[0].startswith("prepare   done at ")
    assert "predict   done at" in out and "config changed: predict" in out


def test_quiet_prints_nothing_on_success(tmp_path: Path, capsys, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    code, out, err = run_cli(capsys, "-q", "run", str(make_project(tmp_path)))
    assert code == EXIT_OK and out == "" and err == ""


def test_single_stage_command_and_force(tmp_path: Path, capsys, monkeypatch) -> None:
    calls = install_fake_stages(monkeypatch)
    path = make_project(tmp_path)
    code, _, err = run_cli(capsys, "fit", str(path))
    assert code == EXIT_BAD_INPUT
    assert "stage 'fit' needs" in err and "run 'flowmodel prepare" in err
    assert run_cli(capsys, "prepare", str(path))[0] == EXIT_OK
    assert run_cli(capsys, "fit", str(path))[0] == EXIT_OK
    assert run_cli(capsys, "fit", str(path), "--force")[0] == EXIT_OK
    assert calls == Counter(prepare=1, fit=2)


def test_stage_failure_exits_1_with_reason(tmp_path: Path, capsys, monkeypatch) -> None:
    install_fake_stages(monkeypatch, fail={"fit": RuntimeError("sampler exploded")})
    code, _, err = run_cli(capsys, "run", str(make_project(tmp_path)))
    assert code == EXIT_FAILURE
    last = err.strip().splitlines()[-1]
    assert (
        last
        == "flowmodel: error: RuntimeError: sampler exploded (rerun with -v for the traceback)"
    )


def test_flowmodel_error_in_a_stage_exits_2(tmp_path: Path, capsys, monkeypatch) -> None:
    from flowmodel.exceptions import DataContractError

    install_fake_stages(
        monkeypatch, fail={"prepare": DataContractError("variable 'population': NaN")}
    )
    code, _, err = run_cli(capsys, "run", str(make_project(tmp_path)))
    assert code == EXIT_BAD_INPUT
    assert err.strip().splitlines()[-1] == "flowmodel: error: variable 'population': NaN"


def test_failed_fit_stops_the_run_with_exit_1_and_no_later_stage(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A fit without a usable posterior (e.g. a Laplace mode at a boundary) stops the run."""
    from flowmodel.exceptions import FitFailedError

    calls = install_fake_stages(
        monkeypatch, fail={"fit": FitFailedError("Laplace: the mode of ['sigma_country'] ...")}
    )
    code, _, err = run_cli(capsys, "run", str(make_project(tmp_path)))
    assert code == EXIT_FAILURE
    assert err.strip().splitlines()[-1].startswith("flowmodel: error: Laplace: the mode")
    assert calls["predict"] == calls["evaluate"] == calls["report"] == 0


def test_validate_command(tmp_path: Path, capsys) -> None:
    path = make_project(tmp_path)
    code, out, _ = run_cli(capsys, "validate", str(path))
    assert code == EXIT_OK and "ok (run 'tiny', model gravity" in out


# ----------------------------------------------------------------- end to end
TINY = """\
[run]
name = "tiny-world"
out_dir = "run"
seed = 1

[units]
path = "world/units.gpkg"
layer = "units"

[rasters]
population = "world/population.tif"
built_up = "world/built_up.tif"
night_lights = "world/night_lights.tif"

[flows.census]
path = "world/census_od.csv"
options = {{ sample_fraction = {fraction}, suppressed_min = 1 }}

[model]
type = "gravity"
backend = "map"

[model.options]
source = "census"
origin_covariates = ["log_population"]
destination_covariates = ["log_population"]

[predict]
top_k = 50

[report]
truth = "world/truth.json"

[dask]
cluster = "none"
"""


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowmodel.simulate import simulate_world

    root = tmp_path_factory.mktemp("tiny")
    world = simulate_world(
        root / "world",
        n_units=24,
        n_countries=3,
        seed=5,
        raster_size=120,
        census_countries=2,
        cdr_countries=1,
    )
    (root / "run.toml").write_text(TINY.format(fraction=world.truth["sample_fraction"]))
    return root


@pytest.mark.integration
@pytest.mark.xdist_group("tiny_world")
def test_end_to_end_on_tiny_world(tiny_world: Path, capsys, monkeypatch) -> None:
    config = tiny_world / "run.toml"
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == EXIT_OK, err
    run = tiny_world / "run"
    for name in (
        "dataset.nc",
        "units.gpkg",
        "posterior.nc",
        "flows.nc",
        "flows.csv",
        "flows.gpkg",
        "metrics.json",
        "report.html",
        "manifest.json",
        "flowmodel.log",
        "config.toml",
    ):
        assert (run / name).exists(), name
    import xarray as xr

    with xr.open_dataset(run / "flows.nc", engine="h5netcdf") as flows:
        assert {"mean", "q05", "q95", "observed"} <= set(flows.data_vars)
        assert flows.sizes["origin"] == 24
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 < metrics["sources"]["census"]["GravityModel"]["cpc"] <= 1.0
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in pipeline.STAGE_ORDER)
    # a second run does nothing: every stage skipped, no stage function called
    calls = Counter()
    for name in pipeline.STAGE_ORDER:
        real = getattr(pipeline, f"stage_{name}")
        monkeypatch.setattr(
            pipeline,
            f"stage_{name}",
            lambda ctx, _n=name, _r=real: (calls.update([_n]), _r(ctx))[1],
        )
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == EXIT_OK and "0 stage(s) ran, 5 skipped" in err
    assert not calls
    # a changed prediction setting reruns predict and what depends on it only
    code, _, err = run_cli(
        capsys, "run", str(config), "--set", "predict.quantiles=[0.1, 0.5, 0.9]"
    )
    assert code == EXIT_OK, err
    assert calls == Counter(predict=1, evaluate=1, report=1)


@pytest.mark.integration
@pytest.mark.xdist_group("tiny_world")
def test_prediction_runs_on_dask_workers_via_scheduler(tiny_world: Path, capsys) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    config = tiny_world / "run.toml"
    assert run_cli(capsys, "-q", "run", str(config))[0] == EXIT_OK  # skips what is done
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        code, _, err = run_cli(
            capsys,
            "-v",
            "predict",
            str(config),
            "--force",
            "--scheduler",
            cluster.scheduler_address,
            "--set",
            "predict.block_size=3",
        )
        assert code == EXIT_OK, err
        assert "prediction: origin blocks on dask workers" in err
    workers = {task["worker"] for task in stream.data}
    assert len(workers) == 2, workers
    assert len(stream.data) >= 8  # 24 origins in blocks of 3


@pytest.mark.integration
def test_demo_small(tmp_path: Path, capsys, mock_sampling) -> None:
    """The demo end to end with sampling mocked (its statistics: test_fusion_world.py)."""
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--out", str(out), "--size", "small")
    assert code == EXIT_OK, err
    assert (out / "report.html").exists()
    html = (out / "report.html").read_text(encoding="utf-8")
    # how homes were detected from the raw phone events: the settings the data chose
    assert "Home detection: cdr" in html
    assert "night hours" in html and "chosen by" in html
    assert "estimated spurious moves per subscriber and pair of periods" in html
    # home detection's rate of spurious moves travels with the CDR flows (the model's
    # background of spurious relocations is centred on it)
    import json

    import xarray as xr

    settings = json.loads((out / "cdr_cdr" / "cdr_settings.json").read_text())
    with xr.open_dataset(out / "dataset.nc") as ds:
        assert ds["flow_cdr"].attrs["spurious_rate"] == settings["spurious_rate_estimate"] > 0
    assert "true vs estimated parameters" in stdout
    assert "beta[log_distance]" in stdout
    assert f"report: {(out / 'report.html').resolve()}" in stdout


def test_demo_rejects_unknown_size(capsys) -> None:
    code, _, err = run_cli(capsys, "demo", "--size", "huge")
    assert code == 2 and "huge" in err


def test_config_paths_are_relative_to_the_config_file(tmp_path: Path, capsys, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    make_project(tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", "a/b/run.toml")
    assert code == EXIT_OK, err
    assert (tmp_path / "a" / "b" / "run" / "manifest.json").exists()
    resolved = json.loads((tmp_path / "a" / "b" / "run" / "config.resolved.json").read_text())
    assert resolved["units"]["path"] == str(tmp_path / "a" / "b" / "units.gpkg")
    assert textwrap.dedent(CONFIG) == (tmp_path / "a" / "b" / "run" / "config.toml").read_text()


@pytest.mark.integration
@pytest.mark.xdist_group("tiny_world")
def test_prepare_adds_marginals_and_names_a_bad_file(tiny_world: Path, capsys) -> None:
    import pandas as pd
    import xarray as xr

    codes = json.loads((tiny_world / "world" / "truth.json").read_text())["countries"]
    table = pd.DataFrame(
        [(a, b, 1000.0) for a in codes for b in codes],
        columns=["origin_country", "destination_country", "value"],
    )
    table.to_csv(tiny_world / "bilateral.csv", index=False)
    text = (
        (tiny_world / "run.toml")
        .read_text()
        .replace('out_dir = "run"', 'out_dir = "run-marginals"')
    )
    assert 'out_dir = "run-marginals"' in text
    text += '\n[marginals.bilateral]\npath = "bilateral.csv"\nrel_sd = 0.2\n'
    config = tiny_world / "marginals.toml"
    config.write_text(text)
    # a gravity model would ignore them: said before any stage runs
    code, _, err = run_cli(capsys, "prepare", str(config))
    assert code == EXIT_BAD_INPUT
    assert "[marginals] bilateral: country-pair totals are observations of the fusion" in err
    fusion = text.replace(
        '[model]\ntype = "gravity"\nbackend = "map"\n\n[model.options]\nsource = "census"\n'
        'origin_covariates = ["log_population"]\ndestination_covariates = ["log_population"]\n',
        '[model]\ntype = "fusion"\nbackend = "map"\n\n[model.options]\nsources = ["census"]\n'
        'latent = { type = "gravity", origin_covariates = ["log_population"] }\n',
    )
    assert 'type = "fusion"' in fusion
    config.write_text(fusion)
    code, _, err = run_cli(capsys, "prepare", str(config))
    assert code == EXIT_OK, err
    with xr.open_dataset(tiny_world / "run-marginals" / "dataset.nc", engine="h5netcdf") as ds:
        marg = ds["estimate_bilateral"].load()
        se = ds["estimate_bilateral_se"].load()
    assert marg.dims == ("cell_bilateral",) and marg.attrs["origin_level"] == "country"
    assert int(marg.notnull().sum()) == len(codes) ** 2
    np.testing.assert_allclose(np.sqrt(np.log1p((se / marg) ** 2)), 0.2)  # log-scale error
    table.assign(origin_country="XYZ").to_csv(tiny_world / "bilateral.csv", index=False)
    code, _, err = run_cli(capsys, "prepare", str(config))
    assert code == EXIT_BAD_INPUT
    assert "bilateral.csv (marginals.bilateral)" in err and "XYZ" in err
    # published estimates beside them (kind = "estimates"), numbers as offices print them
    pub = {"origin": codes[:1], "destination": codes[1:2], "estimate": ["1,500"], "se": ["200"]}
    pd.DataFrame(pub).to_csv(tiny_world / "pub.csv", index=False)
    table.assign(value="1,000").to_csv(tiny_world / "bilateral.csv", index=False)
    config.write_text(fusion + '\n[flows.pub]\nkind = "estimates"\npath = "pub.csv"\n')
    code, _, err = run_cli(capsys, "prepare", str(config))
    assert code == EXIT_OK, err
    with xr.open_dataset(tiny_world / "run-marginals" / "dataset.nc", engine="h5netcdf") as ds:
        assert ds["estimate_pub"].values.tolist() == [1500.0]
        assert ds["estimate_pub_se"].values.tolist() == [200.0]
        assert float(ds["estimate_bilateral"].max()) == 1000.0


def test_status_shows_a_killed_stage_as_interrupted(tmp_path: Path, capsys, monkeypatch) -> None:
    install_fake_stages(monkeypatch)
    path = make_project(tmp_path)
    assert run_cli(capsys, "-q", "run", str(path))[0] == EXIT_OK
    manifest_path = tmp_path / "run" / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["stages"]["predict"].update(status="running", pid=999_999_999)  # its process was killed
    manifest_path.write_text(json.dumps(data))
    code, out, _ = run_cli(capsys, "status", str(path))
    assert code == EXIT_OK
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["predict"].startswith("predict   interrupted - its process (pid 999999999) ended")
    assert "done at" in lines["fit"]


def test_validate_reports_deep_problems_on_one_line(tmp_path: Path, capsys) -> None:
    path = make_project(
        tmp_path,
        CONFIG.replace('path = "census.csv"', 'path = "census.csv"\noptions = { sample_frac = 1 }')
        + "\n[model.options]\ncontraint = 'doubly'\n",
    )
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == EXIT_BAD_INPUT
    line = err.strip().splitlines()[-1]
    assert "did you mean 'sample_fraction'?" in line and "did you mean 'constraint'?" in line
