"""The training loop: one epoch, predictions, and a model set up on its device.

Kept short and free of I/O, like torchvision's references/classification: `trainer` adds storage,
checkpoints and outputs around it; the label audit uses `fit_predict`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..models.network import build_model, set_backbone_frozen, set_train_mode
from ..settings import STUDY_RECIPE, Recipe, Settings, TrainPlan
from .augment import augment_params
from .batches import Inputs, Split
from .devices import make_autocast, pick_device
from .recipe import make_optimizer, make_scheduler, steps_per_epoch

AUX_LOSS_WEIGHT = 0.4  # InceptionV3's auxiliary classifier, as in the Inception paper
PROGRESS_EVERY_S = 30.0  # how often a running epoch logs how far it is

log = logging.getLogger(__name__)


def _logits(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, tuple):
        return out[0].squeeze(1), out[1].squeeze(1)
    return out.squeeze(1), None


@torch.inference_mode()
def predict_proba(model, data: Split, inputs: Inputs, batch_size: int, autocast,
                  tta: bool = False) -> tuple[np.ndarray, float]:  # fmt: skip
    """P(male) for every image of `data`, and the mean BCE loss; with `tta` the mean P(male) of each
    image and its mirror image."""
    model.eval()
    probs, loss_sum = [], 0.0
    for xb, yb in data.batches(None, batch_size):
        x = inputs(xb)
        y = yb.to(inputs.device)
        with autocast():
            logits, _ = _logits(model(x))
            mirrored = _logits(model(x.flip(3)))[0] if tta else None
        prob = torch.sigmoid(logits.float())
        if mirrored is not None:
            prob = (prob + torch.sigmoid(mirrored.float())) / 2
        loss_sum += float(F.binary_cross_entropy(prob.clamp(1e-7, 1 - 1e-7), y, reduction="sum"))
        probs.append(prob.cpu())
    n = max(len(data.labels), 1)
    return (torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)), loss_sum / n


def train_one_epoch(model, model_name: str, data: Split, inputs: Inputs, optimizer, gen: torch.Generator,
                    batch_size: int, autocast, *, frozen: bool = False, recipe: Recipe = STUDY_RECIPE,
                    scheduler=None, progress: Callable[[int, int], None] | None = None) -> tuple[float, float]:  # fmt: skip
    """One pass over `data` in the order and with the augmentation that `gen` draws; the recipe sets the
    augmentation and label smoothing, and `scheduler` (if any) steps after every optimizer step.

    Returns the summed loss and the number of correct predictions (running, on augmented batches).
    `progress(images_done, images)`, if given, is called after every batch (see `progress_logger`).
    """
    set_train_mode(model_name, model, frozen)
    n = len(data.labels)
    order = torch.randperm(n, generator=gen)
    loss_sum = correct = 0.0
    done = 0  # images through, for `progress`
    # In memory or streamed from the shards (batches.StreamedSplit): the same batches for the same order.
    for xb, yb in data.batches(order, batch_size):
        if len(yb) < 2 and n >= 2:
            continue  # batch norm cannot train on a batch of one
        x = inputs(xb, augment_params(len(yb), gen, mode=recipe.augmentation))
        y = yb.to(inputs.device)
        target = y * (1 - recipe.label_smoothing) + 0.5 * recipe.label_smoothing
        with autocast():
            logits, aux = _logits(model(x))
            logits = logits.float()
            loss = F.binary_cross_entropy_with_logits(logits, target)
            if aux is not None:
                loss = loss + AUX_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(aux.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += float(loss.detach()) * len(yb)
        correct += float(((logits.detach() >= 0).float() == y).sum())
        done += len(yb)
        if progress is not None:
            progress(done, n)
    if inputs.device.type == "cuda":
        torch.cuda.synchronize()
    return loss_sum, correct


def progress_logger(label: str, every_s: float = PROGRESS_EVERY_S) -> Callable[[int, int], None]:
    """A `progress` callback that logs "<label>: 1,024/8,000 images (13%)" at most every `every_s` seconds,
    so a long epoch (minutes on the paper profile) shows it is moving; short epochs log nothing."""
    last = time.monotonic()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s and done < total:
            last = now
            log.info("%s: %s/%s images (%d%%)", label, f"{done:,}", f"{total:,}", 100 * done // max(total, 1))

    return report


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's order and augmentation: the same for a seed, whether resumed or not."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def setup_model(model_name: str, image_size: int, weights: str, seed: int, device: torch.device):
    """The model on `device` (channels_last on a GPU) and the matching input pipeline."""
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    model = build_model(model_name, image_size, weights).to(device)
    if is_cuda:
        model = model.to(memory_format=torch.channels_last)
    return model, Inputs(model_name, device, channels_last=is_cuda)


def fit_predict(model_name: str, plan: TrainPlan, settings: Settings, train: Split, predict: Split,
                seed: int) -> np.ndarray:  # fmt: skip
    """Train a fresh model on `train` for the plan's epochs (no checkpoints, no validation) and return
    P(male) for `predict` (the settings' recipe: optimizer, schedule, smoothing, augmentation, TTA):
    the building block of out-of-fold predictions."""
    device = pick_device()
    autocast = make_autocast(device)
    recipe = settings.recipe
    model, inputs = setup_model(model_name, plan.image_size, settings.weights, seed, device)
    set_backbone_frozen(model_name, model, False)
    optimizer = make_optimizer(model.parameters(), settings.learning_rate, recipe)
    scheduler = make_scheduler(optimizer, recipe, plan.epochs * steps_per_epoch(len(train), settings.batch_size))
    for epoch in range(plan.epochs):
        train_one_epoch(model, model_name, train, inputs, optimizer, epoch_generator(seed, epoch),
                        settings.batch_size, autocast, recipe=recipe, scheduler=scheduler)  # fmt: skip
    prob, _ = predict_proba(model, predict, inputs, settings.batch_size * 2, autocast, tta=recipe.tta)
    return prob
