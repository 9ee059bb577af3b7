"""The LightningModule: model, loss and metrics. It knows nothing about privacy: the
gradient of each batch comes from ``gradient_step``, which the privacy callback installs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from dpexp.methods.base import Method
from dpexp.privacy.step import PRIVATE_STATS, GradientStep


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        methods: Sequence[Method] = (),
        scheduler: Callable[..., LRScheduler] | None = None,
        log_private_stats: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.methods = list(methods)
        # Statistics of private batches reach loggers and the progress bar only on request.
        self.log_private_stats = log_private_stats
        self.automatic_optimization = False  # the gradient step drives the optimizer
        self.gradient_step: GradientStep = GradientStep(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        stats = self.gradient_step(batch, optimizer.optimizer, optimizer.step)
        if stats is None:  # the privacy budget stopped training
            return
        if (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()  # manual optimisation: once per optimizer step
        if "update_norm" in stats:
            self.log("train/update_norm", stats["update_norm"], on_step=True, on_epoch=True)
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)
        if not self.log_private_stats:
            return
        for key in PRIVATE_STATS:
            if key in stats:
                epoch = key != "batch_size"
                self.log(f"train/{key}", float(stats[key]), on_step=True, on_epoch=epoch,
                         prog_bar=key == "loss")  # fmt: skip

    def _evaluate(self, batch, prefix: str) -> None:
        x, y = batch
        logits = self.model(x)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=len(y))
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=len(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = self._optimizer()
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(optimizer)}

    def _optimizer(self) -> torch.optim.Optimizer:
        for method in self.methods:
            if (params := method.optimizer_parameters(self.model)) is not None:
                return self.optimizer_factory(params=params)
        return self.optimizer_factory(
            params=[p for p in self.model.parameters() if p.requires_grad]
        )

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> LRScheduler:
        """A schedule over optimizer steps; ``T_max: null`` means the planned number."""
        keywords = getattr(self.scheduler_factory, "keywords", {})
        if "T_max" in keywords and keywords["T_max"] is None:
            steps = int(self.trainer.estimated_stepping_batches)
            return self.scheduler_factory(optimizer, T_max=steps)
        return self.scheduler_factory(optimizer)
