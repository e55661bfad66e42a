"""Value checks that do not block the host (issue 12): ``check_values="deferred"`` (the
default on CUDA) raises a bad input's ``ValueError`` at a later checked call or at
``trpl_fast.raise_deferred_errors()``; ``"sync"`` (the default on the CPU) in the call.
The CPU cases force the deferred mode; the CUDA ones run on the lent GPU machine."""

from __future__ import annotations

import pytest
import torch

import trpl_fast
from trpl_fast.ops import validation

from .helpers import make_case


@pytest.fixture(autouse=True)
def no_pending_checks():
    """Each test starts and ends with no deferred check in flight."""
    validation._pending.clear()
    yield
    validation._pending.clear()


def kl_diag(case, **kw):
    return trpl_fast.project_diag(*case, kind="kl", mean_bound=0.1, cov_bound=0.05, **kw)


def good_case(device="cpu"):
    return [t.to(device) for t in make_case("kl", "diag", (6,), 3)]


def bad_case(device="cpu"):
    case = good_case(device)
    case[1] = case[1].clone()
    case[1][2, 1] = -1.0  # a negative std
    return case


def test_sync_is_the_cpu_default_and_raises_in_the_call():
    assert validation.check_mode(True, torch.device("cpu")) == "sync"
    with pytest.raises(ValueError, match=r"^std must be > 0 everywhere$"):
        kl_diag(bad_case())
    assert trpl_fast.pending_value_checks() == 0


def test_deferred_raises_at_the_next_checked_call():
    """The bad call returns (its outputs are not to be trusted); the next checked call
    raises the same message, marked deferred, before it computes anything; the one after
    runs."""
    kl_diag(bad_case(), check_values="deferred")
    assert trpl_fast.pending_value_checks() == 1
    with pytest.raises(ValueError, match=r"^std must be > 0 everywhere \(deferred value check"):
        kl_diag(good_case(), check_values="deferred")
    assert trpl_fast.pending_value_checks() == 0
    kl_diag(good_case(), check_values="deferred")
    assert trpl_fast.pending_value_checks() == 1  # its own checks, unread until the next call
    trpl_fast.raise_deferred_errors()  # they pass
    assert trpl_fast.pending_value_checks() == 0


def test_deferred_raises_at_the_explicit_check_and_names_the_argument():
    case = good_case()
    case[2] = case[2].clone()
    case[2][0, 0] = float("nan")
    kl_diag(case, check_values="deferred")
    with pytest.raises(ValueError, match=r"^old_mean has non-finite values .*deferred value check"):
        trpl_fast.raise_deferred_errors()
    trpl_fast.raise_deferred_errors()  # nothing left


def test_deferred_good_inputs_raise_nothing_and_match_the_sync_results():
    case = good_case()
    got = kl_diag(case, check_values="deferred")
    want = kl_diag(case, check_values="sync")
    trpl_fast.raise_deferred_errors()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_checks_in_flight_are_bounded(monkeypatch):
    """A caller that never reads the checks: beyond MAX_PENDING_CHECKS the oldest is waited
    for and read (here: it had failed, so that call raises)."""
    monkeypatch.setattr(validation, "MAX_PENDING_CHECKS", 2)
    waited = []
    never_ready = validation._Deferred(("std must be > 0 everywhere",), torch.tensor([False]), lambda: False, None)
    for i in range(2):
        validation._pending.append(never_ready._replace(wait=lambda i=i: waited.append(i)))
    with pytest.raises(ValueError, match="std must be > 0"):
        kl_diag(good_case(), check_values="deferred")
    assert waited == [0]


@pytest.mark.parametrize("bad", ["yes", 1, None, "Sync"], ids=repr)
def test_bad_check_values_is_refused(bad):
    with pytest.raises(ValueError, match="check_values must be True, False, 'sync' or 'deferred'"):
        kl_diag(good_case(), check_values=bad)
    with pytest.raises(ValueError, match="check_values must be"):
        trpl_fast.TrustRegionProjection("kl", 0.1, 0.05, check_values=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_default_is_deferred_and_raises_later():
    """On CUDA the default does not read the checks in the call; the bad input's error
    comes at the explicit check (or the next checked call once its copy has arrived)."""
    assert validation.check_mode(True, torch.device("cuda")) == "deferred"
    kl_diag(bad_case("cuda"))
    assert trpl_fast.pending_value_checks() == 1
    with pytest.raises(ValueError, match=r"^std must be > 0 everywhere \(deferred value check"):
        trpl_fast.raise_deferred_errors()
    with pytest.raises(ValueError, match=r"^std must be > 0 everywhere$"):
        kl_diag(bad_case("cuda"), check_values="sync")
