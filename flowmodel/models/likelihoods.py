"""Count and estimate likelihoods shared by every observation model.

PyTensor expressions (inside a :class:`pymc.Model`) and their numpy twins (for the
pointwise log-likelihood of LOO and for tests):

- negative binomial / Poisson log-likelihood in sufficient-statistic form
  (:func:`count_loglik`): the part linear in the log rate, ``Σ y_c eta_c``, comes
  from the latent field as a precomputed ``Xᵀy``; ``lgamma(y + phi)`` is summed over
  the distinct counts;
- interval censoring ``log P(min <= y <= max)`` (:func:`censored_nb_logp`,
  :func:`interval_logcdf`): a census ``"<5"`` cell is 1..4 where zeros print as 0,
  a redacted CDR cell 0..15;
- moments of a truncated negative binomial (:func:`truncated_nb_moments`), for
  totals that sum redacted cells;
- the log-normal likelihood of a published estimate with a standard error
  (:func:`lognormal_sdlog`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from scipy import special, stats

__all__ = [
    "LIKELIHOODS",
    "MAX_SUMMED_BOUND",
    "censored_bounds",
    "censored_nb_logp",
    "censored_nb_logp_np",
    "count_loglik",
    "interval_logcdf",
    "lognormal_sdlog",
    "pointwise_count_loglik",
    "segment_sum",
    "truncated_nb_moments",
]

#: Count likelihoods of an observation model.
LIKELIHOODS = ("negbin", "poisson")
#: Largest censoring bound handled by exact summation of the pmf (beyond it: log-CDF).
MAX_SUMMED_BOUND = 60


def segment_sum(values: Any, index: np.ndarray, n: int) -> Any:
    """``out[g] = Σ values[index == g]`` as a PyTensor expression (a sparse aggregation)."""
    return pt.inc_subtensor(pt.zeros(n)[index], values)


def censored_bounds(
    upper: np.ndarray, lower: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer censoring bounds: ``upper`` floored, ``lower`` ceiled (None or NaN: 0)."""
    upper = np.floor(np.asarray(upper, dtype=float))
    if lower is None:
        return upper, np.zeros_like(upper)
    return upper, np.ceil(np.nan_to_num(np.asarray(lower, dtype=float), nan=0.0))


def interval_logcdf(make_dist: Any, upper: np.ndarray, lower: np.ndarray) -> Any:
    """``log P(lower <= y <= upper)`` per cell with :func:`pymc.logcdf` (a PyTensor expression).

    ``make_dist(idx)`` returns the count distribution of every cell (``idx``
    None) or of the cells ``idx``. Only cells with ``lower > 0`` get the
    difference ``log(F(upper) - F(lower - 1))``, so the others keep the plain
    CDF and its gradient (no NaN from a difference of equal terms).
    """
    log_hi = pm.logcdf(make_dist(None), upper)
    idx = np.flatnonzero(lower > 0)
    if not idx.size:
        return log_hi
    log_lo = pm.logcdf(make_dist(idx), lower[idx] - 1)
    return pt.set_subtensor(log_hi[idx], pm.math.logdiffexp(log_hi[idx], log_lo))


def _float_tensor(x: Any) -> Any:
    """Return a PyTensor variable as it is, numbers and arrays as float64 (not floatX) constants."""
    if isinstance(x, pt.Variable):
        return x
    return pt.as_tensor_variable(np.asarray(x, dtype=float))


