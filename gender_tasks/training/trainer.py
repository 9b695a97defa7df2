"""Train one model of a run on the preprocessed (sharded) cache, resumably, and write its outputs.

A model is keyed by what determines it (training/keys.py), not by the run: it trains under
datasets/<id>/models/<model>/<train_key>/ (layout.trained_prefix), so any run with the same inputs
resumes a killed training from its checkpoint, or reuses the finished model without training at all.

<trained>/checkpoint.pt    when due (GENDER_CHECKPOINT_EVERY_S) and after the last epoch; removed once exported
<trained>/checkpoint.json  its sha256, written after it: a checkpoint that does not match is discarded
<trained>/predictions.csv  every image's probability of "male", with its split
<trained>/history.json     per-epoch loss / accuracy, train and validation
<trained>/metrics.json     test metrics, train accuracy, settings, timings
<trained>/model.pt2        torch.export archive: float [0,1] NCHW in, P(male) out (training/export.py)
<trained>/model_card.json  written last: the model is complete; "files" holds the sha256 of each file above

The run then gets its own copy (runs/<run_key>/models/<model>/, plus trained.json naming the keyed
model, its inputs and its files' sha256s), so the report, the UI and `predict` read one self-contained
run folder. The files are verified against the card before they are reused or copied.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import layout, tables
from ..data.shards import ShardReader, memory_budget
from ..environment import get_number
from ..errors import PermanentError
from ..evaluation.health import check_predictions, likely_cause
from ..evaluation.metrics import classification_metrics
from ..evaluation.predict import card_checksums
from ..integrity import IntegrityError, repair_hint, sha256_hex
from ..models.registry import ProfilePlan, get_model_spec
from ..settings import Settings
from ..storage import Storage, read_verified
from .batches import Inputs, Split, load_splits
from .checkpoint import discard_checkpoint, load_checkpoint, save_checkpoint
from .devices import configure_threads, device_name, make_autocast, peak_memory_mb, pick_device
from .export import export_model
from .keys import key_of, model_inputs
from .loop import EpochDone, Phase, plan_for, predict_proba, setup_model, start_phase, train_epochs

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The outputs written before the model card, each verified against the sha256 the card records.
_VERIFIED = layout.MODEL_OUTPUTS[:-1]


class TrainingDataError(PermanentError):
    """The data cannot train this model (an empty split, one class only); the message says what to do."""


@dataclass
class TrainingRun:
    """One model's training in progress: what it trains on and with, and what it has done so far."""

    model_name: str
    plan: ProfilePlan
    settings: Settings
    dataset_id: str
    data: dict[str, Split]
    model: torch.nn.Module
    inputs: Inputs
    autocast: object
    device: torch.device
    threads: int
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    # P(male) of a split as last predicted with the current weights (validation: after each epoch, then after
    # the BatchNorm recalibration), so that writing the predictions does not predict it a second time.
    final_prob: dict[str, np.ndarray] = field(default_factory=dict)


def train_model(storage: Storage, *, run_key: str, model_name: str, manifest: pd.DataFrame, dataset_id: str,
                settings: Settings, parallel_tasks: int = 1) -> dict:  # fmt: skip
    """Train `model_name` as `settings` say (or reuse the model trained with the same inputs, or resume
    its checkpoint), then copy its outputs into the run.

    Returns a small summary dict (XCom-safe).
    """
    inputs = model_inputs(settings, model_name, dataset_id, manifest)
    train_key = key_of(inputs)
    file_key = functools.partial(layout.trained_file_key, dataset_id, model_name, train_key)
    prefix = layout.trained_prefix(dataset_id, model_name, train_key)
    reused = _reusable(storage, model_name, prefix)
    if reused:
        log.info("%s: reusing the model trained with the same inputs, %s (nothing to train)", model_name,
                 storage.url(prefix))  # fmt: skip
    else:
        run = _start(storage, model_name, manifest, dataset_id, settings, parallel_tasks)
        _fit(storage, run, file_key(layout.CHECKPOINT))
        _write_outputs(storage, file_key, run)
        discard_checkpoint(storage, file_key(layout.CHECKPOINT))  # exported: a resume has nothing left to do
    summary = _publish(storage, run_key, model_name, prefix, {"trained": prefix, "train_key": train_key,
                                                              "reused": reused, "inputs": inputs})  # fmt: skip
    _warn_if_flagged(storage, run_key, model_name)
    return summary


