"""The DP-SGD step, in one place.

    per-sample gradients → (method picks coordinates) → clip → sum → noise → ÷ B
    → (method transforms the update) → optimizer step → (method accepts/restores) → account

The same pipeline with ``noise_multiplier=None`` is the non-private baseline: the mean
gradient of the batch, unclipped, through the same method hooks and optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dpexp.accounting import Ledger
from dpexp.clipping import (
    ClippingEngine,
    ProbeReport,
    clip_materialized,
    probe,
    trainable_parameters,
)
from dpexp.clipping.base import Weights
from dpexp.methods.base import Method

# Statistics of the private batch that no mechanism releases: only logged on request
# (logger.private_stats=true); everything else a step reports is a DP output.
PRIVATE_STATS = ("loss", "clip_fraction", "grad_norm", "batch_size")

# Per-sample gradients of extra examples for (step, coordinate weights): chunks of
# B_extra × param shape tensors by name.
InjectedGradients = Callable[[int, Weights], Iterable[dict[str, torch.Tensor]]]


def world_size() -> int:
    """Processes sharing each logical batch (1 unless torch.distributed is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over all processes, in one flat collective."""
    names = list(tensors)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([tensors[n].numel() for n in names])
    return {n: part.view_as(tensors[n]) for n, part in zip(names, parts, strict=True)}


def merge_weights(methods: Sequence[Method], step: int) -> dict[str, torch.Tensor] | None:
    """Multiply the coordinate weights of all methods (freeze × select compose)."""
    merged: dict[str, torch.Tensor] = {}
    for method in methods:
        for name, w in (method.coordinate_weights(step) or {}).items():
            merged[name] = merged[name] * w if name in merged else w
    return merged or None


class GradientStep:
    """Computes the update of one logical batch and applies it with the optimizer."""

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[Method] = (),
        *,
        engine: ClippingEngine | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float | None = None,
        expected_batch_size: float | None = None,
        sample_rate: float | None = None,
        physical_batch_size: int | None = None,
        ledger: Ledger | None = None,
        noise_generator: torch.Generator | None = None,
        max_steps: int | None = None,
        verify: bool = False,
        secure_noise: bool = False,
    ) -> None:
        self.model = model
        self.methods = list(methods)
        self.engine = engine
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.physical_batch_size = physical_batch_size
        self.ledger = ledger
        self.noise_generator = noise_generator
        self.max_steps = max_steps
        self.steps = 0
        # The exactness probe runs on the first non-empty chunk, before anything is released.
        self.verify = verify
        self.verification: ProbeReport | None = None
        self.secure_noise = secure_noise
        # Privacy audits set this: gradient canaries clipped and noised with the batch.
        self.injected_gradients: InjectedGradients | None = None

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    def mechanisms(self) -> list[tuple[float, float]]:
        """What one step runs on private data, for the accountant."""
        own = [(self.noise_multiplier, self.sample_rate)]
        return own + [m for method in self.methods for m in method.privacy_mechanisms()]

    def budget_allows_step(self) -> bool:
        return self.max_steps is None or self.steps < self.max_steps

    def _chunks(self, x: torch.Tensor, y: torch.Tensor):
        size = self.physical_batch_size or max(len(y), 1)
        return zip(x.split(size), y.split(size), strict=True)

    def private_gradient(
        self, x: torch.Tensor, y: torch.Tensor, weights
    ) -> tuple[dict[str, torch.Tensor], dict]:
        params = trainable_parameters(self.model)
        sums: dict[str, torch.Tensor] | None = None
        loss, norms = torch.zeros(()), []
        for xc, yc in self._chunks(x, y):
            chunk_sums, chunk_norms, chunk_loss = self.engine.clipped_sum(
                xc, yc, self.max_grad_norm, weights
            )
            if self.verify and len(yc):  # after the engine chose its paths at this size
                self.verification = probe(self.engine, xc, yc, self.max_grad_norm, weights)
                self.verify = False
            if sums is None:  # the engine's fresh tensors are ours: summed into in place
                sums = chunk_sums
            else:
                for n, g in chunk_sums.items():
                    sums[n] += g
            norms.append(chunk_norms.detach())
            loss = loss + chunk_loss.detach().cpu()
        # In the parameter's dtype before the noise: an engine run under autocast sums in
        # bfloat16, and the noise must be drawn and added at the parameter's precision.
        sums = {
            n: sums[n].to(p.dtype) if sums and n in sums else torch.zeros_like(p) for n, p in params
        }
        injected = self.injected_gradients(self.steps, weights) if self.injected_gradients else ()
        for per_sample in injected:
            for n, g in clip_materialized(per_sample, self.max_grad_norm, weights)[0].items():
                sums[n] += g
        std = self.noise_multiplier * self.max_grad_norm
        # Across processes each one clips its share; one process draws the noise of the
        # whole logical batch, so the summed gradient gets N(0, σ²C²) once, not once per rank.
        draws_noise = world_size() == 1 or dist.get_rank() == 0
        for n, p in params if draws_noise else ():
            noise = self.gaussian(std, p)
            if weights is not None and n in weights:
                noise = noise * (weights[n] != 0)  # a dropped coordinate gets no noise
            sums[n].add_(noise)
        if world_size() > 1:
            sums = all_reduce_sum(sums)
        sums = {n: s.div_(self.expected_batch_size) for n, s in sums.items()}
        norms = torch.cat(norms) if norms else torch.zeros(0)
        stats = {"loss": loss / max(len(y), 1), "batch_size": len(y)}
        if len(norms):
            stats["clip_fraction"] = (norms > self.max_grad_norm).float().mean()
            stats["grad_norm"] = norms.median()
        return sums, stats

    def gaussian(self, std: float, like: torch.Tensor) -> torch.Tensor:
        """N(0, std²) noise shaped like ``like``. With ``secure_noise``, as Opacus' secure mode
        draws it: one draw discarded, then the sum of 4 draws / 2 (Holohan & Braghin 2021,
        arXiv 2107.10138, §5.1), against floating-point attacks on the sampler."""

        def draw() -> torch.Tensor:
            return torch.normal(
                0.0, std, like.shape, generator=self.noise_generator, device=like.device,
                dtype=like.dtype,
            )  # fmt: skip

        if not self.secure_noise:
            return draw()
        torch.normal(0.0, std, (1,), generator=self.noise_generator, device=like.device)
        return (draw() + draw() + draw() + draw()) / 2

    def plain_gradient(self, x, y, weights) -> tuple[dict[str, torch.Tensor], dict]:
        params = trainable_parameters(self.model)
        if world_size() > 1:  # every rank joins the collective, even with an empty batch
            return self._plain_gradient_across_processes(x, y, weights, params)
        if len(y) == 0:
            return {n: torch.zeros_like(p) for n, p in params}, {"batch_size": 0}
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, [p for _, p in params])
        grads = {n: g for (n, _), g in zip(params, grads, strict=True)}
        if weights is not None:
            grads = {n: g * weights[n] if n in weights else g for n, g in grads.items()}
        return grads, {"loss": loss.detach(), "batch_size": len(y)}

    def _plain_gradient_across_processes(self, x, y, weights, params):
        """The mean gradient of the global batch: per-rank sums, all-reduced, ÷ global size."""
        grads = {n: torch.zeros_like(p) for n, p in params}
        loss = torch.zeros((), device=grads[params[0][0]].device)
        if len(y):
            loss = F.cross_entropy(self.model(x), y, reduction="sum")
            summed = torch.autograd.grad(loss, [p for _, p in params])
            grads = {n: g for (n, _), g in zip(params, summed, strict=True)}
        count = torch.tensor(float(len(y)), device=loss.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        grads = {n: g / count.clamp_min(1.0) for n, g in all_reduce_sum(grads).items()}
        if weights is not None:
            grads = {n: g * weights[n] if n in weights else g for n, g in grads.items()}
        return grads, {"loss": loss.detach() / max(len(y), 1), "batch_size": len(y)}

    def __call__(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        optimizer_step: Callable[[], None] | None = None,
    ) -> dict | None:
        """Run one step; return its statistics, or None if the privacy budget forbids it."""
        if not self.budget_allows_step():
            return None
        x, y = batch
        weights = merge_weights(self.methods, self.steps)
        if self.private:
            grads, stats = self.private_gradient(x, y, weights)
        else:
            grads, stats = self.plain_gradient(x, y, weights)
        for method in self.methods:
            grads = method.transform_update(grads)
        if grads:  # the released (noisy, averaged) update: a DP output
            stats["update_norm"] = torch.stack([g.detach().norm() for g in grads.values()]).norm()
        named = dict(self.model.named_parameters())  # an update may name any parameter
        for n, g in grads.items():
            named[n].grad = g
        for method in self.methods:
            method.before_optimizer_step(optimizer)
        (optimizer_step or optimizer.step)()
        for method in self.methods:
            method.after_optimizer_step(optimizer)
        for n in grads:
            named[n].grad = None
        self.steps += 1
        if self.private:
            self.ledger.record(self.mechanisms())
        return stats
