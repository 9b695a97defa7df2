"""`gc`: old runs and unreferenced objects go, everything a kept run or a manifest uses stays."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import types

import pytest
from helpers import write_dataset

from gender_tasks import cli, layout, pipeline
from gender_tasks.errors import PermanentError
from gender_tasks.housekeeping import GRACE_S, collect_garbage, total_bytes
from gender_tasks.leases import LeaseConfigError, hold_lease, holder_name
from gender_tasks.storage import LocalStorage, StorageError, put_recorded

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


def test_gc_removes_the_empty_folders_older_versions_left_and_no_other(store):
    """Before deletes pruned their folders, every run left an empty leases/ and every audit an empty fold
    folder: gc removes those (deepest first), and no folder that holds anything, nor the root."""
    for folder in ("runs/new/leases", "datasets/B/leases", "datasets/B/label_audit/done/nested", "empty"):
        (store.root / folder).mkdir(parents=True)
    collect_garbage(store, keep_days=30, dry_run=True)
    assert (store.root / "runs/new/leases").is_dir()  # a dry run removes nothing
    collect_garbage(store, keep_days=30)
    folders = {p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_dir()}
    assert not folders & {"runs/new/leases", "datasets/B/leases", "datasets/B/label_audit/done", "empty"}
    assert not [p for p in store.root.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert {"runs/new", "datasets/B/label_audit", "datasets/A/images/female"} <= folders  # they hold objects
    assert set(store.list("datasets/B/")) and store.root.is_dir()


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


# --- scorings of new images: old ones and their scored batches go, a live scoring's stay -----------------


def _scoring(s: LocalStorage, score_key: str, days: float, *, finished: bool = True) -> list[str]:
    """A scoring's outputs as scoring.py writes them (checksum records beside two), `days` old."""
    prefix = layout.score_prefix(score_key)
    keys = [put_recorded_key(s, f"{prefix}/{layout.SCORED_PREDICTIONS}", b"name,prob_male\n"),
            put_recorded_key(s, f"{prefix}/{layout.SCORING_PAGE}", b"<html></html>")]  # fmt: skip
    keys = [k for pair in keys for k in pair]
    if finished:
        s.put_bytes(f"{prefix}/{layout.SCORING_SUMMARY}", b"{}")
        keys.append(f"{prefix}/{layout.SCORING_SUMMARY}")
    for key in keys:
        _age(s, key, days)
    return keys


def put_recorded_key(s: LocalStorage, key: str, data: bytes) -> tuple[str, str]:
    put_recorded(s, key, data)
    return key, key + layout.CHECKSUM_SUFFIX


def test_gc_removes_old_scorings_and_scored_batches_and_keeps_recent_ones(tmp_path):
    s = LocalStorage(tmp_path / "store")
    old = _scoring(s, "a" * 24, days=40)
    recent = _scoring(s, "b" * 24, days=2)
    unfinished_old = _scoring(s, "c" * 24, days=40, finished=False)
    unfinished_recent = _scoring(s, "d" * 24, days=2 / 24, finished=False)  # killed 2 hours ago: may resume
    old_part = put_recorded_key(s, layout.part_key("e" * 64, "old"), b"rows")
    recent_part = put_recorded_key(s, layout.part_key("e" * 64, "recent"), b"rows")
    for key in old_part:
        _age(s, key, 40)
    for key in recent_part:
        _age(s, key, 2 / 24)
    removed = collect_garbage(s, keep_days=30)
    keys = [r.key for r in removed]
    assert len(keys) == len(set(keys)) and set(keys) == {*old, *old_part, *unfinished_old}
    # Within a scoring its summary.json goes first (a half-removed scoring is scored again, not taken as done),
    # each object before its checksum record (a record alone reads as a missing object).
    assert keys.index(old[-1]) < min(keys.index(k) for k in old[:-1])
    assert keys.index(old_part[0]) < keys.index(old_part[1])
    reasons = {r.key: r.reason for r in removed}
    assert reasons[old[0]] == f"scoring {'a' * 24} is 40 days old (keeping 30)"
    unfinished = f"scoring {'c' * 24} is unfinished (no summary.json) and 40 days old (keeping 30)"
    assert reasons[unfinished_old[0]] == unfinished
    assert reasons[old_part[0]].startswith("scored batch 40 days old (keeping 30): only a killed scoring")
    assert set(s.list("scoring/")) == {*recent, *unfinished_recent, *recent_part}
    # Keep-days 0: the finished scoring goes; a scoring or a scored batch written 2 hours ago may belong to a
    # scoring that was killed and will resume: kept for GENDER_GC_UNFINISHED_HOURS.
    assert {r.key for r in collect_garbage(s, keep_days=0)} == set(recent)
    assert set(s.list("scoring/")) == {*unfinished_recent, *recent_part}


