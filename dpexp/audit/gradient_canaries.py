"""White-box Dirac gradient canaries (Nasr et al. 2023): per-sample gradients injected into the
DP step after the clipping engine, each on its own trainable coordinate."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

from dpexp.audit.canaries import CHUNK, Canaries
from dpexp.clipping import trainable_parameters
from dpexp.errors import ConfigError


class GradientCanaries(Canaries):
    """Dirac gradient canaries injected into, and read back from, the DP step.

    At ``on_fit_start`` (after every method has set up its reparametrisation or freezing) it
    installs itself as the step's injected gradients: an included canary joins each step with
    the data's sample rate q and is clipped by ``clip_materialized`` with the batch's
    coordinate weights, around the clipping engine. The canary coordinates are drawn at the
    first step, among the trainable coordinates the methods' weights keep at that step (a
    fixed public mask, e.g. freezing, would silence canaries on masked coordinates; the mask
    is no secret of the private data).
    """

    name = "audit_gradient_canaries"

    def __init__(self, canaries: int, canary_norm: float, sample_rate: float, seed: int) -> None:
        if canary_norm < 1:
            raise ConfigError(
                f"audit.canary_norm={canary_norm!r} is invalid: >= 1 (in units of C, so that "
                "every canary is clipped to exactly C)"
            )
        super().__init__(canaries, seed)
        self.canary_norm = canary_norm
        self.sample_rate = sample_rate
        self.coordinates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.clip_norm = math.nan

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        step = pl_module.gradient_step
        params = trainable_parameters(step.model)
        self.shapes = {name: p.shape for name, p in params}
        self.clip_norm = step.max_grad_norm
        self.device, self.dtype = params[0][1].device, params[0][1].dtype
        step.injected_gradients = self.gradients

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
