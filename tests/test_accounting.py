"""Evidence that the accountant never under-reports ε.

``dpexp.accounting`` is cross-checked against Google's ``dp_accounting`` (an independent
implementation of the RDP and PLD accountants), against Opacus' own accountants, and against
brute-force numerical integration of the Rényi divergence; then the ledger, the σ calibration,
the budget stop of a real run and the ε recorded in ``result.json`` are checked.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from scipy import integrate, stats

from dpexp import accounting
from dpexp.accounting import Ledger
from dpexp.train import CONFIG_DIR, run

# (σ, q, steps, δ): noise from weak to strong, sampling rates of real DP-SGD runs
# (B/N = 256/60000 ≈ 0.004 up to 0.02), short and long runs, small and large δ.
GRID = list(itertools.product((0.8, 1.0, 2.0), (0.004, 0.02), (50, 1000), (1e-5, 1e-3)))


def _ids(case: tuple) -> str:
    sigma, q, steps, delta = case
    return f"s{sigma}-q{q}-n{steps}-d{delta:g}"


def _event(sigma: float, q: float, steps: int) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, gaussian), steps
    )


@pytest.fixture(autouse=True, scope="module")
def _quiet_google_accountant():
    # dp_accounting logs a warning per fractional order it cannot evaluate; noise in -q runs.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_rdp_matches_google_rdp_accountant(case):
    sigma, q, steps, delta = case
    google = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    google.compose(_event(sigma, q, steps))
    expected = google.get_epsilon(delta)
    assert accounting.epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_prv_is_never_below_google_pld(case):
    """PRV (Opacus) against PLD (Google), two numerical accountants of the same mechanism.

    Google's PLD accountant discretizes with ``pessimistic_estimate=True`` (connect-the-dots):
    its ε is an *upper* bound on the true ε that tightens as the interval shrinks (1e-3 → 1e-4
    lowers it by at most 3e-3 at the points tried). So prv ≥ PLD − 1e-3 ≥ true ε − 1e-3: prv
    does not under-report. PRV itself returns its upper estimate with ``eps_error=0.01``, so
    it may exceed PLD by about that much.
    """
    sigma, q, steps, delta = case
    google = pld.PLDAccountant(value_discretization_interval=1e-3)
    google.compose(_event(sigma, q, steps))
    pld_eps = google.get_epsilon(delta)
    prv_eps = accounting.epsilon(sigma, q, steps, delta, "prv")
    assert prv_eps >= pld_eps - 1e-3
    assert prv_eps <= pld_eps + 0.02  # and it is tight, not merely safe


def _brute_force_rdp(sigma: float, q: float, alpha: float) -> float:
    """D_α(P‖Q), P = (1−q)N(0,σ²) + qN(1,σ²), Q = N(0,σ²), by numerical integration."""

    def integrand(x: float) -> float:
        ratio = (1 - q) + q * math.exp((2 * x - 1) / (2 * sigma**2))  # P(x)/Q(x)
        return stats.norm.pdf(x, 0, sigma) * ratio**alpha

    value, _ = integrate.quad(integrand, -40, 40, epsabs=0, epsrel=1e-12, limit=500)
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize("alpha", [1.1, 1.5, 2.0, 2.5, 3.5, 8.0])
@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.05), (0.8, 0.02), (2.0, 0.004)])
def test_rdp_of_one_step_matches_brute_force_integration(sigma, q, alpha):
    """The RDP curve Opacus (hence dpexp) uses, order by order, against quadrature.

    Google's series for *fractional* orders is larger than the exact divergence (e.g. +35 %
    at α=1.1, σ=1, q=0.05), so at large q, where the best order is fractional, Google's RDP ε
    is looser than ours; this test shows ours is the exact divergence, not an under-estimate.
    """
    ours = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    assert ours == pytest.approx(_brute_force_rdp(sigma, q, alpha), rel=1e-7)


@pytest.mark.parametrize(
    ("accountant", "reference"), [("rdp", RDPAccountant), ("prv", PRVAccountant)]
)
@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), [(1.1, 0.01, 300, 1e-5)])
def test_epsilon_equals_opacus_accountant_stepped(accountant, reference, sigma, q, steps, delta):
    opacus = reference()
    for _ in range(steps):
        opacus.step(noise_multiplier=sigma, sample_rate=q)
    expected = opacus.get_epsilon(delta=delta)
    assert accounting.epsilon(sigma, q, steps, delta, accountant) == pytest.approx(
        expected, rel=1e-9
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 0.004, 1000), (4.0, 0.02, 300)])
def test_calibrated_sigma_meets_target(accountant, target, q, steps):
    delta = 1e-5
    sigma = accounting.noise_multiplier(target, q, steps, delta, accountant)
    spent = accounting.epsilon(sigma, q, steps, delta, accountant)
    assert spent <= target
    assert spent >= target - 0.02  # calibration is tight (tolerance 0.01 in ε)
    assert accounting.epsilon(0.98 * sigma, q, steps, delta, accountant) > spent


def test_calibrated_sigma_with_extra_mechanism_meets_target():
    extra = [(5.0, 0.02)]  # e.g. a noisy validation test per step
    sigma = accounting.noise_multiplier(3.0, 0.02, 200, 1e-5, "rdp", extra_mechanisms=extra)
    history = [(sigma, 0.02, 200), (5.0, 0.02, 200)]
    spent = accounting.epsilon_of_history(history, 1e-5, "rdp")
    assert 3.0 - 0.02 <= spent <= 3.0
    assert sigma > accounting.noise_multiplier(3.0, 0.02, 200, 1e-5, "rdp")


@pytest.mark.parametrize(("accountant", "steps"), [("rdp", 50), ("prv", 15)])
def test_ledger_grouping_equals_step_by_step_history(accountant, steps):
    """Two mechanisms per step: the ledger's grouped counts against Opacus' ungrouped history
    (Opacus only merges consecutive equal steps, so here it keeps all 2×steps entries)."""
    per_step = [(1.2, 0.02), (4.0, 0.05)]
    ledger = Ledger(delta=1e-5, accountant=accountant)
    opacus = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        ledger.record(per_step)
        for sigma, q in per_step:
            opacus.step(noise_multiplier=sigma, sample_rate=q)
    assert len(opacus.history) == 2 * steps and len(ledger.history()) == 2
    assert ledger.epsilon() == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_steps_within_budget_is_exact(accountant):
    ledger = Ledger(delta=1e-5, accountant=accountant)
    ledger.record([(1.0, 0.02)], times=40)  # some budget already spent
    step = [(1.0, 0.02)]
    n = ledger.steps_within_budget(step, target_epsilon=2.0, upper=2_000)
    assert 0 < n < 2_000
    assert ledger.epsilon(step, n) <= 2.0 < ledger.epsilon(step, n + 1)
    assert ledger.steps_within_budget(step, 2.0, upper=n - 3) == n - 3  # the plan fits
    ledger.record(step, times=n + 1)
    assert ledger.steps_within_budget(step, 2.0, upper=100) == 0  # already over budget


def _assert_rederivable(result: dict) -> None:
    """result.json's ε is exactly the accountant applied to its own recorded history, and that
    history holds the gradient mechanism (σ, q) at least once per recorded step."""
    history = [tuple(h) for h in result["accountant_history"]]
    again = accounting.epsilon_of_history(history, result["delta"], result["accountant"])
    assert result["epsilon"] == pytest.approx(again, rel=1e-12)
    sigma_q = (result["noise_multiplier"], result["sample_rate"])
    assert any((s, q) == pytest.approx(sigma_q) and n >= result["steps"] for s, q, n in history)


def test_budget_stop_fires_in_a_real_run(tiny_cfg, tmp_path):
    # q = 32/128; σ = 1 allows 5 of the 12 planned steps under ε = 3, δ = 1e-3 (prv).
    cfg = tiny_cfg("privacy.noise_multiplier=1.0", "privacy.epsilon=3", "trainer.max_epochs=3")
    result = run(cfg, tmp_path / "run")
    assert result["planned_steps"] == 12
    assert 0 < result["steps"] < 12
    assert result["budget_stop"] is True
    assert result["epsilon"] <= 3.0
    assert accounting.epsilon(1.0, 0.25, result["steps"] + 1, 1e-3, "prv") > 3.0
    _assert_rederivable(result)


def test_calibrated_run_result_is_rederivable(tiny_cfg, tmp_path):
    # rdp here; the budget-stop run above re-derives a prv result
    cfg = tiny_cfg("privacy.accountant=rdp", "privacy.epsilon=2")
    result = run(cfg, tmp_path / "run")
    assert result["budget_stop"] is False and result["steps"] == result["planned_steps"] == 4
    assert result["epsilon"] <= 2.0
    _assert_rederivable(result)


# One tiny run per method (rgp at rank 4; screen with its private noisy test, which adds a
# second mechanism to every step). A new conf/method/*.yaml must be added here.
METHOD_RUNS = {
    "dpsgd": [],
    "freeze": ["method=freeze"],
    "select": ["method=select"],
    "freeze_select": ["method=freeze_select"],
    "rgp": ["method=rgp", "rgp.rank=4"],
    "screen": ["method=screen", "screen.validation=private_noisy", "screen.val_batch=16"],
}


def test_every_method_config_is_covered():
    configs = {p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml")}
    assert configs == set(METHOD_RUNS)


# dpsgd runs in the tests above; freeze_select only multiplies the masks of freeze and select.
@pytest.mark.parametrize("method", ["freeze", "select", "rgp", "screen"])
def test_every_method_result_is_rederivable(tiny_cfg, tmp_path, method):
    fixed_sigma = ["privacy.noise_multiplier=1.0", "privacy.epsilon=10", "privacy.accountant=rdp"]
    result = run(tiny_cfg(*METHOD_RUNS[method], *fixed_sigma), tmp_path / "run")
    assert result["method"] == method and result["steps"] > 0
    assert result["epsilon"] <= 10.0
    _assert_rederivable(result)
    if method == "screen":  # the noisy test is accounted as its own mechanism
        assert len(result["accountant_history"]) == 2