def test_a_scoring_lease_keeps_all_of_scoring_and_an_abandoned_one_nothing(tmp_path):
    s = LocalStorage(tmp_path / "store")
    old = _scoring(s, "a" * 24, days=40)
    holder = holder_name("score")
    with hold_lease(s, layout.scoring_lease_key(holder), owner="scoring of /faces"):
        assert collect_garbage(s, keep_days=0) == []
    assert s.list("scoring/leases/") == []  # released
    lease = layout.scoring_lease_key("score-dead")
    _abandoned_lease(s, lease, minutes=20)
    removed = {r.key: r.reason for r in collect_garbage(s, keep_days=30)}
    assert set(removed) == {*old, lease}
    assert removed[lease].endswith("not renewed for 20 minutes")


# --- work in progress: leases (gender_tasks/leases.py) keep what a live run or ingest writes -----------


def _run_objects(s: LocalStorage, run_key: str, *, days: float) -> set[str]:
    """What a run has written so far (no results.json: it has not finished), `days` old."""
    keys = {layout.model_file_key(run_key, "cnn", name): b"x" for name in layout.MODEL_OUTPUTS}
    keys[layout.model_file_key(run_key, "cnn", "trained.json")] = json.dumps({"trained": "elsewhere"}).encode()
    for key, data in keys.items():
        s.put_bytes(key, data)
        _age(s, key, days)
    return set(keys)


def test_keep_days_0_removes_nothing_of_a_live_run_and_all_of_it_once_finished(tmp_path):
    s = LocalStorage(tmp_path / "store")
    written = _run_objects(s, "live", days=2)
    with hold_lease(s, layout.run_lease_key("live", holder_name("train")), owner="train of run live") as lease:
        assert s.exists(lease.key)
        assert collect_garbage(s, keep_days=0) == []
        # Finished in the meantime (results.json written) but the step still holds its lease: still kept.
        s.put_bytes(layout.results_key("live"), b"{}")
        _age(s, layout.results_key("live"), 2)
        assert collect_garbage(s, keep_days=0) == []
    assert not s.list("runs/live/leases/")  # released with the block
    written.add(layout.results_key("live"))
    removed = collect_garbage(s, keep_days=0)
    assert {r.key for r in removed} == written and s.list("runs/live/") == []
    assert all(r.reason == "run live is 2 days old (keeping 0)" for r in removed)


def test_an_unfinished_run_between_steps_is_kept_until_nothing_was_written_for_a_day(tmp_path, monkeypatch):
    s = LocalStorage(tmp_path / "store")
    written = _run_objects(s, "queued", days=2 * GRACE_S / DAY)  # no lease: waiting for its next step
    assert collect_garbage(s, keep_days=0) == []
    later = time.time() + DAY  # 26 hours after its last write
    removed = collect_garbage(s, keep_days=0, now=later)
    assert {r.key for r in removed} == written
    assert removed[0].reason == "run queued is unfinished (no results.json) and 1 days old (keeping 0)"
    # The bound is the environment's to set: with 48 hours the same run would still be kept.
    written = _run_objects(s, "queued", days=2 * GRACE_S / DAY)
    monkeypatch.setenv("GENDER_GC_UNFINISHED_HOURS", "48")
    assert collect_garbage(s, keep_days=0, now=later) == []
    monkeypatch.setenv("GENDER_GC_UNFINISHED_HOURS", "soon")
    with pytest.raises(PermanentError, match="GENDER_GC_UNFINISHED_HOURS='soon' is not a positive number of hours"):
        collect_garbage(s, keep_days=0)


