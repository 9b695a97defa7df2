"""Batch augmentation on the training device: horizontal flip, slight rotation and zoom ("full", the
study's), or horizontal flips only ("flip": at 64 px the affine warp mostly adds blur and border
artefacts; see bench/RESULTS.md, "Recipe ablation").

Every image of a batch draws its own parameters (torchvision's v2 transforms applied to a batch
tensor draw one set for the whole batch). One affine grid per image, one grid_sample per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEG = 10.0
MAX_ZOOM = 0.10


def augment_params(
    n: int,
    generator: torch.Generator,
    *,
    max_rotation_deg: float = MAX_ROTATION_DEG,
    max_zoom: float = MAX_ZOOM,
) -> dict[str, torch.Tensor]:
    """Per-image parameters: flip (bool), rotation (radians), zoom factor (>1 zooms in).

    All three are always drawn, so a flip-only recipe (training.loop keeps just the flips) consumes the
    generator exactly as the full one does."""
    flip = torch.rand(n, generator=generator) < 0.5
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_zoom
    return {"flip": flip, "angle": angle, "zoom": zoom}


def augment_batch(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply per-image flip/rotation/zoom to a float NCHW batch (reflection padding, as Keras)."""
    n = x.shape[0]
    flip = params["flip"].to(x.device)
    if "angle" not in params:  # flips only: an exact mirror, no resampling
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    angle = params["angle"].to(x.device, x.dtype)
    scale = 1.0 / params["zoom"].to(x.device, x.dtype)  # sampling a smaller window zooms in
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    sign = torch.where(flip, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * sign
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