def _nb_kernel(mu: Any, phi: Any, k: np.ndarray) -> tuple[Any, Any]:
    """``(phi log p0, log-kernel)`` of a negative binomial on the counts ``k``.

    ``log pmf(k) = phi log(phi / (phi + mu)) + kernel_k`` with
    ``kernel_k = lgamma(k + phi) - lgamma(phi) - lgamma(k + 1) + k log(mu / (phi + mu))``:
    for a scalar ``phi`` the lgamma part is one vector over ``k`` (not one per
    cell and count), so a censored cell costs a multiply-add per count and the
    graph stays small. ``kernel`` has shape ``(cell, len(k))``.
    """
    mu_t, phi_t = _float_tensor(mu), _float_tensor(phi)
    log_mu = pt.log(mu_t)
    log_phi_mu = pt.log(phi_t + mu_t)
    # mu -> 0 gives log q -> -inf and 0 * -inf at k = 0; clipping far below any real value keeps
    # the pmf at k = 0 exact (exp(-1e4 k) is 0 for k > 0)
    log_q = pt.maximum(log_mu - log_phi_mu, -1.0e4)
    k_row = k[None, :]
    if phi_t.ndim == 0:
        const = pt.gammaln(k + phi_t) - pt.gammaln(phi_t) - special.gammaln(k + 1)
        const = const[None, :]
    else:
        phi_c = pt.shape_padright(phi_t)
        const = pt.gammaln(k_row + phi_c) - pt.gammaln(phi_c) - special.gammaln(k_row + 1)
    kernel = const + k_row * pt.shape_padright(log_q)
    return phi_t * (pt.log(phi_t) - log_phi_mu), kernel


