"""Model zoo: each builder takes ``image_shape`` and ``num_classes``, returns a DP-ready model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpexp.models.cnn import CNNCifar, CNNTanh
from dpexp.models.compat import IncompatibleModelError, make_dp_compatible
from dpexp.models.resnet_gn import resnet18_gn
from dpexp.models.scatternet import ScatterNetCNN


def timm_model(
    model_name: str, image_shape=(3, 32, 32), num_classes: int = 10, **kwargs
) -> nn.Module:
    """Any timm architecture (random init: no hub downloads), made DP-compatible."""
    import timm

    kwargs.setdefault("in_chans", image_shape[0])
    if "vit" in model_name or "deit" in model_name:
        kwargs.setdefault("img_size", tuple(image_shape[1:]))
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    return make_dp_compatible(model)


BUILDERS = {
    "cnn_tanh": CNNTanh,
    "cnn_cifar": CNNCifar,
    "resnet_gn": resnet18_gn,
    "scatternet": ScatterNetCNN,
    "timm": timm_model,
}


def build_model(
    name: str,
    image_shape=(1, 28, 28),
    num_classes: int = 10,
    weights: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` and optionally load a local state dict from ``weights``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(BUILDERS)}")
    model = BUILDERS[name](image_shape=tuple(image_shape), num_classes=num_classes, **kwargs)
    if weights:
        state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
    return model


__all__ = [
    "BUILDERS",
    "CNNCifar",
    "CNNTanh",
    "IncompatibleModelError",
    "ScatterNetCNN",
    "build_model",
    "make_dp_compatible",
    "resnet18_gn",
    "timm_model",
]
