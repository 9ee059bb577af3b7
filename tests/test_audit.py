"""The canary audit: its ε lower bound (Steinke et al. 2023), the canaries' path through the DP
step, and tiny audits with noise off (the bound must be high) and on (it must stay ≤ the claim).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch import nn

from dpexp import accounting
from dpexp.accounting import Ledger
from dpexp.audit import (
    GradientCanaries,
    audit,
    detrended_scores,
    epsilon_lower_bound,
    guess_membership,
    one_run_p_value,
    summed_scores,
)
from dpexp.clipping import make_engine
from dpexp.errors import ConfigError
from dpexp.methods.base import Method
from dpexp.privacy.step import GradientStep

AUDIT = ["+audit=default", "callbacks=none", "privacy.delta=1e-5", "privacy.accountant=rdp"]
AUDIT += ["trainer.max_epochs=10"]


def brute_force_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound written out term by term: max over every i in 1..m."""
    p = math.exp(eps) / (1 + math.exp(eps))
    tail = [sum(binom.pmf(k, r, p) for k in range(max(t, 0), r + 1)) for t in range(v + 1)]
    beta = tail[v]
    alpha = max((tail[max(v - i, 0)] - beta) / i for i in range(1, m + 1))
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (50, 20, 15, 0.5, 1e-3),
        (50, 40, 40, 2.0, 1e-2),
        (30, 30, 12, 0.1, 0.0),
        (80, 10, 9, 1.0, 1e-4),
    ],
)
def test_p_value_matches_the_theorem_term_by_term(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        brute_force_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15
    )


@pytest.mark.parametrize(("r", "confidence"), [(100, 0.95), (1000, 0.95), (50, 0.99)])
def test_all_correct_without_delta_has_the_closed_form(r, confidence):
    # P[Binomial(r, p) = r] = p^r = 1 − confidence  ⇒  ε = log(p / (1 − p))
    p = (1 - confidence) ** (1 / r)
    exact = math.log(p / (1 - p))
    assert epsilon_lower_bound(r, r, r, 0.0, confidence) == pytest.approx(exact, abs=1e-5)


def test_bound_sits_where_the_p_value_crosses_the_significance():
    m, r, v, delta = 1000, 200, 170, 1e-5
    eps = epsilon_lower_bound(m, r, v, delta, 0.95)
    assert one_run_p_value(m, r, v, eps, delta) <= 0.05
    assert one_run_p_value(m, r, v, eps + 1e-4, delta) > 0.05
    assert 0 < eps < math.log(170 / 30)  # below the point estimate log(v / (r − v))


def test_bound_is_monotone_in_evidence_delta_and_confidence():
    by_correct = [epsilon_lower_bound(500, 100, v, 1e-5, 0.95) for v in range(50, 101, 5)]
    assert by_correct == sorted(by_correct) and by_correct[0] == 0.0
    by_delta = [epsilon_lower_bound(500, 100, 95, d, 0.95) for d in (0, 1e-6, 1e-4, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True) and by_delta[0] > by_delta[-1]
    by_confidence = [epsilon_lower_bound(500, 100, 95, 1e-5, c) for c in (0.8, 0.95, 0.999)]
    assert by_confidence == sorted(by_confidence, reverse=True)
    by_guesses = [epsilon_lower_bound(1000, r, r, 1e-6, 0.95) for r in (10, 100, 1000)]
    assert by_guesses == sorted(by_guesses)


def test_guesses_use_top_and_bottom_scores_with_bonferroni():
    included = np.array([True, False] * 50)
    scores = {"inverted": -included.astype(float), "perfect": included.astype(float)}
    best = guess_membership(scores, included, [10, 100], 0.0, 0.95)
    assert (best.score, best.guesses, best.correct) == ("perfect", 100, 100)
    # 2 scores × 2 guess counts = 4 tests, each at significance 0.05 / 4
    assert best.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(100, 100, 100, 0.0, 1 - 0.05 / 4), abs=1e-9
    )
    worst = guess_membership({"inverted": scores["inverted"]}, included, [10], 0.0, 0.95)
    assert worst.correct == 0 and worst.epsilon_lower_bound == 0.0


