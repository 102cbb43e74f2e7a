"""Migration totals with intervals: per unit, per country, per country pair, for the world.

How many people left a unit, how many entered a country, how many crossed a
border? A total's interval cannot be built from the flows' intervals (a sum of
quantiles is not a quantile of the sum): the flows of one posterior draw move
together. :func:`predict_totals` therefore sums the flows of each *joint*
posterior predictive draw and takes the quantiles of those sums.

It streams like :func:`flowmodel.predict.predict_flows`: ``block_size``
origins (or pairs of a sparse pair set) at a time, each block's ``(S, block,
N)`` draws are reduced to per-draw sums and dropped. What it keeps is
``S x N`` per unit quantity and ``S x K x K`` for the country pairs (``S``
draws, ``N`` units, ``K`` countries), never ``S x N x N``; pass ``draws`` to
thin the posterior when ``S x N`` is large.

Quantities (all persons over the period of the flows, population scale):

====================  =====================================  =========================================
quantity              dims                                   meaning
====================  =====================================  =========================================
``unit_out``          unit                                   moves out of the unit (to any other unit)
``unit_in``           unit                                   moves into the unit (from any other unit)
``unit_net``          unit                                   ``unit_in - unit_out``
``country_out``       country                                emigration: moves to other countries
``country_in``        country                                immigration: moves from other countries
``country_net``       country                                ``country_in - country_out``
``country_internal``  country                                moves between units of the same country
``country_pair``      origin_country, destination_country    moves between two countries (diagonal:
                                                             internal moves)
``total_movers``      (none)                                 every move between two different units
``cross_border``      (none)                                 every move between two countries
====================  =====================================  =========================================

Each quantity gives variables ``<quantity>_mean`` and ``<quantity>_q05`` ...
(one per quantile, named by :func:`flowmodel.naming.quantile_name`). The mean
is the posterior mean of the *expected* totals, so it equals the sum of the
flows' ``mean`` (of :func:`~flowmodel.predict.predict_flows` with the same
draws) exactly; the quantiles are those of the posterior predictive totals.
In a closed world (every unit in ``data``) the net migrations of a draw sum
to zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from flowmodel.exceptions import ModelConfigError
from flowmodel.naming import quantile_name
from flowmodel.progress import progress_bar

__all__ = ["LEVELS", "QUANTITIES", "predict_totals", "summarise_totals", "totals_draws"]

#: Levels ``by`` can name, and the quantities each gives.
LEVELS: dict[str, tuple[str, ...]] = {
    "unit": ("unit_out", "unit_in", "unit_net"),
    "country": ("country_out", "country_in", "country_net", "country_internal"),
    "country_pair": ("country_pair",),
    "total": ("total_movers", "cross_border"),
}

#: Quantity -> (dims, long name, short label used in tables).
QUANTITIES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "unit_out": (("unit",), "out-migration: moves out of the unit to any other unit", "out"),
    "unit_in": (("unit",), "in-migration: moves into the unit from any other unit", "in"),
    "unit_net": (("unit",), "net migration: in-migration minus out-migration", "net"),
    "country_out": (("country",), "emigration: moves from the country to other countries", "out"),
    "country_in": (("country",), "immigration: moves into the country from other countries", "in"),
    "country_net": (
        ("country",),
        "net international migration: immigration minus emigration",
        "net",
    ),
    "country_internal": (
        ("country",),
        "internal migration: moves between units of the same country",
        "internal",
    ),
    "country_pair": (
        ("origin_country", "destination_country"),
        "moves from units of the origin country to units of the destination country "
        "(diagonal: internal migration)",
        "flow",
    ),
    "total_movers": ((), "every move between two different units", "movers"),
    "cross_border": ((), "every move between units of two different countries", "cross-border"),
}

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _levels(by: str | Iterable[str]) -> list[str]:
    levels = [by] if isinstance(by, str) else list(by)
    unknown = [b for b in levels if b not in LEVELS]
    if unknown or not levels:
        raise ModelConfigError(
            f"by={by!r}: unknown level(s) {unknown}; use any of {list(LEVELS)} "
            "(a string or a sequence of them)"
        )
    return levels


def _country_codes(data: xr.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted country codes and each unit's position in them; None without ``country``."""
    if "country" not in data.variables:
        return None
    country = np.asarray(data["country"].values).astype(str)
    codes, index = np.unique(country, return_inverse=True)
    return codes, index


