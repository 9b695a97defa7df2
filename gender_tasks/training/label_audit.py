"""Label-quality audit: out-of-fold predictions for every image, ranked by how strongly they disagree
with the given label.

The study took its labels unverified. A model's predictions on images it trained on say nothing
about their labels, so every image is predicted by a model that never saw it: k-fold cross-fitting
over the whole dataset (stratified, seeded), with a fast model (the study's CNN by default).

    datasets/<id>/label_audit/<audit_key>.csv   key, source_path, label, split, fold, prob_male, p_given_label,
                                                label_quality
    runs/<run_key>/label_audit.csv              a copy of it; label_audit.json says which, and its inputs

Ranked by label quality: P(given label) less the model's mean confidence in that class over the
images that carry its label (cleanlab's self-confidence with adjusted probabilities; Northcutt et al.,
"Confident learning", 2021). A model less sure of one class (the smaller one, usually) would otherwise
fill the top of the list with that class's correctly labeled images.

Keyed like a trained model (training/keys.py): a run with the same dataset, split, settings and code
reuses the predictions instead of training the folds again.

On the CPU the folds train side by side, one per process (spawned; one torch thread each unless
GENDER_TORCH_THREADS says otherwise), as many as the task's share of the cores and the memory budget
allow: a small model on a few thousand images uses two cores better as two one-thread trainings than
as one two-thread training (intra-op threads split a 64 px convolution poorly). Each fold's result is the
same whichever process trains it (the same code, seed and thread count): only the finishing order differs,
and each finished fold is stored as it comes in, so a killed audit still resumes after the folds it
finished. On a GPU, with the images streamed from the shards, or for a small dataset (where starting a
process costs more than it saves) the folds train one after another in the task's own process.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from .. import layout, tables
from ..data.shards import ShardReader, memory_budget
from ..errors import PermanentError
from ..evaluation.metrics import encode_labels
from ..layout import audit_result_key, checksum_key, label_audit_key, label_audit_record_key
from ..settings import Settings
from ..storage import Storage, get_recorded, put_recorded
from .batches import SplitData, rows_data
from .devices import configure_threads, explicit_threads, pick_device, usable_cores
from .keys import audit_inputs, key_of
from .loop import fit_predict

log = logging.getLogger(__name__)

# Below this many distinct images the folds train in the task's own process: a worker's start (importing
# torch and the package, ~3-5 s) would cost more than it saves.
PARALLEL_MIN_IMAGES = 200


class AuditWorkerDied(RuntimeError):
    """A fold's worker process ended without a result (killed, or out of memory). Retryable: a retry
    resumes after the folds already stored."""


def run_label_audit(storage: Storage, *, run_key: str, manifest: pd.DataFrame, dataset_id: str, settings: Settings,
                    parallel_tasks: int = 1) -> dict:  # fmt: skip
    inputs = audit_inputs(settings, dataset_id, manifest)
    audit_key = key_of(inputs)
    keyed = audit_result_key(dataset_id, audit_key)
    reused = storage.exists(keyed)
    if reused:
        log.info("label audit: reusing the predictions made with the same inputs, %s", storage.url(keyed))
        table = tables.read_csv(io.BytesIO(get_recorded(storage, keyed)))
    else:
        table = _audit(storage, manifest, dataset_id, settings, parallel_tasks,
                       fold_key=lambda k: layout.audit_fold_key(dataset_id, audit_key, k))  # fmt: skip
        put_recorded(storage, keyed, tables.to_csv(table, index=False).encode())
        for k in range(int(table["fold"].max()) + 1):  # the finished audit replaces its folds
            fold = layout.audit_fold_key(dataset_id, audit_key, k)
            storage.delete(fold)
            storage.delete(checksum_key(fold))
    if storage.exists(checksum_key(keyed)):  # an audit of an earlier version has none
        storage.copy(checksum_key(keyed), checksum_key(label_audit_key(run_key)))
    storage.copy(keyed, label_audit_key(run_key))
    record = {"audit": keyed, "audit_key": audit_key, "reused": reused, "inputs": inputs}
    storage.put_bytes(label_audit_record_key(run_key), json.dumps(record, indent=1).encode())
    return _summary(storage, run_key, table, settings.label_audit_model) | {"reused": reused}


def _summary(storage: Storage, run_key: str, table: pd.DataFrame, model_name: str) -> dict:
    suspicious = int((table["p_given_label"] < 0.1).sum())
    log.info("label audit: %d of %d images have P(given label) < 0.1", suspicious, len(table))
    correct = (table["prob_male"] >= 0.5) == (table["label"] == "male")
    return {"audit_uri": storage.url(label_audit_key(run_key)), "images": len(table),
            "folds": int(table["fold"].nunique()), "model": model_name, "suspicious": suspicious,
            "out_of_fold_accuracy": float(correct.mean())}  # fmt: skip


def _finished_fold(storage: Storage, key: str, shas: pd.Series) -> np.ndarray | None:
    """A fold's stored P(male), if an earlier (killed) try of the same audit finished it."""
    try:
        done = tables.read_csv(io.BytesIO(get_recorded(storage, key)))
    except FileNotFoundError:
        return None
    if done["sha256"].tolist() != shas.tolist():  # cannot happen for the same key; never trust it blindly
        log.warning("label audit: %s does not hold this fold's images; training the fold again", key)
        return None
    return done["prob_male"].to_numpy(dtype=np.float32)