def test_detrended_score_removes_a_slow_drift_and_keeps_the_jumps():
    steps = torch.arange(40, dtype=torch.float64)
    drift = torch.stack([0.02 * steps, 0.1 * steps + 3, torch.sin(steps / 7)], 1)
    jumps = torch.zeros(40, 3, dtype=torch.float64)
    jumps[[5, 20, 33], 0] = 1.0  # canary 0 sampled three times, canaries 1 and 2 never
    detrended = detrended_scores(drift + jumps, window=9)
    # each jump survives, less a one-rank shift (0.02) of the 8 neighbouring medians
    assert 3.0 - 3 * 8 * 0.02 - 1e-9 <= detrended[0] <= 3.0
    assert abs(detrended[1]) < 0.35 and abs(detrended[2]) < 0.35  # drifts mostly cancel
    summed = summed_scores(drift + jumps)  # the drift dominates the plain sum
    assert summed[1] > summed[0]


class HalfMask(Method):
    """Drops the first half of every parameter's coordinates (a fixed public mask)."""

    def coordinate_weights(self, step):
        return {
            n: (torch.arange(p.numel()) >= p.numel() // 2).double().view_as(p)
            for n, p in self.params
        }


def dp_step_with_canaries(model, canaries, methods=(), C=0.3, B=4.0):
    step = GradientStep(
        model,
        methods,
        engine=make_engine("per_sample", model),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=B,
        sample_rate=0.5,
        ledger=Ledger(1e-5, "rdp"),
        noise_generator=torch.Generator().manual_seed(0),
    )
    canaries.on_fit_start(None, type("Module", (), {"gradient_step": step})())
    return step


def test_canary_is_clipped_to_C_and_moves_only_its_coordinate():
    """Noise off, one sampled canary of norm 2C: the update is the batch's clipped mean plus
    exactly C/B on the canary's coordinate (the brute-force clipped sum is the reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.arange(5) % 4
    C, B = 0.3, 4.0

    def update(with_canary: bool):
        net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
        net.load_state_dict(model.state_dict())
        canaries = GradientCanaries(canaries=1, canary_norm=2.0, sample_rate=1.0, seed=0)
        canaries.included[:] = with_canary
        step = dp_step_with_canaries(net, canaries, C=C, B=B)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        with step.engine.attached_to_model():
            step((x, y), torch.optim.SGD(net.parameters(), lr=1.0))
        return {n: before[n] - p.detach() for n, p in net.named_parameters()}, canaries

    plain, _ = update(False)
    with_canary, canaries = update(True)
    ((name, (_, index)),) = canaries.coordinates.items()
    diff = torch.cat([(with_canary[n] - plain[n]).flatten() for n in plain])
    offset = 0 if name == "1.weight" else 24
    expected = torch.zeros_like(diff)
    expected[offset + index] = C / B
    torch.testing.assert_close(diff, expected, rtol=1e-10, atol=1e-15)
    assert canaries.series.item() == pytest.approx(with_canary[name].flatten()[index].item())


def test_canaries_sit_on_coordinates_the_method_updates():
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    mask = HalfMask()
    mask.params = list(net.named_parameters())
    canaries = GradientCanaries(canaries=14, canary_norm=2.0, sample_rate=1.0, seed=3)
    step = dp_step_with_canaries(net, canaries, methods=[mask])
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.arange(3)
    with step.engine.attached_to_model():
        step((x, y), torch.optim.SGD(net.parameters(), lr=1.0))
    weights = mask.coordinate_weights(0)
    chosen = [weights[n].flatten()[i] for n, (_, i) in canaries.coordinates.items()]
    assert torch.cat(chosen).eq(1).all() and len(torch.cat(chosen)) == 14  # all 14 kept ones
    too_many = GradientCanaries(15, 2.0, 1.0, 0)
    too_many.shapes = {n: p.shape for n, p in net.named_parameters()}
    with pytest.raises(ConfigError, match=r"audit\.canaries=15"):
        too_many.choose_coordinates(weights)


def test_audit_without_noise_finds_a_high_lower_bound(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        *AUDIT,
        "privacy.noise_multiplier=0",
        "privacy.epsilon=null",
        "audit.allow_no_noise=true",
        "audit.canaries=500",
    )
    line = audit(cfg, tmp_path / "run")
    assert line["epsilon_claimed"] is None  # σ = 0 claims nothing
    assert line["epsilon_lower_bound"] > 3.5  # every guess right; 500 canaries cap it near 4
    assert line["correct"] == line["guesses"]
    assert json.loads((tmp_path / "run" / "audit.json").read_text()) == line


@pytest.mark.parametrize("clipping", ["per_sample", "functorch"])
def test_audit_with_noise_stays_below_the_claim(tiny_cfg, tmp_path, clipping):
    sigma = ["privacy.noise_multiplier=2.5", "privacy.epsilon=null"]
    cfg = tiny_cfg(*AUDIT, *sigma, "audit.canaries=500", f"clipping={clipping}")
    line = audit(cfg, tmp_path / "run")
    assert line["epsilon_claimed"] == pytest.approx(accounting.epsilon(2.5, 0.25, 40, 1e-5))
    assert line["epsilon_lower_bound"] <= line["epsilon_claimed"]
    assert (line["method"], line["clipping"], line["trials"]) == ("dpsgd", clipping, 500)
    assert line["steps"] == 40


def test_audit_catches_an_accountant_that_counts_more_noise_than_was_added(
    tiny_cfg, tmp_path, monkeypatch
):
    """A planted bug: noise σ = 0.5 is added but the ledger records σ = 50. The claim is then
    tiny and the audit's lower bound must exceed it."""
    monkeypatch.setattr(GradientStep, "mechanisms", lambda self: [(50.0, self.sample_rate)])
    sigma = ["privacy.noise_multiplier=0.5", "privacy.epsilon=null"]
    line = audit(tiny_cfg(*AUDIT, *sigma, "audit.canaries=500"), tmp_path / "run")
    assert line["epsilon_claimed"] < 0.2
    assert line["epsilon_lower_bound"] > 5 * line["epsilon_claimed"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("audit.canaries=100000", "audit.canaries"),
        ("privacy=none", "privacy.enabled"),
        ("audit.guess_fractions=[0,0.5]", "audit.guess_fractions"),
        ("audit.canary_norm=0.5", "audit.canary_norm"),
        ("privacy.noise_multiplier=0", "privacy.noise_multiplier"),
        ("audit.detrend_window=4", "audit.detrend_window"),
        ("trainer=ddp_spawn_cpu", "trainer.devices"),
    ],
)
def test_bad_audit_options_fail_with_one_line(tiny_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        audit(tiny_cfg(*AUDIT, override), tmp_path / "run")


def test_cli_prints_one_json_line(tmp_path):
    """Through the real command line, in its own process (Hydra configures logging globally)."""
    args = [
        "dataset=synthetic", "dataset.image_shape=[1,16,16]", "dataset.size=128",
        "dataset.batch_size=32", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
        "logger=none", "callbacks=none", "privacy.delta=1e-5", "privacy.accountant=rdp",
        "audit.canaries=50", f"hydra.run.dir={tmp_path / 'cli'}",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "dpexp.audit", *args], capture_output=True, text=True, check=True
    ).stdout
    lines = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    assert len(lines) == 1
    keys = {"method", "clipping", "epsilon_claimed", "epsilon_lower_bound", "confidence", "trials"}
    assert keys <= set(lines[0]) and lines[0]["trials"] == 50
    assert (tmp_path / "cli" / "audit.json").is_file()
