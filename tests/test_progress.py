"""Progress: bars where someone watches, one heartbeat line a minute in logs, silence with -q."""

from __future__ import annotations

import io

import pytest

from flowmodel import progress as fprogress
from flowmodel.progress import Heartbeat, progress_bar, progress_enabled, set_progress


@pytest.fixture(autouse=True)
def _default_progress(monkeypatch):
    monkeypatch.delenv("FLOWMODEL_PROGRESS", raising=False)
    set_progress(None)
    yield
    set_progress(None)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_heartbeat_prints_one_line_per_interval_and_a_closing_line():
    clock, out = _Clock(), io.StringIO()
    beat = Heartbeat(total=10, desc="totals", unit="block", interval=60, file=out, clock=clock)
    for _ in range(5):
        clock.now += 10
        beat.update()
    assert out.getvalue() == ""  # 50 s: nothing yet
    clock.now += 15
    beat.update()
    assert out.getvalue().splitlines() == [
        "[flowmodel] totals: 6/10 blocks (60%), 1m05s elapsed, ~43s left"
    ]
    for _ in range(4):
        clock.now += 10
        beat.update()
    beat.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].endswith("10/10 blocks (100%), 1m45s elapsed, done")


def test_short_loops_print_nothing():
    out = io.StringIO()
    with Heartbeat(range(3), desc="x", file=out) as beat:
        assert list(beat) == [0, 1, 2]
    assert out.getvalue() == ""


def test_bar_on_a_terminal_heartbeat_in_a_log_nothing_when_off(monkeypatch):
    from tqdm.auto import tqdm

    bar = progress_bar(total=3, desc="p", file=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert type(progress_bar(total=3, file=io.StringIO())) is Heartbeat
    set_progress(False)  # what `flowmodel -q` does
    assert not progress_enabled()
    out = io.StringIO()
    silent = progress_bar(total=3, file=out, interval=0)
    silent.update(3)
    silent.close()
    assert out.getvalue() == ""
    assert progress_enabled(True)  # an explicit True still wins
    set_progress(None)
    monkeypatch.setenv("FLOWMODEL_PROGRESS", "0")
    assert not progress_enabled()


def test_quiet_flag_switches_progress_off():
    from flowmodel import cli

    cli._main_options(verbose=0, quiet=True, version=False)
    try:
        assert not progress_enabled()
    finally:
        cli._teardown_logging()
    cli._main_options(verbose=0, quiet=False, version=False)
    try:
        assert progress_enabled()
    finally:
        cli._teardown_logging()


def test_totals_and_cross_validation_report_progress(monkeypatch, capsys):
    """Both loops go through progress_bar: with a 0 s heartbeat every step prints a line."""
    import warnings

    from flowmodel.evaluate import cross_validate
    from flowmodel.models.gravity import GravityModel
    from flowmodel.simulate import simulate_flow_dataset
    from flowmodel.totals import predict_totals

    monkeypatch.setattr(fprogress, "HEARTBEAT_SECONDS", 0.0)
    ds, _ = simulate_flow_dataset(12, 2, seed=1)
    model = GravityModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="map", random_seed=0)
    capsys.readouterr()
    predict_totals(model, ds, block_size=4)
    err = capsys.readouterr().err
    assert "[flowmodel] totals: 3/3 origin blocks (100%)" in err
    cross_validate(None, ds, folds=2, baselines=["glm"])
    err = capsys.readouterr().err
    assert "[flowmodel] cross-validation (pairs): 2/2 fits" in err
    set_progress(False)
    predict_totals(model, ds, block_size=4)
    assert capsys.readouterr().err == ""


def test_a_nuts_fit_says_it_is_compiling_before_the_silent_minute(monkeypatch, capsys):
    """One line before the sampler starts (it compiles first, and draws no bar in a log)."""
    import pymc as pm

    from flowmodel.models import inference

    seen = {}

    def fake_sample(**kwargs):
        seen["err"] = capsys.readouterr().err  # what was printed before sampling began
        raise RuntimeError("stop here")

    monkeypatch.setattr(pm, "sample", fake_sample)
    with pm.Model() as model:
        pm.Normal("x")
    with pytest.raises(RuntimeError, match="stop here"):
        inference._fit_nuts(model, "nutpie", draws=10, tune=5, chains=2)
    assert seen["err"].startswith("[flowmodel] fit: compiling the model for nutpie")
    assert "then 2 chains x (5 tuning + 10) draws (no progress bar)" in seen["err"]
    set_progress(False)
    with pytest.raises(RuntimeError, match="stop here"):
        inference._fit_nuts(model, "pymc", draws=10, tune=5, chains=2)
    assert seen["err"] == ""