def _audit(storage: Storage, manifest: pd.DataFrame, dataset_id: str, settings: Settings,
           parallel_tasks: int, fold_key: Callable[[int], str]) -> pd.DataFrame:  # fmt: skip
    """Out-of-fold P(male) for every distinct image, least plausible given label first.

    Each finished fold is stored (`fold_key(k)`), so that a killed audit resumes after it."""
    spec = settings.label_audit_spec
    model_name, folds, seed = settings.label_audit_model, int(settings.label_audit_folds), settings.seed
    rows = manifest.drop_duplicates("sha256").reset_index(drop=True)
    reader = ShardReader(storage, layout.cache_prefix(dataset_id, spec.image_size))
    # In memory if the dataset fits the budget twice (each fold copies its parts), else streamed.
    data = rows_data(rows, reader, stream=reader.nbytes(len(rows)) * 2 > memory_budget())
    y = encode_labels(rows["label"])
    folds = min(folds, int(np.bincount(y, minlength=2).min()))
    if folds < 2:
        raise PermanentError(
            "the label audit needs at least two images of each class; add images or switch the audit off "
            "(label_audit: false)"
        )
    prob = np.full(len(rows), np.nan, dtype=np.float32)
    fold_of = np.zeros(len(rows), dtype=np.int64)
    started = time.monotonic()
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_idx) in enumerate(splitter.split(np.zeros(len(y)), y)):
        fold_of[held_idx] = k
    todo = []
    for k in range(folds):
        held_idx = fold_rows(fold_of, k)[1]
        done = _finished_fold(storage, fold_key(k), rows["sha256"].iloc[held_idx])
        if done is None:
            todo.append(k)
        else:
            prob[held_idx] = done
            log.info("label audit: fold %d/%d finished by an earlier try, resuming after it", k + 1, folds)

    def store(k: int, fold_prob: np.ndarray) -> None:
        held_idx = fold_rows(fold_of, k)[1]
        prob[held_idx] = fold_prob
        fold = pd.DataFrame({"sha256": rows["sha256"].iloc[held_idx].to_numpy(), "prob_male": fold_prob})
        put_recorded(storage, fold_key(k), tables.to_csv(fold, index=False, float_format="%.9g").encode())
        log.info("label audit: fold %d/%d done (%.0fs)", k + 1, folds, time.monotonic() - started)

    workers = fold_workers(len(todo), data, parallel_tasks)
    folder = _copy_for_workers(data, fold_of) if workers > 1 else None
    if folder is not None:
        _folds_in_workers(workers, todo, folder, (model_name, spec, settings), seed, store)
    else:
        configure_threads(parallel_tasks)
        for k in todo:
            fit_idx, held_idx = fold_rows(fold_of, k)
            store(k, fit_predict(model_name, spec, settings, data.subset(fit_idx), data.subset(held_idx), seed + k))
    return audit_table(rows, y, prob, fold_of)


