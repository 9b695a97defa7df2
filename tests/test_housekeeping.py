"""`gc`: old runs and unreferenced objects go, everything a kept run or a manifest uses stays."""

from __future__ import annotations

import json
import os
import time

import pytest

from gender_tasks import cli, layout
from gender_tasks.housekeeping import GRACE_S, collect_garbage, total_bytes
from gender_tasks.storage import LocalStorage

DAY = 86_400


def _age(storage: LocalStorage, key: str, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(storage.local_path(key), (t, t))


def _manifest(*image_keys: str) -> bytes:
    return ("key,label,sha256\n" + "".join(f"{k},female,x\n" for k in image_keys)).encode()


@pytest.fixture
def store(tmp_path):
    """Two runs (one 40 days old), datasets A (used by the old run only), B (used by the new run),
    C (an ingest that never committed) and D (deleted: only its cache is left)."""
    s = LocalStorage(tmp_path / "store")
    a1, a2 = layout.image_key("A", "female", "a1", "x.jpg"), layout.image_key("A", "female", "a2", "y.jpg")
    b1 = layout.image_key("B", "male", "b1", "x.jpg")
    model_a, model_b = layout.trained_prefix("A", "cnn", "ka"), layout.trained_prefix("B", "cnn", "kb")
    objects = {
        # dataset A: committed, a2 is an orphan; its keyed model only the old run used, exported with a checkpoint left
        a1: b"a1",
        a2: b"orphan",
        layout.manifest_key("A"): _manifest(a1),
        f"{model_a}/model.ts": b"m" * 100,
        f"{model_a}/model_card.json": b"{}",
        f"{model_a}/checkpoint.pt": b"c" * 50,
        # dataset B: used by the new run; an unfinished training's checkpoint, stale and fresh
        b1: b"b1",
        layout.manifest_key("B"): _manifest(b1),
        layout.cache_prefix("B", 32) + "/index.json": b"cache",
        f"{model_b}/model.ts": b"m" * 100,
        f"{model_b}/model_card.json": b"{}",
        layout.trained_file_key("B", "resnet50", "stale", "checkpoint.pt"): b"s" * 70,
        layout.trained_file_key("B", "resnet50", "fresh", "checkpoint.pt"): b"f" * 70,
        layout.audit_result_key("B", "unused"): b"audit",
        # folds: of that finished audit, of one still running, of one killed and never resumed
        layout.audit_fold_key("B", "unused", 0): b"fold",
        layout.audit_fold_key("B", "running", 0): b"fold",
        layout.audit_fold_key("B", "abandoned", 0): b"fold",
        # C: images uploaded, manifest never written; D: deleted, its cache left
        layout.image_key("C", "male", "c1", "x.jpg"): b"c1",
        layout.cache_prefix("D", 64) + "/index.json": b"d" * 30,
        # runs
        layout.results_key("old"): json.dumps({"dataset": {"dataset_id": "A"}}).encode(),
        layout.model_file_key("old", "cnn", "trained.json"): json.dumps({"trained": model_a}).encode(),
        layout.results_key("new"): json.dumps({"dataset": {"dataset_id": "B"}}).encode(),
        layout.model_file_key("new", "cnn", "model.ts"): b"m" * 100,
        layout.model_file_key("new", "cnn", "trained.json"): json.dumps(
            {"trained": model_b, "inputs": {"dataset_id": "B"}}
        ).encode(),  # fmt: skip
        layout.model_file_key("new", "cnn", "checkpoint.pt"): b"legacy",
    }
    for key, data in objects.items():
        s.put_bytes(key, data)
    for key in objects:
        if not key.endswith("/fresh/checkpoint.pt"):
            _age(s, key, 2 * GRACE_S / DAY)
    for key in s.list("runs/old/") + [layout.trained_file_key("B", "resnet50", "stale", "checkpoint.pt"),
                                      layout.audit_fold_key("B", "abandoned", 0)]:  # fmt: skip
        _age(s, key, 40)
    return s


EXPECTED = {
    "runs/old/results.json", "runs/old/models/cnn/trained.json",  # past the retention
    "runs/new/models/cnn/checkpoint.pt",  # a checkpoint left in a run folder
    "datasets/A/images/female/a2.jpg",  # no manifest lists it
    "datasets/A/models/cnn/ka/model.ts", "datasets/A/models/cnn/ka/model_card.json",  # only the old run used it
    "datasets/A/models/cnn/ka/checkpoint.pt",  # its model was exported
    "datasets/B/models/resnet50/stale/checkpoint.pt",  # a training nobody resumed within the retention
    "datasets/B/label_audit/unused.csv",  # no kept run copied it
    "datasets/B/label_audit/unused/fold-0.csv",  # its audit finished
    "datasets/B/label_audit/abandoned/fold-0.csv",  # an audit nobody resumed within the retention
    "datasets/C/images/male/c1.jpg", "datasets/D/cache/64px/index.json",  # never committed / deleted
}  # fmt: skip


def test_gc_removes_old_runs_and_unreferenced_objects_and_keeps_what_kept_runs_use(store):
    before = set(store.list(""))
    planned = collect_garbage(store, keep_days=30, dry_run=True)
    assert {r.key for r in planned} == EXPECTED
    assert set(store.list("")) == before  # a dry run removes nothing
    removed = collect_garbage(store, keep_days=30)
    assert {r.key for r in removed} == EXPECTED
    assert set(store.list("")) == before - EXPECTED
    # Dataset A stays committed (its manifest and the image it lists), B whole, the fresh checkpoint too.
    assert store.exists("datasets/A/manifest.csv") and store.exists("datasets/A/images/female/a1.jpg")
    assert store.exists("datasets/B/cache/32px/index.json") and store.exists("datasets/B/models/cnn/kb/model.ts")
    assert store.exists("datasets/B/models/resnet50/fresh/checkpoint.pt")
    assert store.exists("datasets/B/label_audit/running/fold-0.csv")  # may still be resumed
    assert collect_garbage(store, keep_days=30) == []  # nothing left to collect


def test_gc_never_removes_a_dataset_a_kept_run_uses_even_without_its_manifest(store):
    store.delete(layout.manifest_key("B"))
    removed = {r.key for r in collect_garbage(store, keep_days=30)}
    assert not any(k.startswith("datasets/B/images/") or k.startswith("datasets/B/cache/") for k in removed)
    # With a longer retention the old run is kept, and so is everything of A it uses.
    longer = {r.key for r in collect_garbage(store, keep_days=100, dry_run=True)}
    assert "datasets/A/models/cnn/ka/model.ts" not in longer


def test_gc_command_prints_every_object_and_the_bytes(store, capsys):
    assert cli.main(["gc", "--storage", str(store.root), "--keep-days", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    planned = collect_garbage(store, keep_days=30, dry_run=True)
    for key in EXPECTED:
        assert f"would remove {key} (" in out
    assert f"would remove {len(EXPECTED)} object(s), {total_bytes(planned):,} bytes" in out
    assert cli.main(["gc", "--storage", str(store.root), "--keep-days", "-1"]) == 2
