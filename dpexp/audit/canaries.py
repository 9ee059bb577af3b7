"""What every kind of canary shares: the in/out coins, the audit's own random stream, and the
steps × canaries series the auditor reads off the released updates, with its two scores."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

from dpexp.errors import ConfigError
from dpexp.methods.base import Method
from dpexp.privacy.step import GradientStep

AUDIT_STREAM = 0xA0D17
# Canaries per batched computation (memory: CHUNK × trainable parameters per-sample gradients).
CHUNK = 256


def summed_scores(series: torch.Tensor) -> np.ndarray:
    """Σ_t x_t per canary, from the steps × canaries series of released values."""
    return series.sum(0).numpy()


def detrended_scores(series: torch.Tensor, window: int) -> np.ndarray:
    """Σ_t (x_t − median of x over the ``window`` steps centred on t), per canary."""
    half = window // 2
    padded = torch.nn.functional.pad(series.T, (half, half), value=math.nan)
    local = padded.unfold(1, window, 1).nanmedian(-1).values.T
    return (series - local).sum(0).numpy()


class Canaries(Method):
    """m canaries, each in the private data set with probability 1/2, and the value the
    auditor reads for each of them from every step's released noisy gradient.

    A Lightning callback placed after the privacy callback: at ``on_fit_start`` it becomes
    the step's first method, so its ``transform_update`` sees the released gradient itself,
    before any other method transforms it.
    """

    def __init__(self, canaries: int, seed: int) -> None:
        self.m = canaries
        # A stream of its own: the inclusion coins must be independent of the training
        # randomness (sampler, noise), which is seeded with small integers from `seed`.
        stream = np.random.SeedSequence([seed, AUDIT_STREAM]).generate_state(1)[0]
        self.generator = torch.Generator().manual_seed(int(stream))
        self.included = torch.rand(canaries, generator=self.generator) < 0.5
        self.released: list[torch.Tensor] = []  # per step: one float64 value per canary

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step: GradientStep = pl_module.gradient_step
        if not step.private:
            raise ConfigError("privacy.enabled=false is invalid for an audit: set privacy=dp")
        step.methods.insert(0, self)

    @property
    def series(self) -> torch.Tensor:
        """Released canary values, steps × canaries."""
        return torch.stack(self.released) if self.released else torch.zeros(0, self.m)

    def scores(self, window: int) -> dict[str, np.ndarray]:
        return {
            "sum": summed_scores(self.series),
            "detrended": detrended_scores(self.series, window),
        }
