"""Near-duplicate search time: multi-index hashing against the exact all-pairs search.

    .venv/bin/python bench/hamming_bench.py [--n 100000] [--exact-n 20000]

Hashes: random 64-bit values plus clusters of near-copies (5 copies of 1 in 200 hashes, 0-6 bits
flipped). Times pairs_within_indexed and cross_group_pairs_indexed (70/15/15 groups) at 2 and 4
bits on --n hashes, then both methods at 8-12 bits on --exact-n hashes (where the distance limit
MAX_INDEXED_DISTANCE comes from), checking that they agree.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gender_tasks.data.hamming import cross_group_pairs_indexed, pairs_within_indexed
from gender_tasks.data.near_duplicates import pairs_within_exact


def planted(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**64, n - n // 40, dtype=np.uint64)
    copies = np.repeat(rng.choice(centres, n // 200), 5)
    for _ in range(6):  # up to 6 random bits flipped (some flips repeat and cancel)
        flip = rng.random(len(copies)) < 0.5
        copies[flip] ^= np.uint64(1) << rng.integers(0, 64, flip.sum()).astype(np.uint64)
    return rng.permutation(np.concatenate([centres, copies]))


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--exact-n", type=int, default=20_000)
    args = parser.parse_args()
    hashes = planted(args.n)
    groups = np.random.default_rng(1).choice(3, len(hashes), p=[0.7, 0.15, 0.15])
    print("| hashes | bits | search | pairs | seconds |\n|---:|---:|---|---:|---:|")
    for d in (2, 4):
        pairs, s = timed(pairs_within_indexed, hashes, d)
        print(f"| {len(hashes):,} | {d} | pairs_within (indexed) | {len(pairs):,} | {s:.2f} |")
        pairs, s = timed(cross_group_pairs_indexed, hashes, groups, d)
        print(f"| {len(hashes):,} | {d} | cross_group_pairs (indexed) | {len(pairs):,} | {s:.2f} |")
    small = hashes[: args.exact_n]
    for d in (4, 8, 10, 11, 12):
        fast, s_fast = timed(pairs_within_indexed, small, d)
        exact, s_exact = timed(pairs_within_exact, small, d)
        assert fast == exact, f"indexed and exact searches disagree at {d} bits"
        print(f"| {len(small):,} | {d} | indexed / exact | {len(fast):,} | {s_fast:.2f} / {s_exact:.2f} |")


if __name__ == "__main__":
    main()
