"""The learning side's networks, as plain `nn.Module`s: the discriminator and the victim classifiers.

Every image tensor here is float in [0, 1], shape (B, C, H, W).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from cgan_cli.core.choices import VictimArch


class Discriminator(nn.Module):
    """Clean vs protected: one logit per image (positive = protected). Keeps the noise imperceptible."""

    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


class SmallCNN(nn.Module):
    """Victim / surrogate classifier for small images (28-64 px): 3 conv blocks + linear head."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def resnet18_small(channels: int = 1, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 adapted to small images: 3x3 stem, stride 1, no max-pool."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


VICTIM_ARCHS = tuple(a.value for a in VictimArch)


def build_victim(arch: str, channels: int, num_classes: int) -> nn.Module:
    if arch == "cnn":
        return SmallCNN(channels, num_classes)
    if arch == "resnet18":
        return resnet18_small(channels, num_classes)
    raise ValueError(f"unknown victim arch {arch!r}; choose from {VICTIM_ARCHS}")
