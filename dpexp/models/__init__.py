"""Model zoo: each builder takes ``image_shape`` and ``num_classes``, returns a DP-ready model.

:func:`build_model` also decides everything fine-tuning changes before the clipping engine
attaches (docs/finetuning.md): the starting weights (``weights``, or timm's ``pretrained``), what
becomes of the classifier (``head``) and which parameters train (``trainable``).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from torch import nn

from dpexp.errors import ConfigError
from dpexp.models.cnn import CNNCifar, CNNTanh
from dpexp.models.compat import IncompatibleModelError, make_dp_compatible
from dpexp.models.head import Head, find_head
from dpexp.models.resnet_gn import resnet18_gn
from dpexp.models.scatternet import ScatterNetCNN
from dpexp.models.timm_models import hub_weights, timm_model
from dpexp.models.trainable import apply_trainable, parse_patterns
from dpexp.models.weights import (
    HEADS,
    PRETRAINED_WEIGHTS,
    RUN_WEIGHTS,
    load_weights,
    save_weights,
)

log = logging.getLogger(__name__)

BUILDERS = {
    "cnn_tanh": CNNTanh,
    "cnn_cifar": CNNCifar,
    "resnet_gn": resnet18_gn,
    "scatternet": ScatterNetCNN,
    "timm": timm_model,
}

# How each built model was initialised, for result.json (a registry, not a module attribute).
_INIT: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def build_model(
    name: str,
    image_shape=(1, 28, 28),
    num_classes: int = 10,
    weights: str | None = None,
    head: str = "reset",
    strict: bool = True,
    trainable: Any = None,
    **kwargs,
) -> nn.Module:
    """Build model ``name``; optionally start from ``weights`` (a run dir, Lightning checkpoint,
    state dict or safetensors file) and train only the parameters ``trainable`` matches."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(BUILDERS)}")
    if head not in HEADS:
        raise ConfigError(f"model.head={head!r} is invalid: choose one of {', '.join(HEADS)}")
    if not isinstance(strict, bool):
        raise ConfigError(f"model.strict={strict!r} is invalid: true or false")
    if weights and kwargs.get("pretrained"):
        raise ConfigError(
            f"model.pretrained=true is invalid with model.weights={str(weights)!r}: choose one "
            "source of starting weights"
        )
    patterns = parse_patterns(trainable)
    model = BUILDERS[name](image_shape=tuple(image_shape), num_classes=num_classes, **kwargs)
    init: dict[str, Any] = {"model_weights": None, "model_head": None}
    if weights:
        init = load_weights(model, weights, head, strict, name)
    elif kwargs.get("pretrained"):
        hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
        changed = hub_classes not in (None, num_classes)
        head_note = f"reset by timm: {hub_classes} → {num_classes} classes" if changed else "loaded"
        init = {"model_weights": hub_weights(model), "model_head": head_note}
    trained = apply_trainable(model, patterns, name)
    new_head = find_head(model) if init["model_head"] not in (None, "loaded") else None
    frozen = [n for n in new_head.parameter_names if n not in trained] if new_head else []
    if frozen:
        log.warning(
            "%s has a new random classifier %s (model.head=reset) but model.trainable=%s "
            "leaves %s frozen; add 'head' to model.trainable to train it",
            name,
            new_head.name,
            patterns,
            ", ".join(frozen),
        )
    _INIT[model] = {**init, "model_trainable": patterns}
    return model


def init_fields(model: nn.Module) -> dict[str, Any]:
    """result.json entries saying how ``model`` started: weights file, head, trainable patterns."""
    return dict(
        _INIT.get(model, {"model_weights": None, "model_head": None, "model_trainable": None})
    )


__all__ = [
    "BUILDERS",
    "PRETRAINED_WEIGHTS",
    "RUN_WEIGHTS",
    "CNNCifar",
    "CNNTanh",
    "Head",
    "IncompatibleModelError",
    "ScatterNetCNN",
    "build_model",
    "find_head",
    "init_fields",
    "make_dp_compatible",
    "resnet18_gn",
    "save_weights",
    "timm_model",
]
