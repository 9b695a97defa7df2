import pandas as pd
import pytest
from helpers import write_dataset

from gender_tasks.data.ingest import ingest_folder
from gender_tasks.data.manifest import read_manifest
from gender_tasks.data.split import assign_splits, split_counts
from gender_tasks.data.validate import ValidationFailed, validate_manifest
from gender_tasks.layout import manifest_key
from gender_tasks.settings import resolve_settings


def _manifest(n_f=60, n_m=40):
    rows = [{"key": f"k{i}", "label": "female" if i < n_f else "male", "sha256": f"{i:064x}", "bytes": 10,
             "width": 64, "height": 64, "format": "jpeg", "decodable": True, "error": "",
             "source_path": f"{'female' if i < n_f else 'male'}/{i}.jpg"} for i in range(n_f + n_m)]  # fmt: skip
    return pd.DataFrame(rows)


def test_split_is_stratified_seeded_and_70_15_15():
    m = _manifest(200, 100)
    a = assign_splits(m, 7, [0.7, 0.15, 0.15])
    b = assign_splits(m, 7, [0.7, 0.15, 0.15])
    c = assign_splits(m, 8, [0.7, 0.15, 0.15])
    assert a["split"].tolist() == b["split"].tolist() != c["split"].tolist()
    counts = split_counts(a)
    assert counts["train"] == {"female": 140, "male": 70}
    assert counts["val"] == {"female": 30, "male": 15} and counts["test"] == {"female": 30, "male": 15}


def test_identical_images_share_a_split():
    m = _manifest(30, 30)
    m.loc[5, "sha256"] = m.loc[6, "sha256"]
    s = assign_splits(m, 1, [0.7, 0.15, 0.15])
    assert s.loc[5, "split"] == s.loc[6, "split"]


def _settings(**kw):
    return resolve_settings({"min_rows": 10, **kw})


def test_valid_manifest_passes():
    m = assign_splits(_manifest(), 1, [0.7, 0.15, 0.15])
    summary = validate_manifest(m, _settings())
    assert summary["success"] and summary["evaluated"] == 10 and summary["failed"] == []


def _ingested_manifest(tmp_path, local_storage) -> pd.DataFrame:
    out = ingest_folder(write_dataset(tmp_path / "d", 12), local_storage)
    return read_manifest(local_storage, manifest_key(out["dataset_id"]))


def test_failures_are_listed_in_words_with_example_files(tmp_path, local_storage):
    # Ingest refuses such a file first; validation is the second line of defence, on the manifest.
    m = _ingested_manifest(tmp_path, local_storage)
    bad = m.index[m["source_path"] == "female/female_0003.jpg"][0]
    m.loc[bad, ["decodable", "error"]] = [False, "OSError: image file is truncated"]
    m = assign_splits(m, 1, [0.7, 0.15, 0.15])
    with pytest.raises(ValidationFailed) as err:
        validate_manifest(m, _settings())
    text = str(err.value)
    assert "every image decodes" in text and "female/female_0003.jpg" in text and "truncated" in text
    assert "Fix:" in text


@pytest.mark.parametrize(
    "mutate, says",
    [
        (lambda m: m.assign(label=m["label"].where(m.index != 3, "unknown")), "every label is female or male"),
        (lambda m: m.assign(sha256=m["sha256"].where(m.index != 4, m.loc[5, "sha256"])), "no image appears twice"),
        (lambda m: m.assign(width=m["width"].where(m.index != 2, 8)), "at least 32 px"),
        (lambda m: m[m["label"] == "female"], "both classes are present"),
        (lambda m: m.iloc[:5], "between 10 and"),
    ],
)
def test_each_expectation_can_fail(mutate, says):
    m = mutate(assign_splits(_manifest(), 1, [0.7, 0.15, 0.15])).reset_index(drop=True)
    with pytest.raises(ValidationFailed, match=says):
        validate_manifest(m, _settings())


def test_imbalance_and_leakage_fail():
    m = assign_splits(_manifest(95, 15), 1, [0.7, 0.15, 0.15])
    with pytest.raises(ValidationFailed, match="female share between 0.2 and 0.8") as err:
        validate_manifest(m, _settings())
    # the share to three places and the counts behind it, and how to accept a genuine imbalance
    assert "observed 0.864 (95 of 110 images female)" in str(err.value)
    assert (
        'lower min_class_share if the imbalance is genuine (a run setting: --conf \'{"min_class_share": 0.05}'
        in str(err.value)
    )
    m = assign_splits(_manifest(), 1, [0.7, 0.15, 0.15])
    train_row = m.index[m["split"] == "train"][0]
    test_row = m.index[m["split"] == "test"][0]
    m.loc[test_row, "sha256"] = m.loc[train_row, "sha256"]
    with pytest.raises(ValidationFailed, match="no image is in two splits"):
        validate_manifest(m, _settings())


