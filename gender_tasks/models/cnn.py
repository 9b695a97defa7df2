"""The study's custom CNN (section 3.1)."""

from __future__ import annotations

import torch
from torch import nn


class StudyCNN(nn.Module):
    """3 x [Conv2D(32/64/128, 3x3, ReLU) + MaxPool(2)] -> Flatten -> Dense(128, ReLU) -> Dropout(0.5) -> 1."""

    def __init__(self, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = 3, image_size
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels, side = width, (side - 2) // 2  # 'valid' conv, then halve (Keras defaults)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for the CNN; use at least 16")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(128, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_cnn(image_size: int, weights: str = "none") -> nn.Module:
    """The registry's builder: the CNN always trains from scratch (`weights` is not used)."""
    return StudyCNN(image_size)