def _warn_if_flagged(storage: Storage, run_key: str, model_name: str) -> None:
    """The report's health checks (evaluation.health), in this task's log too: a collapsed model warns here."""
    preds = tables.read_csv(io.BytesIO(storage.get_bytes(layout.model_file_key(run_key, model_name, "predictions.csv"))),
                            keep_default_na=False)  # fmt: skip
    metrics = json.loads(storage.get_bytes(layout.model_file_key(run_key, model_name, "metrics.json")))
    findings = check_predictions(preds, metrics.get("train_accuracy"), model=model_name)
    for f in findings:
        log.warning("%s is flagged (%s): %s", model_name, f["check"], f["detail"])
    if findings:
        log.warning("%s: likely cause: %s (the ensemble leaves flagged models out)", model_name, likely_cause(findings))


def _reusable(storage: Storage, model_name: str, prefix: str) -> bool:
    """Whether a finished model is stored under `prefix`: its model card (written last) is there and
    records its files' checksums. A card of an earlier version (no checksums) cannot vouch for the
    files, so the model is trained again (and its files replaced); a damaged card is an IntegrityError."""
    key = f"{prefix}/{layout.MODEL_OUTPUTS[-1]}"
    try:
        card = storage.get_bytes(key)
    except FileNotFoundError:
        return False
    if _exported_as_torchscript(card):
        log.warning("%s: the model under %s was exported as TorchScript (model.ts) by an earlier version; training it "
                    "again to export a model.pt2", model_name, storage.url(prefix))  # fmt: skip
        return False
    checksums = card_checksums(card, _VERIFIED, what=storage.url(key), fix=repair_hint(storage.uri))
    if checksums is None:
        log.warning("%s: the model under %s records no checksums of its files (an earlier version wrote it), so "
                    "it cannot be verified; training it again", model_name, storage.url(prefix))  # fmt: skip
        return False
    # The card is there, but files may have gone since (removed by hand or by a lifecycle rule, a `verify
    # --repair` stopped before the card, a FIFO in a file's place: size 0): reused, the run would fail copying
    # them, retry after retry. One listing says it.
    stored = {o.key.rpartition("/")[2]: o.size for o in storage.list_info(f"{prefix}/")}
    if missing := sorted(name for name in checksums if not stored.get(name)):
        log.warning("%s: the model under %s lacks %s (removed or emptied since it was trained): training it again",
                    model_name, storage.url(prefix), ", ".join(missing))  # fmt: skip
        return False
    return True


def _exported_as_torchscript(card: bytes) -> bool:
    """Whether a model card records a model.ts and no model.pt2 (a model exported by an earlier version)."""
    try:
        files = json.loads(card).get("files")
    except (ValueError, AttributeError):
        return False  # a damaged card: card_checksums names it
    return isinstance(files, dict) and layout.LEGACY_MODEL_FILE in files and layout.MODEL_FILE not in files


