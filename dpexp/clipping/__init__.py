"""Per-sample clipping engines and the one-call API ``clip_and_sum``."""

from __future__ import annotations

import torch
from torch import nn

from dpexp.clipping.base import (
    ClippingEngine,
    LossFn,
    Weights,
    clip_factors,
    clip_materialized,
    summed_cross_entropy,
    trainable_parameters,
)
from dpexp.clipping.fast import AutoEngine, BookKeepingEngine, GhostEngine, MixedGhostEngine
from dpexp.clipping.per_sample import FunctorchEngine, OpacusPerSampleEngine
from dpexp.clipping.tape import UnsupportedModelError

ENGINES: dict[str, type[ClippingEngine]] = {
    engine.mode: engine
    for engine in (
        OpacusPerSampleEngine,
        FunctorchEngine,
        GhostEngine,
        MixedGhostEngine,
        BookKeepingEngine,
        AutoEngine,
    )
}
MODES = tuple(ENGINES)


def make_engine(
    mode: str, model: nn.Module, loss_fn: LossFn = summed_cross_entropy
) -> ClippingEngine:
    if mode not in ENGINES:
        raise ValueError(f"unknown clipping mode {mode!r}; choose one of {MODES}")
    return ENGINES[mode](model, loss_fn)


def check_supported(model: nn.Module, mode: str) -> None:
    """Raise :class:`UnsupportedModelError` (naming the module and its type) if ``mode``
    cannot clip ``model``'s per-sample gradients; attaches and detaches, nothing else."""
    engine = make_engine(mode, model)
    try:
        engine.attach()
    except UnsupportedModelError:
        raise
    except (NotImplementedError, ValueError) as exc:  # Opacus' refusals
        raise UnsupportedModelError(f"{type(exc).__name__}: {exc}") from exc
    engine.detach()


def clip_and_sum(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_grad_norm: float,
    mode: str = "per_sample",
    weights: Weights = None,
    loss_fn: LossFn = summed_cross_entropy,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sum over the batch of per-sample gradients clipped to ``max_grad_norm`` (no noise).

    Returns ``(grads, norms)``: ``grads`` maps every trainable parameter name to its clipped
    sum, ``norms`` holds the per-sample gradient norms before clipping. The model is left
    as it was: no hooks remain and ``.grad`` is untouched.
    """
    engine = make_engine(mode, model, loss_fn)
    with engine.attached_to_model():
        grads, norms, _ = engine.clipped_sum(inputs, targets, max_grad_norm, weights)
    return grads, norms


__all__ = [
    "ENGINES",
    "MODES",
    "ClippingEngine",
    "UnsupportedModelError",
    "check_supported",
    "clip_and_sum",
    "clip_factors",
    "clip_materialized",
    "make_engine",
    "summed_cross_entropy",
    "trainable_parameters",
]
