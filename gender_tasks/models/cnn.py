"""The study's custom CNN (section 3.1)."""

from __future__ import annotations

import torch
from torch import nn


def _side_after_features(image_size: int) -> int:
    side = image_size
    for _ in range(3):
        side = (side - 2) // 2  # 'valid' 3x3 conv, then halve (Keras defaults)
    return side


# The smallest input the three conv + pool blocks leave at least one pixel of: 22 px (22 -> 10 -> 4 -> 1), the
# registry's min_image_size for the CNN (tests/test_models.py checks that they agree).
MIN_CNN_SIZE = next(size for size in range(1, 64) if _side_after_features(size) >= 1)


class StudyCNN(nn.Module):
    """3 x [Conv2D(32/64/128, 3x3, ReLU) + MaxPool(2)] -> Flatten -> Dense(128, ReLU) -> Dropout(0.5) -> 1."""

    def __init__(self, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = 3, _side_after_features(image_size)
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for the CNN; use at least {MIN_CNN_SIZE}")
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
