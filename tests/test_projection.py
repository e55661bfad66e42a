"""TrustRegionProjection: entropy control and schedules, the regression loss, the metrics;
and the parametrized distances it uses, against the dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import trpl_fast
from trpl_fast import distances as D
from trpl_fast import reference as R

from .helpers import F64, assert_close, make_case

KINDS = ["frob", "w2", "kl"]
FORMS = ["diag", "full"]


def dense(kind, form, p):
    if form == "diag":
        return torch.diag_embed(p * p)
    return p @ p if kind == "w2" else p @ p.mT


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_distances_match_reference(kind, form):
    mean, cov, old_mean, old_cov = make_case(kind, form, (41,), 7, conditioning="ill")
    s, so = dense(kind, form, cov), dense(kind, form, old_cov)
    assert_close(D.maha(kind, form, mean, old_mean, old_cov), R.maha(mean, old_mean, so), 1e-10, "maha")
    assert_close(D.kl(kind, form, mean, cov, old_mean, old_cov), R.kl(mean, s, old_mean, so), 1e-9, "kl")
    assert_close(D.entropy(kind, form, cov), R.entropy(s), 1e-12, "entropy")
    if kind == "w2":
        q, qo = (torch.diag_embed(cov), torch.diag_embed(old_cov)) if form == "diag" else (cov, old_cov)
        expect = R.w2_distance(q, qo)
    else:
        expect = R.cov_distance(kind, s, so)
    assert_close(D.cov_part(kind, form, cov, old_cov), expect, 1e-9, "cov part")


def schedule(**kw):
    args = dict(kappa=-1.0, total_steps=100, initial_entropy=4.0, tau=0.5)
    args.update(kw)
    return trpl_fast.EntropySchedule(**args)


def test_exponential_schedule_values():
    sched = schedule()
    d = 3
    assert sched(0, d) == pytest.approx(4.0)
    assert sched(100, d) == pytest.approx(-3.0 + 7.0 * 0.5**10)
    assert sched(50, d) == pytest.approx(-3.0 + 7.0 * 0.5**5)


def test_linear_schedule_values():
    sched = schedule(kind="linear")
    assert sched(0, 3) == pytest.approx(4.0)
    assert sched(50, 3) == pytest.approx(0.5)
    assert sched(100, 3) == pytest.approx(-3.0)
    assert sched(1000, 3) == pytest.approx(-3.0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["ineq", "eq"])
def test_entropy_control(kind, form, mode):
    mean, cov, old_mean, old_cov = make_case(kind, form, (64,), 4, seed=5)
    h_before = D.entropy(
        kind, form, trpl_fast.TrustRegionProjection(kind, 0.1, 0.05, form)(mean, cov, old_mean, old_cov)[1]
    )
    beta = float(h_before.median())  # half the rows below, half above
    sched = schedule(initial_entropy=beta, kappa=beta / 4, total_steps=10)
    layer = trpl_fast.TrustRegionProjection(kind, 0.1, 0.05, form, entropy_control=mode, entropy_schedule=sched)
    _, cov_t = layer(mean, cov, old_mean, old_cov, step=0)
    h = D.entropy(kind, form, cov_t)
    if mode == "eq":
        assert_close(h, torch.full_like(h, beta), 1e-12, "entropy (eq)")
    else:
        below = h_before < beta
        assert_close(h[below], torch.full_like(h[below], beta), 1e-12, "entropy raised to beta")
        assert_close(h[~below], h_before[~below], 1e-12, "entropy above beta unchanged")
    with pytest.raises(ValueError, match="step is required"):
        layer(mean, cov, old_mean, old_cov)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("contextual", [False, True], ids=["global", "contextual"])
def test_trust_region_loss(kind, form, contextual):
    mean, cov, old_mean, old_cov = make_case(kind, form, (32,), 3, seed=9)
    layer = trpl_fast.TrustRegionProjection(kind, 0.05, 0.02, form, contextual_cov=contextual, regression_weight=2.0)
    mean = mean.clone().requires_grad_(True)
    cov = cov.clone().requires_grad_(True)
    mean_t, cov_t = layer(mean, cov, old_mean, old_cov)
    loss = layer.trust_region_loss(mean, cov, mean_t, cov_t)
    # the mean part: 2 * mean(maha(mu, mu_t; S_t)) (halved for KL)
    expect = 2.0 * R.mean_distance(kind, mean, mean_t, dense(kind, form, cov_t.detach())).mean()
    if contextual:
        if kind == "frob":
            expect = expect + 2.0 * ((cov - cov_t.detach()) ** 2).flatten(1).sum(-1).mean()
        elif kind == "kl":
            expect = expect + 2.0 * R.kl_cov(dense(kind, form, cov), dense(kind, form, cov_t.detach())).mean()
        else:
            q, qt = (
                (torch.diag_embed(cov), torch.diag_embed(cov_t.detach())) if form == "diag" else (cov, cov_t.detach())
            )
            expect = expect + 2.0 * R.w2_distance(q, qt).mean()
    assert_close(loss, expect, 1e-10, "loss")
    g_mean, g_cov = torch.autograd.grad(loss, [mean, cov], allow_unused=True)
    assert torch.isfinite(g_mean).all() and g_mean.abs().sum() > 0
    if contextual:
        assert g_cov is not None and torch.isfinite(g_cov).all() and g_cov.abs().sum() > 0
    else:  # a global covariance is copied, not regressed
        assert g_cov is None or g_cov.abs().sum() == 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_metrics(kind, form):
    mean, cov, old_mean, old_cov = make_case(kind, form, (200,), 5, seed=21, inside_fraction=0.3)
    layer = trpl_fast.TrustRegionProjection(kind, 0.1, 0.05, form)
    mean_t, cov_t = layer(mean, cov, old_mean, old_cov)
    m = layer.metrics(mean_t, cov_t, old_mean, old_cov, mean, cov)
    s_t, so = dense(kind, form, cov_t), dense(kind, form, old_cov)
    kl = R.kl(mean_t, s_t, old_mean, so)
    assert m["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-9)
    assert m["kl_max"] == pytest.approx(kl.max().item(), rel=1e-9)
    assert m["constraint_mean_max"] <= 0.1 * (1 + 1e-9)
    if kind == "kl":
        assert m["nonconverged_states"] == 0.0
    assert m["constraint_cov_max"] <= 0.05 * (1 + 1e-9)
    assert m["entropy_mean"] == pytest.approx(R.entropy(s_t).mean().item(), rel=1e-9)
    violated = (R.mean_distance(kind, mean, old_mean, so) > 0.1) | (D.cov_part(kind, form, cov, old_cov) > 0.05)
    assert m["fraction_projected"] == pytest.approx(violated.double().mean().item())
    assert 0.0 < m["fraction_projected"] < 1.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())


def test_per_state_bounds_through_layer():
    mean, cov, old_mean, old_cov = make_case("w2", "diag", (8,), 3, inside_fraction=0.0)
    layer = trpl_fast.TrustRegionProjection("w2", 0.1, 0.05)
    cb = torch.linspace(0.01, 0.2, 8, dtype=F64)
    _, cov_t = layer(mean, cov, old_mean, old_cov, cov_bound=cb)
    assert_close(D.cov_part("w2", "diag", cov_t, old_cov), cb, 1e-12, "per-state bound")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_metrics_of_an_empty_batch(kind, form):
    """Issue 13.4: the forward handles an empty batch, metrics crashed on it."""
    mean, cov, old_mean, old_cov = (t[:0] for t in make_case(kind, form, (4,), 3))
    layer = trpl_fast.TrustRegionProjection(kind, 0.1, 0.05, form)
    mean_t, cov_t = layer(mean, cov, old_mean, old_cov)
    m = layer.metrics(mean_t, cov_t, old_mean, old_cov, mean, cov)
    assert math.isnan(m["kl_mean"]) and math.isnan(m["fraction_projected"])
    assert m.get("nonconverged_states", 0.0) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_fraction_projected_uses_per_state_bounds(kind):
    """Issue 13.4: ``fraction_projected`` compared with the layer's floats even when the
    forward used per-state bounds."""
    mean, cov, old_mean, old_cov = make_case(kind, "diag", (50,), 3, seed=4, inside_fraction=0.0)
    layer = trpl_fast.TrustRegionProjection(kind, 0.1, 0.05)
    cb = torch.full((50,), 1e6, dtype=F64)  # nothing violates the covariance bound
    mb = torch.full((50,), 1e6, dtype=F64)
    mean_t, cov_t = layer(mean, cov, old_mean, old_cov, mean_bound=mb, cov_bound=cb)
    m = layer.metrics(mean_t, cov_t, old_mean, old_cov, mean, cov, mean_bound=mb, cov_bound=cb)
    assert m["fraction_projected"] == 0.0


def test_metrics_flags_belong_to_the_batch_given():
    """Issue 13.4: metrics reused the convergence flags of the last forward for any batch.
    Here the first batch has unconverged rows (one Newton iteration), the second none: the
    metrics of each batch report its own flags, whichever forward ran last."""
    from trpl_fast.ops import kl as kl_ops

    bad = make_case("kl", "diag", (16,), 7, seed=1, inside_fraction=0.0)
    bad = (bad[0], bad[1] * 30.0, bad[2], bad[3])
    good = make_case("kl", "diag", (8,), 7, seed=2)
    layer = trpl_fast.TrustRegionProjection("kl", 1.0, 1e-3)
    old_iter = kl_ops.MAX_ITER
    try:
        kl_ops.MAX_ITER = 1
        bad_t = layer(*bad)
        n_bad = int((~layer.last_converged).sum())
        assert n_bad > 0
        good_t = layer(*good)  # the last forward converges everywhere
        with pytest.warns(RuntimeWarning, match="did not converge"):
            # recomputed from the unprojected policy of the batch given
            assert layer.metrics(*bad_t, bad[2], bad[3], bad[0], bad[1])["nonconverged_states"] == n_bad
        bad_t = layer(*bad)
    finally:
        kl_ops.MAX_ITER = old_iter
    # the last forward's flags belong to bad_t, not to good_t: good_t's are left out
    assert "nonconverged_states" not in layer.metrics(*good_t, good[2], good[3])
    with pytest.warns(RuntimeWarning, match="did not converge"):
        assert layer.metrics(*bad_t, bad[2], bad[3])["nonconverged_states"] == n_bad
