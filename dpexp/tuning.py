"""What a hyper-parameter search on private data costs in privacy, reported with its result.

Every trial of a search trains on the private data, and the best trial is chosen by looking at
all of them: the released result (model, hyper-parameters, score) is not as private as one
trial. ``tuning.accounting`` (conf/hparams_search/*.yaml) says how the search is accounted:

``composition`` (an adaptive search, e.g. Optuna's TPE): each trial's hyper-parameters depend
on earlier trials' scores, so the search is an adaptive composition of all its trials, and
releasing the best one is post-processing. Its ε composes every step of every trial with the
trials' own accountant (valid adaptively); it grows with the number of trials.

``random_stopping`` (Papernot & Steinke, "Hyperparameter Tuning with Renyi Differential
Privacy", ICLR 2022, Theorem 2): the number of trials K is drawn once, before the search, from
the truncated negative binomial distribution D_{η,γ}; each trial draws its hyper-parameters
and its seed independently of the others (Optuna's RandomSampler), and only the best trial is
released. If one trial is (λ, ε(λ))-RDP and (λ̂, ε(λ̂))-RDP, the released best is (λ, ε'(λ))-RDP:

    ε'(λ) = ε(λ) + (1+η)(1 − 1/λ̂) ε(λ̂) + (1+η) log(1/γ) / λ̂ + log E[K] / (λ − 1),

with λ̂ ≥ 1 free (minimised here over Opacus' orders) and E[K] the mean of D_{η,γ}; ε' is then
converted to (ε, δ) as Opacus converts RDP. The cost does not grow with K, only with log E[K].

Both treat the score that picks the best trial (the test split's accuracy) as public: the
guarantees protect the training set.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, flag_override, read_write
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from dpexp.accounting import epsilon_of_history
from dpexp.errors import ConfigError, UserError
from dpexp.results import RESULT_FILE, read_result, write_json_atomic
from dpexp.sweep import read_job

log = logging.getLogger(__name__)

ACCOUNTING = ("composition", "random_stopping")
TRIALS_FILE = "tuning_trials.json"  # K, drawn once per sweep dir before the first trial
SUMMARY_FILE = "tuning.json"  # what the search cost, written when it ends
ORDERS = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
History = Sequence[tuple[float, float, int]]


# -- the truncated negative binomial distribution D_{η,γ} on {1, 2, ...} -----------------
def check_tnb(eta: float, gamma: float) -> None:
    if not (isinstance(eta, int | float) and eta > -1):
        raise ConfigError(f"tuning.eta={eta!r} is invalid: a number > -1 (1: geometric)")
    if not (isinstance(gamma, int | float) and 0 < gamma < 1):
        raise ConfigError(f"tuning.gamma={gamma!r} is invalid: a number in (0, 1)")


def tnb_ratio(k: int, eta: float, gamma: float) -> float:
    """P[K = k+1] / P[K = k] = (1 − γ)(k + η)/(k + 1)."""
    return (1 - gamma) * (k + eta) / (k + 1)


def tnb_pmf_1(eta: float, gamma: float) -> float:
    """P[K = 1] = (1 − γ) η / (γ^{−η} − 1), or (1 − γ)/log(1/γ) for η = 0."""
    if eta == 0:
        return (1 - gamma) / math.log(1 / gamma)
    return (1 - gamma) * eta / (gamma**-eta - 1)


def tnb_mean(eta: float, gamma: float) -> float:
    """E[K] = η(1 − γ)/(γ(1 − γ^η)), or (1/γ − 1)/log(1/γ) for η = 0."""
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def draw_trials(eta: float, gamma: float, uniform: Callable[[], float]) -> int:
    """K ~ D_{η,γ} by inversion: the smallest k with P[K ≤ k] ≥ u."""
    u, k, p = uniform(), 1, tnb_pmf_1(eta, gamma)
    cdf = p
    while cdf < u and p > 0:
        p *= tnb_ratio(k, eta, gamma)
        k, cdf = k + 1, cdf + p
    return k


# -- Theorem 2 -----------------------------------------------------------------------------
def random_stopping_rdp(
    orders: np.ndarray, rdp: np.ndarray, eta: float, gamma: float
) -> np.ndarray:
    """ε'(λ) at each order λ of ``orders`` for one trial's RDP curve ``rdp`` (λ̂ ∈ orders)."""
    orders, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    check_tnb(eta, gamma)
    selection = (1 + eta) * ((1 - 1 / orders) * rdp + math.log(1 / gamma) / orders)
    return rdp + selection.min() + math.log(tnb_mean(eta, gamma)) / (orders - 1)


def trial_rdp(history: History, orders: np.ndarray = ORDERS) -> np.ndarray:
    """RDP curve of one trial: its ``(σ, q, steps)`` mechanisms composed."""
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total += np.asarray(
            compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
        )
    return total


def random_stopping_epsilon(
    history: History, delta: float, eta: float, gamma: float, orders: np.ndarray = ORDERS
) -> float:
    """(ε, δ) of the best of K ~ D_{η,γ} trials, each with the mechanisms ``history``."""
    rdp = random_stopping_rdp(orders, trial_rdp(history, orders), eta, gamma)
    eps, _ = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps)


# -- the Hydra callback of conf/hparams_search -------------------------------------------
def _trials(sweep_dir: Path, params: Sequence[str]) -> list[dict[str, Any]]:
    """Finished trials, each with the searched parameters' values (from its job.json)."""
    trials = []
    for job in sorted(p.parent for p in sweep_dir.glob(f"*/{RESULT_FILE}")):
        overrides = (read_job(job) or {}).get("overrides", [])
        chosen = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in params)
        trials.append({"job": job.name, "params": chosen, **read_result(job)})
    return trials


