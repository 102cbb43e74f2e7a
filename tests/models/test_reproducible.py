"""A seed gives one fit, whether PyTensor's compiled kernels come fresh or from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIT = """
import sys, warnings
import numpy as np
from flowmodel.models import GravityModel
from flowmodel.simulate import simulate_flow_dataset

ds, _ = simulate_flow_dataset(40, 3, seed=1, sample_fraction=0.1)
model = GravityModel(destination_covariates=["log_population"])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.fit(ds, backend="laplace", random_seed=0, draws=50, chains=1)
post = model.posterior
np.save(sys.argv[1], np.concatenate([post[v].values.ravel() for v in sorted(post.data_vars)]))
"""


@pytest.mark.slow
def test_a_seed_gives_one_fit_with_a_cold_or_a_warm_kernel_cache(tmp_path: Path) -> None:
    """Two processes, one compile cache: the first compiles every kernel, the second loads them.

    With PyTensor's default fast-math kernels the two Laplace fits differed by 4.5e-7
    (the first ~24 s, the second ~5 s on 2 cores); flowmodel compiles without it
    (:func:`flowmodel.models.inference.reproducible_kernels`) and they are equal.
    """
    script = tmp_path / "fit.py"
    script.write_text(FIT)
    flags = ",".join(f for f in [os.environ.get("PYTENSOR_FLAGS", "")] if f)
    flags += ("," if flags else "") + f"base_compiledir={tmp_path / 'kernels'}"
    env = os.environ | {"PYTENSOR_FLAGS": flags}
    fits = []
    for run in ("cold", "warm"):
        out = tmp_path / f"{run}.npy"
        done = subprocess.run(
            [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        fits.append(np.load(out))
    assert (tmp_path / "kernels").is_dir()  # the first process did compile into it
    assert fits[0].size > 50 and np.isfinite(fits[0]).all()
    np.testing.assert_array_equal(fits[0], fits[1])


def test_inference_compiles_without_fast_math_and_restores_the_users_setting(monkeypatch) -> None:
    """The flag is off while a backend runs, and the user's PyTensor setting is back after."""
    import pymc as pm
    import pytensor

    from flowmodel.models import inference

    seen = []

    def backend(model, **kwargs):
        seen.append(pytensor.config.numba__fastmath)
        return inference._point_to_idata(model, model.initial_point())

    monkeypatch.setitem(inference._DISPATCH, "map", backend)
    monkeypatch.setattr(inference, "_fit_map", lambda model, **kw: backend(model, **kw))
    with pm.Model() as model:
        pm.Normal("x")
    with pytensor.config.change_flags(numba__fastmath=True):
        inference.run_inference(model, "map", {}, random_seed=0, progressbar=False)
        assert pytensor.config.numba__fastmath is True
    assert seen == [False]
