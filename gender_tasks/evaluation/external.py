"""External evaluation sets: every trained model evaluated on extra labeled folders (for example
real photographs), the study's open question of real-world generalisation.

A set is "folder" or "folder?<filter>", the filter a row selection over the folder's labels.csv in
the grammar of `data/filters.py` (e.g. "../faces/utkface?age >= 16" keeps adults only): parsed,
never evaluated, so a set given as a DAG param cannot run code.

The folder is read like an ingest source (`folders.list_images`: regular files only, links kept
inside it, the size limits max_file_bytes and max_source_bytes) and streamed: BATCH_SIZE images at
a time are read once, decoded at every model's input size and run through every model, so memory
stays flat however large the set is.

    runs/<run_key>/external/<set name>.json   per model: metrics, bootstrap CIs
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import layout
from ..data.attributes import find_labels_csv, read_labels_table
from ..data.filters import ExternalSetError, parse_filter, split_spec
from ..data.folders import IngestError, list_images, read_regular, shown
from ..data.images import decode_resize
from ..errors import decode_failure
from ..settings import ENSEMBLE, RunConfig, Settings
from ..storage import Storage
from .metrics import classification_metrics, encode_labels
from .predict import load_stored_model
from .stats import bootstrap_ci

log = logging.getLogger(__name__)

__all__ = ["ExternalSetError", "evaluate_external", "list_labeled_images", "parse_spec", "predict_streamed"]

BATCH_SIZE = 128  # images read, decoded and run through every model at a time
DECODE_THREADS = 8


def parse_spec(spec: str) -> tuple[Path, str | None, str]:
    """(folder, filter text or None, the set's name) of a set "folder" or "folder?<filter>".

    The filter is parsed here (FilterError naming the position) and the folder must exist; no file
    in it is read, so the CLI's pre-flight can call this before Airflow starts.
    """
    folder, flt = split_spec(spec)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ExternalSetError(
            f"external evaluation set {shown(folder)!r} is not a folder; give a folder with female/ and male/"
        )
    query = flt.text if flt else None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name + (f"_{query}" if query else "")).strip("_")
    return root, query, name


def list_labeled_images(root: Path, query: str | None, *, max_file_bytes: int = RunConfig.max_file_bytes,
                        max_total_bytes: int = RunConfig.max_source_bytes) -> pd.DataFrame:  # fmt: skip
    """(path, label) of every image below the class folders, the rows `query` keeps of labels.csv.

    The folder is judged as an ingest source is (special files, links out, bad names, limits), from
    `lstat` alone, before any file is opened.
    """
    where = f"{root}?{query}" if query else str(root)
    try:
        files = list_images(root, max_file_bytes=max_file_bytes, max_total_bytes=max_total_bytes)
    except IngestError as exc:
        raise ExternalSetError(f"external evaluation set {shown(where)!r}: {exc}") from None
    table = pd.DataFrame([(path, label) for path, label, _ in files], columns=["path", "label"])
    if query:
        flt = parse_filter(query)
        labels_csv = find_labels_csv(root)
        if labels_csv is None:
            raise ExternalSetError(f"a filter ({query!r}) needs a labels.csv in {shown(root)}; remove the filter "
                                   "or add one")  # fmt: skip
        meta = read_labels_table(labels_csv, root, as_text=True)
        if "file" not in meta.columns:
            raise ExternalSetError(f"{shown(labels_csv)} has no 'file' column (the image path relative to it), "
                                   f"so the filter {query!r} cannot select images: add one")  # fmt: skip
        keep = set(meta.loc[flt.mask(meta, where=shown(labels_csv)), "file"])
        rel = table["path"].map(lambda p: p.relative_to(labels_csv.parent).as_posix())
        table = table[rel.isin(keep)]
    if table.empty or table["label"].nunique() < 2:
        raise ExternalSetError(f"external set {shown(where)!r} needs images of both classes")
    return table.reset_index(drop=True)


def _load(path: Path, sizes: Sequence[int], max_file_bytes: int) -> list[np.ndarray]:
    """One image, read once (a regular file of at most max_file_bytes) and decoded at every size."""
    try:
        data = read_regular(path, max_file_bytes)
    except OSError as exc:
        raise ExternalSetError(f"{shown(path)} cannot be read ({exc.strerror or exc}): fix or remove it") from None
    try:
        return [decode_resize(data, size) for size in sizes]
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many types for a broken file; each means "not a usable image"
        raise ExternalSetError(
            f"{shown(path)} cannot be decoded as an image ({decode_failure(exc)}): replace or remove it"
        ) from None


def predict_streamed(paths: Sequence[Path], models: dict[str, tuple[Callable, list[int]]], *,
                     max_file_bytes: int = RunConfig.max_file_bytes,
                     batch_size: int = BATCH_SIZE) -> dict[str, np.ndarray]:  # fmt: skip
    """P(male) of every image for every model ({name: (module, its input sizes)}), `batch_size` images at
    a time: each file is read once per run, decoded at each distinct input size and run through every
    model (the ensemble takes one input per member size); only one batch is ever held decoded."""
    sizes = sorted({size for _, model_sizes in models.values() for size in model_sizes})
    probs: dict[str, list[np.ndarray]] = {name: [] for name in models}
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool, torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded = list(pool.map(lambda p: _load(p, sizes, max_file_bytes), chunk))
            x = {size: torch.from_numpy(np.stack([d[i] for d in decoded])).permute(0, 3, 1, 2).float() / 255.0
                 for i, size in enumerate(sizes)}  # fmt: skip
            for name, (module, model_sizes) in models.items():
                probs[name].append(np.asarray(module(*[x[s] for s in model_sizes])).reshape(-1))
            del decoded
    return {name: np.concatenate(p) if p else np.zeros(0) for name, p in probs.items()}


def evaluate_external(storage: Storage, *, run_key: str, settings: Settings, spec: str,
                      batch_size: int = BATCH_SIZE) -> dict:  # fmt: skip
    root, query, name = parse_spec(spec)
    table = list_labeled_images(root, query, max_file_bytes=settings.max_file_bytes,
                                max_total_bytes=settings.max_source_bytes)  # fmt: skip
    y = encode_labels(table["label"])
    ensemble = [ENSEMBLE] if storage.exists(layout.model_file_key(run_key, ENSEMBLE, layout.MODEL_OUTPUTS[-1])) else []
    models = {}
    for model_name in [*settings.models, *ensemble]:
        module, meta = load_stored_model(storage, layout.model_prefix(run_key, model_name))  # verified by its card
        models[model_name] = (module, meta["input_sizes"])
    probs = predict_streamed(list(table["path"]), models, max_file_bytes=settings.max_file_bytes,
                             batch_size=batch_size)  # fmt: skip
    results = {}
    for model_name, prob in probs.items():
        metrics = classification_metrics(y, prob)
        metrics["ci"] = bootstrap_ci(y, (prob >= 0.5).astype(int), seed=settings.seed)
        results[model_name] = metrics
        log.info("external %s: %s accuracy %.3f on %d images", name, model_name, metrics["accuracy"], len(table))
    out = {"name": name, "source": str(root), "filter": query, "images": len(table),
           "counts": table["label"].value_counts().to_dict(), "models": results}  # fmt: skip
    storage.put_bytes(layout.external_key(run_key, name), json.dumps(out, indent=1).encode())
    return out
