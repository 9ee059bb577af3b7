"""Screened updates (SA-DPSGD, Fu, Chen & Ling, arXiv 2211.07218) with honest accounting.

Every DP-SGD step proposes a candidate. After the optimizer has moved to it, its validation
loss is compared with that of the last accepted point on the same validation batch:

    ΔE = E(θ_candidate) − E(θ_last_accepted)
    accept if ΔE ≤ 0, else with probability exp(−k · t · ΔE)    (t = accepted updates so far)

and after ``max_rejections`` consecutive rejections the next candidate is accepted without a
test. A rejection restores the parameters, and by default the optimizer state, bit-exactly.

Privacy: each candidate is a DP-SGD step that the ledger records whether it is kept or not.
The test itself is either post-processing on a public split (``validation="public"``), or a
Gaussian mechanism on a Poisson sample of the private training set (``"private_noisy"``,
as in DPSUR): ΔE is clipped to [−C_v, C_v] (sensitivity 2·C_v, whatever the batch) and
N(0, (2·C_v·σ_v)²) is added; ``privacy_mechanisms`` reports ``(σ_v, q_v)`` so that the
ledger composes it into every step.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from dpexp import accounting
from dpexp.accounting import Mechanism
from dpexp.errors import ConfigError
from dpexp.methods.base import Method

VALIDATIONS = ("public", "private_noisy")

OptimizerState = dict[torch.Tensor, dict[str, Any]]


def acceptance_probability(delta_e: float, k: float, accepted: int) -> float:
    """SA-DPSGD's rule: 1 if ΔE ≤ 0, else exp(−k · t · ΔE)."""
    return 1.0 if delta_e <= 0 else math.exp(-k * accepted * delta_e)


def copy_optimizer_state(optimizer: torch.optim.Optimizer) -> OptimizerState:
    """A deep copy of ``optimizer.state`` (momentum buffers, step counts)."""
    return {
        p: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in optimizer.state.items()
    }


