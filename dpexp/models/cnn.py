"""The CNNs of Tramèr & Boneh (ICLR 2021), "Differentially Private Learning Needs Better
Features"."""

from __future__ import annotations

import torch
from torch import nn


def _flat_features(features: nn.Module, image_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, *image_shape)).flatten(1).shape[1]


class CNNTanh(nn.Module):
    """MNIST CNN: conv 16@8×8 s2 p2, tanh, maxpool 2 s1, conv 32@4×4 s2, tanh, maxpool 2 s1,
    fc →32, tanh, fc 32→classes (fc 512→32 on 28×28 inputs). ``width`` multiplies the
    channels and the hidden units (16·w, 32·w, 32·w)."""

    def __init__(self, image_shape=(1, 28, 28), num_classes: int = 10, width: int = 1) -> None:
        super().__init__()
        image_shape = tuple(image_shape)
        self.features = nn.Sequential(
            nn.Conv2d(image_shape[0], 16 * width, 8, stride=2, padding=2),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(16 * width, 32 * width, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, image_shape), 32 * width),
            nn.Tanh(),
            nn.Linear(32 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def get_classifier(self) -> nn.Module:
        """The head (timm's name for it): the last Linear, features → class scores."""
        return self.classifier[-1]


class CNNCifar(nn.Module):
    """CIFAR CNN: three blocks of two 3×3 convs (32, 64, 128 channels) with tanh and 2×2
    max-pooling, then fc →128, tanh, fc 128→classes."""

    def __init__(self, image_shape=(3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        image_shape = tuple(image_shape)
        layers: list[nn.Module] = []
        channels = image_shape[0]
        for width in (32, 64, 128):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.Tanh(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.Tanh(),
                nn.MaxPool2d(2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, image_shape), 128),
            nn.Tanh(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def get_classifier(self) -> nn.Module:
        """The head (timm's name for it): the last Linear, features → class scores."""
        return self.classifier[-1]