def fold_rows(fold_of: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold `k`'s rows to train on (every other fold's) and to predict (its own), in index order, as
    StratifiedKFold gives them: the task and its fold processes derive them alike from `fold_of`."""
    return np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)


def fold_threads() -> int:
    """Torch threads of one fold's worker: GENDER_TORCH_THREADS, else one."""
    return explicit_threads() or 1


def fold_workers(folds_left: int, data, parallel_tasks: int) -> int:
    """How many processes train the folds side by side: one when there is nothing to share out (one fold
    left, a GPU, a streamed dataset, a small one) or the task may not start processes (a daemonic one), else the task's share of the cores over the threads a
    fold uses, no more than the folds left, and no more than the memory budget holds: each worker keeps a
    copy of the dataset and its fold's part of it, beside the task's own copy."""
    if folds_left < 2 or not isinstance(data, SplitData) or len(data) < PARALLEL_MIN_IMAGES:
        return 1
    if pick_device().type != "cpu":
        return 1
    if multiprocessing.current_process().daemon:
        log.info("label audit: this task runs in a daemonic process (a Celery worker's pool), which multiprocessing "
                 "allows no children: the folds train one after another in it")  # fmt: skip
        return 1
    workers = min(folds_left, usable_cores() // max(parallel_tasks, 1) // fold_threads())
    while workers > 1 and data.images.numel() * (1 + 2 * workers) > memory_budget():  # uint8: bytes
        workers -= 1
    return max(workers, 1)


def _copy_for_workers(data: SplitData, fold_of: np.ndarray) -> Path | None:
    """The images, labels and fold numbers for the fold processes, in a private temporary folder (0700:
    the faces stay private); None, with a warning saying why and what to do, where they cannot be written
    (a full or read-only temp disk), and the folds then train in the task's own process."""
    _remove_stale_copies()
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{os.getpid()}-"))
    except OSError as exc:
        log.warning("label audit: no temporary folder for the fold processes (%s): training the folds in this "
                    "process instead; point TMPDIR at a writable local disk to train them side by side", exc)  # fmt: skip
        return None
    try:
        np.save(folder / "images.npy", data.images.numpy())
        np.save(folder / "labels.npy", data.labels.numpy())
        np.save(folder / "fold_of.npy", fold_of)
        (folder / "keys.json").write_text(json.dumps(list(data.keys)))
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("label audit: could not copy the images for the fold processes to %s (%s): training the folds "
                    "in this process instead; point TMPDIR at a local disk with %d MB free to train them side by "
                    "side", folder, exc, (data.images.numel() >> 20) + 1)  # fmt: skip
        return None
    except BaseException:  # stopped while copying: leave nothing half-written behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _folds_in_workers(workers: int, todo: list[int], folder: Path, recipe: tuple, seed: int,
                      store: Callable[[int, np.ndarray], None]) -> None:  # fmt: skip
    """Train the folds in `todo` in `workers` spawned processes, storing each as it finishes, and remove
    `folder` (the images, `_copy_for_workers`) at the end. A worker that dies fails the audit at once,
    naming the fold; the others are stopped, as they are when the task itself is stopped.

    The images go to the workers as a file each maps, not through the pipes: spawning writes a worker's
    start-up arguments into a pipe the parent still holds open, so a worker killed before reading a large
    payload would leave the parent blocked in that write for good. What the pipes carry stays small: a
    fold's number and seed, its P(male) back."""
    threads = fold_threads()
    log.info("label audit: %d folds in %d processes side by side, %d torch thread(s) each", len(todo), workers,
             threads)  # fmt: skip
    pool = None
    finished = False
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                   initargs=(os.getpid(), threads, str(folder), recipe))  # fmt: skip
        running = {pool.submit(_train_fold, k, seed + k): k for k in todo}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                k = running.pop(future)
                try:
                    fold_prob = future.result()
                except BrokenProcessPool as exc:
                    raise AuditWorkerDied(
                        f"label audit: the process training fold {k + 1} ended without a result (killed, or out "
                        "of memory: GENDER_MEMORY_BUDGET_MB lowers how many folds train at once). A retry resumes "
                        "after the folds already stored") from exc  # fmt: skip
                store(k, fold_prob)
        finished = True
    finally:
        if pool is not None:
            if not finished:  # stopped, failed or a worker died: end the others now, not after their fold
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.kill()
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(folder, ignore_errors=True)