def _abandoned_lease(s: LocalStorage, key: str, minutes: float) -> None:
    """A lease whose holder was killed (kill -9): written once, never renewed nor removed."""
    s.put_bytes(key, json.dumps({"owner": "ingest of C", "pid": 4242, "host": "worker-1"}).encode())
    t = time.time() - minutes * 60
    os.utime(s.local_path(key), (t, t))


def test_an_abandoned_lease_protects_nothing_for_long(tmp_path, monkeypatch):
    s = LocalStorage(tmp_path / "store")
    image = layout.image_key("C", "male", "c1", "x.jpg")
    s.put_bytes(image, b"c1")
    _age(s, image, 2 * GRACE_S / DAY)
    lease = layout.dataset_lease_key("C", "ingest-dead")
    _abandoned_lease(s, lease, minutes=10)  # within the expiry (15 minutes): its holder may be alive
    assert collect_garbage(s, keep_days=30) == []
    _abandoned_lease(s, lease, minutes=20)
    removed = {r.key: r.reason for r in collect_garbage(s, keep_days=30)}
    assert removed == {image: "image of an ingest that never committed",
                       lease: "lease abandoned by ingest of C (pid 4242 on worker-1): not renewed for 20 minutes"}  # fmt: skip
    # A run killed mid-step: its lease goes with it once nothing of it was written for the unfinished bound.
    written = _run_objects(s, "killed", days=3)
    run_lease = layout.run_lease_key("killed", "train-dead")
    _abandoned_lease(s, run_lease, minutes=20)
    assert collect_garbage(s, keep_days=0) == []  # the lease is its newest object: a day not yet passed
    removed = collect_garbage(s, keep_days=0, now=time.time() + DAY)
    assert {r.key for r in removed} == written | {run_lease}
    # A finished run's abandoned lease goes on its own (a kill -9 after report wrote results.json).
    s.put_bytes(layout.results_key("done"), b"{}")
    _abandoned_lease(s, layout.run_lease_key("done", "report-dead"), minutes=20)
    assert {r.key for r in collect_garbage(s, keep_days=30)} == {layout.run_lease_key("done", "report-dead")}
    # The expiry is the environment's to set; it must leave room for a few missed heartbeats.
    _abandoned_lease(s, lease, minutes=20)
    monkeypatch.setenv("GENDER_LEASE_EXPIRY_S", "3600")
    assert collect_garbage(s, keep_days=30) == []
    monkeypatch.setenv("GENDER_LEASE_EXPIRY_S", "60")
    with pytest.raises(LeaseConfigError, match="GENDER_LEASE_EXPIRY_S=60 is under 3 heartbeats"):
        collect_garbage(s, keep_days=30)


def test_a_lease_is_renewed_while_held_and_removed_however_the_block_ends(tmp_path):
    s = LocalStorage(tmp_path / "store")
    key = layout.run_lease_key("r", holder_name("Train CNN #2"))
    assert key.startswith("runs/r/leases/train-cnn-2-") and layout.is_lease_key(key)
    with pytest.raises(RuntimeError, match="the step failed"):
        with hold_lease(s, key, owner="train of run r", heartbeat_s=0.05, expiry_s=10) as lease:
            first = json.loads(s.get_bytes(key))
            assert first["owner"] == "train of run r" and first["pid"] == os.getpid()
            deadline = time.monotonic() + 10
            while json.loads(s.get_bytes(key))["renewed"] == first["renewed"]:
                assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
                time.sleep(0.02)
            assert not lease.lapsed
            raise RuntimeError("the step failed")
    assert not s.exists(key)  # a failed step's lease goes too: its objects age as any others
    time.sleep(0.2)
    assert not s.exists(key)  # and no late heartbeat brings it back


