"""Multi-index hashing gives exactly the exact blockwise search's answers, in the same order."""

import numpy as np
import pytest

from gender_tasks.data.hamming import block_bounds, cross_group_pairs_indexed, pairs_within_indexed, uses_index
from gender_tasks.data.near_duplicates import (
    cross_group_pairs,
    cross_group_pairs_exact,
    pairs_within,
    pairs_within_exact,
)

DISTANCES = [0, 1, 2, 4, 8, 16]


def planted_hashes(n: int, seed: int, clusters: int = 30, cluster_size: int = 6, max_flips: int = 10) -> np.ndarray:
    """Random 64-bit hashes plus clusters of copies with 0..max_flips bits flipped, shuffled."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) ^ (
        rng.integers(0, 2, n).astype(np.uint64) << np.uint64(63)
    )
    copies = []
    for centre in rng.choice(base, clusters):
        for _ in range(cluster_size):
            flips = rng.choice(64, rng.integers(0, max_flips + 1), replace=False)
            copies.append(centre ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64), initial=np.uint64(0)))
    hashes = np.concatenate([base, np.array(copies, dtype=np.uint64)])
    return hashes[rng.permutation(len(hashes))]


def test_blocks_tile_the_64_bits():
    for d in range(65):
        bounds = block_bounds(d)
        assert len(bounds) == d + 1 and sum(w for _, w in bounds) == 64
        assert [s for s, _ in bounds] == np.cumsum([0] + [w for _, w in bounds])[:-1].tolist()


@pytest.mark.parametrize("d", DISTANCES)
def test_pairs_within_matches_exact(d):
    hashes = planted_hashes(1500, seed=d)
    exact = pairs_within_exact(hashes, d)
    assert pairs_within_indexed(hashes, d) == exact
    assert pairs_within(hashes, d) == exact
    if d <= 4:
        assert exact, "the planted clusters give pairs at small distances"


@pytest.mark.parametrize("d", DISTANCES)
@pytest.mark.parametrize("layout", ["three_splits", "many_groups", "one_group", "strings_with_none", "floats_with_nan"])
def test_cross_group_pairs_match_exact(d, layout):
    hashes = planted_hashes(1200, seed=100 + d)
    rng = np.random.default_rng(d)
    groups = {
        "three_splits": rng.choice([2, 0, 1], len(hashes), p=[0.7, 0.15, 0.15]),
        "many_groups": rng.integers(0, 40, len(hashes)),
        "one_group": np.zeros(len(hashes), dtype=int),
        "strings_with_none": rng.choice(np.array(["val", "train", None], dtype=object), len(hashes)),
        "floats_with_nan": rng.choice([1.0, np.nan, 0.0], len(hashes)),
    }[layout]
    exact = cross_group_pairs_exact(hashes, groups, d)
    assert cross_group_pairs_indexed(hashes, groups, d) == exact
    assert cross_group_pairs(hashes, groups, d) == exact


@pytest.mark.parametrize("d", DISTANCES)
def test_edge_cases(d):
    empty = np.array([], dtype=np.uint64)
    assert pairs_within_indexed(empty, d) == [] and cross_group_pairs_indexed(empty, np.array([]), d) == []
    one = np.array([0xDEADBEEF], dtype=np.uint64)
    assert pairs_within_indexed(one, d) == [] and cross_group_pairs_indexed(one, np.array([0]), d) == []
    same = np.full(40, 0xFFFF0000FFFF0000, dtype=np.uint64)
    assert (
        pairs_within_indexed(same, d)
        == pairs_within_exact(same, d)
        == [(i, j) for i in range(40) for j in range(i + 1, 40)]
    )
    groups = np.arange(40) % 3
    assert cross_group_pairs_indexed(same, groups, d) == cross_group_pairs_exact(same, groups, d)


def test_extreme_bit_patterns_and_full_distance():
    hashes = np.array([0, 2**64 - 1, 1, 2**63, 2**64 - 2, 0], dtype=np.uint64)
    for d in (0, 1, 63, 64):
        assert pairs_within_indexed(hashes, d) == pairs_within_exact(hashes, d)


def test_method_is_chosen_by_distance():
    assert uses_index(4) and not uses_index(16)
    with pytest.raises(ValueError, match="0-64 bits"):
        pairs_within_indexed(np.zeros(2, dtype=np.uint64), 65)
