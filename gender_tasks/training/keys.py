"""What a trained model (or a label audit) is keyed by: everything that determines it, hashed.

A model is determined by its dataset, its split, the settings that change training (`Settings.
training_inputs()` plus the model's own plan) and the code that trains it. Two runs that agree on all
of them would train the same model, so the second reuses the first's outputs, or resumes its checkpoint
if it was killed; a change to any of them gives a new key and a fresh training.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import pandas as pd

from ..settings import Settings

PACKAGE = "gender-classification-pipeline"
_ROOT = Path(__file__).resolve().parent.parent
# The source that decides what training produces: the loop, trainer, checkpoints and export, the networks,
# and how images become arrays (the decode, the shard cache). Editing any of these files changes the code
# version and so every key.
CODE_SOURCES = ("training", "models", "data/images.py", "data/preprocess.py", "data/shards.py")
KEY_LENGTH = 20  # hex digits of sha256: 80 bits, far past any collision among one storage's models


@functools.cache
def code_version() -> str:
    """The package version and a hash of the training source, computed once per process."""
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    for entry in CODE_SOURCES:
        path = _ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(_ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return f"{version}+{digest.hexdigest()[:12]}"


def split_digest(manifest: pd.DataFrame) -> str:
    """A hash of which image is in which split: the split's content, whatever the key it was stored under."""
    pairs = sorted(f"{sha}:{split}" for sha, split in zip(manifest["sha256"], manifest["split"], strict=True))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]


def model_inputs(settings: Settings, model_name: str, dataset_id: str, manifest: pd.DataFrame) -> dict:
    """Everything one model's training depends on, as JSON (saved beside the model, hashed into its key)."""
    plan = settings.per_model[model_name]
    return {"kind": "model", "model": model_name, "dataset_id": dataset_id, "split": split_digest(manifest),
            "plan": asdict(plan),
            "settings": settings.training_inputs(), "code": code_version()}  # fmt: skip


def audit_inputs(settings: Settings, dataset_id: str, manifest: pd.DataFrame) -> dict:
    """Everything the label audit's out-of-fold predictions depend on."""
    spec = settings.label_audit_spec
    return {"kind": "label_audit", "model": settings.label_audit_model, "folds": int(settings.label_audit_folds),
            "dataset_id": dataset_id, "split": split_digest(manifest),
            "plan": asdict(spec),
            "settings": settings.training_inputs(), "code": code_version()}  # fmt: skip


def key_of(inputs: dict) -> str:
    return _digest(inputs)
