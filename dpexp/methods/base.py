"""The hook points a DP-SGD variant may implement. Every hook is optional.

The DP step (``dpexp.privacy.step``) calls them in this order each step::

    coordinate_weights → (clip, sum, noise) → transform_update → before_optimizer_step
    → optimizer.step() → after_optimizer_step

and the accountant composes ``privacy_mechanisms`` into every step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from dpexp.accounting import Mechanism
from dpexp.errors import ConfigError


class Method(L.Callback):
    """Base class of the DP-SGD variants (freeze, select, rgp, screen)."""

    name = "dpsgd"

    def setup_method(self, model: nn.Module, datamodule: L.LightningDataModule) -> None:
        """Before training and before the clipping engine attaches: masks, reparametrization.

        Anything read here from ``datamodule`` must be public (``datamodule.public``)."""

    def use_secret_seed(self, seed: int) -> None:
        """``privacy.secure_noise``: reseed every generator that samples private data or
        draws noise added to it with ``seed`` (from the OS CSPRNG), and keep it out of
        checkpoints. Randomness that never touches private data (e.g. a random mask) may
        stay reproducible."""

    def coordinate_weights(self, step: int) -> dict[str, torch.Tensor] | None:
        """Per-parameter weights applied to every per-sample gradient before clipping.

        0 drops a coordinate: it is excluded from the norm, gets no noise and does not move."""
        return None

    def transform_update(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The noisy averaged gradient, by parameter name, before it reaches the optimizer."""
        return grads

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called with ``.grad`` set, just before ``optimizer.step()``."""

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called right after ``optimizer.step()`` (accept/reject, restore frozen state)."""

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter] | None:
        """Parameters the optimizer updates, if not the trainable ones (e.g. RGP clips its
        carriers but updates the full weights through ``transform_update``)."""
        return None

    def privacy_mechanisms(self) -> list[Mechanism]:
        """Extra (noise_multiplier, sample_rate) mechanisms run once per step on private data."""
        return []

    def result_fields(self) -> dict[str, Any]:
        """Entries this method adds to result.json."""
        return {}

    def trainable_fraction(self, model: nn.Module) -> float | None:
        """Share of the model's parameters this method updates (None: all trainable ones)."""
        return None


def public_split(datamodule: L.LightningDataModule, key: str) -> Any:
    """The data module's public split, for option ``key`` (e.g. ``pruning.scorer``) that scores
    on public data; refuses when there is none (scoring on private data would spend privacy
    that is not accounted)."""
    if getattr(datamodule, "public", None) is None:
        datamodule.setup("fit")
    if datamodule.public is None or len(datamodule.public) == 0:
        raise ConfigError(
            f"{key}='public_grad' needs public data but the data module has none: "
            "set public.source and public.size"
        )
    return datamodule.public