def test_duplicate_and_tiny_images_are_named_by_validation(tmp_path, local_storage):
    m = _ingested_manifest(tmp_path, local_storage)
    again = m.index[m["source_path"] == "female/female_0005.jpg"][0]
    m.loc[again, "sha256"] = m.loc[m["source_path"] == "female/female_0002.jpg", "sha256"].item()
    m.loc[m["source_path"] == "male/male_0001.jpg", ["width", "height"]] = [16, 16]
    m = assign_splits(m, 1, [0.7, 0.15, 0.15])
    assert m.loc[m["source_path"] == "female/female_0005.jpg", "split"].item() == m.loc[
        m["source_path"] == "female/female_0002.jpg", "split"].item()  # fmt: skip
    with pytest.raises(ValidationFailed) as err:
        validate_manifest(m, _settings())
    text = str(err.value)
    assert "no image appears twice" in text and "female/female_0005.jpg" in text and "female/female_0002.jpg" in text
    assert "at least 32 px" in text and "male/male_0001.jpg" in text
    assert "Fix: delete the duplicate files" in text and "Fix: remove the images that are too small" in text


def _grouped_manifest(n_rows: int, seed: int = 0, max_group: int = 20):
    """A manifest of planted near-duplicate clusters (1 to `max_group` images, phashes 0-1 bit from
    the cluster's centre), about half of the rows in groups of 2 or more; `cluster` names the truth."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n_rows:
        sizes.append(int(rng.integers(2, max_group + 1)) if rng.random() < 0.1 else 1)
    rows = []
    for cluster, size in enumerate(sizes):
        centre = int(rng.integers(0, 2**63)) | (int(rng.integers(0, 2)) << 63)
        label = "female" if rng.random() < 0.6 else "male"
        for member in range(size):
            flip = 1 << int(rng.integers(0, 64)) if member else 0
            i = len(rows)
            rows.append({"key": f"k{i}", "label": label, "sha256": f"{i:064x}", "bytes": 10, "width": 64,
                         "height": 64, "format": "jpeg", "decodable": True, "error": "",
                         "source_path": f"{label}/{i}.jpg", "phash": f"{centre ^ flip:016x}", "cluster": cluster})  # fmt: skip
    return pd.DataFrame(rows)


def test_grouped_split_hits_proportions_in_rows_and_keeps_groups_whole():
    m = _grouped_manifest(6000)
    assert m.groupby("cluster").size().max() >= 15 and (m.groupby("cluster").size() > 1).sum() > 100
    a = assign_splits(m, 3, [0.7, 0.15, 0.15], group_distance=2)
    assert a.groupby("cluster")["split"].nunique().max() == 1, "a group straddles splits"
    assert a.groupby("split_group")["split"].nunique().max() == 1
    for label, rows in a.groupby("label"):
        largest = rows.groupby("split_group").size().max()
        for split, target in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
            off = abs((rows["split"] == split).sum() - target * len(rows))
            assert off <= largest, f"{label} {split}: {off:.1f} rows off, largest group {largest}"
    assert validate_manifest(a.drop(columns="cluster"), _settings())["success"]

    b = assign_splits(m, 3, [0.7, 0.15, 0.15], group_distance=2)
    c = assign_splits(m, 4, [0.7, 0.15, 0.15], group_distance=2)
    assert a["split"].tolist() == b["split"].tolist() != c["split"].tolist()


def test_share_tolerance_is_one_largest_group_not_more():
    from gender_tasks.data.validate import _validation_frame

    m = assign_splits(_grouped_manifest(3000, seed=1), 5, [0.7, 0.15, 0.15], group_distance=2)
    frame = _validation_frame(m, [0.7, 0.15, 0.15])
    for _label, rows in frame.groupby("label"):
        largest = rows.groupby("split_group").size().max()
        assert rows["split_share_tolerance"].iloc[0] == pytest.approx(max(0.01, largest / len(rows)), abs=1e-6)
    # A split that is more than one largest group off fails.
    females = m.index[(m["label"] == "female") & (m["split"] == "train")][:60]
    with pytest.raises(ValidationFailed, match="split proportions"):
        validate_manifest(m.assign(split=m["split"].where(~m.index.isin(females), "test")), _settings())
