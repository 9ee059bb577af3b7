"""Empirical privacy audit with gradient canaries in one training run.

python -m dpexp.audit method=rgp clipping=functorch audit.canaries=2000

Design (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846, with the white-box Dirac gradient canaries of Nasr et al., "Tight Auditing
of Differentially Private Machine Learning", USENIX Security 2023):

1. ``m`` canaries; each is included in the private data set with probability 1/2 (S_i = ±1).
2. Canary i is an extra example whose per-sample gradient is a Dirac on its own trainable
   coordinate j_i, of norm ``canary_norm``·C, so clipping brings it to exactly C. Each step an
   included canary joins the batch with the data's sample rate q (Poisson, independently),
   and :class:`~dpexp.privacy.step.GradientStep` clips it with the configured coordinate
   weights, sums it with the batch, adds the noise and runs every method hook on the result.
3. The auditor sees the released noisy gradient of every step (it is what the accountant's
   (σ, q) mechanism releases) and reads canary i's coordinate x_t at every step t. Two scores:
   ``sum`` = Σ_t x_t (best when noise dominates) and ``detrended`` = Σ_t (x_t − the median of
   x over the steps around t), which removes the slowly varying gradient of the real data at
   that coordinate, so the canary's jumps of C/B stand out when noise is small or off.
4. It guesses "in" for the r/2 highest scores and "out" for the r/2 lowest; the number of
   correct guesses is turned into a lower bound on ε that holds with the stated confidence
   (:func:`epsilon_lower_bound`). Both scores and several r are tried, Bonferroni-corrected.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from scipy.special import expit
from scipy.stats import binom

from dpexp.clipping import trainable_parameters
from dpexp.errors import ConfigError, UserError
from dpexp.methods.base import Method
from dpexp.results import write_json_atomic
from dpexp.train import CONFIG_DIR, build
from dpexp.validate import validate

log = logging.getLogger(__name__)
AUDIT_FILE = "audit.json"
AUDIT_STREAM = 0xA0D17
CHUNK = 256  # canaries materialised per clipping call (memory: CHUNK × trainable parameters)


# -- the bound -----------------------------------------------------------------------------
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


def summed_scores(series: torch.Tensor) -> np.ndarray:
    """Σ_t x_t per canary, from the steps × canaries series of released coordinates."""
    return series.sum(0).numpy()


def detrended_scores(series: torch.Tensor, window: int) -> np.ndarray:
    """Σ_t (x_t − median of x over the ``window`` steps centred on t), per canary."""
    half = window // 2
    padded = torch.nn.functional.pad(series.T, (half, half), value=math.nan)
    local = padded.unfold(1, window, 1).nanmedian(-1).values.T
    return (series - local).sum(0).numpy()


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


# -- the canaries ---------------------------------------------------------------------------
class GradientCanaries(Method):
    """Dirac gradient canaries injected into, and read back from, the DP step.

    A Lightning callback placed after the privacy callback: at ``on_fit_start`` (after every
    method has set up its reparametrisation or freezing) it installs itself as the step's
    injected gradients and as the first method, whose ``transform_update`` sees the released
    noisy gradient. The canary coordinates are drawn at the first step, among the trainable
    coordinates the methods' weights keep at that step (a fixed public mask, e.g. freezing,
    would silence canaries on masked coordinates; the mask is no secret of the private data).
    """

    name = "audit_canaries"

    def __init__(self, canaries: int, canary_norm: float, sample_rate: float, seed: int) -> None:
        if canary_norm < 1:
            raise ConfigError(
                f"audit.canary_norm={canary_norm!r} is invalid: >= 1 (in units of C, so that "
                "every canary is clipped to exactly C)"
            )
        self.m = canaries
        self.canary_norm = canary_norm
        self.sample_rate = sample_rate
        # A stream of its own: the inclusion coins must be independent of the training
        # randomness (sampler, noise), which is seeded with small integers from `seed`.
        stream = np.random.SeedSequence([seed, AUDIT_STREAM]).generate_state(1)[0]
        self.generator = torch.Generator().manual_seed(int(stream))
        self.included = torch.rand(canaries, generator=self.generator) < 0.5
        self.released: list[torch.Tensor] = []  # per step: each canary's released coordinate
        self.coordinates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.clip_norm = math.nan

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = pl_module.gradient_step
        if not step.private:
            raise ConfigError("privacy.enabled=false is invalid for an audit: set privacy=dp")
        params = trainable_parameters(step.model)
        self.shapes = {name: p.shape for name, p in params}
        self.clip_norm = step.max_grad_norm
        self.device, self.dtype = params[0][1].device, params[0][1].dtype
        step.injected_gradients = self.gradients
        step.methods.insert(0, self)

    def choose_coordinates(self, weights: dict[str, torch.Tensor] | None) -> None:
        """One distinct coordinate per canary, uniformly among those with weight ≠ 0."""
        kept = [
            torch.broadcast_to(weights[n] != 0, shape).flatten().cpu()
            if weights and n in weights
            else torch.ones(shape.numel(), dtype=torch.bool)
            for n, shape in self.shapes.items()
        ]
        eligible = torch.cat(kept).nonzero().flatten()
        if self.m > len(eligible):
            raise ConfigError(
                f"audit.canaries={self.m} is invalid: at most the {len(eligible)} trainable "
                "coordinates the method updates (one Dirac canary per coordinate)"
            )
        flat = eligible[torch.randperm(len(eligible), generator=self.generator)[: self.m]]
        offsets = torch.tensor([0, *np.cumsum([len(k) for k in kept])])
        owner = torch.bucketize(flat, offsets[1:], right=True)
        for k, name in enumerate(self.shapes):
            ids = (owner == k).nonzero().flatten()
            if len(ids):
                self.coordinates[name] = (ids, flat[ids] - offsets[k])

    def gradients(
        self, step: int, weights: dict[str, torch.Tensor] | None
    ) -> list[dict[str, torch.Tensor]]:
        """Per-sample gradients of the included canaries Poisson-sampled into this step."""
        if not self.coordinates:
            self.choose_coordinates(weights)
        sampled = self.included & (torch.rand(self.m, generator=self.generator) < self.sample_rate)
        rows = torch.full((self.m,), -1, dtype=torch.long)
        rows[sampled] = torch.arange(int(sampled.sum()))
        chunks = []
        for start in range(0, int(sampled.sum()), CHUNK):
            count = min(CHUNK, int(sampled.sum()) - start)
            chunk = {
                n: torch.zeros(count, shape.numel(), device=self.device, dtype=self.dtype)
                for n, shape in self.shapes.items()
            }
            for name, (ids, index) in self.coordinates.items():
                row = rows[ids] - start
                keep = (row >= 0) & (row < count)
                chunk[name][row[keep], index[keep]] = self.canary_norm * self.clip_norm
            chunks.append({n: g.view(count, *self.shapes[n]) for n, g in chunk.items()})
        return chunks

    def transform_update(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Record each canary's coordinate of the released noisy gradient."""
        values = torch.zeros(self.m, dtype=torch.float64)
        for name, (ids, index) in self.coordinates.items():
            values[ids] = grads[name].detach().flatten()[index].double().cpu()
        self.released.append(values)
        return grads

    @property
    def series(self) -> torch.Tensor:
        """Released canary coordinates, steps × canaries."""
        return torch.stack(self.released) if self.released else torch.zeros(0, self.m)

    def scores(self, window: int) -> dict[str, np.ndarray]:
        return {
            "sum": summed_scores(self.series),
            "detrended": detrended_scores(self.series, window),
        }


