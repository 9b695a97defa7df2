"""A dataset ingested by an earlier image decode is brought up to date, and a split that cannot hold both
classes in every split is refused by name instead of reaching the report."""

import pandas as pd
import pytest
from helpers import write_dataset

from gender_tasks import layout, pipeline
from gender_tasks.data.images import DECODE_VERSION
from gender_tasks.data.ingest import ingest_folder
from gender_tasks.data.manifest import read_manifest, write_manifest
from gender_tasks.data.split import assign_splits
from gender_tasks.errors import PermanentError


def test_reingest_replaces_perceptual_hashes_of_an_earlier_decode(tmp_path, local_storage):
    src = write_dataset(tmp_path / "faces", 10)
    out = ingest_folder(src, local_storage)
    key = layout.manifest_key(out["dataset_id"])
    fresh = read_manifest(local_storage, key)
    stale = fresh.assign(phash="8000000000000000")  # what decode 1 gave 16-bit images: all "blank"
    write_manifest(local_storage, key, stale)
    again = ingest_folder(src, local_storage)
    assert again["dataset_id"] == out["dataset_id"] and again["uploaded"] == 0
    updated = read_manifest(local_storage, key, dataset_id=out["dataset_id"])
    pd.testing.assert_frame_equal(updated, fresh)


def test_split_keys_name_the_decode_whose_hashes_grouped_the_images():
    key = layout.split_key("ds-x", 42, [0.7, 0.15, 0.15], 2, decode=DECODE_VERSION)
    assert key.endswith(f"-balanced-d{DECODE_VERSION}.csv") and DECODE_VERSION >= 2
    assert layout.split_key("ds-x", 42, [0.7, 0.15, 0.15], 2) != key


def test_a_split_that_leaves_a_class_out_of_a_split_is_refused_by_name(tmp_path, local_storage):
    src = write_dataset(tmp_path / "faces", 10)
    manifest = read_manifest(local_storage, layout.manifest_key(ingest_folder(src, local_storage)["dataset_id"]))
    manifest.loc[manifest["label"] == "male", "phash"] = "ffffffffffffffff"  # every male image "the same picture"
    with pytest.raises(
        PermanentError, match=r"has no male image.*largest group .* holds 10 of 20 .*split_group_distance"
    ):
        assign_splits(manifest, seed=1, fractions=[0.7, 0.15, 0.15], group_distance=2)


def test_the_pipeline_stops_at_split_not_in_the_report(tmp_path):
    src = write_dataset(tmp_path / "faces", 8)
    run = pipeline.ingest(pipeline.prepare({"source": str(src), "storage": str(tmp_path / "store"), "profile": "tiny",
                                            "models": ["cnn"], "min_rows": 10, "split_group_distance": 64}))  # fmt: skip
    with pytest.raises(PermanentError, match="cannot hold both classes"):
        pipeline.split(run)
