"""The inference engine: backends, their dispatch, diagnostics and failed-fit checks.

One function per backend, each taking only the keyword arguments it understands
(a table of small functions, as pymc-marketing and bambi dispatch theirs):

=============  ==============================================================
``pymc``       PyMC's NUTS
``nutpie``     nutpie's NUTS (compiled with numba)
``numpyro``    numpyro's NUTS (JAX)
``laplace``    Gaussian at the posterior mode in the unconstrained space
               (flowmodel's own: L-BFGS, trust-region Newton, finite-difference
               Hessian of the compiled gradient); ``engine="pymc-extras"``
               uses :func:`pymc_extras.fit_laplace`
``advi``       mean-field ADVI started at the MAP
``map``        one "draw" at the posterior mode
=============  ==============================================================

Laplace, ADVI and MAP are approximations: their results carry
``approximate = 1`` in the posterior's attributes and the report says so. A fit
that failed (non-finite draws, a Hessian that is not positive definite, a mode
run off to a boundary of a parameter's range) raises :class:`FitFailedError`
instead of handing NaN or 1e113 flows to prediction.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pymc as pm
import pytensor
import xarray as xr

from flowmodel.exceptions import (
    BackendNotAvailableError,
    DiagnosticsWarning,
    FitFailedError,
    ModelConfigError,
)
from flowmodel.progress import announce

__all__ = [
    "APPROXIMATE_BACKENDS",
    "AUTO_LAPLACE_PAIRS",
    "AUTO_NUMPYRO_PAIRS",
    "BACKENDS",
    "MCMC_BACKENDS",
    "auto_backend",
    "check_finite",
    "diagnostics_messages",
    "prior_draws",
    "reproducible_kernels",
    "require_backend",
    "run_inference",
    "stack_samples",
    "thin_posterior",
]

#: Inference backends of :meth:`flowmodel.models.base.FlowModel.fit`.
BACKENDS = ("auto", "pymc", "nutpie", "numpyro", "laplace", "advi", "map")
#: Backends that draw from the posterior by MCMC (R-hat and ESS apply).
MCMC_BACKENDS = ("pymc", "nutpie", "numpyro")
#: Backends whose posterior is an approximation (labelled so in outputs and the report).
APPROXIMATE_BACKENDS = ("laplace", "advi", "map")

_BACKEND_PACKAGES = {
    "nutpie": ("nutpie", "pip install nutpie  (or: conda install -c conda-forge nutpie)"),
    "numpyro": (
        "numpyro",
        "pip install numpyro jax  (or: conda install -c conda-forge numpyro jax)",
    ),
}

#: Observed cells above which ``backend="auto"`` uses the Laplace approximation.
AUTO_LAPLACE_PAIRS = 50_000
#: Observed cells above which ``backend="auto"`` prefers numpyro to nutpie.
AUTO_NUMPYRO_PAIRS = 10_000
#: Draws of the ``prior`` group stored by a fit.
PRIOR_DRAWS = 500
#: An unconstrained (log / logit) coordinate of a mode beyond this is at a boundary.
BOUNDARY = 15.0
#: Laplace warns when its mode may lie further than this many posterior sd from the true one.
LAPLACE_MODE_SD = 0.1
#: Laplace's integration grid stops where the log marginal is this far below its best
#: (INLA's default; the grid's points are one standard deviation apart).
LAPLACE_GRID_DROP = 2.5
#: Spacing of Laplace's integration grid, in standard deviations of the integrated
#: parameters' Laplace marginal.
LAPLACE_GRID_STEP = 1.0
#: Laplace's integration grid has at most this many points.
LAPLACE_GRID_MAX = 60
#: Laplace integrates numerically over at most this many hyperparameters.
LAPLACE_INTEGRATE_MAX = 3
#: Keywords of ``fit`` that only the Laplace backend reads.
LAPLACE_KEYWORDS = ("integrate", "newton_maxiter", "gtol", "engine")

logger = logging.getLogger(__name__)


def require_backend(backend: str) -> None:
    """Raise when ``backend`` is unknown or its package is not installed."""
    if backend not in BACKENDS:
        raise ModelConfigError(f"backend={backend!r} is not valid; use one of {list(BACKENDS)}")
    if backend in _BACKEND_PACKAGES:
        module, fix = _BACKEND_PACKAGES[backend]
        if importlib.util.find_spec(module) is None:
            raise BackendNotAvailableError(
                f"backend '{backend}' needs the package '{module}', which is not installed. "
                f"Fix: {fix}; or pass backend='pymc'"
            )


def auto_backend(n_cells: int, *, censored: bool = False) -> str:
    """Backend for ``backend="auto"`` (measured in ``benchmarks/inference.py``).

    Laplace above :data:`AUTO_LAPLACE_PAIRS` observed cells; numpyro above
    :data:`AUTO_NUMPYRO_PAIRS` when no cell is censored; else nutpie; PyMC's own
    NUTS when neither package is installed (a plain ``pip install flowmodel``).
    numpyro's speed was measured on uncensored gravity models; with censored cells
    (the count CDF of "<5" and redacted CDR cells) its chains froze at their start
    on one of five sparse-CDR worlds (step size 0, every transition divergent)
    while nutpie sampled the same model, so censored models use nutpie.
    """
    if n_cells > AUTO_LAPLACE_PAIRS:
        return "laplace"
    if n_cells > AUTO_NUMPYRO_PAIRS and not censored and importlib.util.find_spec("numpyro"):
        return "numpyro"
    if importlib.util.find_spec("nutpie"):
        return "nutpie"
    return "pymc"


# ----------------------------------------------------------------------------- backends
def _announce_nuts(backend: str, *, chains: int, tune: int, draws: int, bar: bool) -> None:
    """Say what the silent minute before the first draw is (compiling), once, before it."""
    if backend == "numpyro":
        what = "numpyro (JAX compiles it afresh in every process)"
    else:
        import pytensor

        sampler = "PyMC's NUTS" if backend == "pymc" else backend
        what = (
            f"{sampler} (about 20 s for the demo's model; the first fit on a machine also "
            "compiles PyTensor's kernels, 1-2 minutes more, cached in "
            f"{pytensor.config.base_compiledir})"
        )
    announce(
        f"fit: compiling the model for {what}, then {chains} chains x ({tune} tuning + "
        f"{draws}) draws" + ("" if bar else " (no progress bar)")
    )


def _fit_nuts(
    model: pm.Model,
    backend: str,
    *,
    draws: int = 1000,
    chains: int = 4,
    tune: int = 1000,
    target_accept: float | None = None,
    cores: int | None = None,
    random_seed: int | None = None,
    progressbar: bool = False,
    nuts_sampler_kwargs: Mapping[str, Any] | None = None,
    nuts: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> xr.DataTree:
    cores = min(chains, os.cpu_count() or 1) if cores is None else cores
    if backend == "pymc" and target_accept is not None:
        kwargs["target_accept"] = target_accept
    nuts_kwargs = dict(nuts_sampler_kwargs or {}) | dict(nuts or {})
    if backend == "nutpie" and target_accept is not None:
        nuts_kwargs.setdefault("target_accept", target_accept)
    if backend == "numpyro":
        if target_accept is not None:
            nuts_kwargs.setdefault("target_accept", target_accept)
        nuts_kwargs.setdefault("chain_method", "sequential" if cores < 2 else "parallel")
    _announce_nuts(backend, chains=int(chains), tune=int(tune), draws=int(draws), bar=progressbar)
    with model:
        return pm.sample(
            draws=int(draws),
            tune=int(tune),
            chains=int(chains),
            cores=cores,
            random_seed=random_seed,
            progressbar=progressbar,
            nuts_sampler=backend,
            compute_convergence_checks=False,
            **({"nuts": nuts_kwargs} if nuts_kwargs else {}),
            **kwargs,
        )


def _fit_pmx_laplace(
    model: pm.Model,
    *,
    draws: int,
    chains: int,
    random_seed: int | None,
    progressbar: bool,
    **kwargs: Any,
) -> xr.DataTree:
    if importlib.util.find_spec("pymc_extras") is None:
        raise BackendNotAvailableError(
            "backend='laplace' with engine='pymc-extras' needs pymc-extras. Fix: pip "
            "install pymc-extras (or conda install -c conda-forge pymc-extras), or drop "
            "engine= to use flowmodel's own Laplace approximation"
        )
    import pymc_extras as pmx

    with model:
        idata = pmx.fit_laplace(
            model=model,
            draws=draws * chains,
            random_seed=random_seed,
            progressbar=progressbar,
            include_transformed=False,
            **kwargs,
        )
    return _reshape_chains(idata, chains)


def _fit_advi(
    model: pm.Model,
    *,
    draws: int,
    chains: int,
    random_seed: int | None,
    progressbar: bool,
    n: int = 10_000,
    start: Mapping[str, Any] | None = None,
    start_sigma: Mapping[str, Any] | None = None,
    obj_optimizer: Any = None,
    **kwargs: Any,
) -> xr.DataTree:
    with model:
        if start is None:  # start at the MAP: mean-field ADVI from the prior converges slowly
            start = pm.find_MAP(progressbar=False, seed=random_seed)
        if start_sigma is None:
            start_sigma = {
                v.name: np.full(np.shape(start[v.name]), 0.01)
                for v in model.value_vars
                if v.name in start
            }
        approx = pm.fit(
            n=int(n),
            method="advi",
            start=start,
            start_sigma=start_sigma,
            obj_optimizer=obj_optimizer or pm.adam(learning_rate=0.01),
            random_seed=random_seed,
            progressbar=progressbar,
            **kwargs,
        )
        idata = approx.sample(draws * chains, random_seed=random_seed)
    return _reshape_chains(idata, chains)


def _fit_map(
    model: pm.Model, *, random_seed: int | None, progressbar: bool, **kwargs: Any
) -> xr.DataTree:
    with model:
        point = pm.find_MAP(progressbar=progressbar, seed=random_seed, **kwargs)
    return _point_to_idata(model, point)


def _fit_laplace(
    model: pm.Model,
    *,
    draws: int,
    chains: int,
    random_seed: int | None,
    maxiter: int = 2000,
    step: float = 1e-4,
    newton_maxiter: int = 200,
    gtol: float = 1e-5,
    integrate: Sequence[str] | str | None = None,
    **_: Any,
) -> xr.DataTree:
    """Laplace approximation at the MAP, in the unconstrained space.

    The MAP comes from L-BFGS on the compiled log density and gradient; where
    L-BFGS stops short of the mode (its iteration limit, or a line-search failure on
    a curved ridge such as ``sigma_country`` x the country offsets of a non-centred
    hierarchy), a trust-region Newton method (:func:`scipy.optimize.minimize` with
    ``method="trust-krylov"``) finishes it, with Hessian-vector products from
    central differences of the gradient (2 gradient calls each, so a Newton step
    costs O(cells x Krylov iterations), not O(cells x parameters)) — it follows
    negative curvature where Newton steps cannot. The Hessian at the mode comes from
    central differences of the gradient (2·d gradient calls, d = number of
    unconstrained parameters), far cheaper to build than a symbolic Hessian. Draws
    ``x ~ N(mode, (-H)^{-1})`` are mapped back through the transforms, and
    deterministics are computed per draw.

    ``integrate`` names up to :data:`LAPLACE_INTEGRATE_MAX` scalar hyperparameters
    whose posterior is integrated numerically instead, the rest by a Laplace
    approximation conditional on them (INLA's scheme: a variance of many group
    effects, or a ridge the data leave to the priors, where the joint mode is not
    the posterior's centre): see :func:`_integrated_draws`.

    Raises
    ------
    FitFailedError
        The optimum is not a proper mode: non-finite density, a Hessian that is
        not positive definite, or a log/logit coordinate beyond :data:`BOUNDARY`
        (a scale run off to 0 or infinity).
    """
    from pymc.blocking import DictToArrayBijection, RaveledVars

    rng = np.random.default_rng(random_seed)
    start = model.initial_point(random_seed)
    value_names = [v.name for v in model.value_vars]
    x0 = DictToArrayBijection.map({k: start[k] for k in value_names})
    info = x0.point_map_info
    logp_fn = model.compile_logp(jacobian=True)
    dlogp_fn = model.compile_dlogp(jacobian=True)
    calls = {"gradient": 0}
    index = _integrate_index(model, info, integrate)

    def point(x):
        return DictToArrayBijection.rmap(RaveledVars(x, info))

    def neg(x):
        calls["gradient"] += 1
        return -float(logp_fn(point(x))), -np.asarray(dlogp_fn(point(x)), dtype=float)

    def grad(x):
        # Hessian-vector products and the Hessian need the gradient only
        calls["gradient"] += 1
        return -np.asarray(dlogp_fn(point(x)), dtype=float)

    mode, f_mode, g_mode, steps = _minimise(
        neg, grad, x0.data, maxiter=maxiter, newton_maxiter=newton_maxiter, gtol=gtol, step=step
    )
    lbfgs = steps["lbfgs"]
    hess = _fd_hessian(grad, mode, step)
    # one Newton step from the finite-difference Hessian polishes the mode (the
    # posterior is close to quadratic there); kept only when it lowers -log p
    vals, vecs = np.linalg.eigh(hess)
    if np.all(vals > 0):
        direction = -(vecs / vals) @ (vecs.T @ g_mode)
        f_new, g_new = neg(mode + direction)
        if np.isfinite(f_new) and f_new <= f_mode + 1e-10 * abs(f_mode):
            mode, f_mode, g_mode = mode + direction, f_new, g_new
    # distance to the mode in posterior standard deviations (the Newton decrement,
    # sqrt(g' H^-1 g)): the scale-free test of convergence, where the gradient's size
    # depends on each parameter's curvature
    decrement = (
        float(np.sqrt(np.sum((vecs.T @ g_mode) ** 2 / vals))) if np.all(vals > 0) else np.inf
    )
    logger.info("Laplace: mode within %.3g posterior sd (Newton decrement)", decrement)
    if np.isfinite(decrement) and decrement > LAPLACE_MODE_SD:
        warnings.warn(
            f"Laplace: the optimiser stopped about {decrement:.2g} posterior sd from the mode "
            f"(largest gradient {np.max(np.abs(g_mode)):.3g}); the intervals are centred "
            "there. Fix: check the fit against a NUTS backend, or raise maxiter / "
            "newton_maxiter ([model.sample_kwargs] of the config, or keywords of fit)",
            DiagnosticsWarning,
            stacklevel=2,
        )
    _check_mode(model, mode, point, vals, f_mode)
    extra: dict[str, Any] = {}
    if not index:
        cov_sqrt = vecs / np.sqrt(vals)
        z = rng.standard_normal((chains * draws, len(mode)))
        samples = mode + z @ cov_sqrt.T
    else:
        samples, extra = _integrated_draws(
            neg,
            grad,
            mode,
            np.sqrt(np.sum(vecs[index] ** 2 / vals, axis=1)),
            index,
            chains * draws,
            rng,
            maxiter=maxiter,
            newton_maxiter=newton_maxiter,
            gtol=gtol,
            step=step,
        )
        named = [integrate] if isinstance(integrate, str) else list(integrate or [])
        extra["laplace_integrated"] = ", ".join(named)
    outs_rv = list(model.free_RVs) + list(model.deterministics)
    outs = model.replace_rvs_by_values(outs_rv)
    fn = model.compile_fn(outs, inputs=model.value_vars, on_unused_input="ignore", point_fn=False)
    names = [v.name for v in outs_rv]
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for x in samples:
        p = point(x)
        for name, val in zip(names, fn(*[p[k] for k in value_names]), strict=True):
            values[name].append(np.asarray(val))
    data_vars = {}
    for name in names:
        arr = np.stack(values[name]).reshape(chains, draws, *np.shape(values[name][0]))
        dims = tuple(model.named_vars_to_dims.get(name, ()))
        if len(dims) != arr.ndim - 2:
            dims = tuple(f"{name}_dim_{i}" for i in range(arr.ndim - 2))
        data_vars[name] = (("chain", "draw", *dims), arr)
    ds = xr.Dataset(data_vars)
    coords = {k: np.asarray(v) for k, v in model.coords.items() if v is not None and k in ds.dims}
    ds = ds.assign_coords(coords | {"chain": np.arange(chains), "draw": np.arange(draws)})
    ds.attrs.update(
        inference_library="flowmodel.laplace",
        laplace_converged=int(decrement < LAPLACE_MODE_SD),
        laplace_n_gradient_calls=int(calls["gradient"]),
        laplace_lbfgs_iterations=lbfgs["iterations"],
        laplace_newton_steps=steps["newton"],
        laplace_max_gradient=float(np.max(np.abs(g_mode))),
        laplace_mode_sd=decrement,
        **extra,
    )
    out = xr.DataTree()
    out["posterior"] = xr.DataTree(ds)
    return out


def _minimise(
    neg: Callable[[np.ndarray], tuple[float, np.ndarray]],
    grad: Callable[[np.ndarray], np.ndarray],
    x0: np.ndarray,
    *,
    maxiter: int,
    newton_maxiter: int,
    gtol: float,
    step: float,
    quiet: bool = False,
) -> tuple[np.ndarray, float, np.ndarray, dict[str, Any]]:
    """L-BFGS, finished by trust-region Newton where it stops short: ``(x, f, g, steps)``."""
    from scipy import optimize

    log = logger.debug if quiet else logger.info
    d = len(x0)
    # the log density is O(number of pairs) while hierarchical terms are O(1): a
    # relative-decrease stopping rule would stop before sigma_country moves
    res = optimize.minimize(
        neg,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-8, "maxcor": 30},
    )
    x = res.x
    f, g = neg(x)
    lbfgs = {"iterations": int(res.nit), "gradient_norm": float(np.max(np.abs(g)))}
    log(
        "Laplace: L-BFGS %d iterations, largest gradient %.3g (%s)",
        res.nit,
        lbfgs["gradient_norm"],
        res.message,
    )

    def hessp(y, p):
        norm = float(np.linalg.norm(p))
        if norm == 0:
            return np.zeros_like(p)
        h = step * max(1.0, float(np.linalg.norm(y)) / np.sqrt(d)) / norm
        return (grad(y + h * p) - grad(y - h * p)) / (2 * h)

    n_newton = 0
    if lbfgs["gradient_norm"] > gtol:
        # trust-region Newton from where L-BFGS stopped: follows a curved ridge and
        # escapes saddles (negative curvature is used, not refused)
        try:
            tr = optimize.minimize(
                neg,
                x,
                jac=True,
                hessp=hessp,
                method="trust-krylov",
                options={"gtol": gtol, "maxiter": newton_maxiter},
            )
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
            # a non-finite gradient inside the Krylov solver: keep L-BFGS's point, whose
            # distance to the mode is measured by the caller
            log("Laplace: trust-region Newton stopped (%s)", err)
        else:
            if np.isfinite(tr.fun) and tr.fun <= f:
                x = tr.x
                f, g = neg(x)
            n_newton = int(tr.nit)
            log(
                "Laplace: trust-region Newton %d iterations, largest gradient %.3g (%s)",
                tr.nit,
                float(np.max(np.abs(g))),
                tr.message,
            )
    return x, f, g, {"lbfgs": lbfgs, "newton": n_newton}


def _newton(
    neg_rest: Callable[[np.ndarray], tuple[float, np.ndarray]],
    grad_rest: Callable[[np.ndarray], np.ndarray],
    grad: Callable[[np.ndarray], np.ndarray],
    put: Callable[[np.ndarray], np.ndarray],
    y: np.ndarray,
    step: float,
    rest: np.ndarray,
    idx: np.ndarray,
    *,
    tol: float = 1e-3,
    max_steps: int = 10,
    max_hessians: int = 4,
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray] | None:
    """Conditional mode by Newton steps with one Hessian, from a start near it.

    The Hessian (finite differences, needed anyway for the marginal) is taken at
    the start and kept for up to ``max_steps`` steps (a chord method); steps are
    halved until ``-log p`` decreases, and the iteration stops when the Newton
    decrement is below ``tol`` (posterior sd). When the mode lies more than a tenth
    of an sd from where the Hessian was taken, or the steps have not converged, the
    Hessian is taken again there (at most ``max_hessians`` times).

    Returns
    -------
    tuple or None
        ``(y, f, eigenvalues, eigenvectors, H_rest,theta)`` at the conditional
        mode, or None (no positive-definite Hessian, no convergence: the caller
        optimises from scratch).
    """
    y0 = y.copy()
    for attempt in range(max_hessians):
        hess = _fd_hessian(grad, put(y), step, g0=grad(put(y)))
        w, v = np.linalg.eigh(hess[np.ix_(rest, rest)])
        if not np.all(w > 0):
            # forward differences can tip a nearly flat direction negative: central ones
            hess = _fd_hessian(grad, put(y), step)
            w, v = np.linalg.eigh(hess[np.ix_(rest, rest)])
        if not np.all(w > 0):
            return None
        f, g = neg_rest(y)
        if not np.isfinite(f):
            return None
        converged = False
        for _ in range(max_steps):
            direction = -(v / w) @ (v.T @ g)
            decrement = float(np.sqrt(max(-(g @ direction), 0.0)))
            if decrement < tol:
                converged = True
                break
            t = 1.0
            while t > 1e-4:
                f_new, g_new = neg_rest(y + t * direction)
                if np.isfinite(f_new) and f_new <= f:
                    break
                t /= 2
            else:
                return None
            y, f, g = y + t * direction, f_new, g_new
        # the distance moved since this Hessian was taken, in conditional posterior sd:
        # the Hessian is taken again where the mode is (or, unconverged, where it got to)
        moved = float(np.sqrt(np.sum((v.T @ (y - y0)) ** 2 * w)))
        if converged and (moved < 0.1 or attempt == max_hessians - 1):
            return y, f, w, v, hess[np.ix_(rest, idx)]
        y0 = y.copy()
    return None


def _fd_hessian(
    grad: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    step: float,
    g0: np.ndarray | None = None,
) -> np.ndarray:
    """Hessian of ``-log p`` by differences of its gradient.

    Central differences (2·d gradient calls), or forward ones from the gradient
    ``g0`` at ``x`` when given (d calls; an error of order ``step`` relative, far
    below what a log determinant or a conditional covariance needs).
    """
    d = len(x)
    out = np.empty((d, d))
    for k in range(d):
        h = step * max(1.0, abs(x[k]))
        e = np.zeros(d)
        e[k] = h
        if g0 is None:
            out[:, k] = (grad(x + e) - grad(x - e)) / (2 * h)
        else:
            out[:, k] = (grad(x + e) - g0) / h
    return (out + out.T) / 2


def _integrate_index(
    model: pm.Model, info: Sequence[Any], integrate: Sequence[str] | str | None
) -> list[int]:
    """Positions in the raveled unconstrained vector of the parameters named by ``integrate``."""
    if integrate is None:
        return []
    names = [integrate] if isinstance(integrate, str) else list(integrate)
    if len(names) > LAPLACE_INTEGRATE_MAX or len(set(names)) != len(names):
        raise ModelConfigError(
            f"backend='laplace': integrate={names!r}; the grid integrates over 1 to "
            f"{LAPLACE_INTEGRATE_MAX} distinct scalar parameters. Fix: name fewer"
        )
    free = {rv.name: rv for rv in model.free_RVs}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for entry in info:
        offsets[entry[0]] = (offset, int(entry[2]))
        offset += int(entry[2])
    out = []
    for name in names:
        if name not in free:
            raise ModelConfigError(
                f"backend='laplace': integrate names {name!r}, which is not a free parameter "
                f"of this model. Fix: one of {sorted(free)}"
            )
        pos, size = offsets[model.rvs_to_values[free[name]].name]
        if size != 1:
            raise ModelConfigError(
                f"backend='laplace': integrate names {name!r}, which has {size} elements; the "
                "grid integrates over scalars. Fix: name scalar parameters (hyperparameters)"
            )
        out.append(pos)
    return out


def _integrated_draws(
    neg: Callable[[np.ndarray], tuple[float, np.ndarray]],
    grad: Callable[[np.ndarray], np.ndarray],
    mode: np.ndarray,
    joint_sd: np.ndarray,
    index: Sequence[int],
    n: int,
    rng: np.random.Generator,
    *,
    maxiter: int,
    newton_maxiter: int,
    gtol: float,
    step: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draws of a Laplace approximation integrated over a few hyperparameters on a grid.

    The joint mode of a hierarchical posterior is not its centre: a variance of many
    group effects (``sigma_market_share``) is inflated at it, and where the data pin
    only a combination (the CDR's share level x ``period_scale``) the mode sits where
    the ridge is narrowest, not where its mass is. As INLA does (Rue, Martino &
    Chopin 2009), the named coordinates ``theta`` (unconstrained) are integrated
    numerically, the rest by Laplace:

    1. for a given ``theta`` the other coordinates get their conditional mode
       ``x*(theta)`` and Hessian ``H(theta)``, and ``theta``'s marginal is the Laplace
       one, ``log p(x*, theta) + ½ log det H(theta)^-1``;
    2. its mode is found (Nelder-Mead) and its Hessian there (central differences)
       standardises ``theta``;
    3. a lattice of :data:`LAPLACE_GRID_STEP` steps in the standardised coordinates
       is explored outwards from the mode while the log marginal is within
       :data:`LAPLACE_GRID_DROP` of its best (INLA's grid strategy), at most
       :data:`LAPLACE_GRID_MAX` points;
    4. a draw picks a point by its marginal weight, ``theta`` uniformly within its
       cell, and the rest from ``N(x*(theta), H^-1)`` moved along ``d x*/d theta``
       (``-H_rr^-1 H_r,theta``).

    Returns
    -------
    samples, attrs
        ``(n, d)`` unconstrained draws; the grid's summary for the posterior's
        attributes.
    """
    from scipy import optimize

    d = len(mode)
    idx = np.asarray(index, dtype=int)
    k = len(idx)
    rest = np.setdiff1d(np.arange(d), idx)
    solved: list[dict[str, Any]] = []

    def solve(theta: np.ndarray) -> dict[str, Any]:
        theta = np.asarray(theta, dtype=float)
        for p in solved:
            if np.allclose(p["theta"], theta, rtol=0, atol=1e-12):
                return p

        def put(y: np.ndarray) -> np.ndarray:
            x = np.empty(d)
            x[rest] = y
            x[idx] = theta
            return x

        def neg_rest(y):
            f, g = neg(put(y))
            return f, g[rest]

        def grad_rest(y):
            return grad(put(y))[rest]

        # warm start from the nearest point already solved, moved along its path
        if solved:
            near = min(solved, key=lambda p: float(np.sum((p["theta"] - theta) ** 2)))
            y = near["x"][rest] + (near["path"] @ (theta - near["theta"]) if "path" in near else 0)
        else:
            y = mode[rest]
        found = _newton(neg_rest, grad_rest, grad, put, y, step, rest, idx)
        if found is None:
            # Newton from the warm start failed (a poor start, negative curvature): the
            # full optimiser, then the Hessian at its point
            y, _, _, _ = _minimise(
                neg_rest,
                grad_rest,
                y,
                maxiter=maxiter,
                newton_maxiter=newton_maxiter,
                gtol=gtol,
                step=step,
                quiet=True,
            )
            found = _newton(neg_rest, grad_rest, grad, put, y, step, rest, idx)
        point: dict[str, Any] = {"theta": theta, "x": put(y), "log_marginal": -np.inf}
        if found is not None:
            y, f, w, v, h_rt = found
            point["x"] = put(y)
            point["log_marginal"] = -f - 0.5 * float(np.sum(np.log(w)))
            point["sqrt_cov"] = v / np.sqrt(w)
            # d x*_rest / d theta = -H_rr^-1 H_r,theta
            point["path"] = -(v / w) @ (v.T @ h_rt)
        solved.append(point)
        return point

    def objective(theta: np.ndarray) -> float:
        lm = solve(theta)["log_marginal"]
        return -lm if np.isfinite(lm) else 1e300

    # 2. the mode of theta's Laplace marginal, and its curvature there
    res = optimize.minimize(
        objective,
        mode[idx],
        method="Nelder-Mead",
        # the lattice's steps are one sd of theta (>= 0.1 on the log scale for any
        # variance the data leave uncertain): the mode is needed to a fraction of that
        options={
            "xatol": 0.05,
            "fatol": 0.02,
            "maxfev": 60 * k,
            # first steps of one joint-Laplace sd (a move of many sd would start the
            # conditional solves far from their modes)
            "initial_simplex": mode[idx]
            + np.vstack([np.zeros(k), np.diag(np.clip(joint_sd, 0.05, 1.0))]),
        },
    )
    centre = np.asarray(res.x, dtype=float)
    f0 = objective(centre)
    if f0 >= 1e300:
        raise FitFailedError(
            "Laplace: the integrated hyperparameters have no proper mode (no positive-definite "
            "conditional Hessian). Fix: use a NUTS backend, or drop integrate="
        )
    e = 0.1
    hess_t = np.empty((k, k))
    for a in range(k):
        for b in range(a, k):
            da, db = e * np.eye(k)[a], e * np.eye(k)[b]
            if a == b:
                hess_t[a, a] = (objective(centre + da) - 2 * f0 + objective(centre - da)) / e**2
            else:
                hess_t[a, b] = hess_t[b, a] = (
                    objective(centre + da + db)
                    - objective(centre + da - db)
                    - objective(centre - da + db)
                    + objective(centre - da - db)
                ) / (4 * e**2)
    w_t, v_t = np.linalg.eigh(hess_t)
    if not np.all(w_t > 0):
        # flat or saddle-like: fall back to the diagonal, at least unit curvature
        w_t, v_t = np.maximum(np.abs(np.diag(hess_t)), 1.0), np.eye(k)
    scale = LAPLACE_GRID_STEP * v_t / np.sqrt(w_t)  # theta = centre + scale @ z

    # 3. the lattice, explored outwards while the log marginal is within the drop
    best = -f0
    lattice: dict[tuple[int, ...], dict[str, Any]] = {}
    frontier = [tuple([0] * k)]
    capped = False
    while frontier:
        key = frontier.pop(0)
        if key in lattice:
            continue
        if len(lattice) >= LAPLACE_GRID_MAX:
            capped = True
            break
        point = solve(centre + scale @ np.asarray(key, dtype=float))
        lattice[key] = point
        best = max(best, point["log_marginal"])
        if point["log_marginal"] < best - LAPLACE_GRID_DROP:
            continue
        for a in range(k):
            for sign in (-1, 1):
                nxt = list(key)
                nxt[a] += sign
                if tuple(nxt) not in lattice:
                    frontier.append(tuple(nxt))
    points = [p for p in lattice.values() if np.isfinite(p["log_marginal"])]
    log_m = np.array([p["log_marginal"] for p in points])
    weight = np.exp(log_m - log_m.max())
    weight /= weight.sum()
    if capped:
        warnings.warn(
            f"Laplace: the integration grid stopped at {LAPLACE_GRID_MAX} points before the "
            "marginal of the integrated parameters fell off; its tails are cut. Fix: use a "
            "NUTS backend",
            DiagnosticsWarning,
            stacklevel=3,
        )

    # 4. draws
    pick = rng.choice(len(points), size=n, p=weight)
    jitter = rng.uniform(-0.5, 0.5, size=(n, k)) @ scale.T
    samples = np.empty((n, d))
    for g, point in enumerate(points):
        sel = np.flatnonzero(pick == g)
        if len(sel) == 0:
            continue
        z = rng.standard_normal((len(sel), d - k))
        samples[sel] = point["x"]
        samples[np.ix_(sel, idx)] += jitter[sel]
        samples[np.ix_(sel, rest)] += jitter[sel] @ point["path"].T + z @ point["sqrt_cov"].T
    logger.info(
        "Laplace: integrated over %d hyperparameter(s) on a grid of %d points "
        "(%d conditional modes in all); largest weight %.2f",
        k,
        len(points),
        len(solved),
        float(weight.max()),
    )
    return samples, {
        "laplace_grid_points": len(points),
        "laplace_grid_conditional_modes": len(solved),
        "laplace_grid_capped": int(capped),
    }


def _check_mode(
    model: pm.Model,
    mode: np.ndarray,
    point: Callable[[np.ndarray], dict],
    vals: np.ndarray,
    f: float,
) -> None:
    """Raise :class:`FitFailedError` unless ``mode`` is a proper interior mode."""
    fix = (
        "Fix: use a NUTS backend (backend='nutpie' or 'pymc'), stronger priors on the named "
        "parameters, or noncentered=True when countries have few observed pairs"
    )
    if not np.isfinite(f) or not np.all(np.isfinite(mode)):
        raise FitFailedError(f"Laplace: the posterior mode is not finite. {fix}")
    at_mode = point(mode)
    boundary = []
    for var in model.value_vars:
        transform = model.rvs_to_transforms.get(model.values_to_rvs[var])
        if transform is None:
            continue
        value = np.asarray(at_mode[var.name])
        if np.any(np.abs(value) > BOUNDARY):
            boundary.append(model.values_to_rvs[var].name)
    if boundary:
        raise FitFailedError(
            f"Laplace: the mode of {boundary} lies at a boundary of its range (a scale run off "
            f"to 0 or infinity, |unconstrained value| > {BOUNDARY:g}); a Gaussian there is "
            f"meaningless. {fix}"
        )
    if np.any(vals <= 0):
        raise FitFailedError(
            "Laplace: the Hessian at the mode is not positive definite (smallest eigenvalue "
            f"{vals.min():.3g}): the posterior is flat or has a ridge there. {fix}"
        )


#: backend -> (function, passes the backend name)
_DISPATCH: dict[str, Callable[..., xr.DataTree]] = {
    "laplace": _fit_laplace,
    "laplace:pymc-extras": _fit_pmx_laplace,
    "advi": _fit_advi,
    "map": _fit_map,
}


def reproducible_kernels() -> Any:
    """Context in which PyTensor compiles its numba kernels without fast-math.

    With fast-math (PyTensor's default) LLVM may reassociate sums and fuse
    multiply-adds differently when a kernel is compiled afresh and when it is
    loaded from numba's cache, so the same model, data and seed gave another fit
    on a machine whose cache was cold: a Laplace mode 4e-6 posterior sd away, and
    NUTS chains on another path (market-share MAE 0.039 against 0.029 on the same
    world). Without it the kernels follow IEEE arithmetic and a seed gives one
    answer (docs/performance.md: the cost, within about 10% a step).
    """
    return pytensor.config.change_flags(numba__fastmath=False)


@reproducible_kernels()
def run_inference(
    model: pm.Model,
    backend: str,
    kwargs: Mapping[str, Any],
    *,
    random_seed: int | None,
    progressbar: bool,
) -> xr.DataTree:
    """Run ``backend`` on ``model``; return the DataTree (``posterior`` [, ``sample_stats``]).

    ``kwargs`` are the merged sampler settings; each backend takes the ones it
    understands (``tune``, ``target_accept`` and ``cores`` apply to NUTS only;
    :data:`LAPLACE_KEYWORDS` to Laplace only: another backend logs that it ignores
    them, so that a run config's settings for ``backend = "auto"`` hold whichever
    backend it chooses). The posterior is checked with :func:`check_finite`. The
    model's kernels are compiled without fast-math (:func:`reproducible_kernels`).
    """
    kwargs = dict(kwargs)
    if backend != "laplace":
        ignored = [k for k in LAPLACE_KEYWORDS if kwargs.pop(k, None) is not None]
        if ignored:
            logger.info("%s ignores %s (Laplace settings)", backend, ", ".join(ignored))
    if backend in MCMC_BACKENDS:
        idata = _fit_nuts(
            model, backend, random_seed=random_seed, progressbar=progressbar, **kwargs
        )
    else:
        for key in ("tune", "target_accept", "cores"):
            kwargs.pop(key, None)
        draws = int(kwargs.pop("draws", 1000))
        chains = int(kwargs.pop("chains", 4))
        key = backend
        if backend == "laplace":
            engine = kwargs.pop("engine", "flowmodel")
            if engine not in ("flowmodel", "pymc-extras"):
                raise ModelConfigError(
                    f"backend='laplace': engine={engine!r}; use 'flowmodel' or 'pymc-extras'"
                )
            key = "laplace" if engine == "flowmodel" else "laplace:pymc-extras"
        if key not in _DISPATCH:
            raise ModelConfigError(
                f"backend={backend!r} is not valid; use one of {list(BACKENDS)}"
            )
        if key in ("map",):
            idata = _fit_map(model, random_seed=random_seed, progressbar=progressbar, **kwargs)
        else:
            idata = _DISPATCH[key](
                model,
                draws=draws,
                chains=chains,
                random_seed=random_seed,
                progressbar=progressbar,
                **kwargs,
            )
    check_finite(idata["posterior"].to_dataset(), backend)
    if backend in MCMC_BACKENDS:
        check_chains_moved(idata["posterior"].to_dataset(), backend)
    return idata


def check_chains_moved(posterior: xr.Dataset, backend: str) -> None:
    """Raise :class:`FitFailedError` when a chain never moved (every draw identical).

    A NUTS chain whose step size collapsed to 0 (e.g. a gradient that is not finite
    at its start) repeats its initial point: every transition is divergent, R-hat is
    infinite, and summaries of it would look like a very sure answer.
    """
    frozen: set[int] = set()
    n_chains = int(posterior.sizes.get("chain", 1))
    for var in posterior.data_vars.values():
        if (
            var.dtype.kind != "f"
            or var.size == 0
            or "chain" not in var.dims
            or var.sizes.get("draw", 0) < 2
        ):
            continue
        values = var.transpose("chain", "draw", ...).values.reshape(
            n_chains, var.sizes["draw"], -1
        )
        still = np.all(values == values[:, :1], axis=(1, 2))
        frozen = set(np.flatnonzero(still)) if not frozen else frozen & set(np.flatnonzero(still))
        if not frozen:
            return
    if frozen:
        raise FitFailedError(
            f"{backend}: chain(s) {sorted(int(c) for c in frozen)} of {n_chains} never moved "
            "(every draw equals the first: the step size collapsed, e.g. a gradient that is "
            "not finite at the start); the posterior is unusable. Fix: backend='nutpie' (or "
            "'pymc'), or other initial values (random_seed)"
        )


def check_finite(posterior: xr.Dataset, backend: str) -> None:
    """Raise :class:`FitFailedError` when any posterior draw of any parameter is not finite."""
    bad = [
        str(name)
        for name, var in posterior.data_vars.items()
        if var.dtype.kind == "f" and not bool(np.isfinite(var.values).all())
    ]
    if bad:
        raise FitFailedError(
            f"{backend}: non-finite posterior draws of {bad[:6]}: the fit failed (a mode or "
            "chain ran off to a boundary, e.g. a hierarchical sd at 0 or infinity), and "
            "predictions from it would be NaN or absurd. Fix: a NUTS backend, stronger priors, "
            "or noncentered=True when countries have few pairs"
        )


def _reshape_chains(idata: xr.DataTree, chains: int) -> xr.DataTree:
    post = idata["posterior"].to_dataset()
    n = post.sizes["draw"] * post.sizes["chain"]
    per = n // chains
    stacked = post.stack(sample=("chain", "draw")).isel(sample=slice(0, per * chains))
    stacked = stacked.drop_vars(["sample", "chain", "draw"])
    arrays = {}
    for name, var in stacked.data_vars.items():
        other = [d for d in var.dims if d != "sample"]
        vals = var.transpose("sample", *other).values.reshape(
            chains, per, *[var.sizes[d] for d in other]
        )
        arrays[name] = (("chain", "draw", *other), vals)
    coords = {k: v for k, v in post.coords.items() if k not in ("chain", "draw")}
    new = xr.Dataset(arrays, coords={**coords, "chain": np.arange(chains), "draw": np.arange(per)})
    out = xr.DataTree()
    out["posterior"] = xr.DataTree(new)
    out.attrs.update(idata.attrs)
    return out


def _point_to_idata(model: pm.Model, point: Mapping[str, np.ndarray]) -> xr.DataTree:
    data_vars = {}
    names = {v.name for v in model.free_RVs} | {v.name for v in model.deterministics}
    for name in names:
        if name not in point:
            continue
        value = np.asarray(point[name])
        dims = model.named_vars_to_dims.get(name, ())
        if len(dims) != value.ndim:
            dims = tuple(f"{name}_dim_{i}" for i in range(value.ndim))
        data_vars[name] = (("chain", "draw", *dims), value[None, None, ...])
    coords = {k: np.asarray(v) for k, v in model.coords.items() if v is not None}
    ds = xr.Dataset(data_vars)
    ds = ds.assign_coords(
        {k: v for k, v in coords.items() if k in ds.dims} | {"chain": [0], "draw": [0]}
    )
    out = xr.DataTree()
    out["posterior"] = xr.DataTree(ds)
    return out


def prior_draws(
    model: pm.Model, *, draws: int = PRIOR_DRAWS, random_seed: int | None = None
) -> xr.Dataset:
    """Prior draws of every parameter of ``model`` (its free variables and deterministics).

    Variables over a cell or pair dim are left out (they grow with the data). The
    likelihood terms are ``Potential``s, which forward sampling ignores: PyMC's
    warning about it, and its "Sampling: [...]" log line, are silenced.
    """
    names = [
        v.name
        for v in [*model.free_RVs, *model.deterministics]
        if not any(
            d == "pair" or str(d).startswith("cell_")
            for d in model.named_vars_to_dims.get(v.name, ())
        )
    ]
    forward = logging.getLogger("pymc.sampling.forward")
    level = forward.level
    forward.setLevel(logging.WARNING)
    try:
        with model, warnings.catch_warnings(), reproducible_kernels():
            warnings.filterwarnings("ignore", message=r"(?s).*[Pp]otential", category=UserWarning)
            prior = pm.sample_prior_predictive(
                draws=draws, var_names=names, random_seed=random_seed
            )
    finally:
        forward.setLevel(level)
    group = prior["prior"]
    return group.to_dataset() if hasattr(group, "to_dataset") else group


def diagnostics_messages(idata: xr.DataTree, names: list[str]) -> list[str]:
    """Divergences, R-hat > 1.01 and bulk ESS < 100 per chain of the MCMC posterior ``idata``."""
    import arviz as az

    post = idata["posterior"].to_dataset()
    names = [v for v in names if v in post]
    n_chains = post.sizes.get("chain", 1)
    msgs = []
    if "sample_stats" in idata.children and "diverging" in idata["sample_stats"]:
        n_div = int(idata["sample_stats"]["diverging"].values.sum())
        if n_div:
            msgs.append(f"{n_div} divergent transition(s) (raise target_accept or reparametrise)")
    if n_chains > 1 and names:
        rhat = az.rhat(post[names])
        worst = max(float(np.nanmax(rhat[v].values)) for v in names)
        if worst > 1.01:
            msgs.append(f"R-hat up to {worst:.3f} > 1.01 (run more tune/draws)")
    if names:
        ess = az.ess(post[names])
        low = min(float(np.nanmin(ess[v].values)) for v in names)
        if low < 100 * n_chains:
            msgs.append(
                f"bulk ESS as low as {low:.0f} < {100 * n_chains} (100 per chain; draw more)"
            )
    return msgs


def warn_diagnostics(model_name: str, msgs: list[str]) -> None:
    """Warn with :class:`DiagnosticsWarning` when there are diagnostics messages."""
    if msgs:
        warnings.warn(
            f"{model_name} sampling diagnostics: " + "; ".join(msgs),
            DiagnosticsWarning,
            stacklevel=4,
        )


def thin_posterior(posterior: xr.Dataset, draws: int | None) -> xr.Dataset:
    """Keep ``draws`` draws per chain, evenly spaced (all when None)."""
    if draws is None or draws >= posterior.sizes["draw"]:
        return posterior
    idx = np.unique(np.linspace(0, posterior.sizes["draw"] - 1, draws).round().astype(int))
    return posterior.isel(draw=idx)


def stack_samples(var: xr.DataArray) -> np.ndarray:
    """Return a posterior variable as numpy, chain and draw stacked into one leading axis."""
    other = [d for d in var.dims if d not in ("chain", "draw")]
    values = var.transpose("chain", "draw", *other).values
    return values.reshape(-1, *values.shape[2:])