def test_a_lease_that_could_not_be_renewed_for_half_its_expiry_says_it_lapsed(tmp_path, monkeypatch):
    s = LocalStorage(tmp_path / "store")
    key = layout.dataset_lease_key("C", holder_name("ingest"))
    with hold_lease(s, key, owner="ingest of C", heartbeat_s=0.05, expiry_s=0.4) as lease:
        monkeypatch.setattr(s, "put_bytes", lambda k, d: (_ for _ in ()).throw(StorageError("storage down")))
        time.sleep(0.3)  # no renewal for longer than half the expiry: gc may have taken the holder for dead
        monkeypatch.undo()
        lease.renew()
        assert lease.lapsed  # for good, though renewed since
    assert not s.exists(key)


def test_a_lease_taken_while_gc_runs_stops_its_removals(tmp_path):
    """gc lists, decides, then removes: an ingest resuming in between must not lose what gc decided on."""
    listed = []

    class Racing(LocalStorage):
        def list_info(self, prefix):
            out = super().list_info(prefix)
            if prefix == "" and not listed:  # right after gc's full listing, an ingest of C resumes
                listed.append(prefix)
                self.put_bytes(layout.dataset_lease_key("C", holder_name("ingest")), b"{}")
            return out

    s = Racing(tmp_path / "store")
    images = {layout.image_key("C", "male", f"c{i}", "x.jpg") for i in range(3)}
    for key in images:
        s.put_bytes(key, b"c")
        _age(s, key, 2 * GRACE_S / DAY)
    assert {r.key for r in collect_garbage(s, keep_days=30, dry_run=True)} == images  # what it decides on
    listed.clear()
    assert collect_garbage(s, keep_days=30) == []
    assert all(s.exists(k) for k in images)


def test_an_ingest_uploading_past_the_grace_keeps_its_images(tmp_path):
    """An ingest that uploads for longer than GRACE_S loses nothing; a killed one's images go as before."""
    from gender_tasks.data.ingest import ingest_folder

    src = write_dataset(tmp_path / "faces", 20)
    paused, resume = threading.Event(), threading.Event()

    class Slow(LocalStorage):
        uploaded = 0

        def put_bytes(self, key, data):
            super().put_bytes(key, data)
            if "/images/" in key:
                Slow.uploaded += 1
                if Slow.uploaded == 25:  # halfway: the upload stalls here for "hours"
                    paused.set()
                    assert resume.wait(30)

    s = Slow(tmp_path / "store")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(ingest_folder(src, s, upload_workers=1)))
    thread.start()
    assert paused.wait(30)
    images = s.list("datasets/")
    images = [k for k in images if "/images/" in k]
    assert len(images) == 25
    for key in images:
        _age(s, key, 2 * GRACE_S / DAY)  # uploaded two hours ago: past the grace
    try:
        assert collect_garbage(s, keep_days=30) == []
    finally:
        resume.set()
        thread.join(30)
    manifest = s.get_bytes(layout.manifest_key(result["dataset_id"])).decode()
    assert len(manifest.splitlines()) == 41 and all(s.exists(k) for k in images)
    assert not s.list(f"datasets/{result['dataset_id']}/leases/")
    # The same images, their ingest killed (no lease, no manifest), are removed as before.
    s.delete(layout.manifest_key(result["dataset_id"]))
    removed = collect_garbage(s, keep_days=30)
    assert {r.key for r in removed} == set(images)
    assert {r.reason for r in removed} == {"image of an ingest that never committed"}


