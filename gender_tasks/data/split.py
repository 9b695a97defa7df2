"""Stratified, seeded train/val/test split of a manifest (70/15/15 by default).

Identical images (same sha256) always land in the same split, and so do near-identical ones
(perceptual hashes within `near_duplicate_distance` bits, the same picture re-encoded, resized or
recoloured): a copy of a test image in the training set would inflate test accuracy. Validation
still reports near-duplicates across splits at its own, looser distance.
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from .near_duplicates import hashes_to_uint64, pairs_within

SPLITS = ("train", "val", "test")


def near_duplicate_groups(manifest: pd.DataFrame, max_distance: int) -> pd.Series:
    """A group id per row: the sha256 of one member of its cluster of near-identical images
    (perceptual hashes linked by pairs within `max_distance` bits); its own sha256 if it has none."""
    group = manifest["sha256"].copy()
    if max_distance < 0 or "phash" not in manifest.columns:
        return group
    hashed = manifest[manifest["phash"].astype(str) != ""].drop_duplicates("sha256")
    shas = hashed["sha256"].tolist()
    parent = list(range(len(shas)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs_within(hashes_to_uint64(hashed["phash"]), max_distance):
        parent[root(j)] = root(i)
    group_of = {sha: shas[root(i)] for i, sha in enumerate(shas)}
    return group.map(lambda sha: group_of.get(sha, sha))


def assign_splits(manifest: pd.DataFrame, seed: int, fractions: list[float], group_distance: int = -1) -> pd.DataFrame:
    """Return a copy of `manifest` with a `split` column, stratified by label; images within
    `group_distance` phash bits of each other share a split (-1: only identical content does)."""
    train_f, val_f, test_f = fractions
    grouped = manifest.assign(sha256=near_duplicate_groups(manifest, group_distance))
    unique = grouped.drop_duplicates("sha256")[["sha256", "label"]]
    stratify = unique["label"] if unique["label"].value_counts().min() >= 3 else None
    train, rest = train_test_split(unique, train_size=train_f, stratify=stratify, random_state=seed)
    stratify_rest = rest["label"] if stratify is not None and rest["label"].value_counts().min() >= 2 else None
    val, test = train_test_split(rest, test_size=test_f / (val_f + test_f), stratify=stratify_rest, random_state=seed)
    split_of = {**dict.fromkeys(train["sha256"], "train"), **dict.fromkeys(val["sha256"], "val"),
                **dict.fromkeys(test["sha256"], "test")}  # fmt: skip
    out = manifest.copy()
    out["split"] = grouped["sha256"].map(split_of)
    return out


def split_counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {label: count}} for the report and the class-balance audit."""
    table = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    return {s: {k: int(v) for k, v in table.loc[s].items()} for s in SPLITS if s in table.index}
