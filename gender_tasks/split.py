"""Stratified, seeded train/val/test split of a manifest (70/15/15 by default).

Identical images (same sha256) always land in the same split, so a duplicate can never leak
test data into training even before validation flags it.
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from .ingest import dataset_prefix

SPLITS = ("train", "val", "test")


def split_key(dataset_id: str, seed: int, fractions: list[float]) -> str:
    tag = "-".join(str(round(f * 100)) for f in fractions)
    return f"{dataset_prefix(dataset_id)}/splits/seed{seed}-{tag}.csv"


def assign_splits(manifest: pd.DataFrame, seed: int, fractions: list[float]) -> pd.DataFrame:
    """Return a copy of `manifest` with a `split` column, stratified by label."""
    train_f, val_f, test_f = fractions
    unique = manifest.drop_duplicates("sha256")[["sha256", "label"]]
    stratify = unique["label"] if unique["label"].value_counts().min() >= 3 else None
    train, rest = train_test_split(unique, train_size=train_f, stratify=stratify, random_state=seed)
    stratify_rest = rest["label"] if stratify is not None and rest["label"].value_counts().min() >= 2 else None
    val, test = train_test_split(rest, test_size=test_f / (val_f + test_f), stratify=stratify_rest, random_state=seed)
    split_of = {**dict.fromkeys(train["sha256"], "train"), **dict.fromkeys(val["sha256"], "val"),
                **dict.fromkeys(test["sha256"], "test")}  # fmt: skip
    out = manifest.copy()
    out["split"] = out["sha256"].map(split_of)
    return out


def split_counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {label: count}} for the report and the class-balance audit."""
    table = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    return {s: {k: int(v) for k, v in table.loc[s].items()} for s in SPLITS if s in table.index}