def restore_optimizer_state(optimizer: torch.optim.Optimizer, saved: OptimizerState) -> None:
    """Make ``optimizer.state`` equal to ``saved``; state created since the copy is dropped."""
    optimizer.state.clear()
    for p, s in saved.items():
        optimizer.state[p] = s


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"screen.{key}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Screen(Method):
    """Accept or reject every DP-SGD step by a simulated-annealing test on a validation batch."""

    name = "screen"

    def __init__(
        self,
        k: float = 10.0,
        max_rejections: int = 5,
        val_batch: int = 256,
        validation: str = "public",
        restore_optimizer_state: bool = True,
        paper_accounting: bool = False,
        clip_v: float = 0.001,
        sigma_v: float = 1.3,
        public_source: str | None = None,
        seed: int = 0,
    ) -> None:
        _check("k", k, _is_number(k) and k >= 0, "a finite number >= 0")
        rejections_ok = _is_int(max_rejections) and max_rejections >= 0
        _check("max_rejections", max_rejections, rejections_ok, "an integer >= 0")
        _check("val_batch", val_batch, _is_int(val_batch) and val_batch > 0, "a positive integer")
        if validation == "private":
            raise ConfigError(
                "screen.validation='private' is refused: a test on private data without noise "
                "leaks it; use private_noisy (clipped and noised, accounted) or public"
            )
        _check("validation", validation, validation in VALIDATIONS, f"one of {VALIDATIONS}")
        if validation == "public" and public_source == "none":
            raise ConfigError(
                "screen.validation='public' needs a public split but public.source='none': "
                "set public.source (e.g. heldout with public.size=1000, held out of the "
                "private data) or use screen.validation=private_noisy"
            )
        if validation == "private_noisy":
            _check("clip_v", clip_v, _is_number(clip_v) and clip_v > 0, "a finite number > 0")
            _check("sigma_v", sigma_v, _is_number(sigma_v) and sigma_v > 0, "a finite number > 0")
        self.k = float(k)
        self.max_rejections = max_rejections
        self.val_batch = val_batch
        self.validation = validation
        self.restore_optimizer = bool(restore_optimizer_state)
        self.paper_accounting = bool(paper_accounting)
        self.clip_v = float(clip_v)
        self.sigma_v = float(sigma_v)
        # One seeded stream for validation sampling, test noise and acceptance draws.
        self.generator = torch.Generator().manual_seed(seed + 6007)
        self.secret_generator = False
        self.model: nn.Module | None = None
        self.datamodule: L.LightningDataModule | None = None
        self.validation_rate = math.nan  # q_v of the private noisy test
        self.candidates = 0
        self.accepted = 0
        self.forced = 0
        self.consecutive_rejections = 0
        self._step = None  # the run's GradientStep: σ, q and ledger for epsilon_paper
        self._pending: dict[str, Any] | None = None

    # -- setup ------------------------------------------------------------------------
    def setup_method(self, model: nn.Module, datamodule: L.LightningDataModule) -> None:
        self.model = model
        self.datamodule = datamodule
        if self.validation == "public":
            if datamodule.public_size <= 0:
                raise ConfigError(
                    "screen.validation='public' needs a public split but the data has none: "
                    "set public.source and public.size or use screen.validation=private_noisy"
                )
        else:
            # Poisson rate of the private test batch; N is the size the gradient's q uses.
            self.validation_rate = min(1.0, self.val_batch / datamodule.num_private)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = pl_module.gradient_step

    def privacy_mechanisms(self) -> list[Mechanism]:
        if self.validation == "public":
            return []
        if math.isnan(self.validation_rate):
            raise RuntimeError("Screen.privacy_mechanisms() needs setup_method() first")
        return [(self.sigma_v, self.validation_rate)]

    # -- the test ---------------------------------------------------------------------
    def _validation_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.validation == "public":
            data = self.datamodule.public
            order = torch.randperm(len(data), generator=self.generator)
            return data[order[: self.val_batch]]
        data = self.datamodule.train
        mask = torch.rand(len(data), generator=self.generator) < self.validation_rate
        return data[mask.nonzero().flatten()]

    @torch.no_grad()
    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy at the current parameters, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            return F.cross_entropy(self.model(x.to(device)), y.to(device), reduction="none")
        finally:
            self.model.train(was_training)

    def released_delta(self, delta_e: float) -> float:
        """What the test may look at: ΔE itself on public data, clipped and noised otherwise."""
        if self.validation == "public":
            return delta_e
        clipped = min(max(delta_e, -self.clip_v), self.clip_v)
        noise = torch.normal(0.0, 2 * self.clip_v * self.sigma_v, (), generator=self.generator)
        return clipped + float(noise)

    def accept(self, delta_e: float) -> bool:
        """Draw the SA decision for a (released) ΔE at the current accepted count."""
        if delta_e <= 0:
            return True
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        return u < acceptance_probability(delta_e, self.k, self.accepted)

    # -- hooks around the optimizer step ------------------------------------------------
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.consecutive_rejections >= self.max_rejections:
            self._pending = None  # forced acceptance: no test, nothing to restore
            return
        x, y = self._validation_batch()
        self._pending = {
            "x": x,
            "y": y,
            "old_losses": self._losses(x, y),
            "params": [p.detach().clone() for p in self.model.parameters()],
            "optimizer": copy_optimizer_state(optimizer) if self.restore_optimizer else None,
        }

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.candidates += 1
        pending, self._pending = self._pending, None
        if pending is None:
            self._keep(forced=True)
            return
        new_losses = self._losses(pending["x"], pending["y"])
        diff = new_losses - pending["old_losses"]
        delta_e = float(diff.mean()) if len(diff) else 0.0  # an empty Poisson batch: no signal
        if self.accept(self.released_delta(delta_e)):
            self._keep(forced=False)
            return
        self.consecutive_rejections += 1
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), pending["params"], strict=True):
                p.copy_(saved)
        if pending["optimizer"] is not None:
            restore_optimizer_state(optimizer, pending["optimizer"])

    def _keep(self, forced: bool) -> None:
        self.accepted += 1
        self.forced += int(forced)
        self.consecutive_rejections = 0

    # -- results and checkpoints --------------------------------------------------------
    def epsilon_paper(self) -> float | None:
        """ε counting only accepted gradient steps, as the paper does (under-reports)."""
        step = self._step
        if step is None or not step.private:
            return None
        return accounting.epsilon(
            step.noise_multiplier,
            step.sample_rate,
            self.accepted,
            step.ledger.delta,
            step.ledger.accountant,
        )

    def result_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "candidates": self.candidates,
            "accepted": self.accepted,
            "forced_accepts": self.forced,
            "acceptance_rate": self.accepted / self.candidates if self.candidates else None,
            "validation": self.validation,
        }
        if self.validation == "private_noisy":
            fields["validation_mechanism"] = {
                "sigma_v": self.sigma_v,
                "sample_rate_v": self.validation_rate,
                "clip_v": self.clip_v,
            }
        if self.paper_accounting:
            fields["epsilon_paper"] = self.epsilon_paper()
        return fields

    def use_secret_seed(self, seed: int) -> None:
        """The private validation sample and the test noise must not be predictable."""
        self.generator.manual_seed(seed)
        self.secret_generator = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "accepted": self.accepted,
            "forced": self.forced,
            "consecutive_rejections": self.consecutive_rejections,
            "generator": None if self.secret_generator else self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.candidates = state_dict["candidates"]
        self.accepted = state_dict["accepted"]
        self.forced = state_dict["forced"]
        self.consecutive_rejections = state_dict["consecutive_rejections"]
        if state_dict["generator"] is not None:  # None: secret, reseeded by this run
            self.generator.set_state(state_dict["generator"])
