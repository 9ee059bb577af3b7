"""Per-sample clipping engines and the one-call API ``clip_and_sum``."""

from __future__ import annotations

import re

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
from dpexp.clipping.verify import ExactnessError, ProbeReport, probe

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


def check_supported(
    model: nn.Module, mode: str, example: torch.Tensor | None = None, num_classes: int = 2
) -> None:
    """Raise :class:`UnsupportedModelError` (one line, naming the module or parameter) if
    ``mode`` cannot clip ``model``'s per-sample gradients exactly.

    With an ``example`` batch (random inputs of the model's input shape will do), the engine
    also runs on it and is compared with one backward per example (:func:`probe`): the
    traced plan, every layer's path and the clipped sum are exercised before training."""
    engine = make_engine(mode, model)
    try:
        engine.attach()
        if example is not None:
            targets = torch.arange(len(example), device=example.device) % num_classes
            with torch.random.fork_rng(devices=[]):  # with dropout on, as in training
                engine.clipped_sum(example, targets, 1.0)
            probe(engine, example, targets, max_grad_norm=None)
    except (UnsupportedModelError, ExactnessError):
        raise
    except (NotImplementedError, ValueError, RuntimeError) as exc:  # Opacus', torch's refusals
        raise UnsupportedModelError(_one_line(exc)) from exc
    finally:
        if engine.attached:
            engine.detach()


def _one_line(exc: Exception) -> str:
    """A library's refusal in one line; Opacus prints whole modules, name them instead."""
    text = str(exc)
    named = re.search(r"\(([\w.]*):(\w+)\(", text)
    head = text[: named.start()] if named else text.strip().splitlines()[0]
    head = head.strip(" [\"'").removeprefix("NotImplementedError(").strip(" \"'")
    where = f" (model module {named.group(1) or '<root>'!r}, {named.group(2)})" if named else ""
    return f"{type(exc).__name__}: {head[:200]}{where}"


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
    "ExactnessError",
    "ProbeReport",
    "UnsupportedModelError",
    "check_supported",
    "clip_and_sum",
    "clip_factors",
    "clip_materialized",
    "make_engine",
    "probe",
    "summed_cross_entropy",
    "trainable_parameters",
]
