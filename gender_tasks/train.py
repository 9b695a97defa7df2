"""Train one model on the cached arrays, checkpointing every epoch, and write its outputs.

runs/<run_key>/models/<model>/checkpoint.pt    after every epoch (a retry resumes from it)
runs/<run_key>/models/<model>/metrics.json     test metrics, train accuracy, settings, timings
runs/<run_key>/models/<model>/history.json     per-epoch loss / accuracy, train and validation
runs/<run_key>/models/<model>/predictions.csv  every image's probability of "male", with its split
runs/<run_key>/models/<model>/model.ts         TorchScript: float [0,1] NCHW in, P(male) out
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import models as M
from .augment import augment_batch, augment_params
from .config import CLASSES
from .metrics import classification_metrics, encode_labels
from .preprocess import load_cache
from .storage import Storage

log = logging.getLogger(__name__)

AUX_LOSS_WEIGHT = 0.4  # InceptionV3's auxiliary classifier, as in the Inception paper


def model_prefix(run_key: str, model_name: str) -> str:
    return f"runs/{run_key}/models/{model_name}"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads(parallel_tasks: int = 1) -> int:
    """Split the CPU cores among training tasks running side by side (GENDER_TORCH_THREADS wins)."""
    threads = int(os.environ.get("GENDER_TORCH_THREADS", 0)) or max(1, (os.cpu_count() or 1) // parallel_tasks)
    torch.set_num_threads(threads)
    return threads


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 NHWC, on the CPU
    labels: torch.Tensor  # float 0/1
    keys: list[str]


def _split_data(manifest: pd.DataFrame, images: np.ndarray, index: dict[str, int], split: str) -> SplitData:
    rows = manifest[manifest["split"] == split].drop_duplicates("sha256")
    idx = np.fromiter((index[s] for s in rows["sha256"]), dtype=np.int64, count=len(rows))
    return SplitData(
        images=torch.from_numpy(images[idx]),
        labels=torch.from_numpy(encode_labels(rows["label"]).astype(np.float32)),
        keys=rows["key"].tolist(),
    )


class _Inputs:
    """uint8 NHWC batch -> float NCHW on the device, [0, 1], optionally augmented and normalised."""

    def __init__(self, model_name: str, device: torch.device, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        self.normalise = M.uses_imagenet_normalisation(model_name)
        self.mean = torch.tensor(M.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(M.IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, xb: torch.Tensor, aug: dict | None = None) -> torch.Tensor:
        x = xb.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if aug is not None:
            x = augment_batch(x, aug)
        if self.normalise:
            x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _logits(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, tuple):
        return out[0].squeeze(1), out[1].squeeze(1)
    return out.squeeze(1), None


@torch.inference_mode()
def predict_proba(model, data: SplitData, inputs: _Inputs, batch_size: int, autocast) -> tuple[np.ndarray, float]:
    """P(male) for every image of `data`, and the mean BCE loss."""
    model.eval()
    probs, loss_sum = [], 0.0
    for start in range(0, len(data.labels), batch_size):
        x = inputs(data.images[start : start + batch_size])
        y = data.labels[start : start + batch_size].to(inputs.device)
        with autocast():
            logits, _ = _logits(model(x))
        logits = logits.float()
        loss_sum += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        probs.append(torch.sigmoid(logits).cpu())
    n = max(len(data.labels), 1)
    return (torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)), loss_sum / n


def _save_torch(storage: Storage, key: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.put_bytes(key, buf.getvalue())


def _load_checkpoint(storage: Storage, key: str) -> dict | None:
    if not storage.exists(key):
        return None
    return torch.load(io.BytesIO(storage.get_bytes(key)), map_location="cpu", weights_only=False)


class _Exportable(torch.nn.Module):
    """The trained network with its input normalisation and sigmoid: needs no training code."""

    def __init__(self, net: torch.nn.Module, normalise: bool):
        super().__init__()
        self.net = net
        self.normalise = normalise
        self.register_buffer("mean", torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = (x - self.mean) / self.std
        out = self.net(x)
        return torch.sigmoid(out.squeeze(1))


def export_torchscript(model: torch.nn.Module, model_name: str, image_size: int, card: dict) -> bytes:
    """TorchScript of the model with its pre/post-processing; `card` rides along as meta.json."""
    net = copy.deepcopy(model).float().cpu().eval()
    wrapper = _Exportable(net, M.uses_imagenet_normalisation(model_name)).eval()
    example = torch.rand(2, 3, image_size, image_size)
    with torch.inference_mode():
        scripted = torch.jit.trace(wrapper, example, check_trace=False)
    meta = {"model": model_name, "image_size": image_size, "classes": list(CLASSES),
            "input": "float32 NCHW RGB in [0, 1]", "output": "P(male)", **card}  # fmt: skip
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files={"meta.json": json.dumps(meta, default=str)})
    return buf.getvalue()


def train_one_epoch(model, model_name: str, data: SplitData, inputs: _Inputs, optimizer, gen: torch.Generator,
                    batch_size: int, autocast, *, frozen: bool = False) -> tuple[float, float]:  # fmt: skip
    """One pass over `data` in the order and with the augmentation that `gen` draws.

    Returns the summed loss and the number of correct predictions (running, on augmented batches).
    """
    M.set_train_mode(model_name, model, frozen)
    n = len(data.labels)
    order = torch.randperm(n, generator=gen)
    loss_sum = correct = 0.0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and n >= 2:
            continue  # batch norm cannot train on a batch of one
        x = inputs(data.images[idx], augment_params(len(idx), gen))
        y = data.labels[idx].to(inputs.device)
        with autocast():
            logits, aux = _logits(model(x))
            logits = logits.float()
            loss = F.binary_cross_entropy_with_logits(logits, y)
            if aux is not None:
                loss = loss + AUX_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(aux.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(idx)
        correct += float(((logits.detach() >= 0).float() == y).sum())
    if inputs.device.type == "cuda":
        torch.cuda.synchronize()
    return loss_sum, correct


def make_autocast(device: torch.device):
    """bf16 mixed precision on a GPU, full precision on the CPU."""

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    return autocast


def setup_model(model_name: str, image_size: int, weights: str, seed: int, device: torch.device):
    """The model on `device` (channels_last on a GPU) and the matching input pipeline."""
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    model = M.build_model(model_name, image_size, weights if model_name != "cnn" else "none").to(device)
    if is_cuda:
        model = model.to(memory_format=torch.channels_last)
    return model, _Inputs(model_name, device, channels_last=is_cuda)


def fit_predict(model_name: str, spec: dict, settings: dict, train: SplitData, predict: SplitData,
                seed: int) -> np.ndarray:  # fmt: skip
    """Train a fresh model on `train` for spec's epochs (no checkpoints, no validation) and return
    P(male) for `predict`: the building block of out-of-fold predictions."""
    device = pick_device()
    autocast = make_autocast(device)
    model, inputs = setup_model(model_name, spec["image_size"], settings["weights"], seed, device)
    M.set_backbone_frozen(model_name, model, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"])
    for epoch in range(spec["epochs"]):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        train_one_epoch(model, model_name, train, inputs, optimizer, gen, settings["batch_size"], autocast)
    prob, _ = predict_proba(model, predict, inputs, settings["batch_size"] * 2, autocast)
    return prob


def train_model(
    storage: Storage,
    *,
    run_key: str,
    model_name: str,
    manifest: pd.DataFrame,
    dataset_id: str,
    settings: dict,
    parallel_tasks: int = 1,
    stop_after_epoch: int | None = None,
) -> dict:
    """Train `model_name` as `settings` say and write its outputs; returns a small summary dict.

    `stop_after_epoch` ends the call after that epoch's checkpoint (used to test resuming).
    """
    spec = settings["per_model"][model_name]
    size, epochs, freeze_epochs = spec["image_size"], spec["epochs"], spec["freeze_epochs"]
    batch_size, seed = settings["batch_size"], settings["seed"]
    prefix = model_prefix(run_key, model_name)
    ckpt_key = f"{prefix}/checkpoint.pt"

    device = pick_device()
    threads = configure_threads(parallel_tasks)
    autocast = make_autocast(device)

    images, index = load_cache(storage, dataset_id, size)
    data = {s: _split_data(manifest, images, index, s) for s in ("train", "val", "test")}
    del images
    train = data["train"]
    n_train = len(train.labels)
    if n_train == 0:
        raise ValueError(f"the training split of {dataset_id} is empty; the dataset is too small to train on")

    model, inputs = setup_model(model_name, size, settings["weights"], seed, device)

    def make_optimizer(frozen: bool):
        lr = settings["learning_rate"] if frozen or freeze_epochs == 0 else settings["fine_tune_learning_rate"]
        M.set_backbone_frozen(model_name, model, frozen)
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr), lr

    history: list[dict] = []
    start_epoch = 0
    state = _load_checkpoint(storage, ckpt_key)
    frozen = freeze_epochs > 0
    optimizer, lr = make_optimizer(frozen)
    if state is not None:
        model.load_state_dict(state["model"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        frozen = start_epoch < freeze_epochs
        optimizer, lr = make_optimizer(frozen)
        if state["frozen"] == frozen:
            optimizer.load_state_dict(state["optimizer"])
        log.info("%s: resuming from the checkpoint of epoch %d/%d", model_name, start_epoch, epochs)

    log.info(
        "%s: %d train / %d val / %d test images at %dpx, %d epochs (%d frozen), batch %d, %s, %d threads",
        model_name, n_train, len(data["val"].labels), len(data["test"].labels), size, epochs, freeze_epochs,
        batch_size, device, threads,
    )  # fmt: skip
    epoch_times: list[float] = []
    train_started = time.monotonic()
    for epoch in range(start_epoch, epochs):
        now_frozen = epoch < freeze_epochs
        if now_frozen != frozen:
            frozen = now_frozen
            optimizer, lr = make_optimizer(frozen)
            log.info("%s: backbone unfrozen at epoch %d; learning rate %.0e", model_name, epoch + 1, lr)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)  # order and augmentation, per epoch
        t0 = time.monotonic()
        loss_sum, correct = train_one_epoch(model, model_name, train, inputs, optimizer, gen, batch_size,
                                            autocast, frozen=frozen)  # fmt: skip
        train_time = time.monotonic() - t0
        val_prob, val_loss = predict_proba(model, data["val"], inputs, batch_size * 2, autocast)
        val_acc = float(((val_prob >= 0.5) == data["val"].labels.numpy().astype(bool)).mean()) if len(val_prob) else 0.0
        record = {
            "epoch": epoch + 1,
            "frozen": frozen,
            "learning_rate": lr,
            "loss": loss_sum / n_train,
            "accuracy": correct / n_train,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "images_per_s": n_train / train_time,
            "seconds": time.monotonic() - t0,
        }
        history.append(record)
        epoch_times.append(record["seconds"])
        _save_torch(storage, ckpt_key, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "frozen": frozen, "history": history,
        })  # fmt: skip
        eta = (epochs - epoch - 1) * (sum(epoch_times) / len(epoch_times))
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.3f val_loss %.4f val_acc %.3f | %.0f images/s | ETA %.0fs",
            model_name, epoch + 1, epochs, record["loss"], record["accuracy"], val_loss, val_acc,
            record["images_per_s"], eta,
        )  # fmt: skip
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < epochs:
            return {"model": model_name, "stopped_after_epoch": epoch + 1}

    settings = {**settings, "dataset_id": dataset_id}
    return _finish(storage, prefix, model, model_name, data, inputs, autocast, history, settings, spec,
                   device, threads, time.monotonic() - train_started)  # fmt: skip


def _finish(storage, prefix, model, model_name, data, inputs, autocast, history, settings, spec, device,
            threads, train_seconds) -> dict:  # fmt: skip
    batch = settings["batch_size"] * 2
    frames, test_metrics = [], None
    for split, d in data.items():
        if not len(d.labels):
            continue
        prob, _ = predict_proba(model, d, inputs, batch, autocast)
        frames.append(pd.DataFrame({"key": d.keys, "split": split, "label_id": d.labels.numpy().astype(int),
                                    "prob_male": prob}))  # fmt: skip
        if split == "test":
            test_metrics = classification_metrics(d.labels.numpy().astype(int), prob)
    preds = pd.concat(frames, ignore_index=True)
    preds["label"] = preds["label_id"].map({0: "female", 1: "male"})
    preds["predicted"] = np.where(preds["prob_male"] >= 0.5, "male", "female")
    storage.put_bytes(f"{prefix}/predictions.csv", preds.drop(columns="label_id").to_csv(index=False).encode())
    storage.put_bytes(f"{prefix}/history.json", json.dumps(history, indent=1).encode())
    last = history[-1]
    metrics = {
        "model": model_name,
        # As in the study (Keras' history): the last epoch's running accuracy on augmented training batches.
        "train_accuracy": last["accuracy"],
        "val_accuracy": last["val_accuracy"],
        "test": test_metrics,
        "epochs": len(history),
        "image_size": spec["image_size"],
        "freeze_epochs": spec["freeze_epochs"],
        "weights": settings["weights"] if model_name != "cnn" else "none",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in history])),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": threads,
        "torch_version": torch.__version__,
    }
    storage.put_bytes(f"{prefix}/metrics.json", json.dumps(metrics, indent=1).encode())
    card = {"dataset_id": settings.get("dataset_id"), "source": settings["source"], "seed": settings["seed"],
            "profile": settings["profile"], "test_metrics": test_metrics, "epochs": len(history)}  # fmt: skip
    storage.put_bytes(f"{prefix}/model.ts", export_torchscript(model, model_name, spec["image_size"], card))
    storage.put_bytes(f"{prefix}/model_card.json", json.dumps({**metrics, **card}, indent=1).encode())
    log.info(
        "%s done: train acc %.3f, test acc %.3f, weighted F1 %.3f",
        model_name, metrics["train_accuracy"], test_metrics["accuracy"] if test_metrics else float("nan"),
        test_metrics["weighted"]["f1"] if test_metrics else float("nan"),
    )  # fmt: skip
    return {"model": model_name, "metrics_uri": storage.url(f"{prefix}/metrics.json"),
            "test_accuracy": test_metrics["accuracy"] if test_metrics else None}  # fmt: skip
