"""A split's images as tensors, and the step that turns a uint8 batch into the model's input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..evaluation.metrics import encode_labels
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, get_model_spec
from .augment import augment_batch


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 NHWC, on the CPU
    labels: torch.Tensor  # float 0/1
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def split_data(manifest: pd.DataFrame, images: np.ndarray, index: dict[str, int], split: str) -> SplitData:
    """The rows of `split` (one per distinct image) gathered from the preprocessed cache."""
    rows = manifest[manifest["split"] == split].drop_duplicates("sha256")
    idx = np.fromiter((index[s] for s in rows["sha256"]), dtype=np.int64, count=len(rows))
    return SplitData(
        images=torch.from_numpy(images[idx]),
        labels=torch.from_numpy(encode_labels(rows["label"]).astype(np.float32)),
        keys=rows["key"].tolist(),
    )


class Inputs:
    """uint8 NHWC batch -> float NCHW on the device, [0, 1], optionally augmented and normalised."""

    def __init__(self, model_name: str, device: torch.device, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        self.normalise = get_model_spec(model_name).imagenet_normalised
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, xb: torch.Tensor, aug: dict | None = None) -> torch.Tensor:
        x = xb.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if aug is not None:
            x = augment_batch(x, aug)
        if self.normalise:
            x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