def _publish(storage: Storage, run_key: str, model_name: str, prefix: str, record: dict) -> dict:
    """Copy the keyed model's outputs into the run's folder, with a record of where they came from.

    A copy (a hard link locally, a server-side copy on S3), not a pointer: every reader of a run (the
    report, the UI plugin, external evaluation, `predict --model runs/…/model.pt2`) keeps reading one
    self-contained folder, and a run stays complete when `gc` later drops keyed models no run needs.

    Every file is first checked against the sha256 its model card recorded (an IntegrityError naming
    the file if one changed): a damaged or altered model is never copied into a run. The run's
    trained.json records the same checksums, and the card's own.
    """
    fix = repair_hint(storage.uri)
    card = storage.get_bytes(f"{prefix}/{layout.MODEL_OUTPUTS[-1]}")
    files = card_checksums(card, _VERIFIED, what=storage.url(f"{prefix}/{layout.MODEL_OUTPUTS[-1]}"), fix=fix)
    if files is None:  # only a card of an earlier version, and _reusable retrains those
        raise IntegrityError(f"{storage.url(prefix)}'s model card records no checksums of its files. {fix}")
    for name, sha in files.items():
        read_verified(storage, f"{prefix}/{name}", sha)
    for name in layout.MODEL_OUTPUTS:
        storage.copy(f"{prefix}/{name}", layout.model_file_key(run_key, model_name, name))
    record = {**record, "files": {**files, layout.MODEL_OUTPUTS[-1]: sha256_hex(card)}}
    storage.put_bytes(layout.model_file_key(run_key, model_name, layout.TRAINED_RECORD),
                      json.dumps(record, indent=1).encode())  # fmt: skip
    metrics = json.loads(storage.get_bytes(layout.model_file_key(run_key, model_name, "metrics.json")))
    test = metrics.get("test")
    return {"model": model_name, "metrics_uri": storage.url(layout.model_file_key(run_key, model_name, "metrics.json")),
            "test_accuracy": test["accuracy"] if test else None, "reused": record["reused"],
            "train_key": record["train_key"], "model_sha256": files[layout.MODEL_FILE]}  # fmt: skip


def _start(storage: Storage, model_name: str, manifest: pd.DataFrame, dataset_id: str, settings: Settings,
           parallel_tasks: int) -> TrainingRun:  # fmt: skip
    plan = settings.per_model[model_name]
    device = pick_device()
    threads = configure_threads(parallel_tasks)
    # Shards fetched once per machine (GENDER_CACHE_DIR) and memory-mapped; the splits are copied into
    # memory only when they fit the budget, else streamed batch by batch.
    reader = ShardReader(storage, layout.cache_prefix(dataset_id, plan.image_size))
    data = load_splits(manifest, reader, SPLITS, memory_budget(), device)
    if len(data["train"]) == 0:
        raise TrainingDataError(
            f"the training split of {dataset_id} is empty; the dataset is too small to train on: add images"
        )
    plan = plan_for(plan, len(data["train"]), settings.batch_size, model_name)
    model, inputs = setup_model(model_name, plan.image_size, settings.weights, settings.seed, device)
    return TrainingRun(model_name, plan, settings, dataset_id, data, model, inputs, make_autocast(device), device,
                       threads)  # fmt: skip


def _phase(run: TrainingRun, frozen: bool, epoch: int = 0) -> Phase:
    """The recipe's optimizer and schedule for `run` (loop.start_phase), continued from the first step of `epoch`."""
    return start_phase(run.model, run.model_name, run.plan, run.settings, len(run.data["train"]), frozen, epoch)


def _resume(storage: Storage, run: TrainingRun, ckpt_key: str) -> tuple[int, Phase]:
    """The first epoch to train and the phase (optimizer and schedule) to train it in, from the checkpoint
    if there is a sound one (checkpoint.load_checkpoint discards any other, and training starts afresh).

    The schedule is rebuilt at the checkpoint's global step (make_scheduler's `first_step`), so a
    resumed run takes the same learning rates; the optimizer's state (moments, current rate) is
    loaded when the checkpoint was taken in the same phase (frozen or not) as the resumed epoch."""
    plan = run.plan
    state = load_checkpoint(storage, ckpt_key, run.model)
    if state is not None:
        start = state["epoch"] + 1
        phase = _phase(run, start < plan.freeze_epochs, start)
        try:
            if state["frozen"] == phase.frozen:
                phase.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("discarding the checkpoint %s: its optimizer state does not fit %s (%s); training starts "
                        "again from the first epoch", storage.url(ckpt_key), run.model_name, exc)  # fmt: skip
            discard_checkpoint(storage, ckpt_key)
            state = None
    if state is None:
        return 0, _phase(run, plan.freeze_epochs > 0)
    run.model.load_state_dict(state["model"])
    run.history = state["history"]
    if start < plan.epochs:
        log.info("%s: resuming at epoch %d/%d (checkpoint of epoch %d)", run.model_name, start + 1, plan.epochs, start)
    else:  # killed while exporting: every epoch is done
        log.info("%s: all %d epochs were trained before; exporting from the checkpoint", run.model_name, start)
    return start, phase


