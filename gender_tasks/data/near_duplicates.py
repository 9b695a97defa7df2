"""Near-duplicates: perceptually near-identical images that fall in different splits.

Identical files (same sha256) are caught by validation and kept in one split by `split`; a
re-encoded, resized or slightly shifted copy of a test image in the training set inflates test
accuracy just the same. Each image's 64-bit perceptual hash (ImageHash's phash) is computed once,
at ingest (manifest column `phash`, hex; see images.phash_of_bytes); here every pair of images in different splits is
compared by Hamming distance: by multi-index hashing (gender_tasks.data.hamming, 1e5 images in
seconds), or at large distances exactly, every pair with numpy, block by block (10k images: about
2e7 pairs, under a second). Pairs within `near_duplicate_distance` bits (default 4) are reported; with
`near_duplicates_fatal` they stop the run.
"""

from __future__ import annotations

import logging
from itertools import combinations

import numpy as np
import pandas as pd

from .hamming import cross_group_pairs_indexed, pairs_within_indexed, uses_index
from .manifest import decodable_mask
from .validate import ValidationFailed

log = logging.getLogger(__name__)

DEFAULT_MAX_DISTANCE = 4
PAIRS_SHOWN = 50  # the summary travels through XCom: keep it small
EXAMPLES_IN_MESSAGE = 5
# Pairwise distances are computed this many at a time (uint64 XORs: 4M of them are 32 MB).
BLOCK_ELEMENTS = 4_000_000
SPLIT_ORDER = ("train", "val", "test")


def hashes_to_uint64(hexes) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def pairs_within(hashes: np.ndarray, max_distance: int, block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """(i, j), i < j, sorted, for every pair of `hashes` at most `max_distance` bits apart: multi-index
    hashing (gender_tasks.data.hamming) up to its distance limit, beyond it the exact search."""
    if uses_index(max_distance):
        return pairs_within_indexed(hashes, max_distance)
    return pairs_within_exact(hashes, max_distance, block_elements)


def cross_group_pairs(hashes: np.ndarray, groups: np.ndarray, max_distance: int,
                      block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int, int]]:  # fmt: skip
    """`cross_group_pairs_exact`'s answer, in its order, by multi-index hashing up to its distance limit."""
    if uses_index(max_distance):
        return cross_group_pairs_indexed(hashes, groups, max_distance)
    return cross_group_pairs_exact(hashes, groups, max_distance, block_elements)


def pairs_within_exact(hashes: np.ndarray, max_distance: int,
                       block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:  # fmt: skip
    """(i, j), i < j, for every pair of `hashes` at most `max_distance` bits apart (all pairs compared,
    blockwise, bounded memory): the reference the indexed search is tested against."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    pairs: list[tuple[int, int]] = []
    step = max(1, block_elements // max(n, 1))
    for start in range(0, n, step):
        rows = np.arange(start, min(start + step, n))
        dist = np.bitwise_count(hashes[rows, None] ^ hashes[None, :])
        r, c = np.nonzero((dist <= max_distance) & (np.arange(n)[None, :] > rows[:, None]))
        pairs.extend(zip(rows[r].tolist(), c.tolist(), strict=True))
    return pairs


def cross_group_pairs_exact(hashes: np.ndarray, groups: np.ndarray, max_distance: int,
                            block_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int, int]]:  # fmt: skip
    """(i, j, distance) for every pair of hashes in different groups at most `max_distance` bits apart.

    Only pairs across groups are compared (train x val, train x test, val x test: under half of
    all pairs for a 70/15/15 split), in blocks of rows so that memory stays bounded.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    groups = np.asarray(groups)
    members = {g: np.flatnonzero(groups == g) for g in pd.unique(groups)}
    pairs: list[tuple[int, int, int]] = []
    for ga, gb in combinations(members, 2):
        rows_a, rows_b = members[ga], members[gb]
        if not len(rows_a) or not len(rows_b):
            continue
        hb = hashes[rows_b]
        step = max(1, block_elements // len(rows_b))
        for start in range(0, len(rows_a), step):
            rows = rows_a[start : start + step]
            dist = np.bitwise_count(hashes[rows, None] ^ hb[None, :])
            r, c = np.nonzero(dist <= max_distance)
            pairs.extend(zip(rows[r].tolist(), rows_b[c].tolist(), dist[r, c].tolist(), strict=True))
    return pairs


def find_near_duplicates(manifest: pd.DataFrame, max_distance: int = DEFAULT_MAX_DISTANCE) -> list[dict]:
    """Every pair of decodable images in different splits whose phashes differ in at most
    `max_distance` bits, closest first: {a, b (source paths), split_a, split_b, label_a, label_b, distance}."""
    decodable = decodable_mask(manifest)
    frame = manifest[decodable & manifest["split"].isin(SPLIT_ORDER)].reset_index(drop=True)
    if frame.empty:
        return []
    hashes = hashes_to_uint64(frame["phash"])
    rank = frame["split"].map(SPLIT_ORDER.index).to_numpy()
    out = []
    for i, j, dist in cross_group_pairs(hashes, rank, int(max_distance)):
        a, b = (i, j) if rank[i] < rank[j] else (j, i)  # the earlier split first: train before val before test
        ra, rb = frame.iloc[a], frame.iloc[b]
        out.append({"a": ra["source_path"], "b": rb["source_path"], "split_a": ra["split"], "split_b": rb["split"],
                    "label_a": ra["label"], "label_b": rb["label"], "distance": int(dist)})  # fmt: skip
    return sorted(out, key=lambda p: (p["distance"], p["a"], p["b"]))


def check_near_duplicates(manifest: pd.DataFrame, max_distance: int, fatal: bool) -> dict:
    """The near-duplicate part of the validation summary; raises ValidationFailed when there are
    near-duplicates across splits and the setting `near_duplicates_fatal` is true."""
    pairs = find_near_duplicates(manifest, max_distance)
    summary = {"near_duplicates": pairs[:PAIRS_SHOWN], "near_duplicate_count": len(pairs),
               "near_duplicate_distance": max_distance}  # fmt: skip
    if pairs:
        log.warning("%d near-duplicate pair(s) across splits (phash distance <= %d), e.g. %s",
                    len(pairs), max_distance, _describe_pairs(pairs[:EXAMPLES_IN_MESSAGE]))  # fmt: skip
        if fatal:
            raise _failure(pairs, max_distance)
    return summary


def _pair_text(p: dict) -> str:
    return f"{p['a']} ({p['split_a']}) ~ {p['b']} ({p['split_b']}), distance {p['distance']}"


def _describe_pairs(pairs: list[dict]) -> str:
    return "; ".join(_pair_text(p) for p in pairs)


FIX = (
    "delete one image of each pair from the source and re-run; or, if they are genuinely different images, "
    "lower near_duplicate_distance or set near_duplicates_fatal to false to only report them"
)


def _failure(pairs: list[dict], max_distance: int):
    examples = [_pair_text(p) for p in pairs[:EXAMPLES_IN_MESSAGE]]
    failure = {"expectation": "no_near_duplicates_across_splits", "column": "phash",
               "says": f"no two images in different splits are near-identical (phash distance <= {max_distance})",
               "detail": f"{len(pairs)} pair(s)", "examples": examples, "fix": FIX}  # fmt: skip
    message = (f"{len(pairs)} near-duplicate pair(s) across splits (phash distance <= {max_distance}), "
               f"e.g. {'; '.join(examples)}. Fix: {FIX}")  # fmt: skip
    return ValidationFailed(message, [failure])
