"""Bad input gets a ValueError naming the argument (never a silent NaN)."""

from __future__ import annotations

import math

import pytest
import torch

import trpl_fast

from .helpers import F64, make_case


def diag_case():
    return list(make_case("frob", "diag", (4,), 3))


def call_diag(case, **kw):
    args = dict(kind="frob", mean_bound=0.1, cov_bound=0.1)
    args.update(kw)
    return trpl_fast.project_diag(*case, **args)


def call_full(case, **kw):
    args = dict(kind="frob", mean_bound=0.1, cov_bound=0.1)
    args.update(kw)
    return trpl_fast.project_full(*case, **args)


@pytest.mark.parametrize("kind", ["frobenius", "W2", "", None, 3])
def test_unknown_kind(kind):
    with pytest.raises(ValueError, match="kind must be one of"):
        call_diag(diag_case(), kind=kind)


@pytest.mark.parametrize(
    "name,value",
    [
        ("mean_bound", 0.0),
        ("mean_bound", -1.0),
        ("cov_bound", 0.0),
        ("cov_bound", -0.5),
        ("mean_bound", math.inf),
        ("cov_bound", math.nan),
        ("cov_bound", None),
        ("mean_bound", True),
        ("mean_bound", "0.1"),
    ],
)
def test_bad_scalar_bound(name, value):
    with pytest.raises(ValueError, match=name):
        call_diag(diag_case(), **{name: value})


