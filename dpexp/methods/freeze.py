"""``method=freeze``: parameter freezing / pre-pruning before private training.

Before DP-SGD starts, a mask keeps a fraction ``1 - rate`` of the maskable weights; only those
train, the others stay fixed at 0 (``frozen_value=zero``, pruning: Adamczewski, He & Park 2023,
arXiv 2306.11754) or at their starting values (``keep``, freezing: Adamczewski & Park 2023,
arXiv 2303.04612). The mask is chosen from data-independent scores (``magnitude`` of the
starting weights, ``random``) or from gradients on *public* data (``public_grad``); nothing
about it depends on private data, so DP-SGD's accounting is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from dpexp.errors import ConfigError, UserError
from dpexp.methods import masks as M
from dpexp.methods.base import Method

log = logging.getLogger(__name__)

SCORERS = ("magnitude", "random", "public_grad")
GRAD_SCORES = ("grad", "taylor")
SCOPES = ("layerwise", "global")
FROZEN_VALUES = ("zero", "keep")
PUBLIC_SOURCES = ("heldout",)
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
        public: str = "heldout",
        public_size: int = 0,
        pretrain_epochs: int = 0,
        pretrain_lr: float = 0.05,
        public_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.rate = check_rate("pruning.rate", rate)
        _choice("pruning.scorer", scorer, SCORERS)
        _choice("pruning.grad_score", grad_score, GRAD_SCORES)
        _choice("pruning.scope", scope, SCOPES)
        _choice("pruning.frozen_value", frozen_value, FROZEN_VALUES)
        _choice("pruning.public", public, PUBLIC_SOURCES)
        integer = isinstance(pretrain_epochs, int) and not isinstance(pretrain_epochs, bool)
        if not integer or pretrain_epochs < 0:
            raise ConfigError(
                f"pruning.pretrain_epochs={pretrain_epochs!r} is invalid: an integer >= 0"
            )
        needs_public = scorer == "public_grad" or pretrain_epochs > 0
        if needs_public and not public_size:
            what = (
                "pruning.scorer='public_grad'"
                if scorer == "public_grad"
                else f"pruning.pretrain_epochs={pretrain_epochs}"
            )
            raise ConfigError(
                f"{what} needs public data but dataset.public_size=0: set dataset.public_size > 0 "
                "(examples held out of the private training set); scoring on private data would "
                "spend privacy that is not accounted"
            )
        self.scorer = scorer
        self.grad_score = grad_score
        self.scope = scope
        self.frozen_value = frozen_value
        self.prune_all = bool(prune_all)
        self.public = public
        self.public_size = int(public_size or 0)
        self.pretrain_epochs = pretrain_epochs
        self.pretrain_lr = float(pretrain_lr)
        self.public_batch_size = int(public_batch_size)
        self.seed = seed
        self.masks: M.Masks = {}
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
        public = self._public_data(datamodule)
        if self.pretrain_epochs:
            self._pretrain(model, datamodule)
        params = M.maskable_parameters(model, self.prune_all)
        if self.scorer == "magnitude":
            scores = M.magnitude_scores(params)
        elif self.scorer == "random":
            scores = M.random_scores(
                params, torch.Generator().manual_seed(M.stream_seed(self.seed, "freeze"))
            )
        else:
            loader = datamodule.public_dataloader(self.public_batch_size, shuffle=False)
            scores = M.public_gradient_scores(
                model, loader, [n for n, _ in params], taylor=self.grad_score == "taylor"
            )
        chosen = M.top_fraction(scores, self.rate, self.scope)
        self.masks = {n: chosen[n].to(p) for n, p in params}
        self.mask_source = self._describe_source(public)
        self._apply(model)
        M.register_kept(model, self.masks)
        log.info(
            "freeze: rate=%g scorer=%s scope=%s: %d of %d maskable weights train (%s)",
            self.rate,
            self.scorer,
            self.scope,
            sum(int(m.sum()) for m in self.masks.values()),
            sum(m.numel() for m in self.masks.values()),
            self.mask_source,
        )

    def _public_data(self, datamodule) -> int:
        """Size of the public split; refuses to score on data that is not public."""
        if self.scorer != "public_grad" and not self.pretrain_epochs:
            return 0
        if getattr(datamodule, "public", None) is None:
            datamodule.setup("fit")
        size = len(datamodule.public) if datamodule.public is not None else 0
        if size == 0:
            raise ConfigError(
                f"pruning.scorer={self.scorer!r} with pretrain_epochs={self.pretrain_epochs} "
                "needs public data but the data module has none: set dataset.public_size > 0"
            )
        return size

    def _pretrain(self, model: nn.Module, datamodule) -> None:
        """Non-private SGD on the public split only (before any private data is touched)."""
        optimizer = torch.optim.SGD(model.parameters(), lr=self.pretrain_lr, momentum=0.9)
        device = next(model.parameters()).device
        model.train()
        for _ in range(self.pretrain_epochs):
            for x, y in datamodule.public_dataloader(self.public_batch_size, shuffle=True):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x.to(device)), y.to(device)).backward()
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _describe_source(self, public_size: int) -> str:
        if self.scorer == "random":
            source = f"random (seed {self.seed})"
        elif self.scorer == "magnitude":
            source = "magnitude of the starting weights"
        else:
            kind = "|grad|" if self.grad_score == "grad" else "|weight*grad|"
            source = f"{kind} on the public split"
        if public_size:
            source += (
                f"; public split = {public_size} held-out training examples (dataset.public_size)"
            )
        if self.pretrain_epochs:
            source += f"; after {self.pretrain_epochs} non-private epochs on the public split"
        return source

    @torch.no_grad()
    def _apply(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        self.frozen_parameters = []
        for n, mask in self.masks.items():
            if self.frozen_value == "zero":
                params[n].mul_(mask)
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
