"""Posterior (predictive) flows for any pair set, streamed in origin (or pair) blocks.

Predicting every pair of N units with S posterior draws needs N x N x S values;
at N = 5,000 and S = 200 that is 5 x 10⁹ numbers. :func:`predict_flows` never
holds them: it takes ``block_size`` origins at a time, draws ``(S, block, N)``
flows, reduces them to the mean and quantiles and keeps only those
(``(1 + n_quantiles) x block x N``). With ``use_dask=True`` each block is a dask
task (threads by default, or any cluster), otherwise a plain loop. The
predictive noise of origin row ``i`` is drawn from its own stream
``[seed, i]`` (of sparse pairs, from one stream per chunk of
:data:`SPARSE_CHUNK` pairs), so results do not depend on the block size or on
dask.

A sparse pair set (one ``pair`` dim with ``origin``/``destination``
coordinates, e.g. from :func:`flowmodel.pairs.sparse_pairs`) is streamed in
blocks of ``block_size`` *pairs* instead: each block draws ``(S, block)`` flows
from the pair variables of those pairs only, and the result is a Dataset over
``pair`` with the same variable names. The log rates, and so ``kind="mean"``
summaries, equal the dense ones gathered at the same pairs; the predictive
noise is seeded per chunk of pairs, so it matches the dense draws in
distribution, not number for number.

Models plug in through the hooks of :class:`~flowmodel.models.base.FlowModel`
(``_prediction_params``, ``_log_rate_from_params``) and a *flow rule*
(``_flow_rule()``) that turns latent log rates into flows: ``exp(eta)`` with
count noise, or — for constrained gravity models — shares of the observed
margins; every model class shares one streaming code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from flowmodel.dataset import is_sparse
from flowmodel.exceptions import ModelConfigError
from flowmodel.models.base import FlowModel, thin_posterior
from flowmodel.naming import quantile_name

__all__ = ["count_noise", "flow_draws", "predict_flows", "quantile_name"]

#: Target bytes of one block of draws.
BLOCK_BYTES = 64 * 2**20
#: Units above which the dask path is used by default.
DASK_UNITS = 2_000
#: Sparse pairs per noise stream (sparse blocks are whole multiples of it).
SPARSE_CHUNK = 1024


class _Context:
    """Everything a block needs: params, features, margins, exposure, sizes."""

    def __init__(
        self,
        model: FlowModel,
        data: xr.Dataset,
        posterior: xr.Dataset,
        *,
        kind: str,
        exposure: str | None,
        seed: int,
        dtype: Any,
        period: str | None = None,
    ) -> None:
        if kind not in ("predictive", "mean"):
            raise ModelConfigError(f"kind={kind!r} is not valid; use 'predictive' or 'mean'")
        self.sparse = is_sparse(data)
        units = np.asarray(data["unit"].values)
        self.rule = model._flow_rule()
        if self.sparse:
            if not self.rule.supports_sparse:
                raise ModelConfigError(
                    f"{type(model).__name__} with constraint='{getattr(model, 'constraint', '')}': "
                    "predictions normalise over every destination (or origin), which a sparse "
                    "pair set does not hold. Fix: predict on the dense dataset and gather the "
                    "pairs you need"
                )
            self._sparse_pairs(model, data)
        elif not (
            np.array_equal(np.asarray(data["origin"].values), units)
            and np.array_equal(np.asarray(data["destination"].values), units)
        ):
            data = data.reindex(origin=units, destination=units)
        self.model = model
        self.data = data
        self.kind = kind
        self.seed = seed
        self.dtype = np.dtype(dtype)
        self.n = data.sizes["unit"]
        self.period = model.target_period(period)
        self.params = model._prediction_params(
            posterior, data, rng=np.random.default_rng([seed, 2**31]), period=self.period
        )
        self.features = model._features(data, period=self.period)
        if self.period is not None and exposure is not None:
            # on the source's reporting scale: its duration / undercount factor too
            log_factor = model._source_log_factor(posterior, exposure)
            self.params["log_offset"] = self.params.get("log_offset", 0.0) + log_factor
        self.n_samples = int(posterior.sizes["chain"] * posterior.sizes["draw"])
        self.exposure_unit = np.ones(self.n)
        self.exposure_pair = None
        if exposure is not None:
            name = f"exposure_{exposure}"
            if name not in data:
                self.exposure_unit = np.ones(self.n)
            elif data[name].dims == ("unit",):
                self.exposure_unit = np.asarray(data[name].values, dtype=float)
            elif self.sparse:
                if data[name].dims != ("pair",):
                    raise ModelConfigError(
                        f"'{name}' has dims {data[name].dims}; a sparse pair set needs it over "
                        "('unit',) or ('pair',). Fix: select one period or use exposure=None"
                    )
                self.exposure_pair = data[name]
            elif {"origin", "destination"} <= set(data[name].dims):
                self.exposure_pair = data[name].transpose("origin", "destination")
        self.rule.prepare(self, exposure)

    def row_rng(self, row: int) -> np.random.Generator:
        """Return the noise stream of origin row ``row`` (dense) or pair chunk ``row`` (sparse)."""
        return np.random.default_rng([self.seed, int(row)])

    def noise(self, mu: np.ndarray, rows: np.ndarray, *, phi: Any = "model") -> np.ndarray:
        """Count draws around ``mu`` ``(S, rows, N)``, one stream per origin row (dense)."""
        phi = self.params.get("phi") if isinstance(phi, str) else phi
        out = np.empty(mu.shape, dtype=self.dtype)
        for r, row in enumerate(rows):
            out[:, r] = count_noise(mu[:, r], phi, self.row_rng(int(row)), self.dtype)
        return out

    def blocks(self) -> list[tuple[int, int]]:
        """Return the default blocks over the streamed axis."""
        return block_ranges(self.n_rows, self.block_size())

    def _sparse_pairs(self, model: FlowModel, data: xr.Dataset) -> None:
        """Store unit positions of the pairs of a sparse ``data`` (diagonal pairs masked)."""
        oi = _unit_positions(data, data["origin"].values)
        dj = _unit_positions(data, data["destination"].values)
        bad = np.isnan(oi) | np.isnan(dj)
        if bad.any():
            names = np.asarray(data["origin"].values)[bad][:10].tolist()
            raise ModelConfigError(
                f"{int(bad.sum())} pair(s) name units not in 'unit' (origins {names}); "
                "Fix: build the pair set with flowmodel.pairs.sparse_pairs from this dataset"
            )
        self.origin_idx = oi.astype(np.int64)
        self.dest_idx = dj.astype(np.int64)
        self.diagonal = self.origin_idx == self.dest_idx
        self.n_pairs = len(self.origin_idx)

    @property
    def n_rows(self) -> int:
        """Length of the streamed axis: origins (dense) or pairs (sparse)."""
        return self.n_pairs if self.sparse else self.n

    def block_size(self) -> int:
        """Origins (dense) or pairs (sparse) per block, ~:data:`BLOCK_BYTES` of draws."""
        row = 1 if self.sparse else self.n
        per_row = max(self.n_samples * row * max(self.dtype.itemsize, 8) * 3, 1)
        size = int(max(1, min(self.n_rows, BLOCK_BYTES // per_row)))
        return self.aligned(size)

    def aligned(self, size: int) -> int:
        """``size`` rounded up to whole noise chunks (sparse pairs; dense rows are their own)."""
        if not self.sparse:
            return max(1, int(size))
        return max(SPARSE_CHUNK, -(-int(size) // SPARSE_CHUNK) * SPARSE_CHUNK)

    def pair_block_log_rate(self, a: int, b: int) -> np.ndarray:
        """``(S, b - a)`` log rates of sparse pairs ``a:b``; NaN for diagonal pairs."""
        oi, dj = self.origin_idx[a:b], self.dest_idx[a:b]
        eta = self.model._log_rate_from_params(
            self.params, self.features, oi, dj, self.model._sparse_pair_block(self.data, a, b)
        )
        eta = np.array(eta, dtype=float).reshape(-1, b - a)
        eta[:, self.diagonal[a:b]] = np.nan
        return eta

    def pair_block_flows(
        self, a: int, b: int, *, kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, draws)`` of shape ``(S, b - a)`` for sparse pairs ``a:b``.

        ``a`` must be a multiple of :data:`SPARSE_CHUNK` (blocks are aligned), so
        each chunk of pairs draws its noise from its own stream.
        """
        kind = kind or self.kind
        mu = np.exp(self.pair_block_log_rate(a, b))
        scale = self.exposure_unit[self.origin_idx[a:b]][None, :]
        if self.exposure_pair is not None:
            scale = np.asarray(self.exposure_pair.isel(pair=slice(a, b)).values, dtype=float)[None]
        mu = (mu * scale).astype(self.dtype, copy=False)
        if kind == "mean":
            return mu, mu
        out = np.empty(mu.shape, dtype=self.dtype)
        phi = self.params.get("phi")
        for c in range(a, b, SPARSE_CHUNK):
            e = min(c + SPARSE_CHUNK, b)
            rng = self.row_rng(c // SPARSE_CHUNK)
            out[:, c - a : e - a] = count_noise(mu[:, c - a : e - a], phi, rng, self.dtype)
        return mu, out

    def row_flows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """``block_flows`` (dense, ``(S, b - a, N)``) or ``pair_block_flows`` (sparse)."""
        return self.pair_block_flows(a, b) if self.sparse else self.block_flows(a, b)

    def row_shape(self, a: int, b: int) -> tuple[int, ...]:
        """Shape of one block's summary after the leading axis."""
        return (b - a,) if self.sparse else (b - a, self.n)

    def out_dims(self) -> tuple[str, ...]:
        return ("pair",) if self.sparse else ("origin", "destination")

    def out_coords(self) -> dict[str, Any]:
        if not self.sparse:
            return {"origin": self.data["unit"].values, "destination": self.data["unit"].values}
        coords: dict[str, Any] = {
            "origin": ("pair", np.asarray(self.data["origin"].values)),
            "destination": ("pair", np.asarray(self.data["destination"].values)),
        }
        if "pair" in self.data.coords:
            coords["pair"] = np.asarray(self.data["pair"].values)
        return coords

    def block_log_rate(self, a: int, b: int) -> np.ndarray:
        """``(S, b - a, N)`` log rates; NaN on the diagonal."""
        oi = np.repeat(np.arange(a, b), self.n)
        dj = np.tile(np.arange(self.n), b - a)
        eta = self.model._log_rate_from_params(
            self.params, self.features, oi, dj, self.model._pair_block(self.data, a, b)
        ).reshape(-1, b - a, self.n)
        eta[:, np.arange(b - a), np.arange(a, b)] = np.nan
        return eta

    def block_flows(
        self, a: int, b: int, *, kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, draws)`` of shape ``(S, b - a, N)``: expected flows and the draws asked for."""
        return self.rule.block(
            self, self.block_log_rate(a, b), np.arange(a, b), kind or self.kind, None
        )


def _unit_positions(data: xr.Dataset, names: np.ndarray) -> np.ndarray:
    """Float positions of ``names`` in ``data.unit``; NaN for names not there."""
    pos = pd.Series(np.arange(data.sizes["unit"]), index=data["unit"].values.astype(str))
    return pos.reindex(np.asarray(names).astype(str)).to_numpy(dtype=float)


def count_noise(
    mu: np.ndarray, phi: np.ndarray | None, rng: np.random.Generator, dtype
) -> np.ndarray:
    """Poisson or negative-binomial (gamma-Poisson) draws with means ``mu``."""
    nan = np.isnan(mu)
    m = np.where(nan, 0, mu)
    if phi is not None:
        # one scalar-shape gamma call per posterior draw: faster than an array of shapes
        lam = np.empty(m.shape, dtype=np.result_type(m.dtype, np.float32))
        for k, shape in enumerate(np.asarray(phi, dtype=float)):
            lam[k] = rng.standard_gamma(shape, size=m.shape[1:], dtype=lam.dtype)
            lam[k] *= m[k] / shape
    else:
        lam = m
    # numpy refuses lam > ~1e19; far below that the Poisson noise is negligible anyway
    big = lam > 1e12
    out = rng.poisson(np.where(big, 0.0, lam)).astype(dtype)
    out[big] = lam[big]
    out[nan] = np.nan
    return out


def block_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in blocks of ``size``."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _summarise(ctx: _Context, a: int, b: int, quantiles: Sequence[float]) -> np.ndarray:
    mu, draws = ctx.row_flows(a, b)
    mean = np.mean(mu, axis=0, dtype=np.float64)
    out = np.empty((1 + len(quantiles), *ctx.row_shape(a, b)), dtype=np.float64)
    out[0] = mean
    if len(quantiles):
        out[1:] = sorted_quantiles(draws, quantiles)
    return out


def sorted_quantiles(draws: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """Quantiles along axis 0 (numpy's default 'linear' method) from one sort.

    Sorting once along the sample axis is several times faster than
    :func:`numpy.quantile` with several probabilities on large blocks.
    """
    srt = np.sort(draws, axis=0)
    n = srt.shape[0]
    out = np.empty((len(quantiles), *srt.shape[1:]), dtype=np.float64)
    for k, q in enumerate(quantiles):
        pos = q * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out[k] = srt[lo] + (srt[hi].astype(np.float64) - srt[lo]) * frac if frac else srt[lo]
    return out


def predict_flows(
    model: FlowModel,
    data: xr.Dataset,
    *,
    quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    kind: str = "predictive",
    exposure: str | None = None,
    draws: int | None = None,
    block_size: int | None = None,
    use_dask: bool | None = None,
    seed: int = 0,
    dtype: Any = np.float64,
    progress: bool | None = None,
    period: str | None = None,
) -> xr.Dataset:
    """Mean and quantiles of predicted flows for every pair of ``data``, streamed.

    Parameters
    ----------
    model
        A fitted flow model.
    data
        A FlowDataset with the covariates the model uses (any units): dense
        (origin x destination), or sparse (one ``pair`` dim with
        ``origin``/``destination`` coords, e.g. from
        :func:`flowmodel.pairs.sparse_pairs`; unconstrained models only).
    quantiles
        Equal-tailed quantiles, named by :func:`quantile_name`.
    kind
        ``"predictive"`` (counts with the observation noise) or ``"mean"``.
    exposure
        None (population scale) or a source name (multiply by
        ``exposure_<source>``).
    draws
        Posterior draws per chain to use (evenly thinned); all when None.
    block_size
        Origins per block (dense) or pairs per block (sparse, rounded up to
        whole chunks of :data:`SPARSE_CHUNK`); default: ~64 MB of draws per
        block. Results do not depend on it.
    use_dask
        One dask task per block (lazy result); default when N > 2,000 (dense)
        or more than 2,000² pairs (sparse).
    seed
        Seed of the predictive noise (one stream per origin row or pair chunk)
        and of effects of unseen countries.
    dtype
        Float type of the draws inside a block.
    progress
        Progress over blocks (numpy path): None follows
        :func:`flowmodel.progress.set_progress` (on: a bar when interactive,
        a heartbeat line a minute in logs); True/False force it.
    period
        Models with periods: the period predicted (default the latest latent
        period); its label is the ``period`` attribute of the result. ``exposure``
        then also applies the source's duration / undercount factor.

    Returns
    -------
    xarray.Dataset
        dims (origin, destination), or ``pair`` (with ``origin``/``destination``
        coords) for a sparse ``data``: ``mean`` (posterior mean of the expected
        flow, which is also the predictive mean) and one variable per quantile;
        NaN on the diagonal. Dask-backed when ``use_dask``.
    """
    posterior = thin_posterior(model.posterior, draws)
    ctx = _Context(
        model,
        data,
        posterior,
        kind=kind,
        exposure=exposure,
        seed=seed,
        dtype=dtype,
        period=period,
    )
    size = ctx.aligned(int(block_size)) if block_size else ctx.block_size()
    blocks = block_ranges(ctx.n_rows, size)
    quantiles = [float(q) for q in quantiles]
    names = ["mean", *(quantile_name(q) for q in quantiles)]
    if use_dask is None:
        use_dask = ctx.n_pairs > DASK_UNITS**2 if ctx.sparse else ctx.n > DASK_UNITS
    if use_dask:
        import dask
        import dask.array as da

        parts = [
            da.from_delayed(
                dask.delayed(_summarise)(ctx, a, b, quantiles),
                shape=(len(names), *ctx.row_shape(a, b)),
                dtype=np.float64,
            )
            for a, b in blocks
        ]
        arr = da.concatenate(parts, axis=1)
    else:
        from flowmodel.progress import progress_bar

        unit = "pair block" if ctx.sparse else "origin block"
        bar = progress_bar(blocks, desc="prediction", unit=unit, progress=progress)
        arr = np.concatenate([_summarise(ctx, a, b, quantiles) for a, b in bar], axis=1)
    ds = xr.Dataset(
        {name: (ctx.out_dims(), arr[k]) for k, name in enumerate(names)}, coords=ctx.out_coords()
    )
    ds.attrs.update(
        model=type(model).__name__,
        kind=kind,
        exposure=exposure or "none (population scale)",
        n_samples=ctx.n_samples,
        seed=seed,
        quantiles=list(quantiles),
    )
    if ctx.period is not None:
        from flowmodel.periods import parse_period

        ds.attrs.update(period=ctx.period, window_years=parse_period(ctx.period).length)
    return ds


def flow_draws(
    model: FlowModel,
    data: xr.Dataset,
    *,
    draws: int | None = None,
    kind: str = "mean",
    exposure: str | None = None,
    seed: int = 0,
    use_dask: bool | None = None,
    block_size: int | None = None,
    period: str | None = None,
) -> xr.DataArray:
    """Posterior draws of flows, dims (chain, draw, origin, destination) or (chain, draw, pair).

    ``kind="mean"`` gives the expected flow ``mu``; ``"predictive"`` adds the
    observation noise. A sparse ``data`` gives dims (chain, draw, pair) with
    ``origin``/``destination`` coords. Dask-backed (one task per block of
    origins, or of pairs) when ``use_dask`` (default when N > 2,000, or more
    than 2,000² sparse pairs).
    """
    posterior = thin_posterior(model.posterior, draws)
    ctx = _Context(
        model,
        data,
        posterior,
        kind=kind,
        exposure=exposure,
        seed=seed,
        dtype=np.float64,
        period=period,
    )
    n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
    size = ctx.aligned(int(block_size)) if block_size else ctx.block_size()
    blocks = block_ranges(ctx.n_rows, size)

    def one(a: int, b: int) -> np.ndarray:
        return ctx.row_flows(a, b)[1].reshape(n_chain, n_draw, *ctx.row_shape(a, b))

    if use_dask is None:
        use_dask = ctx.n_pairs > DASK_UNITS**2 if ctx.sparse else ctx.n > DASK_UNITS
    if use_dask:
        import dask
        import dask.array as da

        arr = da.concatenate(
            [
                da.from_delayed(
                    dask.delayed(one)(a, b),
                    shape=(n_chain, n_draw, *ctx.row_shape(a, b)),
                    dtype=np.float64,
                )
                for a, b in blocks
            ],
            axis=2,
        )
    else:
        arr = np.concatenate([one(a, b) for a, b in blocks], axis=2)
    return xr.DataArray(
        arr,
        dims=("chain", "draw", *ctx.out_dims()),
        coords={
            "chain": posterior["chain"].values,
            "draw": posterior["draw"].values,
            **ctx.out_coords(),
        },
        name="flow",
        attrs={"kind": kind, "exposure": exposure or "none (population scale)"}
        | ({"period": ctx.period} if ctx.period is not None else {}),
    )
