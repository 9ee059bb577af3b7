"""``method=freeze``: parameter freezing / pre-pruning before private training.

Before DP-SGD starts, a mask keeps a fraction ``1 - rate`` of the maskable weights; only those
train, the others stay fixed at 0 (``frozen_value=zero``, pruning: Adamczewski, He & Park 2023,
arXiv 2306.11754) or at their starting values (``keep``, freezing: Adamczewski & Park 2023,
arXiv 2303.04612). The mask is chosen from data-independent scores (``magnitude`` of the
starting weights, ``random``) or from gradients on *public* data (``public_grad``); nothing
about it depends on private data, so DP-SGD's accounting is unchanged. ``rescale`` multiplies
each pruned tensor's kept weights so that its norm, and with it the layer's output variance
at the start, is the unpruned layer's.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from dpexp.errors import ConfigError, UserError
from dpexp.methods import masks as M
from dpexp.methods.base import Method, public_split

log = logging.getLogger(__name__)

SCORERS = ("magnitude", "random", "public_grad")
GRAD_SCORES = ("grad", "taylor")
SCOPES = ("layerwise", "global")
FROZEN_VALUES = ("zero", "keep")
MASKS_FILE = "masks.pt"


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid: choose one of {', '.join(allowed)}")


def check_rate(key: str, rate: Any) -> float:
    """A dropped fraction in [0, 1), or a one-line ConfigError."""
    ok = isinstance(rate, int | float) and not isinstance(rate, bool) and 0 <= rate < 1
    if not ok or math.isnan(rate):
        raise ConfigError(f"{key}={rate!r} is invalid: a fraction in [0, 1)")
    return float(rate)


class Freeze(Method):
    """Train only a fixed, publicly chosen subset of the weights; the rest never move."""

    name = "freeze"

    def __init__(
        self,
        rate: float = 0.5,
        scorer: str = "magnitude",
        grad_score: str = "grad",
        scope: str = "layerwise",
        frozen_value: str = "zero",
        prune_all: bool = False,
        rescale: bool = False,
        public_source: str = "none",
        public_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.rate = check_rate("pruning.rate", rate)
        _choice("pruning.scorer", scorer, SCORERS)
        _choice("pruning.grad_score", grad_score, GRAD_SCORES)
        _choice("pruning.scope", scope, SCOPES)
        _choice("pruning.frozen_value", frozen_value, FROZEN_VALUES)
        if not isinstance(rescale, bool):
            raise ConfigError(f"pruning.rescale={rescale!r} is invalid: true or false")
        if rescale and frozen_value == "keep":
            raise ConfigError(
                "pruning.rescale=true is invalid with pruning.frozen_value='keep': frozen "
                "weights keep their values, so no layer's output changes; rescale is for zero"
            )
        if scorer == "public_grad" and public_source == "none":
            raise ConfigError(
                "pruning.scorer='public_grad' needs public data but public.source='none': set "
                "public.source (heldout, digits or a dataset) and public.size; scoring on "
                "private data would spend privacy that is not accounted"
            )
        self.scorer = scorer
        self.grad_score = grad_score
        self.scope = scope
        self.frozen_value = frozen_value
        self.prune_all = bool(prune_all)
        self.rescale = rescale
        self.public_source = public_source
        self.public_batch_size = int(public_batch_size)
        self.seed = seed
        self.masks: M.Masks = {}
        self.scales: dict[str, float] = {}
        self.frozen_parameters: list[str] = []
        self.mask_source = ""
        self.run_dir: Path | None = None
        self._model: nn.Module | None = None
        self._restorer = M.CoordinateRestorer(restore_state=True)

    # -- choosing the mask (public information only) -----------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.default_root_dir:
            self.run_dir = Path(trainer.default_root_dir)

    def setup_method(self, model: nn.Module, datamodule: L.LightningDataModule) -> None:
        self._model = model
        params = M.maskable_parameters(model, self.prune_all)
        if self.scorer == "magnitude":
            scores = M.magnitude_scores(params)
        elif self.scorer == "random":
            scores = M.random_scores(
                params, torch.Generator().manual_seed(M.stream_seed(self.seed, "freeze"))
            )
        else:
            loader = self._public_loader(datamodule)
            scores = M.public_gradient_scores(
                model, loader, [n for n, _ in params], taylor=self.grad_score == "taylor"
            )
        chosen = M.top_fraction(scores, self.rate, self.scope)
        self.masks = {n: chosen[n].to(p) for n, p in params}
        self.mask_source = self._describe_source(datamodule)
        self._apply(model)
        M.register_kept(model, self.masks)
        log.info(
            "freeze: rate=%g scorer=%s scope=%s: %d of %d maskable weights train (%s)%s",
            self.rate,
            self.scorer,
            self.scope,
            sum(int(m.sum()) for m in self.masks.values()),
            sum(m.numel() for m in self.masks.values()),
            self.mask_source,
            f"; kept weights rescaled by {min(self.scales.values(), default=1):.3g}–"
            f"{max(self.scales.values(), default=1):.3g}"
            if self.rescale
            else "",
        )

    def _public_loader(self, datamodule):
        """Batches of the public split; refuses to score on data that is not public."""
        public_split(datamodule, "pruning.scorer")
        return datamodule.public_dataloader(self.public_batch_size, shuffle=False)

    def _describe_source(self, datamodule) -> str:
        if self.scorer == "random":
            return f"random (seed {self.seed})"
        if self.scorer == "magnitude":
            return "magnitude of the starting weights"
        kind = "|grad|" if self.grad_score == "grad" else "|weight*grad|"
        return f"{kind} on the public split: {datamodule.public_description}"

    @torch.no_grad()
    def _apply(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        self.frozen_parameters = []
        self.scales = {}
        for n, mask in self.masks.items():
            if self.frozen_value == "zero":
                before = params[n].norm()
                params[n].mul_(mask)
                after = params[n].norm()
                if self.rescale and after > 0:
                    # For inputs with uncorrelated coordinates of equal variance, a unit's
                    # output variance is that variance times its squared weight norm: restoring
                    # the tensor's norm restores the layer's mean output variance, for any rate
                    # and scorer (random keeps ~1/(1-rate) of it, magnitude more).
                    scale = float(before / after)
                    params[n].mul_(scale)
                    self.scales[n] = scale
            if not mask.any():
                # nothing left to train in this tensor: no per-sample work for it
                params[n].requires_grad_(False)
                self.frozen_parameters.append(n)

    # -- during training ------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.model.named_parameters())
        self.masks = {n: m.to(params[n]) for n, m in self.masks.items()}
        M.register_kept(pl_module.model, self.masks)
        if self.run_dir is not None and trainer.is_global_zero:
            self.save_masks(self.run_dir / MASKS_FILE)

    def coordinate_weights(self, step: int) -> dict[str, torch.Tensor] | None:
        frozen = set(self.frozen_parameters)
        return {n: m for n, m in self.masks.items() if n not in frozen} or None

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._restorer.snapshot(dict(self._model.named_parameters()), self.masks, optimizer)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._restorer.restore(optimizer)

    # -- outputs -----------------------------------------------------------------------------
    def save_masks(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "masks": {n: m.detach().cpu().bool() for n, m in self.masks.items()},
                **self.result_fields(),
                "scope": self.scope,
                "frozen_value": self.frozen_value,
            },
            tmp,
        )
        os.replace(tmp, path)

    def result_fields(self) -> dict[str, Any]:
        return {
            "pruning_rate": self.rate,
            "scorer": self.scorer,
            "mask_source": self.mask_source,
            "frozen_value": self.frozen_value,
            "pruning_scope": self.scope,
            "pruning_rescale": self.rescale,
        }

    def trainable_fraction(self, model: nn.Module) -> float:
        """(kept maskable weights + trainable unmasked parameters) / all parameters."""
        total = sum(p.numel() for p in model.parameters())
        updated = sum(
            int(self.masks[n].sum()) if n in self.masks else p.numel()
            for n, p in model.named_parameters()
            if p.requires_grad
        )
        return updated / total

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.detach().cpu() for n, m in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["masks"]
        same = saved.keys() == self.masks.keys() and all(
            torch.equal(saved[n].cpu().bool(), self.masks[n].cpu().bool()) for n in saved
        )
        if not same:
            raise UserError(
                "ckpt_path: the checkpoint's pruning masks differ from the masks this config "
                "chooses; resume with the same pruning.* settings, seed and model"
            )
