"""The one-run lower bound on ε (Steinke, Nasr & Jagielski 2023) and the membership guesses
it is computed from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[W ≥ v] for an (ε, δ)-DP algorithm, W = correct guesses out of r.

    Steinke, Nasr & Jagielski (2023), Theorem 3.1 (their main theorem): with m canaries each
    included with probability 1/2 and r guesses,

        P[W ≥ v] ≤ β + 2mδ · max_{i=1..v} (P[X ≥ v − i] − β) / i,  β = P[X ≥ v],
        X ~ Binomial(r, e^ε / (1 + e^ε)).

    (For δ = 0 this is the Binomial tail alone. i > v adds nothing: P[X ≥ v − i] = 1 for
    all i ≥ v, so the maximum over i ∈ [m] is attained for some i ≤ v.)
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = expit(epsilon)
    beta = binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return float(beta)
    i = np.arange(1, v + 1)
    alpha = np.max((binom.sf(v - i - 1, r, p) - beta) / i)
    return float(min(1.0, beta + 2 * m * delta * alpha))


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float, grid: float = 0.05
) -> float:
    """Largest ε̂ such that every (ε, δ)-DP claim with ε ≤ ε̂ is rejected at ``confidence``.

    Scans ε = 0, grid, 2·grid, … while the p-value of :func:`one_run_p_value` stays
    ≤ 1 − confidence, then bisects the last interval (to 1e-6). Every ε ≤ ε̂ has a rejected
    test point ε' ≥ ε, and an (ε, δ)-DP algorithm is also (ε', δ)-DP, so P[ε̂ > ε_true] ≤
    1 − confidence without assuming the p-value is monotone in ε. Returns 0 if even ε = 0
    is not rejected.
    """
    significance = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) <= significance

    if not rejected(0.0):
        return 0.0
    low = 0.0
    while rejected(low + grid):
        low += grid
        if low > 100:  # only v = r with tiny r·δ gets here: no finite bound to report
            return math.inf
    high = low + grid
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


@dataclass
class Guesses:
    """Outcome of guessing membership from canary scores."""

    score: str
    guesses: int
    correct: int
    epsilon_lower_bound: float


def guess_membership(
    scores: dict[str, np.ndarray],
    included: np.ndarray,
    guess_counts: list[int],
    delta: float,
    confidence: float,
) -> Guesses:
    """Best ε lower bound over the scores and guess counts r (top r/2 "in", bottom r/2 "out").

    Trying k (score, r) pairs is k tests: each runs at significance (1 − confidence)/k
    (Bonferroni), so the best of them still holds with probability ≥ ``confidence``.
    """
    per_test = 1.0 - (1.0 - confidence) / (len(scores) * len(guess_counts))
    best = Guesses("", 0, 0, 0.0)
    for name, score in scores.items():
        m = len(score)
        order = np.argsort(-score, kind="stable")
        for r in guess_counts:
            top, bottom = order[: r // 2], order[m - (r - r // 2) :]
            correct = int(included[top].sum() + (~included[bottom]).sum())
            bound = epsilon_lower_bound(m, r, correct, delta, per_test)
            if bound > best.epsilon_lower_bound or best.guesses == 0:
                best = Guesses(name, r, correct, bound)
    return best
