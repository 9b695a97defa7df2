"""The profile's recipe turned into training objects: the optimizer, the per-step learning-rate
schedule, and the number of steps an epoch takes (the schedule's length).

Kept apart from the loop so the trainer (checkpoints, freeze phases) and the label audit's
`fit_predict` build them the same way.
"""

from __future__ import annotations

import math

import torch

from ..settings import Recipe


def make_optimizer(params, lr: float, recipe: Recipe) -> torch.optim.Optimizer:
    """Adam (the study's) or AdamW with the recipe's weight decay, over `params`."""
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=recipe.weight_decay)


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: train_one_epoch skips a last batch of one image."""
    full, rest = divmod(n_images, batch_size)
    return max(1, full + (1 if rest >= 2 or (rest and n_images < 2) else 0))


def lr_factor(step: int, total_steps: int, recipe: Recipe) -> float:
    """Multiplier of the peak rate at global step `step`: 1 (constant), or linear warm-up over the first
    warmup_fraction of the steps, then cosine decay to 0 at `total_steps`."""
    if recipe.schedule == "constant":
        return 1.0
    warm = max(1, round(recipe.warmup_fraction * total_steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int,
                   first_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """A per-step schedule over the whole run; `first_step` is the global step this optimizer starts at
    (a new optimizer when the backbone unfreezes continues the schedule where the last one stopped).
    A resumed run rebuilds it at the checkpoint's step (no stored state), so it takes the same rates."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(first_step + s, total_steps, recipe))