class _Sums:
    """Per-draw sums (for the quantiles) and sums of expected flows (for the means)."""

    def __init__(self, n_samples: int, n: int, k: int, *, units: bool, pairs: bool) -> None:
        self.units, self.pairs = units, pairs
        if units:
            self.out = np.zeros((n_samples, n))
            self.inn = np.zeros((n_samples, n))
            self.mu_out = np.zeros(n)
            self.mu_in = np.zeros(n)
        if pairs:
            self.pair = np.zeros((n_samples, k, k))
            self.mu_pair = np.zeros((k, k))


def _accumulate_dense(ctx: Any, a: int, b: int, sums: _Sums, onehot: np.ndarray | None) -> None:
    mu, draws = ctx.row_flows(a, b)
    rows = np.arange(b - a)
    # the diagonal (staying in the unit) is not a move: 0, not NaN; other NaN (a flow that
    # cannot be predicted, e.g. a constrained model without the origin's margin) propagate
    draws = np.array(draws, dtype=np.float64)
    draws[:, rows, rows + a] = 0.0
    mu = np.array(mu, dtype=np.float64)
    mu[:, rows, rows + a] = 0.0
    mu_sum = mu.sum(axis=0)  # (B, N): Σ over draws of the expected flows
    if sums.units:
        sums.out[:, a:b] = draws.sum(axis=2)
        sums.inn += draws.sum(axis=1)
        sums.mu_out[a:b] = mu_sum.sum(axis=1)
        sums.mu_in += mu_sum.sum(axis=0)
    if sums.pairs and onehot is not None:
        block = onehot[a:b]  # (B, K) origin country
        by_dest = draws @ onehot  # (S, B, K)
        sums.pair += np.einsum("sbk,bj->sjk", by_dest, block)
        sums.mu_pair += block.T @ mu_sum @ onehot


def _accumulate_sparse(
    ctx: Any, a: int, b: int, sums: _Sums, country_index: np.ndarray | None, k: int
) -> None:
    from scipy import sparse

    mu, draws = ctx.row_flows(a, b)
    draws = np.array(draws, dtype=np.float64)
    mu = np.array(mu, dtype=np.float64)
    diagonal = ctx.diagonal[a:b]
    draws[:, diagonal] = 0.0
    mu[:, diagonal] = 0.0
    mu_sum = mu.sum(axis=0)
    oi, dj = ctx.origin_idx[a:b], ctx.dest_idx[a:b]
    rows = np.arange(b - a)
    ones = np.ones(b - a)

    def gather(cols: np.ndarray, width: int) -> Any:
        return sparse.csr_array((ones, (rows, cols)), shape=(b - a, width))

    if sums.units:
        mo, md = gather(oi, ctx.n), gather(dj, ctx.n)
        sums.out += (mo.T @ draws.T).T
        sums.inn += (md.T @ draws.T).T
        sums.mu_out += mo.T @ mu_sum
        sums.mu_in += md.T @ mu_sum
    if sums.pairs and country_index is not None:
        mp = gather(country_index[oi] * k + country_index[dj], k * k)
        sums.pair += (mp.T @ draws.T).T.reshape(-1, k, k)
        sums.mu_pair += (mp.T @ mu_sum).reshape(k, k)