def _history(result: dict[str, Any]) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in result["accountant_history"]]


def _config(tuning: DictConfig) -> dict[str, Any]:
    accounting = tuning.get("accounting")
    if accounting not in ACCOUNTING:
        raise ConfigError(
            f"tuning.accounting={accounting!r} is invalid: one of {', '.join(ACCOUNTING)}"
        )
    out = {"accounting": accounting}
    if accounting == "random_stopping":
        check_tnb(tuning.get("eta"), tuning.get("gamma"))
        out |= {"eta": float(tuning.eta), "gamma": float(tuning.gamma)}
    return out


class SearchPrivacy(HydraCallback):
    """Draws K before a ``random_stopping`` search; reports what any search cost when it ends
    (printed, and ``tuning.json`` in the sweep dir)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            settings = _config(config.tuning)
            if settings["accounting"] == "random_stopping":
                self._fix_trials(config, settings)
        except UserError as exc:  # Hydra would turn it into a warning and go on
            print(f"dpexp: error: {exc}", file=sys.stderr)
            sys.exit(2)

    def _fix_trials(self, config: DictConfig, settings: dict[str, Any]) -> None:
        sampler = str(config.hydra.sweeper.sampler.get("_target_", ""))
        if not sampler.endswith("RandomSampler"):
            raise ConfigError(
                f"hydra.sweeper.sampler={sampler!r} is invalid with tuning.accounting="
                "random_stopping: trials must not depend on each other (optuna.samplers."
                "RandomSampler)"
            )
        path = Path(config.hydra.sweep.dir) / TRIALS_FILE
        drawn = json.loads(path.read_text()) if path.is_file() else None
        if drawn is not None and {k: drawn[k] for k in settings} != settings:
            raise UserError(
                f"{path}: K was drawn for {drawn['accounting']} eta={drawn.get('eta')} "
                f"gamma={drawn.get('gamma')}; start a fresh sweep (sweep_stamp=true)"
            )
        if drawn is None:  # drawn once, from the OS's entropy, before any trial runs
            trials = draw_trials(settings["eta"], settings["gamma"], random.SystemRandom().random)
            drawn = {**settings, "trials": trials}
            write_json_atomic(path, drawn)
        with read_write(config.hydra.sweeper), flag_override(config, "struct", False):
            config.hydra.sweeper.n_trials = drawn["trials"]
        log.info("tuning: K=%d trials (drawn from D(eta=%g, gamma=%g))",
                 drawn["trials"], settings["eta"], settings["gamma"])  # fmt: skip

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        params = list(config.hydra.sweeper.get("params") or {})
        summary = search_summary(_trials(sweep_dir, params), _config(config.tuning))
        write_json_atomic(sweep_dir / SUMMARY_FILE, summary)
        print(summary["statement"])


def _params(trial: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in trial["params"].items()) or trial["job"]


def search_summary(trials: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The search's privacy, stated for its best trial (highest test_acc)."""
    if not trials:
        raise UserError("the search finished no trial: nothing to report")
    best = max(trials, key=lambda t: t["test_acc"])
    if best["epsilon"] is None:
        statement = f"tuning privacy: none, the {len(trials)} trials are not private"
        return {**settings, "trials": len(trials), "best_job": best["job"], "epsilon": None,
                "statement": statement}  # fmt: skip
    delta, accountant = best["delta"], best["accountant"]
    trial_eps = max(t["epsilon"] for t in trials)
    out: dict[str, Any] = {
        **settings,
        "trials": len(trials),
        "best_job": best["job"],
        "best_params": best["params"],
        "best_test_acc": best["test_acc"],
        "trial_epsilon": trial_eps,
        "delta": delta,
    }
    if settings["accounting"] == "composition":
        every_step = [m for t in trials for m in _history(t)]
        out["epsilon"] = epsilon_of_history(every_step, delta, accountant)
        out["statement"] = (
            f"tuning privacy: {len(trials)} trials of an adaptive search, each "
            f"(epsilon={trial_eps:.3f}, delta={delta:g})-DP; the best trial ({_params(best)}, "
            f"test_acc={best['test_acc']:.4f}) is (epsilon={out['epsilon']:.3f}, "
            f"delta={delta:g})-DP: all trials composed ({accountant}), not one trial's "
            "epsilon. A search whose cost grows with log E[K] only: hparams_search=lr_clip_private"
        )
        return out
    histories = {json.dumps(_history(t)) for t in trials}
    if len(histories) > 1:
        raise UserError(
            "tuning.accounting=random_stopping: the trials ran different privacy mechanisms "
            "(search only parameters that leave sigma, sample rate and steps unchanged)"
        )
    eta, gamma = settings["eta"], settings["gamma"]
    out["expected_trials"] = tnb_mean(eta, gamma)
    out["epsilon"] = random_stopping_epsilon(_history(best), delta, eta, gamma)
    out["statement"] = (
        f"tuning privacy: best of K={len(trials)} trials, K drawn before the search from "
        f"D(eta={eta:g}, gamma={gamma:g}) (E[K]={out['expected_trials']:.2f}), each trial "
        f"(epsilon={trial_eps:.3f}, delta={delta:g})-DP; the best trial ({_params(best)}, "
        f"test_acc={best['test_acc']:.4f}) is (epsilon={out['epsilon']:.3f}, delta={delta:g})-DP "
        "(Papernot & Steinke 2022, Thm 2). Release only that trial: the others, and K, "
        "are not covered"
    )
    return out
