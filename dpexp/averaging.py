"""Parameter averaging: an exponential moving average (EMA) of the DP-SGD iterates.

Each iterate θ_t is a function of the noisy releases of steps 1..t, so any average of them is
post-processing: it spends no privacy budget (ε, σ and the step count are untouched). Averaging
the late iterates of noisy SGD cancels part of the noise and raises test accuracy (De et al.,
"Unlocking High-Accuracy Differentially Private Image Classification through Scale", 2022).

Why not Lightning's ``EMAWeightAveraging``: it deep-copies the whole LightningModule at
``setup`` and pairs the copy's parameters and buffers with the live ones by position
(``zip(..., strict=False)``). dpexp's methods change the parameter list during ``fit`` (rgp adds
carrier sub-layers in its ``setup`` hook and removes them at ``teardown``), so what gets paired
depends on callback order; it also averages tensors the optimizer never updates, and under DDP
spawn its state stays in the worker. :class:`ParameterEMA` averages, by name, exactly the
tensors in the optimizer's param groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from dpexp.errors import ConfigError

log = logging.getLogger(__name__)


def optimizer_parameters(
    trainer: L.Trainer, pl_module: L.LightningModule
) -> dict[str, nn.Parameter]:
    """The tensors the optimizers update, by their name in ``pl_module`` (optimizer order).

    For rgp these are the full weights W (its carriers are clipped but never stepped)."""
    names = {id(p): n for n, p in pl_module.named_parameters()}
    updated: dict[str, nn.Parameter] = {}
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise RuntimeError("an optimizer updates a tensor that is not in the module")
                updated[names[id(p)]] = p
    return updated


class ParameterEMA(L.Callback):
    """EMA of the parameters the optimizer updates, refreshed after every optimizer step.

    ``avg ← d·avg + (1 − d)·θ`` with ``d = decay``; with ``warmup`` (default) the first
    updates use ``d_t = min(decay, (1 + t) / (10 + t))`` (t = updates so far), so the random
    initialisation does not linger in the average (as TensorFlow's and jax_privacy's EMA do).

    The model holds the raw iterate while training and the average during validation and
    after training (``trainer.test`` then scores the average); :meth:`last_iterate`
    temporarily puts the raw last iterate back. Checkpoints follow Lightning's convention:
    their ``state_dict`` holds the averaged weights; this callback's own state (under
    ``callbacks["ParameterEMA"]``) holds the average, the raw weights training continues from,
    and the update count, so a resumed run is bit-identical to an uninterrupted one.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
            raise ConfigError(
                f"callbacks.ema.decay={decay!r} is invalid: a number in (0, 1), e.g. 0.999"
            )
        if not isinstance(warmup, bool):
            raise ConfigError(f"callbacks.ema.warmup={warmup!r} is invalid: true or false")
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0
        self.average: dict[str, torch.Tensor] | None = None
        # The raw iterate, stored while the model holds the average (or restored from a
        # checkpoint and not yet put back into the model).
        self.raw: dict[str, torch.Tensor] | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._last_step = 0
        self._swapped_for_validation = False

    @property
    def state_key(self) -> str:
        return "ParameterEMA"

    @property
    def label(self) -> str:
        """How result.json names this averaging, e.g. ``ema:0.999``."""
        return f"ema:{self.decay:g}" + ("" if self.warmup else ":nowarmup")

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    # -- training -------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the checkpoint and optimizer are restored and the model is on its device.
        self._params = optimizer_parameters(trainer, pl_module)
        self._last_step = trainer.global_step
        if self.average is None:
            if trainer.global_step > 0:
                log.warning(
                    "resuming at step %d from a checkpoint without a parameter average: the "
                    "average starts here",
                    trainer.global_step,
                )
            self.average = {n: p.detach().clone() for n, p in self._params.items()}
            return
        if self.average.keys() != self._params.keys():
            raise RuntimeError(
                "the checkpoint's parameter average covers other tensors than the optimizer: "
                f"{sorted(self.average)} vs {sorted(self._params)}"
            )
        self.average = {n: a.to(self._params[n]) for n, a in self.average.items()}
        if self.raw is not None:  # resumed: the checkpoint's state_dict held the average
            self._load(self.raw)
            self.raw = None

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average (one optimizer step)."""
        names = list(self._params)
        averages = [self.average[n] for n in names]
        current = [self._params[n].detach() for n in names]
        torch._foreach_lerp_(averages, current, 1.0 - self.current_decay())
        self.updates += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A batch without an optimizer step (the budget stop) leaves global_step unchanged.
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.update()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._params and self.raw is None:
            self._hold_average()
            self._swapped_for_validation = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped_for_validation:
            self._load(self.raw)
            self.raw = None
            self._swapped_for_validation = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._params and self.raw is None:
            self._hold_average()

    # -- swapping ---------------------------------------------------------------------------
    @torch.no_grad()
    def _load(self, values: dict[str, torch.Tensor]) -> None:
        for n, p in self._params.items():
            p.copy_(values[n])

    def _hold_average(self) -> None:
        self.raw = {n: p.detach().clone() for n, p in self._params.items()}
        self._load(self.average)

    @contextmanager
    def last_iterate(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Within the block ``pl_module`` holds the raw last iterate instead of the average
        (after training, also in the main process of a DDP spawn run)."""
        if self.raw is None:
            raise RuntimeError("last_iterate() needs a model that holds the average (after fit)")
        params = dict(pl_module.named_parameters())
        averaged = {n: params[n].detach().clone() for n in self.raw}
        with torch.no_grad():
            for n, value in self.raw.items():
                params[n].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in averaged.items():
                    params[n].copy_(value)

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.average is None:
            return
        model_state = checkpoint["state_dict"]
        for n, value in self.average.items():
            model_state[n] = value.detach().clone()  # never the live tensor: it keeps moving

    def state_dict(self) -> dict[str, Any]:
        raw = self.raw
        if raw is None and self._params:
            raw = {n: p.detach().clone() for n, p in self._params.items()}
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "average": None if self.average is None else dict(self.average),
            "raw": raw,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict["updates"]
        self.average = state_dict["average"]
        self.raw = state_dict["raw"]
        if (state_dict["decay"], state_dict["warmup"]) != (self.decay, self.warmup):
            log.warning(
                "the checkpoint's parameter average used decay=%g warmup=%s; continuing it with "
                "decay=%g warmup=%s",
                state_dict["decay"],
                state_dict["warmup"],
                self.decay,
                self.warmup,
            )