def totals_draws(
    model: Any,
    data: xr.Dataset,
    *,
    by: str | Iterable[str] = ("unit", "country", "country_pair", "total"),
    draws: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    kind: str = "predictive",
    progress: bool | None = None,
    period: str | None = None,
) -> xr.Dataset:
    """Joint posterior (predictive) draws of migration totals, streamed.

    Parameters
    ----------
    model
        A fitted :class:`~flowmodel.models.base.FlowModel`.
    data
        The FlowDataset to predict (dense, or a sparse pair set: the totals
        then cover the pairs in the set only).
    by
        Levels: any of ``"unit"``, ``"country"``, ``"country_pair"``,
        ``"total"`` (see the module docstring for the quantities).
    draws
        Posterior draws per chain (thinned evenly); default all.
    seed
        Seed of the predictive noise (blocks are seeded as in
        :func:`~flowmodel.predict.predict_flows`, so the same seed and block
        size give the same flow draws as
        :func:`~flowmodel.predict.flow_draws`).
    block_size
        Origins (or pairs) per block; default about 64 MB of draws.
    kind
        ``"predictive"`` (with the observation noise: the number of people who
        will be counted as moving) or ``"mean"`` (the expected totals).
    progress
        Progress bar (terminal, notebook) or heartbeat lines (logs); None
        follows :func:`flowmodel.progress.progress_enabled`.

    Returns
    -------
    xarray.Dataset
        One variable per quantity over ``(chain, draw, ...)`` (the per-draw
        totals), and ``<quantity>_expected``: the posterior mean of the
        expected totals (no chain and draw dims), which
        :func:`summarise_totals` reports as the mean.

    Raises
    ------
    flowmodel.exceptions.ModelConfigError
        For an unknown level or ``kind``; a sparse pair set with a constrained
        model.
    """
    from flowmodel.models.base import thin_posterior
    from flowmodel.predict import _Context, block_ranges

    levels = _levels(by)
    posterior = thin_posterior(model.posterior, draws)
    ctx = _Context(
        model,
        data,
        posterior,
        kind=kind,
        exposure=None,
        seed=seed,
        dtype=np.float64,
        period=period,
    )
    countries = _country_codes(ctx.data)
    need_pairs = countries is not None and bool({"country", "country_pair", "total"} & set(levels))
    need_units = "unit" in levels or (countries is None and "total" in levels)
    codes, country_index = countries if countries is not None else (np.array([], str), None)
    k = len(codes)
    sums = _Sums(ctx.n_samples, ctx.n, k, units=need_units, pairs=need_pairs)
    onehot = None
    if need_pairs and not ctx.sparse:
        onehot = np.zeros((ctx.n, k))
        onehot[np.arange(ctx.n), country_index] = 1.0
    size = ctx.aligned(int(block_size)) if block_size else ctx.block_size()
    blocks = block_ranges(ctx.n_rows, size)
    unit = "pair block" if ctx.sparse else "origin block"
    with progress_bar(total=len(blocks), desc="totals", unit=unit, progress=progress) as bar:
        for a, b in blocks:
            if ctx.sparse:
                _accumulate_sparse(ctx, a, b, sums, country_index, k)
            else:
                _accumulate_dense(ctx, a, b, sums, onehot)
            bar.update(1)

    n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
    s = ctx.n_samples
    units = np.asarray(ctx.data["unit"].values)
    sample_dims = ("chain", "draw")
    coords: dict[str, Any] = {
        "chain": posterior["chain"].values,
        "draw": posterior["draw"].values,
    }
    if "unit" in levels:
        coords["unit"] = units
        if countries is not None:
            coords["unit_country"] = ("unit", codes[country_index])
    if countries is not None and "country" in levels:
        coords["country"] = codes
    if countries is not None and "country_pair" in levels:
        coords["origin_country"] = codes
        coords["destination_country"] = codes
    out = xr.Dataset(coords=coords)

    def put(name: str, per_draw: np.ndarray, expected: np.ndarray) -> None:
        dims = QUANTITIES[name][0]
        out[name] = (
            (*sample_dims, *dims),
            per_draw.reshape(n_chain, n_draw, *per_draw.shape[1:]),
        )
        out[f"{name}_expected"] = (dims, np.asarray(expected, dtype=float) / s)

    if "unit" in levels:
        put("unit_out", sums.out, sums.mu_out)
        put("unit_in", sums.inn, sums.mu_in)
        put("unit_net", sums.inn - sums.out, sums.mu_in - sums.mu_out)
    if need_pairs:
        diag = np.arange(k)
        internal = sums.pair[:, diag, diag]
        mu_internal = sums.mu_pair[diag, diag]
        if "country" in levels:
            emig = sums.pair.sum(axis=2) - internal
            immig = sums.pair.sum(axis=1) - internal
            mu_emig = sums.mu_pair.sum(axis=1) - mu_internal
            mu_immig = sums.mu_pair.sum(axis=0) - mu_internal
            put("country_out", emig, mu_emig)
            put("country_in", immig, mu_immig)
            put("country_net", immig - emig, mu_immig - mu_emig)
            put("country_internal", internal, mu_internal)
        if "country_pair" in levels:
            put("country_pair", sums.pair, sums.mu_pair)
    if "total" in levels:
        if need_pairs:
            total = sums.pair.sum(axis=(1, 2))
            mu_total = sums.mu_pair.sum()
            put("total_movers", total, mu_total)
            put(
                "cross_border",
                total - sums.pair[:, np.arange(k), np.arange(k)].sum(axis=1),
                mu_total - np.trace(sums.mu_pair),
            )
        else:
            put("total_movers", sums.out.sum(axis=1), sums.mu_out.sum())
    out.attrs.update(
        model=type(model).__name__,
        kind=kind,
        n_samples=s,
        seed=seed,
        pair_set="sparse (the pairs of the set only)" if ctx.sparse else "every pair of units",
        scale="population (persons)",
    )
    return out


