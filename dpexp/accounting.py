"""Privacy accounting: a thin layer over Opacus' accountants.

A training run is a composition of subsampled Gaussian mechanisms, each described by
``(noise_multiplier, sample_rate)``. :class:`Ledger` counts how many times each one ran;
composition is commutative, so the grouped history gives exactly the same ε as the
step-by-step one, while staying short (Opacus merges only *consecutive* equal steps, and
a method that adds a second mechanism per step would otherwise double the history each step).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")
Mechanism = tuple[float, float]  # (noise_multiplier, sample_rate)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")


def epsilon_of_history(
    history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """ε of a composition given as ``(noise_multiplier, sample_rate, steps)`` triples."""
    _check_accountant(accountant)
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return float("inf")
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε spent by ``steps`` Poisson-subsampled Gaussian steps."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    extra_mechanisms: Iterable[Mechanism] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest σ (to ``tolerance`` in ε) whose ε after ``steps`` is ≤ ``target_epsilon``.

    ``extra_mechanisms`` run once per step beside the gradient (e.g. a noisy test) and are
    composed in; without them this is Opacus' own search.
    """
    _check_accountant(accountant)
    extra = list(extra_mechanisms)
    if not extra:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
        )

    def eps(sigma: float) -> float:
        history = [(sigma, sample_rate, steps)] + [(s, q, steps) for s, q in extra]
        return epsilon_of_history(history, delta, accountant)

    if epsilon_of_history([(s, q, steps) for s, q in extra], delta, accountant) >= target_epsilon:
        raise ValueError("the extra mechanisms alone exceed the target epsilon")
    low, high = 0.0, 10.0
    while (eps_high := eps(high)) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > tolerance:
        mid = (low + high) / 2
        if (e := eps(mid)) < target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high


class Ledger:
    """Counts the mechanisms a run has executed and turns them into ε.

    ``step_mechanisms`` are the mechanisms one training step runs (DP-SGD's noisy gradient,
    plus any a method adds, e.g. a noisy validation test). The ledger is plain data so it
    can go into a checkpoint.
    """

    def __init__(self, delta: float, accountant: str = "prv") -> None:
        _check_accountant(accountant)
        self.delta = delta
        self.accountant = accountant
        self.counts: Counter[Mechanism] = Counter()

    def record(self, mechanisms: Iterable[Mechanism], times: int = 1) -> None:
        for sigma, q in mechanisms:
            self.counts[(float(sigma), float(q))] += times

    def history(self) -> list[tuple[float, float, int]]:
        return [(s, q, n) for (s, q), n in sorted(self.counts.items())]

    def epsilon(self, extra: Iterable[Mechanism] = (), extra_times: int = 0) -> float:
        """ε of everything recorded, plus ``extra_times`` more runs of ``extra`` (a what-if)."""
        counts = Counter(self.counts)
        for sigma, q in extra:
            counts[(float(sigma), float(q))] += extra_times
        return epsilon_of_history(
            [(s, q, n) for (s, q), n in counts.items()], self.delta, self.accountant
        )

    def steps_within_budget(
        self, step_mechanisms: list[Mechanism], target_epsilon: float, upper: int
    ) -> int:
        """Largest n ≤ ``upper`` such that n more steps keep ε ≤ ``target_epsilon``.

        ε grows monotonically with the number of steps, so a binary search is exact.
        """
        if self.epsilon(step_mechanisms, upper) <= target_epsilon:
            return upper
        lo, hi = 0, upper  # invariant: lo fits, hi does not
        if self.epsilon() > target_epsilon:
            return 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(step_mechanisms, mid) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def state_dict(self) -> dict:
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "history": self.history(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.delta = state["delta"]
        self.accountant = state["accountant"]
        self.counts = Counter({(s, q): n for s, q, n in state["history"]})
