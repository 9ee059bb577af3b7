"""Tramèr & Boneh's ScatterNet+CNN (ICLR 2021): a fixed wavelet scattering transform in front of
a small tanh CNN.

The scattering transform has no parameters and uses no data statistics: each image's features
depend on that image alone, so computing them costs no privacy. That is also why the data module
may compute them once for the whole dataset instead of at every step (``fixed_features``).
"""

from __future__ import annotations

import torch
from torch import nn


class Scattering(nn.Module):
    """Scattering transform of order 2 (``J`` scales, ``L`` angles; kymatio): an image of shape
    (C, H, W) becomes C·(1 + J·L + L²·J(J−1)/2) channels at (H/2^J, W/2^J), e.g. 81 × 7 × 7
    for MNIST with J = 2, L = 8."""

    def __init__(self, image_shape=(1, 28, 28), J: int = 2, L: int = 8) -> None:
        super().__init__()
        # kymatio's top-level `kymatio.torch` also imports its 3-D transform, which needs a
        # scipy function removed in scipy 1.15; the 2-D frontend does not.
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        self.image_shape = tuple(image_shape)
        self.transform = ScatteringTorch2D(J=J, shape=self.image_shape[1:], L=L)
        with torch.no_grad():
            self.output_shape = tuple(self(torch.zeros(1, *self.image_shape)).shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x).flatten(1, 2)  # (B, C, K, h, w) -> (B, C·K, h, w)


class ScatterNetCNN(nn.Module):
    """Scattering (J = 2, L = 8), GroupNorm without affine parameters (``groups`` groups, a
    per-example normalisation, so no privacy cost), then conv 16@3×3 s2 p1, tanh, conv 32@3×3
    p1, tanh, fc →32, tanh, fc 32→classes. ``forward`` takes raw images or, when the data
    module has precomputed them, their scattering features."""

    def __init__(
        self,
        image_shape=(1, 28, 28),
        num_classes: int = 10,
        J: int = 2,
        L: int = 8,
        groups: int = 27,
        channels: tuple[int, int] | list[int] = (16, 32),
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.fixed_features = Scattering(self.image_shape, J=J, L=L)
        k, h, w = self.fixed_features.output_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.GroupNorm(groups, k, affine=False),
            nn.Conv2d(k, c1, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.Tanh(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, k, h, w)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) == self.image_shape:
            x = self.fixed_features(x)
        return self.classifier(self.features(x))

    def get_classifier(self) -> nn.Module:
        """The head (timm's name for it): the last Linear, features → class scores."""
        return self.classifier[-1]
