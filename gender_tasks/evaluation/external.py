"""External evaluation sets: every trained model evaluated on extra labeled folders (for example
real photographs), the study's open question of real-world generalisation.

A set is "path" or "path?<query>", where the query is a pandas expression over the folder's
labels.csv (e.g. "../faces/utkface?age >= 16" keeps adults only).

    runs/<run_key>/external/<set name>.json   per model: metrics, bootstrap CIs
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import layout
from ..data.attributes import find_labels_csv, read_labels_table
from ..data.folders import IMAGE_SUFFIXES, find_class_dirs
from ..data.images import decode_resize
from ..errors import PermanentError
from ..settings import ENSEMBLE, Settings
from ..storage import Storage
from .metrics import classification_metrics, encode_labels
from .predict import load_stored_model
from .stats import bootstrap_ci

log = logging.getLogger(__name__)


class ExternalSetError(PermanentError):
    pass


def parse_spec(spec: str) -> tuple[Path, str | None, str]:
    path, _, query = spec.partition("?")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ExternalSetError(
            f"external evaluation set {path!r} is not a folder; give a folder with female/ and male/"
        )
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name + (f"_{query}" if query else "")).strip("_")
    return root, query.strip() or None, name


def list_labeled_images(root: Path, query: str | None) -> pd.DataFrame:
    """(path, label) of every image below the class folders, filtered by `query` over labels.csv."""
    rows = [{"path": p, "label": label} for label, folder in find_class_dirs(root).items()
            for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    table = pd.DataFrame(rows)
    if query:
        labels_csv = find_labels_csv(root)
        if labels_csv is None:
            raise ExternalSetError(f"a filter ({query!r}) needs a labels.csv in {root}; remove the filter or add one")
        meta = read_labels_table(labels_csv, root)
        try:
            keep = set(meta.query(query)["file"])
        except Exception as exc:
            raise ExternalSetError(f"filter {query!r} does not apply to {labels_csv}: {exc}") from None
        rel = table["path"].map(lambda p: p.resolve().relative_to(labels_csv.parent.resolve()).as_posix())
        table = table[rel.isin(keep)]
    if table.empty or table["label"].nunique() < 2:
        raise ExternalSetError(f"external set {root}{'?' + query if query else ''} needs images of both classes")
    return table.reset_index(drop=True)


def evaluate_external(storage: Storage, *, run_key: str, settings: Settings, spec: str) -> dict:
    root, query, name = parse_spec(spec)
    table = list_labeled_images(root, query)
    y = encode_labels(table["label"])
    results, decoded = {}, {}
    ensemble = [ENSEMBLE] if storage.exists(layout.model_file_key(run_key, ENSEMBLE, "model.ts")) else []
    for model_name in [*settings.models, *ensemble]:
        module, meta = load_stored_model(storage, layout.model_prefix(run_key, model_name))  # verified by its card
        size = int(meta["image_size"])
        if size not in decoded:
            with ThreadPoolExecutor(max_workers=8) as pool:
                decoded[size] = np.stack(list(pool.map(decode_resize, (p.read_bytes() for p in table["path"]),
                                                       [size] * len(table))))  # fmt: skip
        probs = []
        with torch.inference_mode():
            for start in range(0, len(table), 128):
                x = torch.from_numpy(decoded[size][start : start + 128]).permute(0, 3, 1, 2).float() / 255.0
                probs.append(module(x).numpy())
        prob = np.concatenate(probs)
        metrics = classification_metrics(y, prob)
        metrics["ci"] = bootstrap_ci(y, (prob >= 0.5).astype(int), seed=settings.seed)
        results[model_name] = metrics
        log.info("external %s: %s accuracy %.3f on %d images", name, model_name, metrics["accuracy"], len(table))
    out = {"name": name, "source": str(root), "filter": query, "images": len(table),
           "counts": table["label"].value_counts().to_dict(), "models": results}  # fmt: skip
    storage.put_bytes(layout.external_key(run_key, name), json.dumps(out, indent=1).encode())
    return out
