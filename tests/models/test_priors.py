import pymc as pm
import pytest

from flowmodel.exceptions import ModelConfigError, PriorWarning
from flowmodel.models.priors import DEFAULT_PRIORS, create_prior, resolve_priors


def test_precedence_user_over_data_over_default():
    data = {
        "intercept": {"dist": "Normal", "mu": -3.0, "sigma": 5.0},
        "beta": {"dist": "Normal", "mu": 1, "sigma": 1},
    }
    user = {"beta": {"dist": "Normal", "mu": 0.0, "sigma": 0.1}}
    out = resolve_priors(["intercept", "beta", "phi"], data_derived=data, user=user)
    assert out["beta"] == user["beta"]  # user wins over data-derived
    assert out["intercept"] == data["intercept"]  # data-derived wins over default
    assert out["phi"] == DEFAULT_PRIORS["phi"]  # default otherwise


def test_data_derived_for_unknown_node_is_dropped():
    out = resolve_priors(["beta"], data_derived={"tau": {"dist": "HalfNormal", "sigma": 1}})
    assert set(out) == {"beta"}


def test_unknown_user_key_warns_and_is_ignored():
    with pytest.warns(PriorWarning, match="prior 'bta' names no parameter"):
        out = resolve_priors(["beta"], user={"bta": {"dist": "Normal", "mu": 0, "sigma": 1}})
    assert "bta" not in out


def test_create_prior_from_dict_and_pymc_extras_prior():
    from pymc_extras.prior import Prior

    with pm.Model(coords={"term": ["a", "b"]}):
        x = create_prior("beta", {"dist": "Normal", "mu": 1.0, "sigma": 2.0}, dims="term")
        y = create_prior("phi", Prior("Gamma", alpha=2, beta=1))
    assert x.owner.op.name == "normal"
    assert y.name == "phi"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"mu": 0}, "expected a pymc_extras Prior or a mapping with a 'dist' key"),
        ({"dist": "Nromal", "mu": 0}, "'Nromal' is not a PyMC distribution"),
        ({"dist": "Normal", "location": 0}, "bad parameters"),
    ],
)
def test_bad_prior_spec_errors(spec, match):
    with pm.Model(), pytest.raises(ModelConfigError, match=match):
        create_prior("beta", spec)
