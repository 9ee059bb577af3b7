"""Where public data comes from (``public.source``, ``public.size``) and how its images are
brought to the private model's input.

Sources:

- ``none``: no public data;
- ``heldout``: the last ``public.size`` examples of the private dataset's training split,
  removed from the private set (N shrinks by ``public.size``);
- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, inside the wheel,
  no download), a "close but different" public set for MNIST;
- any other dataset of the ``dataset`` group (e.g. ``fashion_mnist`` for private MNIST): the
  first ``public.size`` examples of its training split.

Public images meet the private model's input as follows (:func:`to_private_input`): pixels
in [0, 1]; channels: grey → colour by repetition, colour → grey by luminance (ITU-R 601:
0.299 R + 0.587 G + 0.114 B); size: bilinear resize to the private height × width
(antialiased when shrinking); normalization: the private dataset's mean and std (a private
``synthetic`` set has none: the public set's own per-channel mean and std). Nothing here reads
private data: the public set is free, and never part of the private set.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dpexp.data.sources import NORMALIZATION, TORCHVISION, load_torchvision, locate
from dpexp.errors import ConfigError

DIGITS = "digits"
DIGITS_SIZE, DIGITS_SHAPE, DIGITS_CLASSES = 1797, (1, 8, 8), 10
SOURCES = ("none", "heldout", DIGITS, *TORCHVISION)
LUMINANCE = (0.299, 0.587, 0.114)


def available(source: str, private_train_size: int) -> int:
    """Examples the source can provide (heldout: all but one of the private training set)."""
    if source == "heldout":
        return private_train_size - 1
    if source == DIGITS:
        return DIGITS_SIZE
    if source in TORCHVISION:
        return TORCHVISION[source][2]
    return 0


def public_count(
    source: str, size: int | None, private: str, private_train_size: int, num_classes: int
) -> int:
    """The number of public examples ``public.source``/``public.size`` give, or one
    :class:`ConfigError` line (unknown source, bad size, overlap with the private set)."""
    if source not in SOURCES:
        allowed = ", ".join(SOURCES)
        raise ConfigError(f"public.source={source!r} is invalid: choose one of {allowed}")
    if source == private:
        raise ConfigError(
            f"public.source={source!r} is invalid: it is the private dataset; use "
            "public.source=heldout to declare part of it public (removed from the private set)"
        )
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise ConfigError(f"public.size={size!r} is invalid: an integer >= 1, or null")
    if source == "none":
        if size:
            raise ConfigError(
                f"public.size={size!r} is invalid with public.source='none': set a source "
                "(heldout, digits or a dataset) or public.size=null"
            )
        return 0
    if source in TORCHVISION and TORCHVISION[source][5] > num_classes:
        raise ConfigError(
            f"public.source={source!r} is invalid for dataset {private!r}: its labels take "
            f"{TORCHVISION[source][5]} values, the model scores {num_classes} classes"
        )
    most = available(source, private_train_size)
    if source == "heldout" and size is None:
        raise ConfigError(
            f"public.size=None is invalid with public.source='heldout': the number of training "
            f"examples to hold out, in [1, {most}]"
        )
    if size is not None and not 1 <= size <= most:
        raise ConfigError(f"public.size={size!r} is invalid: {source} has [1, {most}] examples")
    return most if size is None else size


def check_available(source: str, root: str | Path) -> None:
    """An external source can be read: scikit-learn installed, a dataset's files found."""
    if source == DIGITS:
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise ConfigError(
                "public.source='digits' is invalid here: it needs scikit-learn "
                "(pip install scikit-learn), which is not installed"
            )
    elif source in TORCHVISION:
        locate(source, root)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as N×1×8×8 in [0, 1] (ink bright, as in MNIST) and labels."""
    check_available(DIGITS, ".")
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.as_tensor(digits.target, dtype=torch.long)


def load_public(source: str, size: int, root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` images of an external source, in [0, 1], and their labels."""
    if source == DIGITS:
        x, y = load_digits()
    else:
        x, y = load_torchvision(source, locate(source, root), train=True, normalize=False)
    return x[:size], y[:size]


def to_private_input(x: torch.Tensor, image_shape: tuple[int, ...], private: str) -> torch.Tensor:
    """Images in [0, 1] (N×C×H×W) → the private model's input: channels, size, normalization."""
    channels, height, width = image_shape
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            x = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMINANCE)).unsqueeze(1)
        else:
            raise ConfigError(
                f"public.source: cannot map {x.shape[1]}-channel images to {channels} channels"
            )
    if tuple(x.shape[2:]) != (height, width):
        shrink = x.shape[2] > height or x.shape[3] > width
        x = F.interpolate(
            x, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
        )
    if private in NORMALIZATION:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[private])
    else:  # synthetic private data is standard Gaussian: standardise the public set itself
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ((x - mean) / std).contiguous()


def describe(source: str, size: int, private: str, shape: tuple[int, ...]) -> str:
    """What the public set is and how it was brought to the private input (result.json)."""
    if source == "none":
        return "none"
    if source == "heldout":
        return (
            f"the last {size} examples of {private}'s training split, removed from the private set"
        )
    target = "×".join(map(str, shape))
    before = "×".join(map(str, DIGITS_SHAPE if source == DIGITS else TORCHVISION[source][4]))
    norm = f"{private}'s mean/std" if private in NORMALIZATION else "its own per-channel mean/std"
    return (
        f"the first {size} of {source} ({before}, pixels in [0, 1]) → {target} "
        f"(channels, bilinear resize), normalised with {norm}"
    )