COPY_PREFIX = "gender-audit-"


def _remove_stale_copies() -> None:
    """Remove the image copies of audits whose process died (`kill -9` runs no `finally`), this user's."""
    for folder in Path(tempfile.gettempdir()).glob(f"{COPY_PREFIX}*-*"):
        pid = folder.name.removeprefix(COPY_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and folder.stat().st_uid == os.getuid():
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_worker: dict = {}


def _start_worker(parent: int, threads: int, folder: str, recipe: tuple) -> None:
    """A fold worker's set-up: die with the task's process (a `kill -9` of it must not leave trainings
    running), leave Ctrl-C to the task, use `threads` torch threads, map the images (copy-on-write: the
    workers share the pages)."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the task died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)
    if folder:
        where = Path(folder)
        images = torch.from_numpy(np.load(where / "images.npy", mmap_mode="c"))
        labels = torch.from_numpy(np.load(where / "labels.npy"))
        keys = json.loads((where / "keys.json").read_text())
        _worker.update(data=SplitData(images, labels, keys), fold_of=np.load(where / "fold_of.npy"), recipe=recipe)


def _train_fold(k: int, seed: int) -> np.ndarray:
    """Fold `k`: trained on the images of the other folds, P(male) of its own."""
    data, (model_name, spec, settings) = _worker["data"], _worker["recipe"]
    fit_idx, held_idx = fold_rows(_worker["fold_of"], k)
    return fit_predict(model_name, spec, settings, data.subset(fit_idx), data.subset(held_idx), seed)


def audit_table(rows: pd.DataFrame, y: np.ndarray, prob: np.ndarray, fold_of: np.ndarray) -> pd.DataFrame:
    """The audit's table: each image's fold and out-of-fold P(male), P(given label) and label quality,
    the least plausible label first."""
    table = rows[["key", "source_path", "label", "split"]].copy()
    table["fold"] = fold_of
    table["prob_male"] = prob
    table["p_given_label"] = np.where(y == 1, prob, 1 - prob)
    table["label_quality"] = label_quality(y, prob)
    return table.sort_values(["label_quality", "p_given_label"], kind="stable").reset_index(drop=True)


def label_quality(y: np.ndarray, prob_male: np.ndarray) -> np.ndarray:
    """How plausible each given label is, for ranking: P(given label) minus the class's confident threshold
    (the mean P(class) over the images labeled that class), shifted and scaled as cleanlab's adjusted
    self-confidence is (so that it lies in [0, 1]; the order is that of the difference).

    Written out here rather than adding cleanlab for one formula (its rank.get_label_quality_scores with
    method="self_confidence", adjust_pred_probs=True computes the same numbers)."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.stack([1.0 - np.asarray(prob_male, dtype=np.float64), np.asarray(prob_male, dtype=np.float64)], axis=1)
    thresholds = np.array([probs[y == c, c].mean() if (y == c).any() else 0.0 for c in (0, 1)])
    adjusted = probs - thresholds + thresholds.max()
    adjusted /= adjusted.sum(axis=1, keepdims=True)
    return adjusted[np.arange(len(y)), y]
