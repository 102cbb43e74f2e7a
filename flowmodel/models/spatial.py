r"""Spatial smoothing of unit effects: the neighbour graph and a scaled ICAR basis (BYM2).

The BYM2 effect of unit ``i`` (Riebler et al. 2016) is

.. math::

    e_i = \sqrt{1 - \rho}\, v_i + \sqrt{\rho}\, u^*_i, \qquad v_i \sim N(0, 1),

with :math:`u^*` an intrinsic CAR field on the neighbour graph scaled so that the
geometric mean of its marginal variances is 1, and :math:`\rho` the share of the
effect's variance that is spatial. Here :math:`u^* = B w`, :math:`w \sim N(0, I)`:
for a connected component with graph Laplacian :math:`Q = D - W = V \Lambda V^\top`,
:math:`B = V_+ \Lambda_+^{-1/2} / \sqrt{s}` over the non-zero eigenvalues, which is
exactly the ICAR with its sum-to-zero constraint (no soft constraint, a proper
Gaussian in the free coordinates, so prior draws, Laplace and ADVI all work); a unit
with no neighbour gets an independent N(0, 1) in place of the field (Freni-Sterrantino
et al. 2018). Nothing here imports PyMC.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import sparse
from scipy.sparse import csgraph

from flowmodel.exceptions import ModelConfigError

__all__ = ["icar_basis", "unit_adjacency"]

#: Largest connected component whose ICAR basis is built by a dense eigendecomposition
#: (O(n^3) once, an n x n matrix in the model): beyond it the option asks for fewer units.
ICAR_MAX_COMPONENT = 5000


def unit_adjacency(
    data: xr.Dataset, units: np.ndarray, *, within_country: bool = True
) -> np.ndarray:
    """Neighbour graph of the unit positions ``units`` from the pair variable ``contiguous``.

    Parameters
    ----------
    data
        A FlowDataset with ``contiguous`` over (origin, destination) or over ``pair``
        (a sparse pair set with ``origin``/``destination`` coordinates).
    units
        Positions (into ``data.unit``) of the units of the graph.
    within_country
        Keep only neighbours in the same country (an operator's market is national).

    Returns
    -------
    numpy.ndarray
        Symmetric boolean ``(len(units), len(units))`` matrix, False on the diagonal.

    Raises
    ------
    ModelConfigError
        When the dataset has no ``contiguous`` variable.
    """
    if "contiguous" not in data:
        raise ModelConfigError(
            "spatial smoothing needs the pair variable 'contiguous' (which units share a "
            "border). Fix: build the dataset from unit polygons (flowmodel.dataset."
            "build_dataset with a geometry column, or a [units] file in a run config), or "
            "turn the spatial option off"
        )
    units = np.asarray(units, dtype=int)
    n_all = int(data.sizes["unit"])
    var = data["contiguous"]
    if "pair" in var.dims:
        ids = np.asarray(data["unit"].values).astype(str)
        pos = {u: k for k, u in enumerate(ids)}
        o = np.array([pos[u] for u in np.asarray(var["origin"].values).astype(str)])
        d = np.array([pos[u] for u in np.asarray(var["destination"].values).astype(str)])
        on = np.nan_to_num(np.asarray(var.values, dtype=float)) > 0
        full = sparse.coo_matrix((np.ones(on.sum()), (o[on], d[on])), shape=(n_all, n_all))
        adj = full.tocsr()[units][:, units].toarray() > 0
    else:
        values = np.asarray(var.transpose("origin", "destination").values, dtype=float)
        adj = np.nan_to_num(values[np.ix_(units, units)]) > 0
    adj = adj | adj.T
    np.fill_diagonal(adj, False)
    if within_country:
        country = np.asarray(data["country"].values).astype(str)[units]
        adj &= country[:, None] == country[None, :]
    return adj


def icar_basis(adjacency: np.ndarray) -> tuple[np.ndarray, dict[str, int | float]]:
    """Basis ``B`` with ``B @ w``, ``w ~ N(0, I)``, the scaled ICAR field of each component.

    Parameters
    ----------
    adjacency
        Symmetric boolean neighbour matrix ``(n, n)``.

    Returns
    -------
    basis : numpy.ndarray
        ``(n, m)``: ``n_c - 1`` columns per connected component of ``n_c >= 2`` units
        (their field sums to zero and has geometric-mean marginal variance 1) and one
        column per unit without neighbours (an independent N(0, 1)).
    info : dict
        ``components`` (with two or more units), ``isolated`` (units without a
        neighbour), ``largest`` (units in the largest component) and ``scaling``
        (geometric mean of the unscaled ICAR's marginal variances, averaged over
        components, for the record).

    Raises
    ------
    ModelConfigError
        When a component has more than :data:`ICAR_MAX_COMPONENT` units.
    """
    adj = np.asarray(adjacency, dtype=bool)
    n = len(adj)
    n_comp, label = csgraph.connected_components(sparse.csr_matrix(adj), directed=False)
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    scalings: list[float] = []
    isolated = 0
    largest = 0
    for c in range(n_comp):
        members = np.flatnonzero(label == c)
        largest = max(largest, len(members))
        if len(members) == 1:
            blocks.append((members, np.ones((1, 1))))
            isolated += 1
            continue
        if len(members) > ICAR_MAX_COMPONENT:
            raise ModelConfigError(
                f"spatial smoothing: a connected group of {len(members)} units is larger than "
                f"{ICAR_MAX_COMPONENT} (its ICAR basis is a dense eigendecomposition). Fix: "
                "turn the spatial option off, or model fewer units"
            )
        w = adj[np.ix_(members, members)].astype(float)
        lap = np.diag(w.sum(axis=1)) - w
        lam, vec = np.linalg.eigh(lap)
        # a connected graph's Laplacian has one zero eigenvalue (the constant vector)
        keep = np.argsort(lam)[1:]
        root = vec[:, keep] / np.sqrt(lam[keep])
        variance = (root**2).sum(axis=1)  # marginal variances of the unscaled ICAR
        s = float(np.exp(np.log(variance).mean()))
        scalings.append(s)
        blocks.append((members, root / np.sqrt(s)))
    m = sum(b.shape[1] for _, b in blocks)
    basis = np.zeros((n, m))
    col = 0
    for members, b in blocks:
        basis[members, col : col + b.shape[1]] = b
        col += b.shape[1]
    info: dict[str, int | float] = {
        "components": len(scalings),
        "isolated": isolated,
        "largest": largest,
        "scaling": float(np.mean(scalings)) if scalings else float("nan"),
    }
    return basis, info
