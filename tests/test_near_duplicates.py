import io
import itertools

import numpy as np
import pandas as pd
import pytest
from helpers import write_dataset

from gender_tasks import pipeline
from gender_tasks.data.images import phash_of_bytes
from gender_tasks.data.manifest import read_manifest
from gender_tasks.data.near_duplicates import (
    check_near_duplicates,
    cross_group_pairs,
    find_near_duplicates,
    hashes_to_uint64,
)
from gender_tasks.data.split import assign_splits
from gender_tasks.data.validate import ValidationFailed
from gender_tasks.layout import manifest_key


def test_blockwise_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    for i in range(0, 60, 3):  # plant near copies: flip 0-5 random bits
        flips = rng.choice(64, size=i % 6, replace=False)
        hashes[i + 1] = hashes[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    groups = rng.choice(np.array(["train", "val", "test"]), size=300)
    want = {(min(i, j), max(i, j), bin(int(hashes[i]) ^ int(hashes[j])).count("1"))
            for i, j in itertools.combinations(range(300), 2)
            if groups[i] != groups[j] and bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 4}  # fmt: skip
    got = {(min(i, j), max(i, j), d) for i, j, d in cross_group_pairs(hashes, groups, 4, block_elements=37)}
    assert got == want and len(want) >= 5  # blocks of 37 elements: every boundary case is crossed


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _near_copy(path) -> bytes:
    """The same picture upscaled and re-encoded: another file, the same image to the eye.

    (On these tiny noise-textured faces a 1 px shift already moves the phash 4-8 bits, so the
    copy here is the kind a resize-and-resave produces, 0-2 bits away.)
    """
    from PIL import Image

    with Image.open(path) as img:
        return _jpeg(img.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC), quality=85)


def _manifest(paths_splits: list[tuple[str, str, bytes]]) -> pd.DataFrame:
    rows = [{"key": f"k/{p}", "label": p.split("/")[0], "sha256": f"{i:064x}", "decodable": True, "split": split,
             "source_path": p, "phash": phash_of_bytes(data)} for i, (p, split, data) in enumerate(paths_splits)]  # fmt: skip
    return pd.DataFrame(rows)


def test_near_copy_flagged_only_across_splits(tmp_path):
    root = write_dataset(tmp_path / "d", 3)
    original = (root / "female" / "female_0001.jpg").read_bytes()
    copy = _near_copy(root / "female" / "female_0001.jpg")
    assert copy != original
    others = [(f"{p.parent.name}/{p.name}", "val", p.read_bytes()) for p in sorted(root.rglob("*.jpg"))[2:]]
    across = _manifest([("female/a.jpg", "train", original), ("female/a_copy.jpg", "test", copy), *others])
    pairs = find_near_duplicates(across, max_distance=4)
    assert [(p["a"], p["b"], p["split_a"], p["split_b"]) for p in pairs] == [
        ("female/a.jpg", "female/a_copy.jpg", "train", "test")]  # fmt: skip
    assert 0 <= pairs[0]["distance"] <= 4 and pairs[0]["label_a"] == pairs[0]["label_b"] == "female"

    same_split = _manifest([("female/a.jpg", "test", original), ("female/a_copy.jpg", "test", copy), *others])
    assert find_near_duplicates(same_split, max_distance=4) == []


def test_summary_is_capped_and_counted():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**62, size=60)
    rows = [{"key": f"k{i}", "label": "female", "sha256": f"{i:064x}", "decodable": True,
             "split": "train" if i % 2 == 0 else "test", "source_path": f"female/{i}.jpg",
             "phash": f"{int(base[i // 2]):016x}"} for i in range(120)]  # fmt: skip
    summary = check_near_duplicates(pd.DataFrame(rows), max_distance=0, fatal=False)
    assert summary["near_duplicate_count"] == 60 and len(summary["near_duplicates"]) == 50
    assert summary["near_duplicate_distance"] == 0
    assert set(summary["near_duplicates"][0]) == {"a", "b", "split_a", "split_b", "label_a", "label_b", "distance"}


