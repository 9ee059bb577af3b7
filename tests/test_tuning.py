"""Privacy of a hyper-parameter search: the truncated negative binomial number of trials and
Papernot & Steinke's bound (ICLR 2022, Thm 2) against values derived independently; 3-trial
Optuna searches end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpexp import tuning
from dpexp.accounting import epsilon_of_history
from dpexp.errors import ConfigError
from dpexp.results import RESULT_FILE, read_result
from tests.test_preemption import ENV, REPO, TINY_CLI

TNB = [(1.0, 1 / 3), (0.0, 0.1), (-0.5, 0.2), (2.5, 0.4)]  # geometric, logarithmic, ...


def pmf(eta: float, gamma: float, k_max: int = 4000) -> np.ndarray:
    """P[K=k], k = 1..k_max, from the definition ∝ (1−γ)^k ∏_{l<k} (l+η)/(l+1) (all factors
    share the sign of η; η = 0 is the limit (1−γ)^k / k), normalised by summation (not by
    the closed form under test)."""
    k = np.arange(1, k_max + 1)
    factors = np.abs(k - 1 + eta) / k
    if eta == 0:
        factors[0] = 1.0  # ∏/η → 1/k
    log_terms = k * math.log(1 - gamma) + np.cumsum(np.log(factors))
    weights = np.exp(log_terms - log_terms.max())
    return weights / weights.sum()


@pytest.mark.parametrize(("eta", "gamma"), TNB)
def test_tnb_mean_and_first_mass_match_summation(eta, gamma):
    p = pmf(eta, gamma)
    assert tuning.tnb_mean(eta, gamma) == pytest.approx((np.arange(1, len(p) + 1) * p).sum(),
                                                        rel=1e-9)  # fmt: skip
    assert tuning.tnb_pmf_1(eta, gamma) == pytest.approx(p[0], rel=1e-9)
    assert tuning.tnb_mean(1.0, 0.25) == pytest.approx(4.0)  # geometric: 1/γ


@pytest.mark.parametrize(("eta", "gamma"), TNB[:2])
def test_drawn_trials_follow_the_distribution(eta, gamma):
    rng = np.random.default_rng(0)
    draws = np.array([tuning.draw_trials(eta, gamma, rng.random) for _ in range(20000)])
    p = pmf(eta, gamma)
    mean = (np.arange(1, len(p) + 1) * p).sum()
    sd = math.sqrt((np.arange(1, len(p) + 1) ** 2 * p).sum() - mean**2)
    assert draws.min() >= 1
    assert abs(draws.mean() - mean) < 4 * sd / math.sqrt(len(draws))
    for k in (1, 2, 3):  # each frequency within 4 standard errors
        se = math.sqrt(p[k - 1] * (1 - p[k - 1]) / len(draws))
        assert abs((draws == k).mean() - p[k - 1]) < 4 * se


@pytest.mark.parametrize(("eta", "gamma"), TNB)
def test_bound_for_a_gaussian_mechanism_equals_its_closed_form(eta, gamma):
    """ε(λ) = ρλ (Gaussian mechanism): minimising (1+η)[(λ̂−1)ρ + log(1/γ)/λ̂] over λ̂ gives
    λ̂* = sqrt(log(1/γ)/ρ) and (1+η)(2 sqrt(ρ log(1/γ)) − ρ), derived by hand."""
    rho = 0.05
    orders = np.linspace(1.001, 400, 400_000)
    bound = tuning.random_stopping_rdp(orders, rho * orders, eta, gamma)
    log_inv_gamma = math.log(1 / gamma)
    assert math.sqrt(log_inv_gamma / rho) < 400  # λ̂* inside the grid
    by_hand = (
        rho * orders
        + (1 + eta) * (2 * math.sqrt(rho * log_inv_gamma) - rho)
        + math.log(tuning.tnb_mean(eta, gamma)) / (orders - 1)
    )
    np.testing.assert_allclose(bound, by_hand, rtol=1e-6)


def renyi_bernoulli(a: float, b: float, order: float) -> float:
    return math.log(a**order * b ** (1 - order) + (1 - a) ** order * (1 - b) ** (1 - order)) / (
        order - 1
    )


@pytest.mark.parametrize(("eta", "gamma"), TNB)
def test_bound_holds_for_the_exact_divergence_of_a_best_of_k(eta, gamma):
    """A toy trial: a score of 1 with probability 0.3 on D and 0.2 on D'. The best of K is 1
    with probability 1 − E[(1−p)^K]; its exact Rényi divergence must stay below the bound."""
    p_d, p_d2 = 0.3, 0.2
    orders = tuning.ORDERS
    trial = np.array([max(renyi_bernoulli(p_d, p_d2, a), renyi_bernoulli(p_d2, p_d, a))
                      for a in orders])  # fmt: skip
    masses = pmf(eta, gamma)
    k = np.arange(1, len(masses) + 1)
    best_d, best_d2 = (1 - (masses * (1 - p) ** k).sum() for p in (p_d, p_d2))
    exact = np.array([max(renyi_bernoulli(best_d, best_d2, a), renyi_bernoulli(best_d2, best_d, a))
                      for a in orders])  # fmt: skip
    bound = tuning.random_stopping_rdp(orders, trial, eta, gamma)
    assert (exact <= bound).all()


def test_bad_distribution_is_one_line():
    with pytest.raises(ConfigError, match=r"tuning\.gamma=1\.5 is invalid"):
        tuning.check_tnb(1.0, 1.5)
    with pytest.raises(ConfigError, match=r"tuning\.eta=-2 is invalid"):
        tuning.check_tnb(-2, 0.5)


def search(sweep_dir: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "dpexp.train", f"hparams_search={name}", *TINY_CLI,
        "trainer.max_epochs=1", f"hydra.sweep.dir={sweep_dir}", *extra,
    ]  # fmt: skip
    out = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def trial_results(sweep_dir: Path) -> list[dict]:
    return [read_result(p.parent) for p in sorted(sweep_dir.glob(f"*/{RESULT_FILE}"))]


@pytest.mark.slow  # a 3-trial Optuna search in a subprocess
def test_tpe_search_reports_all_trials_composed(tmp_path):
    sweep_dir = tmp_path / "search"
    out = search(sweep_dir, "lr_clip_optuna", "hydra.sweeper.n_trials=3")
    print(out.stdout)
    trials = trial_results(sweep_dir)
    assert len(trials) == 3
    assert len({(t["max_grad_norm"], json.dumps(t["accountant_history"])) for t in trials}) == 3
    summary = json.loads((sweep_dir / tuning.SUMMARY_FILE).read_text())
    assert summary["statement"] in out.stdout
    every_step = [m for t in trials for m in t["accountant_history"]]
    assert summary["epsilon"] == epsilon_of_history(every_step, 1e-3, "rdp")
    assert summary["epsilon"] > 1.4 * max(t["epsilon"] for t in trials)  # not one trial's ε
    assert summary["best_test_acc"] == max(t["test_acc"] for t in trials)
    for trial in trials:
        assert "one trial of a hyper-parameter search" in trial["tuning"]


@pytest.mark.slow  # a 3-trial Optuna search in a subprocess
def test_random_stopping_search_uses_the_drawn_k_and_reports_theorem_2(tmp_path):
    sweep_dir = tmp_path / "search"
    sweep_dir.mkdir()
    drawn = {"accounting": "random_stopping", "eta": 1.0, "gamma": 1 / 3, "trials": 3}
    (sweep_dir / tuning.TRIALS_FILE).write_text(json.dumps(drawn))  # K=3 drawn earlier
    out = search(sweep_dir, "lr_clip_private", "tuning.gamma=0.3333333333333333")
    print(out.stdout)
    trials = trial_results(sweep_dir)
    assert len(trials) == 3 and len({t["seed"] for t in trials}) == 3  # independent runs
    summary = json.loads((sweep_dir / tuning.SUMMARY_FILE).read_text())
    assert summary["statement"] in out.stdout and "Thm 2" in summary["statement"]
    history = [tuple(m) for m in trials[0]["accountant_history"]]
    expected = tuning.random_stopping_epsilon(history, 1e-3, 1.0, 1 / 3)
    assert summary["epsilon"] == pytest.approx(expected)
    assert summary["expected_trials"] == pytest.approx(3.0)
    assert max(t["epsilon"] for t in trials) < summary["epsilon"]
    # E[K] = 3 costs about as much as 3 trials composed (4.87 vs 4.78); the bound pays off
    # with more trials: E[K] = 10 (gamma=0.1) vs 10 trials composed
    assert summary["epsilon"] < 1.05 * epsilon_of_history(history * 3, 1e-3, "rdp")
    many = tuning.random_stopping_epsilon(history, 1e-3, 1.0, 0.1)
    assert many < 0.75 * epsilon_of_history(history * 10, 1e-3, "rdp")


def test_random_stopping_draws_k_once_before_the_search(tiny_cfg, tmp_path):
    cfg = tiny_cfg("hparams_search=lr_clip_private", f"hydra.sweep.dir={tmp_path / 's'}")
    callback = tuning.SearchPrivacy()
    callback.on_multirun_start(cfg)
    drawn = json.loads((tmp_path / "s" / tuning.TRIALS_FILE).read_text())
    assert drawn["trials"] >= 1 and cfg.hydra.sweeper.n_trials == drawn["trials"]
    again = tiny_cfg("hparams_search=lr_clip_private", f"hydra.sweep.dir={tmp_path / 's'}")
    callback.on_multirun_start(again)  # a re-run keeps K
    assert again.hydra.sweeper.n_trials == drawn["trials"]
    tpe = tiny_cfg("hparams_search=lr_clip_private", "hydra/sweeper/sampler=tpe",
                   f"hydra.sweep.dir={tmp_path / 't'}")  # fmt: skip
    with pytest.raises(SystemExit):
        callback.on_multirun_start(tpe)
