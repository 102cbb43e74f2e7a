"""One quantile naming rule for every output (predict, evaluate, report)."""

import importlib

import pytest

from flowmodel import naming
from flowmodel.naming import quantile_name


@pytest.mark.parametrize(
    ("q", "name"),
    [(0.05, "q05"), (0.25, "q25"), (0.5, "q50"), (0.75, "q75"), (0.95, "q95"),
     (0.025, "q02_5"), (0.975, "q97_5"), (0.001, "q00_1")],
)  # fmt: skip
def test_quantile_names(q, name):
    assert quantile_name(q) == name


def test_fractional_quantiles_never_collide_with_whole_ones():
    qs = [0.025, 0.25, 0.975, 0.0975, 0.5, 0.05]
    assert len({quantile_name(q) for q in qs}) == len(qs)


def test_every_layer_uses_the_one_definition():
    for module in ("flowmodel.predict", "flowmodel.evaluate", "flowmodel.outputs.report"):
        assert importlib.import_module(module).quantile_name is naming.quantile_name
