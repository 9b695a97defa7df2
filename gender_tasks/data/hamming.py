"""Near-duplicate search on 64-bit perceptual hashes below quadratic time: multi-index hashing.

Owns the fast answers to "which pairs of hashes are at most d bits apart" (all pairs, or only pairs
across groups). The exact blockwise search in `gender_tasks.data.near_duplicates` compares every pair
(1e5 hashes: 5e9 pairs, minutes); this module gives the same pairs, in the same order.

Pigeonhole: split the 64 bits into d + 1 blocks; two hashes at most d bits apart differ in at most
d blocks, so at least one block is identical. Per block, sorting the hashes by that block's value
brings every such pair into one run of equal values; only pairs inside runs are candidates
(random hashes at d = 4: 13-bit blocks, about 1 candidate in 1,600 pairs), and each candidate is
verified with an exact popcount. A pair identical in several blocks is kept only from the first of
them, so no pair is reported twice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Above this distance the blocks are 5 bits or less (d = 12: 13 blocks of 4-5 bits): a run of equal
# block values holds 1/16-1/32 of all hashes, the candidates approach all pairs and the exact
# blockwise search is faster. An algorithm choice by distance, measured in bench/RESULTS.md.
MAX_INDEXED_DISTANCE = 10
# Candidate pairs are generated and verified this many at a time (a few int64 arrays each: ~200 MB).
CANDIDATE_CHUNK = 4_000_000


def block_bounds(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the d + 1 blocks that tile the 64 bits, widths differing by at most one."""
    count = max_distance + 1
    widths = [64 // count + (1 if b < 64 % count else 0) for b in range(count)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def _block_mask(shift: int, width: int) -> np.uint64:
    return np.uint64(((1 << width) - 1) << shift)


def _run_partners(sorted_values: np.ndarray) -> np.ndarray:
    """For each position of a sorted array, how many later positions hold the same value."""
    n = len(sorted_values)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], n]
    run_end = np.repeat(ends, ends - starts)
    return run_end - np.arange(n) - 1


def _pairs_in_runs(order: np.ndarray, partners: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (order[p], order[q]) with q after p in the same run, for the sorted positions given."""
    counts = partners[positions]
    left = np.repeat(positions, counts)
    # For each left position the offsets 1..count: a running index minus where its stretch starts.
    stretch_start = np.repeat(np.cumsum(counts) - counts, counts)
    offsets = np.arange(len(left)) - stretch_start + 1
    return order[left], order[left + offsets]


def _position_chunks(partners: np.ndarray, chunk: int):
    """Consecutive slices of positions whose candidate pairs add up to about `chunk` each."""
    active = np.flatnonzero(partners)
    if not len(active):
        return
    total = np.cumsum(partners[active])
    cuts = np.searchsorted(total, np.arange(chunk, total[-1], chunk), side="right")
    yield from np.split(active, np.unique(cuts))


def _first_shared_block(xor: np.ndarray, block: int, bounds: list[tuple[int, int]]) -> np.ndarray:
    """True where no earlier block than `block` is identical: the pair is reported from this block only."""
    first = np.ones(len(xor), dtype=bool)
    for shift, width in bounds[:block]:
        first &= (xor & _block_mask(shift, width)) != 0
    return first


def _indexed_pairs(hashes: np.ndarray, max_distance: int, codes: np.ndarray | None):
    """(i, j, distance) arrays, i < j, of every pair within `max_distance` bits (across codes, if given)."""
    bounds = block_bounds(max_distance)
    found_i, found_j, found_d = [], [], []
    for block, (shift, width) in enumerate(bounds):
        values = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(values, kind="stable")
        partners = _run_partners(values[order])
        for positions in _position_chunks(partners, CANDIDATE_CHUNK):
            a, b = _pairs_in_runs(order, partners, positions)
            if codes is not None:
                keep = codes[a] != codes[b]
                a, b = a[keep], b[keep]
            xor = hashes[a] ^ hashes[b]
            distance = np.bitwise_count(xor)
            keep = (distance <= max_distance) & _first_shared_block(xor, block, bounds)
            found_i.append(np.minimum(a[keep], b[keep]))
            found_j.append(np.maximum(a[keep], b[keep]))
            found_d.append(distance[keep])
    if not found_i:
        return (np.empty(0, dtype=np.int64),) * 2 + (np.empty(0, dtype=np.uint8),)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def _check_distance(max_distance: int) -> int:
    d = int(max_distance)
    if not 0 <= d <= 64:
        raise ValueError(f"max_distance must be 0-64 bits, got {max_distance}")
    return d


def pairs_within_indexed(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """(i, j), i < j, sorted, for every pair at most `max_distance` bits apart, by multi-index hashing
    at any distance (the distance-based choice of method is `pairs_within`'s)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    i, j, _ = _indexed_pairs(hashes, _check_distance(max_distance), None)
    order = np.lexsort((j, i))
    return list(zip(i[order].tolist(), j[order].tolist(), strict=True))


def cross_group_pairs_indexed(hashes: np.ndarray, groups: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair in different groups at most `max_distance` bits apart, in the
    exact search's order: by pair of groups (in order of first appearance), then i, then j; i's group
    appears first. Rows whose group is NaN are never paired (NaN equals nothing, not even in the
    exact search); None is a group like any other."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    values = np.asarray(groups)
    codes, _ = pd.factorize(values, use_na_sentinel=False)
    codes = np.where(values != values, -1, codes)
    present = np.flatnonzero(codes >= 0)
    i, j, dist = _indexed_pairs(hashes[present], _check_distance(max_distance), codes[present])
    i, j = present[i], present[j]
    swap = codes[i] > codes[j]
    i, j = np.where(swap, j, i), np.where(swap, i, j)
    order = np.lexsort((j, i, codes[j], codes[i]))
    return list(zip(i[order].tolist(), j[order].tolist(), dist[order].tolist(), strict=True))


def uses_index(max_distance: int) -> bool:
    """Whether multi-index hashing beats the exact blockwise search at this distance."""
    return int(max_distance) <= MAX_INDEXED_DISTANCE