CHECKPOINT_EVERY_VAR = "GENDER_CHECKPOINT_EVERY_S"


def _fit(storage: Storage, run: TrainingRun, ckpt_key: str) -> None:
    """The shared epoch loop (loop.train_epochs), with validation and a log line after every epoch, a
    checkpoint after the epochs that end GENDER_CHECKPOINT_EVERY_S after the last one and after the last
    epoch, then the validation numbers of the recalibrated model."""
    plan, s, name = run.plan, run.settings, run.model_name
    every_s = get_number(CHECKPOINT_EVERY_VAR, error=PermanentError)
    start_epoch, phase = _resume(storage, run, ckpt_key)
    train, val = run.data["train"], run.data["val"]
    log.info(
        "%s: %d train / %d val / %d test images at %dpx, %d epochs (%d frozen), batch %d, %s, %d threads",
        name, len(train), len(val), len(run.data["test"]), plan.image_size, plan.epochs, plan.freeze_epochs,
        s.batch_size, run.device, run.threads,
    )  # fmt: skip
    started = time.monotonic()
    last_saved = started

    def after_epoch(done: EpochDone) -> None:
        nonlocal last_saved
        val_prob, val_loss = predict_proba(run.model, val, run.inputs, s.batch_size * 2, run.autocast, s.recipe.tta)
        run.final_prob["val"] = val_prob  # the final model's, unless the BatchNorm recalibration changes it
        val_acc = float(((val_prob >= 0.5) == val.labels.numpy().astype(bool)).mean()) if len(val_prob) else 0.0
        optimizer = done.phase.optimizer
        # The rate of the epoch's last step (the peak rate under a constant schedule).
        record = {"epoch": done.epoch + 1, "frozen": done.phase.frozen, "learning_rate": optimizer.param_groups[0]["lr"],
                  "loss": done.loss_sum / len(train), "accuracy": done.correct / len(train), "val_loss": val_loss,
                  "val_accuracy": val_acc, "images_per_s": len(train) / done.train_seconds,
                  "seconds": time.monotonic() - done.started}  # fmt: skip
        run.history.append(record)
        # Not after every epoch: a small dataset's epochs take seconds, and a large model's checkpoint about
        # as long. After the last one always (a task killed while exporting then trains nothing again).
        if time.monotonic() - last_saved >= every_s or done.epoch + 1 == plan.epochs:
            save_checkpoint(storage, ckpt_key, model=run.model, optimizer=optimizer, epoch=done.epoch,
                            frozen=done.phase.frozen, history=run.history)  # fmt: skip
            last_saved = time.monotonic()
        _log_epoch(run, record, started, done.epoch - start_epoch + 1)

    used = train_epochs(run.model, name, train, run.inputs, run.autocast, plan=plan, settings=s, seed=s.seed,
                        start_epoch=start_epoch, phase=phase, on_epoch=after_epoch)  # fmt: skip
    _recalibrated(run, used)
    run.train_seconds = time.monotonic() - started


def _recalibrated(run: TrainingRun, used: int) -> None:
    """After the last epoch train_epochs recomputed the BatchNorm statistics for the final weights
    (loop.recalibrate_batchnorm, on `used` images); the last epoch's validation numbers become those of the
    model as exported (the lagging ones are kept beside)."""
    s, val = run.settings, run.data["val"]
    if not used or not run.history or not len(val):
        return
    last = run.history[-1]
    prob, loss = predict_proba(run.model, val, run.inputs, s.batch_size * 2, run.autocast, s.recipe.tta)
    run.final_prob["val"] = prob
    accuracy = float(((prob >= 0.5) == val.labels.numpy().astype(bool)).mean())
    last.setdefault("val_accuracy_before_recalibration", last["val_accuracy"])
    last.update(val_loss=loss, val_accuracy=accuracy, batchnorm_recalibrated_on=used)
    log.info("%s: BatchNorm statistics recomputed on %d training images: validation accuracy %.3f (was %.3f)",
             run.model_name, used, accuracy, last["val_accuracy_before_recalibration"])  # fmt: skip