def summarise_totals(
    draws: xr.Dataset, *, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> xr.Dataset:
    """Reduce :func:`totals_draws` to ``<quantity>_mean`` and ``<quantity>_q05`` ... variables.

    The mean is the posterior mean of the expected totals (``<quantity>_expected``
    when present, else the mean of the draws); the quantiles are those of the
    per-draw totals (numpy's default 'linear' method).
    """
    quantiles = [float(q) for q in quantiles]
    out = xr.Dataset(coords={k: v for k, v in draws.coords.items() if k not in ("chain", "draw")})
    for name in QUANTITIES:
        if name not in draws:
            continue
        var = draws[name]
        dims, long_name, _ = QUANTITIES[name]
        values = np.asarray(var.values, dtype=float).reshape(-1, *var.shape[2:])
        expected = draws.get(f"{name}_expected")
        mean = np.asarray(expected.values) if expected is not None else values.mean(axis=0)
        attrs = {"units": "1", "quantity": name}  # a count of persons (CF: dimensionless)
        out[f"{name}_mean"] = (
            dims,
            mean,
            attrs | {"long_name": f"{long_name}; posterior mean", "statistic": "mean"},
        )
        if quantiles:
            qs = np.quantile(values, quantiles, axis=0)
            for q, arr in zip(quantiles, qs, strict=True):
                out[f"{name}_{quantile_name(q)}"] = (
                    dims,
                    arr,
                    attrs
                    | {
                        "long_name": f"{long_name}; posterior predictive quantile {q:g}",
                        "statistic": quantile_name(q),
                    },
                )
    out.attrs.update(draws.attrs)
    out.attrs["quantiles"] = list(quantiles)
    return out


def predict_totals(
    model: Any,
    data: xr.Dataset,
    *,
    by: str | Iterable[str] = ("unit", "country", "country_pair", "total"),
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    draws: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    kind: str = "predictive",
    progress: bool | None = None,
    period: str | None = None,
) -> xr.Dataset:
    """Migration totals with intervals from joint posterior predictive draws, streamed.

    Parameters
    ----------
    model
        A fitted :class:`~flowmodel.models.base.FlowModel`.
    data
        The FlowDataset to predict (every unit: a closed world, so net
        migrations sum to zero; or a sparse pair set, whose totals cover its
        pairs only).
    by
        ``"unit"`` (in-, out- and net migration per unit), ``"country"``
        (immigration, emigration, net and internal migration per country),
        ``"country_pair"`` (moves between two countries) and ``"total"``
        (movers, cross-border movers); a string or a sequence of them.
    quantiles
        Equal-tailed quantiles of the totals (``q05`` ... ``q95``).
    draws
        Posterior draws per chain (thinned evenly); default all.
    seed
        Seed of the predictive noise.
    block_size
        Origins (or pairs) per block; default about 64 MB of draws.
    kind
        ``"predictive"`` (default) or ``"mean"`` (intervals of the expected
        totals, without the observation noise).
    progress
        Progress bar or heartbeat lines; None follows
        :func:`flowmodel.progress.progress_enabled`.
    period
        Models with periods: the period whose totals are predicted (default the
        latest latent period; see :meth:`~flowmodel.models.base.FlowModel.predict`).

    Returns
    -------
    xarray.Dataset
        ``<quantity>_mean`` and ``<quantity>_q05`` ... (persons, population
        scale) over ``unit`` (coordinate ``unit_country``), ``country``,
        ``origin_country`` x ``destination_country``, or no dims (world
        totals); see the module docstring for the quantities.

    Examples
    --------
    >>> totals = predict_totals(model, data, by="country")  # doctest: +SKIP
    >>> totals["country_net_mean"].sel(country="KEN")  # doctest: +SKIP
    """
    joint = totals_draws(
        model,
        data,
        by=by,
        draws=draws,
        seed=seed,
        block_size=block_size,
        kind=kind,
        progress=progress,
        period=period,
    )
    return summarise_totals(joint, quantiles=quantiles)
