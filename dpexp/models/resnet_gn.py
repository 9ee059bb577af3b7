"""torchvision's ResNet-18 made DP-friendly: GroupNorm instead of BatchNorm, no in-place ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class OutOfPlaceBasicBlock(BasicBlock):
    """BasicBlock without ``out += identity`` and in-place ReLU, which break backward hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetGN(ResNet):
    """torchvision's ResNet with the classifier named as in timm (``get_classifier``)."""

    def get_classifier(self) -> nn.Module:
        return self.fc


def resnet18_gn(image_shape=(3, 32, 32), num_classes: int = 10, groups: int = 32) -> nn.Module:
    """ResNet-18 with GroupNorm(``groups``); inputs ≤ 64 px get the CIFAR stem (3×3 conv,
    stride 1, no max-pool)."""
    image_shape = tuple(image_shape)

    def norm(channels: int) -> nn.GroupNorm:
        return nn.GroupNorm(min(groups, channels), channels)

    model = ResNetGN(OutOfPlaceBasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=norm)
    if image_shape[0] != 3 or max(image_shape[1:]) <= 64:
        stride, kernel = (1, 3) if max(image_shape[1:]) <= 64 else (2, 7)
        model.conv1 = nn.Conv2d(
            image_shape[0], 64, kernel, stride=stride, padding=kernel // 2, bias=False
        )
    if max(image_shape[1:]) <= 64:
        model.maxpool = nn.Identity()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model
