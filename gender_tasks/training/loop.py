"""The training loop: one epoch, the epochs of a plan, predictions, and a model set up on its device.

Kept short and free of I/O, like torchvision's references/classification. `train_epochs` is the one
epoch loop (freeze phases, the recipe's optimizer and schedule, per-epoch generators, BatchNorm
recalibration): `trainer` adds storage, checkpoints and outputs around it through its `on_epoch`
callback, the label audit uses it through `fit_predict`, and bench/recipe_ablation.py drives it too,
so every one of them trains a seed's model the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.network import build_model, set_backbone_frozen, set_train_mode
from ..models.registry import ProfilePlan
from ..settings import STUDY_RECIPE, Recipe, Settings
from .augment import augment_params
from .batches import Inputs, Split
from .devices import make_autocast, maybe_compile, pick_device
from .recipe import make_optimizer, make_scheduler, steps_per_epoch

AUX_LOSS_WEIGHT = 0.4  # InceptionV3's auxiliary classifier, as in the Inception paper
PROGRESS_EVERY_S = 30.0  # how often a running epoch logs how far it is
# Training images that re-estimate BatchNorm statistics after the last epoch (recalibrate_batchnorm): a few
# thousand estimate them closely; the cap keeps the pass short on large datasets.
RECALIBRATION_IMAGES = 8192

log = logging.getLogger(__name__)


def _logits(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, tuple):
        return out[0].squeeze(1), out[1].squeeze(1)
    return out.squeeze(1), None


@torch.inference_mode()
def predict_proba(model, data: Split, inputs: Inputs, batch_size: int, autocast,
                  tta: bool = False) -> tuple[np.ndarray, float]:  # fmt: skip
    """P(male) for every image of `data`, and the mean BCE loss; read from the device once, at the end.
    With `tta`, the mean P(male) of each image and its mirror image."""
    model.eval()
    data = inputs.stage(data)
    probs = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    for xb, yb in data.batches(None, batch_size):
        x = inputs(xb)
        y = yb.to(inputs.device, non_blocking=True)
        with autocast():
            logits, _ = _logits(model(x))
            mirrored = _logits(model(x.flip(3)))[0] if tta else None
        logits = logits.float()
        if mirrored is None:
            # float64, as the Python float sum this replaces: the same figures on the CPU, bit for bit
            loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").double()
            probs.append(torch.sigmoid(logits))
        else:
            prob = (torch.sigmoid(logits) + torch.sigmoid(mirrored.float())) / 2
            loss_sum += F.binary_cross_entropy(prob.clamp(1e-7, 1 - 1e-7), y, reduction="sum").double()
            probs.append(prob)
    n = max(len(data.labels), 1)
    return (torch.cat(probs).cpu().numpy() if probs else np.zeros(0, np.float32)), float(loss_sum) / n


def epoch_plan(n: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, int, dict]:
    """One epoch's order, how many of its images train, and every trained image's augmentation, all
    drawn up front.

    The draws are those the loop always made, in the same order (the permutation, then each batch's
    parameters), so a seed gives the same epoch as before; drawn at once, they reach the GPU in one
    copy instead of three small pageable copies per step, each of which waits for the GPU to drain.
    """
    order = torch.randperm(n, generator=gen)
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    if n >= 2 and sizes and sizes[-1] < 2:
        sizes.pop()  # a trailing batch of one is skipped: batch norm cannot train on a single image
    drawn = [augment_params(size, gen) for size in sizes]
    params = {k: torch.cat([d[k] for d in drawn]) if drawn else torch.zeros(0) for k in ("flip", "angle", "zoom")}
    return order, sum(sizes), params


def class_weights(labels: torch.Tensor, how: str) -> tuple[float, float] | None:
    """(female weight, male weight) of the loss for training labels `labels` (0 female, 1 male) under the
    recipe's `class_weighting`: "balanced" gives each class n / (2 * n_class), so each class's images weigh
    half the total; None (no weighting) for "none", for equal classes (the weights would be exactly 1) and
    when a class is missing (nothing to balance)."""
    if how == "none":
        return None
    if how != "balanced":
        raise ValueError(f"class_weighting: expected 'none' or 'balanced', got {how!r}")
    n = len(labels)
    males = int((labels > 0.5).sum())
    females = n - males
    if males == females or not males or not females:
        return None
    return n / (2 * females), n / (2 * males)


def train_one_epoch(model, model_name: str, data: Split, inputs: Inputs, optimizer, gen: torch.Generator,
                    batch_size: int, autocast, *, frozen: bool = False, recipe: Recipe = STUDY_RECIPE,
                    scheduler=None, progress: Callable[[int, int], None] | None = None) -> tuple[float, float]:  # fmt: skip
    """One pass over `data` in the order and with the augmentation that `gen` draws; the recipe sets the
    augmentation and label smoothing, and `scheduler` (if any) steps after every optimizer step.

    Returns the summed loss and the number of correct predictions (running, on augmented batches),
    accumulated on the device and read once at the end: a read per step would stall the GPU's queue.
    `progress(images_done, images)`, if given, is called after every batch (see `progress_logger`).
    """
    set_train_mode(model_name, model, frozen)
    data = inputs.stage(data)  # on a GPU: into its memory once, when it fits
    n = len(data.labels)
    order, trained, params = epoch_plan(n, batch_size, gen)
    if inputs.device.type == "cuda":
        params = {k: v.pin_memory().to(inputs.device, non_blocking=True) for k, v in params.items()}
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    start = 0  # images through (host-side counts: no sync), for the augmentation and `progress`
    augmented = ("flip",) if recipe.augmentation == "flip" else tuple(params)
    weights = class_weights(data.labels, recipe.class_weighting)
    # In memory or streamed from the shards (batches.StreamedSplit): the same batches for the same order.
    for xb, yb in data.batches(order, batch_size):
        size = len(yb)
        if start + size > trained:
            break  # the trailing batch of one that epoch_plan left out
        # epoch_plan draws every parameter (the same draws whatever the recipe); "flip" applies flips only.
        x = inputs(xb, {k: v[start : start + size] for k, v in params.items() if k in augmented})
        y = yb.to(inputs.device, non_blocking=True)
        target = y * (1 - recipe.label_smoothing) + 0.5 * recipe.label_smoothing
        weight = None if weights is None else torch.where(y > 0.5, weights[1], weights[0])
        # The compiled forward only for full batches: one graph per mode, no recompiles for the last one.
        net = inputs.compiled if inputs.compiled is not None and size == batch_size else model
        with autocast():
            logits, aux = _logits(net(x))
            logits = logits.float()
            loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
            if aux is not None:
                loss = loss + AUX_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(aux.float(), target, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().double() * size
        correct += ((logits.detach() >= 0) == y.bool()).sum()
        start += size
        if progress is not None:
            progress(start, n)
    return float(loss_sum), float(correct)


def recalibrate_batchnorm(model, model_name: str, data: Split, inputs: Inputs, batch_size: int, autocast, *,
                          frozen: bool = False, seed: int = 0, max_images: int = RECALIBRATION_IMAGES) -> int:  # fmt: skip
    """Recompute every trained BatchNorm layer's running statistics for the final weights ("precise BN"),
    from up to `max_images` training images in a seeded random order, un-augmented, as inference sees them.

    Why: during training, running statistics are an exponential average (momentum 0.1) over batches seen
    under earlier, different weights. After few optimizer steps (small data, few epochs) they lag far
    behind: measured with MobileNetV2, `cpu` profile, 150 faces a class (35 steps), two seeds each run
    twice, the model reached 0.89-0.92 running training accuracy yet in eval mode called every image one
    class (validation and test accuracy 0.500 in all four); recomputed statistics gave validation
    0.70-0.86 and test 0.76-0.85. With many steps the running averages are already close, and this
    changes little.

    The statistics are a plain average over the batches (momentum None) of the layers in training mode
    (set_train_mode: a frozen backbone's layers keep theirs); everything else stays in eval mode (dropout
    off), so the statistics are those of the network inference runs. A layer no batch reaches (InceptionV3's
    auxiliary head, off in eval mode) keeps its statistics. Deterministic for given weights: a resumed run
    recalibrates to the same values. Returns the number of images used."""
    set_train_mode(model_name, model, frozen)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    model.eval()
    if not layers or len(data) < 2:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.train()
        m.momentum = None  # cumulative average from the first batch on
        m.num_batches_tracked.zero_()
    data = inputs.stage(data)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    used = 0
    try:
        with torch.no_grad(), autocast():
            for xb, _ in data.batches(order, batch_size):
                if used >= max_images or len(xb) < 2:  # a batch of one has no variance to average
                    break
                model(inputs(xb))
                used += len(xb)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return used


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
    """The model on `device` (channels_last on a GPU) and the matching input pipeline (with the
    model's compiled forward when GENDER_TORCH_COMPILE asks for one)."""
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    model = build_model(model_name, image_size, weights).to(device)
    if is_cuda:
        model = model.to(memory_format=torch.channels_last)
    inputs = Inputs(model_name, device, channels_last=is_cuda)
    inputs.compiled = maybe_compile(model)
    return model, inputs


def plan_for(plan: ProfilePlan, n_train: int, batch_size: int, model_name: str = "") -> ProfilePlan:
    """`plan` as trained on `n_train` images: its epochs raised until training takes the plan's min_steps
    optimizer steps (ProfilePlan.scaled_to), saying so when they are."""
    per_epoch = steps_per_epoch(n_train, batch_size)
    scaled = plan.scaled_to(per_epoch)
    if scaled != plan:
        log.info("%s: %d training images make %d optimizer steps an epoch; %d epochs (not %d) give the %d steps "
                 "this profile trains at least", model_name or "model", n_train, per_epoch, scaled.epochs,
                 plan.epochs, plan.min_steps)  # fmt: skip
    return scaled


@dataclass
class Phase:
    """The optimizer and per-step schedule of one phase of training (backbone frozen, or not)."""

    frozen: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    learning_rate: float  # the phase's peak rate


def start_phase(model, model_name: str, plan: ProfilePlan, settings: Settings, n_train: int, frozen: bool,
                epoch: int = 0) -> Phase:  # fmt: skip
    """Freeze or unfreeze the backbone, and the recipe's optimizer over the trainable parameters (the base
    rate while frozen or never frozen, else fine-tuning's) with its per-step schedule, continued from the
    first step of `epoch`."""
    lr = settings.learning_rate if frozen or plan.freeze_epochs == 0 else settings.fine_tune_learning_rate
    set_backbone_frozen(model_name, model, frozen)
    optimizer = make_optimizer(model.parameters(), lr, settings.recipe)
    per_epoch = steps_per_epoch(n_train, settings.batch_size)
    scheduler = make_scheduler(optimizer, settings.recipe, plan.epochs * per_epoch, epoch * per_epoch)
    return Phase(frozen, optimizer, scheduler, lr)


@dataclass
class EpochDone:
    """What `train_epochs` hands its `on_epoch` callback after each epoch."""

    epoch: int  # 0-based
    phase: Phase  # the phase it trained in (its optimizer is the one to checkpoint)
    loss_sum: float  # summed over the epoch's images (running, on augmented batches)
    correct: float  # correct running predictions
    train_seconds: float  # the epoch's training pass alone
    started: float  # time.monotonic() when the epoch began


def train_epochs(model, model_name: str, train: Split, inputs: Inputs, autocast, *, plan: ProfilePlan,
                 settings: Settings, seed: int, start_epoch: int = 0, phase: Phase | None = None,
                 on_epoch: Callable[[EpochDone], None] | None = None) -> int:  # fmt: skip
    """Train `model` for epochs `start_epoch`..plan.epochs-1 as the pipeline does, then recompute its
    BatchNorm statistics (recalibrate_batchnorm); returns the number of images that used.

    The backbone is frozen for the plan's first freeze_epochs (a new optimizer when it unfreezes); each
    epoch's order and augmentation come from epoch_generator(seed, epoch); the settings give the recipe,
    learning rates and batch size. `phase` is the phase to start in (a resumed run's, with its optimizer
    state loaded); None starts afresh. `on_epoch` (validation, checkpoints, logs) runs after every epoch,
    before the next one."""
    if phase is None:
        phase = start_phase(model, model_name, plan, settings, len(train), start_epoch < plan.freeze_epochs,
                            start_epoch)  # fmt: skip
    for epoch in range(start_epoch, plan.epochs):
        frozen = epoch < plan.freeze_epochs
        if frozen != phase.frozen:
            phase = start_phase(model, model_name, plan, settings, len(train), frozen, epoch)
            log.info("%s: backbone unfrozen at epoch %d; learning rate %.0e", model_name, epoch + 1,
                     phase.learning_rate)  # fmt: skip
        started = time.monotonic()
        loss_sum, correct = train_one_epoch(model, model_name, train, inputs, phase.optimizer,
                                            epoch_generator(seed, epoch), settings.batch_size, autocast,
                                            frozen=frozen, recipe=settings.recipe, scheduler=phase.scheduler,
                                            progress=progress_logger(f"{model_name} epoch {epoch + 1}/{plan.epochs}"))  # fmt: skip
        if on_epoch is not None:
            on_epoch(EpochDone(epoch, phase, loss_sum, correct, time.monotonic() - started, started))
    return recalibrate_batchnorm(model, model_name, train, inputs, settings.batch_size, autocast,
                                 frozen=plan.freeze_epochs >= plan.epochs, seed=seed)  # fmt: skip


def fit_predict(model_name: str, plan: ProfilePlan, settings: Settings, train: Split, predict: Split,
                seed: int) -> np.ndarray:  # fmt: skip
    """Train a fresh model on `train` for the plan's epochs (train_epochs: no checkpoints, no validation)
    and return P(male) for `predict` (the settings' recipe: optimizer, schedule, smoothing, augmentation,
    TTA): the building block of out-of-fold predictions."""
    device = pick_device()
    autocast = make_autocast(device)
    plan = plan_for(plan, len(train), settings.batch_size, model_name)
    model, inputs = setup_model(model_name, plan.image_size, settings.weights, seed, device)
    train_epochs(model, model_name, train, inputs, autocast, plan=plan, settings=settings, seed=seed)
    prob, _ = predict_proba(model, predict, inputs, settings.batch_size * 2, autocast, tta=settings.recipe.tta)
    return prob