def _log_epoch(run: TrainingRun, record: dict, started: float, epochs_done: int) -> None:
    eta = (run.plan.epochs - record["epoch"]) * (time.monotonic() - started) / epochs_done
    log.info(
        "%s epoch %d/%d: loss %.4f acc %.3f val_loss %.4f val_acc %.3f | %.0f images/s | ETA %.0fs",
        run.model_name, record["epoch"], run.plan.epochs, record["loss"], record["accuracy"], record["val_loss"],
        record["val_accuracy"], record["images_per_s"], eta,
    )  # fmt: skip


def _predictions(run: TrainingRun) -> tuple[pd.DataFrame, dict | None]:
    """Every image's P(male) with its split and label, and the test metrics."""
    frames, test_metrics = [], None
    for split, d in run.data.items():
        if not len(d):
            continue
        prob = run.final_prob.get(split)
        if prob is None:
            prob, _ = predict_proba(run.model, d, run.inputs, run.settings.batch_size * 2, run.autocast,
                                    run.settings.recipe.tta)  # fmt: skip
        frames.append(pd.DataFrame({"key": d.keys, "split": split, "label_id": d.labels.numpy().astype(int),
                                    "prob_male": prob}))  # fmt: skip
        if split == "test":
            test_metrics = classification_metrics(d.labels.numpy().astype(int), prob)
    preds = pd.concat(frames, ignore_index=True)
    preds["label"] = preds["label_id"].map({0: "female", 1: "male"})
    preds["predicted"] = np.where(preds["prob_male"] >= 0.5, "male", "female")
    return preds.drop(columns="label_id"), test_metrics


def _write_outputs(storage: Storage, file_key: Callable[[str], str], run: TrainingRun) -> None:
    """The model's outputs, in layout.MODEL_OUTPUTS order: the model card, written last, marks it complete
    and records the sha256 of every file written before it ("files"), checked whenever they are read."""
    s, name = run.settings, run.model_name
    preds, test_metrics = _predictions(run)
    predictions = tables.to_csv(preds, index=False).encode()
    storage.put_bytes(file_key("predictions.csv"), predictions)
    history = json.dumps(run.history, indent=1).encode()
    storage.put_bytes(file_key("history.json"), history)
    last = run.history[-1]
    metrics = {
        "model": name,
        # As in the study (Keras' history): the last epoch's running accuracy on augmented training batches.
        "train_accuracy": last["accuracy"],
        "val_accuracy": last["val_accuracy"],
        "test": test_metrics,
        "epochs": len(run.history),
        "image_size": run.plan.image_size,
        "freeze_epochs": run.plan.freeze_epochs,
        "weights": s.weights if _takes_weights(name) else "none",
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "train_seconds": run.train_seconds,
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in run.history])),
        "device": str(run.device),
        "device_name": device_name(run.device),
        "peak_device_memory_mb": peak_memory_mb(run.device),
        "torch_threads": run.threads,
        "torch_version": torch.__version__,
    }
    metrics_json = json.dumps(metrics, indent=1).encode()
    storage.put_bytes(file_key("metrics.json"), metrics_json)
    card = {"dataset_id": run.dataset_id, "source": s.source, "seed": s.seed, "profile": s.profile,
            "test_metrics": test_metrics, "epochs": len(run.history)}  # fmt: skip
    exported = export_model(run.model, name, run.plan.image_size, card, tta=s.recipe.tta)
    storage.put_bytes(file_key(layout.MODEL_FILE), exported)
    files = {"predictions.csv": predictions, "history.json": history, "metrics.json": metrics_json,
             layout.MODEL_FILE: exported}  # fmt: skip
    card = {**metrics, **card, "files": {n: sha256_hex(data) for n, data in files.items()}}
    storage.put_bytes(file_key(layout.MODEL_OUTPUTS[-1]), json.dumps(card, indent=1).encode())
    accuracy = test_metrics["accuracy"] if test_metrics else float("nan")
    f1 = test_metrics["weighted"]["f1"] if test_metrics else float("nan")
    log.info("%s done: train acc %.3f, test acc %.3f, weighted F1 %.3f", name, metrics["train_accuracy"], accuracy, f1)


def _takes_weights(model_name: str) -> bool:
    return get_model_spec(model_name).pretrained