# -- the audit run --------------------------------------------------------------------------
def guess_counts(m: int, fractions: list[float]) -> list[int]:
    """The numbers of guesses r tried, from fractions of the m canaries."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(
            f"audit.guess_fractions={fractions!r} is invalid: a non-empty list in (0, 1]"
        )
    return sorted({max(2, min(m, round(f * m))) for f in fractions})


def validate_audit(cfg: DictConfig) -> None:
    audit = cfg.get("audit")
    if audit is None:
        raise ConfigError("audit=None is invalid: compose the audit group (+audit=default)")
    m = audit.canaries
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ConfigError(f"audit.canaries={m!r} is invalid: an integer >= 2")
    if not 0 < audit.confidence < 1:
        raise ConfigError(f"audit.confidence={audit.confidence!r} is invalid: in (0, 1)")
    window = audit.detrend_window
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ConfigError(f"audit.detrend_window={window!r} is invalid: an odd integer >= 3")
    if not cfg.privacy.enabled:
        raise ConfigError("privacy.enabled=false is invalid for an audit: set privacy=dp")
    devices = cfg.trainer.get("devices", 1)
    if devices != 1 or cfg.trainer.get("num_nodes", 1) != 1:
        # every process would inject its own canaries into the shared logical batch
        raise ConfigError(f"trainer.devices={devices!r} is invalid for an audit: 1 (one process)")
    guess_counts(m, list(audit.guess_fractions))


def audit(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Train the configured method with canaries; return (and write) the audit line."""
    validate_audit(cfg)
    datamodule = validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, privacy, _, trainer = build(cfg, output_dir)
    canaries = GradientCanaries(
        cfg.audit.canaries, cfg.audit.canary_norm, datamodule.sample_rate, cfg.audit.seed
    )
    trainer.callbacks.append(canaries)  # after the privacy callback: its step exists
    if 2 * cfg.audit.canaries * privacy.delta > 0.1:
        log.warning(
            "2·m·δ = %.3g: the δ term of the bound is large and will hold the lower bound down; "
            "use fewer canaries or a smaller privacy.delta",
            2 * cfg.audit.canaries * privacy.delta,
        )
    trainer.fit(module, datamodule=datamodule)
    claimed = privacy.spent_epsilon()
    best = guess_membership(
        canaries.scores(cfg.audit.detrend_window),
        canaries.included.numpy(),
        guess_counts(cfg.audit.canaries, list(cfg.audit.guess_fractions)),
        privacy.delta,
        cfg.audit.confidence,
    )
    line = {
        "method": cfg.method.name,
        "clipping": cfg.clipping.mode,
        "epsilon_claimed": claimed if math.isfinite(claimed) else None,
        "epsilon_lower_bound": round(best.epsilon_lower_bound, 4),
        "confidence": cfg.audit.confidence,
        "trials": cfg.audit.canaries,
        "guesses": best.guesses,
        "correct": best.correct,
        "delta": privacy.delta,
        "noise_multiplier": privacy.noise_multiplier,
        "sample_rate": privacy.sample_rate,
        "score": best.score,
        "steps": len(canaries.released),
    }
    write_json_atomic(output_dir / AUDIT_FILE, line)
    return line


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        line = audit(cfg, output_dir)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"dpexp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(line))


def main() -> None:
    """``python -m dpexp.audit [overrides]``: the train config plus the ``audit`` group."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    given = sys.argv[1:]
    if not any(a.lstrip("+~").startswith("audit=") for a in given):
        given = ["+audit=default", *given]
    if not any(a.startswith("task_name=") for a in given):
        given = ["task_name=audit", *given]
    sys.argv[1:] = given
    hydra_main()


if __name__ == "__main__":
    main()


__all__ = [
    "GradientCanaries",
    "audit",
    "epsilon_lower_bound",
    "guess_membership",
    "one_run_p_value",
]