def test_a_live_training_keeps_its_checkpoint_and_a_live_audit_its_folds(tmp_path):
    """The train and label_audit steps lease the run's dataset: a checkpoint or fold nobody else would
    keep (keep_days 0: any unexported checkpoint is 'not resumed within the retention') stays."""
    s = LocalStorage(tmp_path / "store")
    checkpoint = layout.trained_file_key("B", "resnet50", "k1", layout.CHECKPOINT)
    fold = layout.audit_fold_key("B", "a1", 0)
    for key in (checkpoint, fold):
        s.put_bytes(key, b"state")
        _age(s, key, 2 * GRACE_S / DAY)
    run = {"run_key": "r", "settings": {"storage": s.uri}, "dataset": {"dataset_id": "B"}}

    @pipeline._leased("train")
    def step(run: dict) -> list:
        assert s.list("datasets/B/leases/") and s.list("runs/r/leases/")
        return collect_garbage(s, keep_days=0)

    assert step(run) == []
    assert s.exists(checkpoint) and s.exists(fold)
    assert not s.list("datasets/B/leases/") and not s.list("runs/r/leases/")
    assert {r.key for r in collect_garbage(s, keep_days=0)} == {checkpoint, fold}


@pytest.mark.parametrize("leases", ["held", "switched off"])
def test_gc_running_throughout_a_pipeline_removes_nothing_it_writes(tmp_path, monkeypatch, leases):
    """gc (keep-days 0, no grace: only leases protect) runs in a loop in a thread and after every write,
    while ingest, split and preprocess run on a tiny dataset. With the leases switched off it removes
    the ingest's images before their manifest is written: the check can fail."""
    from gender_tasks import housekeeping
    from gender_tasks.data import ingest as ingest_mod

    monkeypatch.setattr(housekeeping, "GRACE_S", 0)
    monkeypatch.setenv("GENDER_CACHE_DIR", str(tmp_path / "local-cache"))
    if leases == "switched off":

        @contextlib.contextmanager
        def no_lease(storage, key, **kwargs):
            yield types.SimpleNamespace(renew=lambda: None, lapsed=False)

        monkeypatch.setattr(pipeline, "hold_lease", no_lease)
        monkeypatch.setattr(ingest_mod, "hold_lease", no_lease)
    store = tmp_path / "store"
    gc_storage = LocalStorage(store)
    removed: list = []
    errors: list = []
    written: set[str] = set()
    original = LocalStorage.put_bytes

    def put_then_collect(self, key, data):
        original(self, key, data)
        written.add(key)
        if threading.current_thread() is not collector and not layout.is_lease_key(key):
            removed.extend(collect_garbage(gc_storage, keep_days=0))

    stop = threading.Event()

    def collect_in_a_loop():
        while not stop.is_set():
            try:
                removed.extend(collect_garbage(gc_storage, keep_days=0))
            except Exception as exc:  # reported below: gc must not fail on a store being written
                errors.append(exc)
            time.sleep(0.005)

    collector = threading.Thread(target=collect_in_a_loop, daemon=True)
    monkeypatch.setattr(LocalStorage, "put_bytes", put_then_collect)
    src = write_dataset(tmp_path / "faces", 12)
    collector.start()
    try:
        run = pipeline.prepare({"source": str(src), "storage": str(store), "profile": "tiny", "models": ["cnn"],
                                "min_rows": 10})  # fmt: skip
        if leases == "switched off":
            with pytest.raises(FileNotFoundError, match="/images/"):  # preprocess misses an image gc took
                pipeline.preprocess(pipeline.split(pipeline.ingest(run)))
            assert any(r.reason == "image of an ingest that never committed" for r in removed)
            return
        run = pipeline.preprocess(pipeline.split(pipeline.ingest(run)))
    finally:
        stop.set()
        collector.join(30)
    assert errors == [] and removed == []
    missing = sorted(k for k in written if not layout.is_lease_key(k) and not gc_storage.exists(k))
    assert missing == []
    assert run["dataset"]["images"] == 24 and run["caches"]["cache_prefixes"]
    assert [k for k in gc_storage.list("") if layout.is_lease_key(k)] == []  # every step released its leases
