"""The clipping-engine interface: per-sample norms and the clipped sum, nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weights = dict[str, torch.Tensor] | None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of per-sample losses: each sample's gradient is then its own, unscaled."""
    return F.cross_entropy(logits, targets, reduction="sum")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def squared_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """‖row_i‖² of a B × ... tensor (a reduction kernel: no squared copy is made)."""
    return torch.linalg.vector_norm(per_sample.flatten(1), dim=1).square()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C/‖g_i‖), with 1 for a zero gradient."""
    return (max_grad_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)


def clip_materialized(
    per_sample: dict[str, torch.Tensor], max_grad_norm: float, weights: Weights = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip instantiated per-sample gradients (B × param shape) jointly and sum them.

    ``weights`` multiply coordinates before the norm is taken (0/1 masks select coordinates).
    """
    if weights:
        per_sample = {n: g * weights[n] if n in weights else g for n, g in per_sample.items()}
    squares = [squared_norms(g) for g in per_sample.values()]
    norms = torch.stack(squares).sum(0).sqrt()
    factors = clip_factors(norms, max_grad_norm)
    sums = {n: torch.tensordot(factors, g, dims=1) for n, g in per_sample.items()}
    return sums, norms


class ClippingEngine(ABC):
    """Computes, for a batch, each sample's gradient norm and the sum of clipped gradients.

    An engine is attached to a model for as long as it is used (hooks, if any, live that
    long) and detached afterwards, leaving the model as it was.
    """

    mode: str = ""

    def __init__(self, model: nn.Module, loss_fn: LossFn = summed_cross_entropy) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.attached = False

    def attach(self) -> None:
        self.attached = True

    def detach(self) -> None:
        self.attached = False

    @contextmanager
    def attached_to_model(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def clipped_sum(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        max_grad_norm: float,
        weights: Weights = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Return (clipped gradient sums by parameter name, per-sample norms, summed loss).

        Leaves ``.grad`` of every parameter untouched. An empty batch (a Poisson sample may
        be one) is a valid step in every mode: zero sums, no norms, zero loss; the caller
        still adds the noise and counts the step.
        """
        if len(inputs) == 0:
            sums = {n: torch.zeros_like(p) for n, p in trainable_parameters(self.model)}
            like = next(iter(sums.values()), torch.zeros((), device=inputs.device))
            return sums, like.new_zeros(0), like.new_zeros(())
        return self._clipped_sum(inputs, targets, max_grad_norm, weights)

    @abstractmethod
    def _clipped_sum(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        max_grad_norm: float,
        weights: Weights = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """:meth:`clipped_sum` of a non-empty batch."""


class MaterializingEngine(ClippingEngine):
    """Engines that instantiate every per-sample gradient, then clip them."""

    @abstractmethod
    def per_sample_gradients(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients (B × param shape) by name, and the summed loss."""

    def _clipped_sum(self, inputs, targets, max_grad_norm, weights=None):
        per_sample, loss = self.per_sample_gradients(inputs, targets)
        sums, norms = clip_materialized(per_sample, max_grad_norm, weights)
        return sums, norms, loss