@pytest.mark.parametrize("name", ["mean_bound", "cov_bound"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_bad_tensor_bound(name, value):
    bound = torch.full((4,), 0.1, dtype=F64)
    bound[2] = value
    with pytest.raises(ValueError, match=name):
        call_diag(diag_case(), **{name: bound})


def test_tensor_bound_of_wrong_shape():
    with pytest.raises(ValueError, match="cov_bound of shape"):
        call_diag(diag_case(), cov_bound=torch.full((5,), 0.1, dtype=F64))


@pytest.mark.parametrize("index,name", [(0, "mean"), (1, "std"), (2, "old_mean"), (3, "old_std")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values(index, name, value):
    case = diag_case()
    case[index] = case[index].clone()
    case[index][1, 2] = value
    with pytest.raises(ValueError, match=f"^{name} has non-finite"):
        call_diag(case)


@pytest.mark.parametrize("index,name", [(1, "std"), (3, "old_std")])
@pytest.mark.parametrize("value", [0.0, -0.3])
def test_non_positive_std(index, name, value):
    case = diag_case()
    case[index] = case[index].clone()
    case[index][0, 1] = value
    with pytest.raises(ValueError, match=f"^{name} must be > 0"):
        call_diag(case)


@pytest.mark.parametrize("index,name", [(1, "std"), (2, "old_mean"), (3, "old_std")])
def test_mismatched_shapes(index, name):
    case = diag_case()
    case[index] = case[index][:, :2]
    with pytest.raises(ValueError, match=name):
        call_diag(case)


def test_mismatched_dtype_of_std():
    case = diag_case()
    case[1] = case[1].float()
    with pytest.raises(ValueError, match="std has dtype"):
        call_diag(case)


def test_non_tensor_input():
    case = diag_case()
    case[0] = case[0].tolist()
    with pytest.raises(ValueError, match="mean must be a torch.Tensor"):
        call_diag(case)


def test_mismatched_devices():
    case = diag_case()
    case[2] = case[2].to("meta")
    with pytest.raises(ValueError, match="old_mean is on meta"):
        call_diag(case)


@pytest.mark.parametrize("index,name", [(1, "factor"), (3, "old_factor")])
def test_cholesky_factor_with_non_positive_diagonal(index, name):
    case = list(make_case("frob", "full", (3,), 3))
    case[index] = case[index].clone()
    case[index][1, 1, 1] = -case[index][1, 1, 1]
    with pytest.raises(ValueError, match=f"^{name} must have a positive diagonal"):
        call_full(case)


def test_cholesky_factor_not_lower_triangular():
    case = list(make_case("frob", "full", (3,), 3))
    case[1] = case[1].clone()
    case[1][0, 0, 2] = 0.5
    with pytest.raises(ValueError, match="^factor must be lower triangular"):
        call_full(case)


def test_w2_root_not_symmetric_or_not_pd():
    case = list(make_case("w2", "full", (3,), 3))
    bad = case[1].clone()
    bad[0, 0, 1] += 0.5
    with pytest.raises(ValueError, match="^factor must be symmetric"):
        call_full([case[0], bad, case[2], case[3]], kind="w2")
    neg = -case[3]
    with pytest.raises(ValueError, match="^old_factor must be positive definite"):
        call_full([case[0], case[1], case[2], neg], kind="w2")


def test_full_factor_of_wrong_shape():
    case = list(make_case("frob", "full", (3,), 3))
    case[1] = case[1][..., :2]
    with pytest.raises(ValueError, match="factor must have shape"):
        call_full(case)


def test_scalar_mean():
    with pytest.raises(ValueError, match="mean must have at least 1 dimension"):
        trpl_fast.project_diag(
            torch.tensor(1.0),
            torch.tensor(1.0),
            torch.tensor(1.0),
            torch.tensor(1.0),
            kind="frob",
            mean_bound=0.1,
            cov_bound=0.1,
        )


def test_layer_arguments():
    with pytest.raises(ValueError, match="kind"):
        trpl_fast.TrustRegionProjection("bad", 0.1, 0.1)
    with pytest.raises(ValueError, match="cov_form"):
        trpl_fast.TrustRegionProjection("frob", 0.1, 0.1, "dense")
    with pytest.raises(ValueError, match="mean_bound"):
        trpl_fast.TrustRegionProjection("frob", 0.0, 0.1)
    with pytest.raises(ValueError, match="entropy_schedule is required"):
        trpl_fast.TrustRegionProjection("frob", 0.1, 0.1, entropy_control="ineq")
    with pytest.raises(ValueError, match="entropy_control"):
        trpl_fast.TrustRegionProjection("frob", 0.1, 0.1, entropy_control="up")


@pytest.mark.parametrize("form", ["diag", "full"])
def test_frob_float64_variance_overflow_is_refused(form):
    """Issue 13.3: a float64 std whose square overflows cannot be projected by Frobenius
    (it works with variances): a clear error, not a NaN."""
    case = list(make_case("frob", form, (4,), 3))
    case[1] = case[1].clone()
    case[1][2] = case[1][2] * 1e160
    call = call_diag if form == "diag" else call_full
    with pytest.raises(ValueError, match="too large for kind='frob' in float64"):
        call(case)


def test_w2_std_ratio_overflow_is_refused():
    case = [t.float() for t in diag_case()]
    case[1][1, 0], case[3][1, 0] = 1e30, 1e-20
    with pytest.raises(ValueError, match="std / old_std overflows"):
        call_diag(case, kind="w2")


@pytest.mark.parametrize("cond", [1e4, 1e8, 1e12], ids=lambda c: f"cond={c:g}")
def test_frob_full_float32_ill_conditioned_old_factor(cond):
    """Issue 13.2: a float32 old factor of condition number >= 1e8 crashed the Cholesky of
    the projected covariance (torch._C._LinAlgError naming no argument); now computed in
    float64 with the factor from a QR, it projects onto the bound."""
    d = 3
    old = torch.tensor([[1.0, 0.0, 0.0], [0.5, cond**-0.5, 0.0], [0.3, 0.2, 1.0 / cond]], dtype=F64)
    assert torch.linalg.cond(old) >= cond
    old = old.expand(4, d, d).float()
    factor = (old.double() @ torch.diag(torch.tensor([1.5, 0.7, 2.0], dtype=F64))).float()
    mean = torch.zeros(4, d)
    mean_t, factor_t = trpl_fast.project_full(mean, factor, mean, old, kind="frob", mean_bound=0.1, cov_bound=1e-4)
    assert torch.isfinite(factor_t).all()
    from trpl_fast import distances as D

    f = D.cov_part("frob", "full", factor_t.double(), old.double())
    assert torch.allclose(f, torch.full_like(f, 1e-4), rtol=1e-3)


@pytest.mark.parametrize("schedule", ["exp", 3, 0.5], ids=["str", "int", "float"])
def test_layer_entropy_schedule_must_be_a_schedule(schedule):
    """Issue 13.4: a string was accepted and failed later with "'str' object is not callable"."""
    with pytest.raises(ValueError, match="entropy_schedule must be an EntropySchedule"):
        trpl_fast.TrustRegionProjection("frob", 0.1, 0.1, entropy_control="ineq", entropy_schedule=schedule)


@pytest.mark.parametrize(
    "name,value",
    [
        ("kappa", math.nan),
        ("kappa", math.inf),
        ("initial_entropy", math.nan),
        ("tau", math.nan),
        ("kappa", "1"),
        ("total_steps", 10.5),
    ],
)
def test_entropy_schedule_values(name, value):
    """Issue 13.4: ``kappa=nan`` was accepted and later gave a NaN std."""
    args = dict(kappa=-1.0, total_steps=100, initial_entropy=2.0)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        trpl_fast.EntropySchedule(**args)


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, "1", True], ids=["inf", "nan", "neg", "str", "bool"])
def test_layer_regression_weight(value):
    """Issue 13.4: ``regression_weight=inf`` was accepted."""
    with pytest.raises(ValueError, match="regression_weight"):
        trpl_fast.TrustRegionProjection("frob", 0.1, 0.1, regression_weight=value)
