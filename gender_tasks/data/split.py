"""Stratified, seeded train/val/test split of a manifest (70/15/15 by default).

Identical images (same sha256) always land in the same split, and so do near-identical ones
(perceptual hashes within `near_duplicate_distance` bits, the same picture re-encoded, resized or
recoloured): a copy of a test image in the training set would inflate test accuracy. Validation
still reports near-duplicates across splits at its own, looser distance.

Whole groups are placed, largest first, into the split furthest below its share of the class's
rows, so proportions hold by construction however many groups there are (a train_test_split over
groups counts groups, not rows, and drifted by 1,350 rows on 20,000 faces).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import PermanentError
from .near_duplicates import hashes_to_uint64, pairs_within

SPLITS = ("train", "val", "test")


def min_groups_per_class(fractions) -> int:
    """The fewest distinct images a class needs for the split to put at least one in every split.

    Found by running the split's own placement (`_fill_splits`) on n single images, n = 1, 2, …;
    it ends by ceil(1 / smallest share), where every split's target is a whole image or more.
    """
    bound = math.ceil(sum(fractions) / min(fractions) - 1e-9)
    return next(n for n in range(1, bound + 1) if len(set(_fill_splits([1] * n, fractions))) == len(fractions))


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


def group_labels(manifest: pd.DataFrame, group: pd.Series) -> pd.DataFrame:
    """One row per group: `group`, its `label` (its members' majority; on a tie, the first member's)
    and `rows` (its member rows, the unit the split proportions are counted in)."""
    members = pd.DataFrame({"group": group.to_numpy(), "label": manifest["label"].to_numpy(),
                            "position": range(len(manifest))})  # fmt: skip
    votes = members.groupby(["group", "label"], sort=False).agg(votes=("position", "size"), first=("position", "min"))
    winners = votes.reset_index().sort_values(["votes", "first"], ascending=[False, True]).drop_duplicates("group")
    rows = members.groupby("group", sort=False).size().rename("rows")
    return winners[["group", "label"]].join(rows, on="group")


def _fill_splits(sizes: list[int], fractions: list[float]) -> list[int]:
    """A split number per group, groups taken in the given order, each into the split furthest
    below its target (in rows): large groups first leave the singletons to even out the rest."""
    total = sum(sizes)
    deficit = [total * f / sum(fractions) for f in fractions]
    chosen = []
    for size in sizes:
        split = max(range(len(deficit)), key=deficit.__getitem__)
        deficit[split] -= size
        chosen.append(split)
    return chosen


def balanced_group_splits(groups: pd.DataFrame, seed: int, fractions: list[float]) -> dict:
    """{group: split} hitting `fractions` of each label's rows by construction (off by less than one
    largest group); groups are shuffled with `seed` and placed largest first. Deterministic."""
    rng = np.random.default_rng(seed)
    split_of = {}
    for label in sorted(groups["label"].unique()):
        of_label = groups[groups["label"] == label]
        of_label = of_label.iloc[rng.permutation(len(of_label))].sort_values("rows", ascending=False, kind="stable")
        chosen = _fill_splits(of_label["rows"].tolist(), fractions)
        split_of.update(zip(of_label["group"], (SPLITS[c] for c in chosen), strict=True))
    return split_of


def assign_splits(manifest: pd.DataFrame, seed: int, fractions: list[float], group_distance: int = -1) -> pd.DataFrame:
    """Return a copy of `manifest` with a `split` column, stratified by label, and `split_group`: a
    number per cluster of images kept in one split, those within `group_distance` phash bits of
    each other (-1: only identical content). Each class's splits hold `fractions` of its rows to
    within one largest group (validation allows exactly that)."""
    group = near_duplicate_groups(manifest, group_distance)
    split_of = balanced_group_splits(group_labels(manifest, group), seed, fractions)
    out = manifest.copy()
    out["split"] = group.map(split_of).to_numpy()
    out["split_group"] = pd.factorize(group)[0]
    _refuse_empty_splits(out, group_distance)
    return out


def _refuse_empty_splits(split: pd.DataFrame, group_distance: int) -> None:
    """Every split must hold both classes (training, validation and the test metrics all need them). Ingest
    refuses classes too small for that, so what empties a split here is grouping: near-identical images
    (phash within `group_distance` bits) stay in one split, and a class that is nearly all one group fills
    one split with it."""
    missing = [(s, label) for s in SPLITS for label in sorted(split["label"].unique())
               if not ((split["split"] == s) & (split["label"] == label)).any()]  # fmt: skip
    if not missing:
        return
    sizes = split.groupby("split_group").size()
    where = ", ".join(f"the {s} split has no {label} image" for s, label in missing)
    raise PermanentError(
        f"the split cannot hold both classes in every split ({where}): near-identical images stay together, and "
        f"the largest group of near-identical images holds {int(sizes.max())} of {len(split)} images "
        f"(split_group_distance={group_distance} phash bits). Remove the copies, add distinct images, or lower "
        "split_group_distance (-1: group identical content only)"
    )


def split_counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {label: count}} for the report and the class-balance audit."""
    table = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    return {s: {k: int(v) for k, v in table.loc[s].items()} for s in SPLITS if s in table.index}