def _bound_groups(upper: np.ndarray, lower: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Cells grouped by their integer bounds ``(lower, upper)``: ``[(lo, hi, cells), ...]``."""
    if not upper.size:
        return []
    pairs, inverse = np.unique(np.stack([lower, upper], axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    return [(int(lo), int(hi), np.flatnonzero(inverse == g)) for g, (lo, hi) in enumerate(pairs)]


def _by_bounds(
    mu: Any, phi: Any, upper: np.ndarray, lower: np.ndarray, per_group: Any
) -> Any | list[Any]:
    """Apply ``per_group(phi_log_p0, kernel, idx)`` to each group of equal bounds; reassemble.

    Every group sums its own counts ``lower..upper`` (no mask, no wasted terms).
    With many distinct bounds (> 8) one kernel over ``0..max(upper)`` is masked
    instead. Returns the per-cell results in the order of the cells (a list when
    ``per_group`` returns a tuple).
    """
    mu_t, phi_t = _float_tensor(mu), _float_tensor(phi)
    groups = _bound_groups(upper, lower)
    if len(groups) > 8:
        k = np.arange(int(upper.max()) + 1, dtype=float)
        a, kernel = _nb_kernel(mu_t, phi_t, k)
        inside = (k[None, :] <= upper[:, None]) & (k[None, :] >= lower[:, None])
        return per_group(a, pt.where(inside, kernel, -np.inf), k)
    parts, order = [], []
    for lo, hi, idx in groups:
        k = np.arange(lo, hi + 1, dtype=float)
        whole = len(groups) == 1
        m = mu_t if whole else mu_t[idx]
        p = phi_t if (whole or phi_t.ndim == 0) else phi_t[idx]
        a, kernel = _nb_kernel(m, p, k)
        parts.append(per_group(a, kernel, k))
        order.append(idx)
    if len(parts) == 1:
        return parts[0]
    back = np.argsort(np.concatenate(order), kind="stable")
    if isinstance(parts[0], tuple):
        return [pt.concatenate([p[j] for p in parts])[back] for j in range(len(parts[0]))]
    return pt.concatenate(parts)[back]


def censored_nb_logp(mu: Any, phi: Any, upper: np.ndarray, lower: np.ndarray | None = None) -> Any:
    """Elementwise ``log P(lower <= y <= upper)`` of a negative binomial (a PyTensor expression).

    For bounds up to :data:`MAX_SUMMED_BOUND` it is the log-sum-exp of the pmf
    over ``lower..upper``: exact, cheap, and differentiable in every backend
    (PyTensor C, JAX, numba). The pmf is written as ``phi log p0 + kernel_k``
    with the ``lgamma`` terms of a scalar ``phi`` computed once per count, and
    cells are grouped by their bounds, so a redacted cell costs a few
    multiply-adds per count. Larger bounds use :func:`pymc.logcdf`
    (``log(F(upper) - F(lower - 1))``).

    Parameters
    ----------
    mu
        Expected counts, shape ``(cell,)``.
    phi
        Dispersion, scalar or ``(cell,)``; variance ``mu + mu**2 / phi``.
    upper
        Censoring bounds, shape ``(cell,)``, >= 0 (floored to integers).
    lower
        Lower bounds, shape ``(cell,)`` (ceiled to integers; default 0): a
        census that prints zeros and suppresses ``"<5"`` holds 1..4 there.

    Returns
    -------
    pytensor.tensor.TensorVariable
        Shape ``(cell,)``.
    """
    upper, lower = censored_bounds(upper, lower)
    top = int(upper.max()) if upper.size else 0
    if top > MAX_SUMMED_BOUND:
        mu_t, phi_t = pt.as_tensor_variable(mu), pt.as_tensor_variable(phi)

        def dist(idx: np.ndarray | None) -> Any:
            if idx is None:
                return pm.NegativeBinomial.dist(mu=mu_t, alpha=phi_t)
            return pm.NegativeBinomial.dist(
                mu=mu_t[idx], alpha=phi_t[idx] if phi_t.ndim else phi_t
            )

        return interval_logcdf(dist, upper, lower)
    return _by_bounds(mu, phi, upper, lower, lambda a, kernel, k: a + pt.logsumexp(kernel, axis=1))


def truncated_nb_moments(
    mu: Any, phi: Any, upper: np.ndarray, lower: np.ndarray | None = None
) -> tuple[Any, Any]:
    """Mean and variance of a negative binomial truncated to ``lower..upper`` (PyTensor).

    Exact sums of the pmf over ``lower..upper``; the moments of a redacted
    cell given that it was redacted (``lower`` default 0). Bounds must be at most
    :data:`MAX_SUMMED_BOUND` apart from 0 (redaction thresholds are).

    Returns
    -------
    (TensorVariable, TensorVariable)
        Mean and variance, shape ``(cell,)``.
    """
    upper, lower = censored_bounds(upper, lower)
    mean, var = _by_bounds(mu, phi, upper, lower, _moments)
    return mean, var


def _moments(a: Any, kernel: Any, k: np.ndarray) -> tuple[Any, Any]:
    """Mean and variance of the counts ``k`` with weights ``exp(kernel)`` (renormalised).

    ``phi log p0`` cancels in the renormalisation. Written with the same
    ``logsumexp(kernel)`` as :func:`censored_nb_logp`, so a graph holding both for
    the same cells computes the kernel once (PyTensor merges equal subgraphs).
    """
    w = pt.exp(kernel - pt.shape_padright(pt.logsumexp(kernel, axis=1)))
    mean = pt.sum(w * k[None, :], axis=1)
    var = pt.sum(w * (k[None, :] - pt.shape_padright(mean)) ** 2, axis=1)
    return mean, var


def count_loglik(
    log_mu: Any,
    y: np.ndarray,
    *,
    likelihood: str,
    phi: Any = None,
    linear: Any = None,
    log_offset: np.ndarray | None = None,
) -> Any:
    """Return the summed Poisson / negative-binomial log-likelihood of exact counts (PyTensor).

    Parameters
    ----------
    log_mu
        ``(cell,)`` log expected counts.
    y
        ``(cell,)`` observed counts.
    likelihood
        ``"negbin"`` (variance ``mu + mu**2/phi``) or ``"poisson"``.
    phi
        Dispersion of the negative binomial.
    linear
        ``Σ y_c log_mu_c`` when the caller has it in sufficient-statistic form
        (the latent field's ``Xᵀy``, without ``log_offset``); else ``dot(y, log_mu)``.
    log_offset
        ``(cell,)`` log exposure already inside ``log_mu`` but not inside
        ``linear``; its ``Σ y log_offset`` is added as a constant.
    """
    y = np.asarray(y, dtype=float)
    if linear is None:
        linear = pt.dot(y, log_mu)
    elif log_offset is not None:
        linear = linear + float(np.dot(y, log_offset))
    if likelihood == "poisson":
        return linear - pt.sum(pt.exp(log_mu)) - float(special.gammaln(y + 1).sum())
    values, counts = np.unique(y, return_counts=True)
    n_obs = len(y)
    log_phi_mu = pt.log(phi + pt.exp(log_mu))
    # Σ lgamma(y + phi) over distinct counts; Σ (y + phi) log(phi + mu) over cells
    return (
        pt.dot(counts, pt.gammaln(values + phi))
        - n_obs * pt.gammaln(phi)
        - float(special.gammaln(y + 1).sum())
        + n_obs * phi * pt.log(phi)
        + linear
        - pt.dot(y, log_phi_mu)
        - phi * pt.sum(log_phi_mu)
    )


def censored_count_logp(
    mu: Any, upper: np.ndarray, lower: np.ndarray, *, likelihood: str, phi: Any = None
) -> Any:
    """Elementwise ``log P(lower <= y <= upper)`` of a Poisson or negative binomial (PyTensor)."""
    if likelihood == "negbin":
        return censored_nb_logp(mu, phi, upper, lower)
    upper, lower = censored_bounds(upper, lower)
    mu_t = pt.as_tensor_variable(mu)

    def dist(idx: np.ndarray | None) -> Any:
        return pm.Poisson.dist(mu=mu_t if idx is None else mu_t[idx])

    return interval_logcdf(dist, upper, lower)


def pointwise_count_loglik(
    log_mu: np.ndarray, y: np.ndarray, phi: np.ndarray | None
) -> np.ndarray:
    """Pointwise log-likelihood ``(sample, cell)`` of exact counts in numpy (phi None: Poisson)."""
    mu = np.exp(log_mu)
    if phi is None:
        return y * log_mu - mu - special.gammaln(y + 1)
    phi = np.asarray(phi, dtype=float).reshape(-1, 1)
    return (
        special.gammaln(y + phi)
        - special.gammaln(phi)
        - special.gammaln(y + 1)
        + phi * np.log(phi / (phi + mu))
        + y * (log_mu - np.log(phi + mu))
    )


def censored_nb_logp_np(
    upper: np.ndarray, lower: np.ndarray, phi: np.ndarray | None, mu: np.ndarray
) -> np.ndarray:
    """``log P(lower <= y <= upper)`` per draw (rows) and cell (columns) in numpy.

    ``phi`` None gives the Poisson; else the negative binomial with dispersion
    ``phi`` (one value per draw).
    """
    upper_k = np.floor(np.asarray(upper, dtype=float))[None, :]
    lo_k = np.ceil(np.nan_to_num(np.asarray(lower, dtype=float), nan=0.0))[None, :] - 1
    if phi is None:
        dist = stats.poisson(mu)
    else:
        phi = np.asarray(phi, dtype=float).reshape(-1, 1)
        dist = stats.nbinom(phi, phi / (phi + mu))
    hi = dist.logcdf(upper_k)
    if not (lo_k >= 0).any():
        return hi
    lo = dist.logcdf(np.maximum(lo_k, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = hi + np.log1p(-np.exp(np.minimum(lo - hi, 0.0)))
    return np.where(lo_k >= 0, diff, hi)


def lognormal_sdlog(estimate: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Log-scale sd of a log-normal with mean ``estimate`` and sd ``se``: ``sqrt(log1p((se/est)²))``."""
    estimate = np.asarray(estimate, dtype=float)
    return np.sqrt(np.log1p((np.asarray(se, dtype=float) / estimate) ** 2))