@pytest.mark.slow  # ingest and Great Expectations validation of a run (3.5 s here)
def test_pipeline_validate_reports_near_duplicates_and_stops_when_fatal(tmp_path, local_storage):
    root = write_dataset(tmp_path / "faces", 12)
    (root / "female" / "female_0003_copy.jpg").write_bytes(_near_copy(root / "female" / "female_0003.jpg"))
    # Split grouping off, so that a seed can put the copy in another split than its original.
    run = pipeline.ingest(pipeline.prepare({"min_rows": 10, "storage": str(local_storage.root),
                                            "split_group_distance": -1, "source": str(root)}))  # fmt: skip
    settings, dataset = run["settings"], run["dataset"]
    manifest = read_manifest(local_storage, manifest_key(dataset["dataset_id"]))
    pair = {"female/female_0003.jpg", "female/female_0003_copy.jpg"}

    def pair_splits(seed):
        m = assign_splits(manifest, seed, settings["split"], settings["split_group_distance"])
        return set(m.loc[m["source_path"].isin(pair), "split"])

    # The split is seeded and deterministic: take the first seed that separates the two.
    settings["seed"] = next(seed for seed in range(100) if len(pair_splits(seed)) == 2)
    run = pipeline.split(run)

    summary = pipeline.validate(run)["validation"]
    assert summary["success"] and summary["near_duplicate_count"] == 1
    found = summary["near_duplicates"][0]
    assert {found["a"], found["b"]} == pair and found["split_a"] != found["split_b"] and found["distance"] <= 4

    settings["near_duplicates_fatal"] = True
    with pytest.raises(ValidationFailed) as err:
        pipeline.validate(run)
    text = str(err.value)
    assert "female/female_0003.jpg" in text and "female/female_0003_copy.jpg" in text
    assert "Fix: delete one image of each pair" in text and "near_duplicates_fatal" in text
    assert err.value.failures[0]["expectation"] == "no_near_duplicates_across_splits"


def test_split_keeps_near_copies_together(tmp_path, local_storage):
    root = write_dataset(tmp_path / "faces", 12)
    (root / "female" / "female_0003_copy.jpg").write_bytes(_near_copy(root / "female" / "female_0003.jpg"))
    dataset = pipeline.ingest(pipeline.prepare({"source": str(root), "storage": str(local_storage.root)}))["dataset"]
    manifest = read_manifest(local_storage, manifest_key(dataset["dataset_id"]))
    pair = manifest["source_path"].isin({"female/female_0003.jpg", "female/female_0003_copy.jpg"})
    a, b = manifest.loc[pair, "sha256"].tolist(), manifest.loc[pair, "phash"].tolist()
    assert a[0] != a[1]  # a near-copy, not identical content
    assert int(np.bitwise_count(hashes_to_uint64(b[:1]) ^ hashes_to_uint64(b[1:]))[0]) <= 2
    separated = 0
    for seed in range(30):
        grouped = assign_splits(manifest, seed, [0.7, 0.15, 0.15], 2)
        assert grouped.loc[pair, "split"].nunique() == 1, seed
        plain = assign_splits(manifest, seed, [0.7, 0.15, 0.15], -1)
        separated += plain.loc[pair, "split"].nunique() == 2
    assert separated > 0  # without grouping, some seeds do separate them


def test_pairs_within_match_brute_force():
    from gender_tasks.data.near_duplicates import pairs_within

    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    hashes[50] = hashes[7] ^ np.uint64(0b101)  # 2 bits from 7
    hashes[200] = hashes[7]  # identical to 7
    brute = sorted(
        (i, j)
        for i, j in itertools.combinations(range(len(hashes)), 2)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 2
    )
    assert sorted(pairs_within(hashes, 2, block_elements=1000)) == brute
    assert (7, 50) in brute and (7, 200) in brute and (50, 200) in brute
