"""Classify a folder of images with an exported model (TorchScript), no training code needed.

The model file carries its input size and class names (`meta.json` inside the TorchScript archive).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import tables
from ..data.folders import IMAGE_SUFFIXES
from ..data.images import decode_resize

log = logging.getLogger(__name__)


def load_exported(model: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """Load a model.ts from a path or a storage URI (s3://bucket/.../model.ts, file://...)."""
    text = str(model)
    if text.startswith(("s3://", "file://")):
        from ..storage import open_storage

        parent, _, name = text.rpartition("/")
        data = open_storage(parent).get_bytes(name)
    else:
        data = Path(text).read_bytes()
    extra = {"meta.json": ""}
    module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra["meta.json"])


def predict_folder(model: str | Path, folder: Path, out_csv: Path, batch_size: int = 64) -> int:
    module, meta = load_exported(model)
    size = int(meta["image_size"])
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        arrays, ok = [], []
        for path in chunk:
            try:
                arrays.append(decode_resize(path.read_bytes(), size))
                ok.append(path)
            except Exception as exc:  # one unreadable file must not stop the rest
                rows.append({"file": str(path), "predicted": "", "prob_male": np.nan, "error": str(exc)})
        if not arrays:
            continue
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            prob = module(x).numpy()
        for path, p in zip(ok, prob, strict=True):
            rows.append({"file": str(path), "predicted": meta["classes"][int(p >= 0.5)],
                         "prob_male": float(p), "error": ""})  # fmt: skip
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tables.to_csv(pd.DataFrame(rows, columns=["file", "predicted", "prob_male", "error"]), out_csv, index=False)
    log.info("predicted %d images with %s -> %s", len(rows), meta.get("model"), out_csv)
    return len(rows)
