"""The pipeline on the sharded cache: preprocess writes shards, training and the label audit give the
same results whether the splits sit in memory or stream from the shards, ingest decodes in processes."""

import io
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import copy_prepared, write_dataset

from gender_tasks import layout, pipeline
from gender_tasks.data.images import decode_resize
from gender_tasks.data.manifest import read_manifest
from gender_tasks.data.shards import MEMORY_BUDGET_ENV, ShardReader, memory_budget
from gender_tasks.errors import PermanentError
from gender_tasks.settings import Settings
from gender_tasks.storage import open_storage
from gender_tasks.training.batches import SplitData, StreamedSplit, load_splits
from gender_tasks.training.loop import epoch_generator


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory):
    """Ingested, split and preprocessed into shards once for the module: (its folder, the run record)."""
    base = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENDER_CACHE_DIR", str(base / "local-cache"))
        src = write_dataset(base / "faces", 14)
        run = pipeline.prepare({"source": str(src), "storage": str(base / "store"), "profile": "tiny",
                                "models": ["cnn"], "min_rows": 10, "label_audit_folds": 2})  # fmt: skip
        return base, pipeline.preprocess(pipeline.split(pipeline.ingest(run)))


@pytest.fixture
def prepared(prepared_once, tmp_path, monkeypatch):
    """The prepared run, copied for this test (the tests train and audit in its storage), with an empty
    local shard cache of its own."""
    run = copy_prepared(*prepared_once, tmp_path / "prepared")
    monkeypatch.setenv("GENDER_CACHE_DIR", str(tmp_path / "local-cache"))
    dataset, split_info, caches = run["dataset"], run["split"], run["caches"]
    storage = open_storage(run["storage"])
    return run, dataset, split_info, caches, storage, read_manifest(storage, split_info["split_key"])


@pytest.mark.slow  # the prepared run preprocesses into shards
def test_preprocess_writes_every_image_once_into_shards(prepared):
    run, dataset, _, caches, storage, manifest = prepared
    size = Settings.from_dict(run["settings"]).per_model["cnn"].image_size
    prefix = layout.cache_prefix(dataset["dataset_id"], size)
    assert prefix in caches["cache_prefixes"]
    assert not [k for k in storage.list(layout.dataset_prefix(dataset["dataset_id"])) if k.endswith(".npz")]
    reader = ShardReader(storage, prefix)
    distinct = manifest.drop_duplicates("sha256").sort_values("sha256")
    assert reader.index["sha256"] == distinct["sha256"].tolist()  # sha256 order: any split names the same cache
    expected = np.stack([decode_resize(storage.get_bytes(k), size) for k in distinct["key"]])
    assert np.array_equal(reader.take(np.arange(len(reader))), expected)


@pytest.mark.slow  # the prepared run preprocesses into shards
def test_streamed_and_in_memory_splits_give_identical_batches(prepared):
    settings, dataset, _, _, storage, manifest = prepared
    reader = ShardReader(storage, layout.cache_prefix(dataset["dataset_id"], 32))
    in_memory = load_splits(manifest, reader, ("train", "test"), budget=1 << 30)
    streamed = load_splits(manifest, reader, ("train", "test"), budget=0)
    assert isinstance(in_memory["train"], SplitData) and isinstance(streamed["train"], StreamedSplit)
    for split in ("train", "test"):
        a, b = in_memory[split], streamed[split]
        assert a.keys == b.keys and torch.equal(a.labels, b.labels)
        for order in (None, torch.randperm(len(a), generator=epoch_generator(42, 1))):
            pairs = list(zip(a.batches(order, 4), b.batches(order, 4), strict=True))
            assert len(pairs) == -(-len(a) // 4)
            for (xa, ya), (xb, yb) in pairs:
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    positions = np.array([5, 0, 3])
    sub_a, sub_b = in_memory["train"].subset(positions), streamed["train"].subset(positions)
    assert sub_a.keys == sub_b.keys == [in_memory["train"].keys[i] for i in positions]
    assert torch.equal(next(sub_a.batches(None, 8))[0], next(sub_b.batches(None, 8))[0])


def _forget_trained(storage, dataset_id: str) -> None:
    """Delete the keyed models and audits, so that the next call trains again instead of reusing them."""
    for prefix in (f"{layout.dataset_prefix(dataset_id)}/models/", f"{layout.dataset_prefix(dataset_id)}/label_audit/"):
        for key in storage.list(prefix):
            storage.delete(key)


def _train_outputs(run, storage, run_key):
    _forget_trained(storage, run["dataset"]["dataset_id"])
    pipeline.train({**run, "run_key": run_key}, "cnn")
    read = lambda name: storage.get_bytes(layout.model_file_key(run_key, "cnn", name))  # noqa: E731
    return pd.read_csv(io.BytesIO(read("predictions.csv"))), read("history.json")


@pytest.mark.slow  # trains
def test_training_streamed_from_the_shards_equals_training_in_memory(prepared, monkeypatch, caplog):
    run, _, _, _, storage, _ = prepared
    caplog.set_level("INFO")
    preds_mem, history_mem = _train_outputs(run, storage, "in-memory")
    assert "fit the memory budget" in caplog.text
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "0")
    preds_stream, history_stream = _train_outputs(run, storage, "streamed")
    assert "streaming batches from the shards" in caplog.text and "reusing" not in caplog.text
    pd.testing.assert_frame_equal(preds_mem, preds_stream)  # same batches, same weights: same probabilities
    import json

    strip = lambda h: [{k: v for k, v in e.items() if k not in ("images_per_s", "seconds")} for e in json.loads(h)]  # noqa: E731
    assert strip(history_mem) == strip(history_stream)


@pytest.mark.slow  # trains
def test_label_audit_streamed_equals_in_memory(prepared, monkeypatch):
    run, _, _, _, storage, _ = prepared
    tables = []
    for run_key, budget in (("a", "2048"), ("b", "0")):
        monkeypatch.setenv(MEMORY_BUDGET_ENV, budget)
        _forget_trained(storage, run["dataset"]["dataset_id"])
        summary = pipeline.label_audit({**run, "run_key": run_key})
        assert summary["reused"] is False
        tables.append(pd.read_csv(io.BytesIO(storage.get_bytes(layout.label_audit_key(run_key)))))
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert tables[0]["prob_male"].notna().all()


@pytest.mark.slow  # trains
def test_a_killed_label_audit_resumes_after_its_last_finished_fold(prepared, monkeypatch):
    from gender_tasks.training import label_audit as audit_mod

    run, dataset, _, _, storage, _ = prepared
    folds_prefix = f"{layout.dataset_prefix(dataset['dataset_id'])}/label_audit/"
    pipeline.label_audit({**run, "run_key": "whole"})
    whole = pd.read_csv(io.BytesIO(storage.get_bytes(layout.label_audit_key("whole"))))
    assert not [k for k in storage.list(folds_prefix) if "/fold-" in k]  # the finished audit replaced its folds

    _forget_trained(storage, dataset["dataset_id"])
    real, calls = audit_mod.fit_predict, []

    def killed_in_the_second_fold(*args, **kwargs):
        calls.append(args[-1])  # the fold's seed
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as a SIGKILL would leave it: fold 1 stored, fold 2 not
        return real(*args, **kwargs)

    monkeypatch.setattr(audit_mod, "fit_predict", killed_in_the_second_fold)
    with pytest.raises(KeyboardInterrupt):
        pipeline.label_audit({**run, "run_key": "killed"})
    assert [k.rsplit("/", 1)[1] for k in storage.list(folds_prefix)] == ["fold-0.csv", "fold-0.csv.sha256"]
    monkeypatch.setattr(audit_mod, "fit_predict", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    pipeline.label_audit({**run, "run_key": "resumed"})
    assert calls[2:] == [calls[1]]  # only the unfinished fold trained again, with its own seed
    resumed = pd.read_csv(io.BytesIO(storage.get_bytes(layout.label_audit_key("resumed"))))
    pd.testing.assert_frame_equal(resumed, whole)  # bit for bit what the uninterrupted audit gave
    assert not [k for k in storage.list(folds_prefix) if "/fold-" in k]


def test_memory_budget_setting(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "512")
    assert memory_budget() == 512 * 1024**2
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(PermanentError, match="GENDER_MEMORY_BUDGET_MB='lots'.*megabytes"):
        memory_budget()


def _spawned_workers() -> list:
    """This process's live multiprocessing workers (not the resource tracker the spawn context starts,
    which lives as long as this process)."""
    import psutil

    workers = []
    for child in psutil.Process().children():
        try:
            if _executing(child) and "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def _executing(process) -> bool:
    """Whether a psutil.Process still runs: not gone, and not a zombie (exited, awaiting its parent's wait)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _audit_in(run, storage, run_key: str) -> pd.DataFrame:
    _forget_trained(storage, run["dataset"]["dataset_id"])
    assert pipeline.label_audit({**run, "run_key": run_key})["reused"] is False
    return pd.read_csv(io.BytesIO(storage.get_bytes(layout.label_audit_key(run_key))))


@pytest.mark.slow  # trains, and starts worker processes
def test_label_audit_folds_in_worker_processes_equal_folds_in_the_task(prepared, monkeypatch, caplog, tmp_path):
    """The folds trained side by side in spawned processes give the table the in-process loop gives, bit
    for bit, at the same thread count; and the finished audit leaves no fold files, no copy of the images
    and no processes."""
    import tempfile

    from gender_tasks.training import label_audit as audit_mod

    run, dataset, _, _, storage, _ = prepared
    caplog.set_level("INFO")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("GENDER_TORCH_THREADS", "1")
    monkeypatch.setattr(audit_mod, "usable_cores", lambda: 2)  # two workers on any machine
    monkeypatch.setattr(audit_mod, "PARALLEL_MIN_IMAGES", 0)  # the prepared set is small
    in_workers = _audit_in(run, storage, "workers")
    assert "2 folds in 2 processes side by side, 1 torch thread(s) each" in caplog.text
    caplog.clear()
    monkeypatch.setattr(audit_mod, "PARALLEL_MIN_IMAGES", 10**9)
    in_task = _audit_in(run, storage, "in-task")
    assert "processes side by side" not in caplog.text
    pd.testing.assert_frame_equal(in_workers, in_task)
    assert in_workers["prob_male"].notna().all()
    folds_prefix = f"{layout.dataset_prefix(dataset['dataset_id'])}/label_audit/"
    assert not [k for k in storage.list(folds_prefix) if "/fold-" in k]
    assert not _spawned_workers()
    assert not list((tmp_path / "tmp").glob(f"{audit_mod.COPY_PREFIX}*"))  # the images copied for the workers


@pytest.mark.slow  # trains
def test_a_temp_disk_that_cannot_take_the_copy_trains_the_folds_in_the_task(prepared, monkeypatch, caplog, tmp_path):
    """A full temp disk costs the audit its side-by-side folds, not its result: a warning says why and
    what to do, the folds train in the task, and no partial copy is left."""
    import errno
    import tempfile

    from gender_tasks.training import label_audit as audit_mod

    run, _, _, _, storage, _ = prepared
    caplog.set_level("INFO")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("GENDER_TORCH_THREADS", "1")
    monkeypatch.setattr(audit_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(audit_mod, "PARALLEL_MIN_IMAGES", 0)
    real_save, saved = np.save, []

    def full_after_the_first_file(path, array):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(path)
        real_save(path, array)

    monkeypatch.setattr(np, "save", full_after_the_first_file)
    table = _audit_in(run, storage, "full-disk")
    assert saved and table["prob_male"].notna().all()
    assert "No space left on device" in caplog.text and "training the folds in this process instead" in caplog.text
    assert "point TMPDIR at a local disk with" in caplog.text
    assert "processes side by side," not in caplog.text
    assert not list(tmp_path.glob(f"{audit_mod.COPY_PREFIX}*"))


def test_copies_of_audits_whose_process_died_are_removed(tmp_path, monkeypatch):
    import tempfile

    from gender_tasks.training import label_audit as audit_mod

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead_pid = next(pid for pid in range(4_000_000, 1, -1) if not audit_mod._alive(pid))  # no process has it
    dead = tmp_path / f"{audit_mod.COPY_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{audit_mod.COPY_PREFIX}{os.getpid()}-def"
    other = tmp_path / "gender-audit-notes"
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"x")
    audit_mod._remove_stale_copies()
    assert not dead.exists() and live.exists() and other.exists()


@pytest.mark.slow  # starts worker processes
def test_a_fold_worker_that_dies_fails_the_audit_at_once_naming_it(prepared, monkeypatch):
    """A worker killed (as the OOM killer would) fails the audit with a named, retryable error; the other
    worker is stopped, not left training, and no fold is stored half-written."""
    import threading

    from gender_tasks.training import label_audit as audit_mod

    run, dataset, _, _, storage, _ = prepared
    monkeypatch.setenv("GENDER_TORCH_THREADS", "1")
    monkeypatch.setattr(audit_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(audit_mod, "PARALLEL_MIN_IMAGES", 0)
    killed = []

    def kill_a_worker():
        for _ in range(600):
            workers = _spawned_workers()
            if workers:
                workers[0].kill()
                killed.append(workers[0].pid)
                return
            threading.Event().wait(0.05)

    watcher = threading.Thread(target=kill_a_worker, daemon=True)
    watcher.start()
    _forget_trained(storage, dataset["dataset_id"])
    with pytest.raises(audit_mod.AuditWorkerDied, match=r"fold \d ended without a result.*resumes after"):
        pipeline.label_audit({**run, "run_key": "died"})
    watcher.join(5)
    assert killed
    assert not storage.exists(layout.label_audit_key("died"))
    folds = [k for k in storage.list(f"{layout.dataset_prefix(dataset['dataset_id'])}/label_audit/") if "/fold-" in k]
    for key in folds:  # whatever finished before the death is whole, with its checksum
        if not key.endswith(".sha256"):
            assert f"{key}.sha256" in folds
    assert not _spawned_workers()  # the other worker was stopped with the pool, not left to finish its fold


_ORPHAN_SCRIPT = """
import os, sys, time
from pathlib import Path

from gender_tasks.training import label_audit


def hold(folder):
    # A task runs only after its worker's initializer: this file says that worker's death pact is in place.
    (Path(folder) / str(os.getpid())).touch()
    time.sleep(120)


if __name__ == "__main__":
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    folder = Path(sys.argv[1])
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                               initializer=label_audit._start_worker, initargs=(os.getpid(), 1, "", None))
    futures = [pool.submit(hold, str(folder)) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    print(" ".join(path.name for path in folder.iterdir()), flush=True)
    time.sleep(120)
"""


@pytest.mark.slow  # starts processes
def test_fold_workers_die_with_a_task_killed_by_sigkill(tmp_path):
    """`kill -9` of the task must not leave its fold workers training (and holding memory) for minutes."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "orphans.py"
    script.write_text(_ORPHAN_SCRIPT)
    started = tmp_path / "started"
    started.mkdir()
    # The pids come once both workers have run their initializer (a worker still importing torch under load has
    # no death pact yet: it finds its parent gone when it gets there, a while later, and exits then).
    task = subprocess.Popen([sys.executable, str(script), str(started)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in task.stdout.readline().split()]
        assert len(pids) == 2
        workers = [psutil.Process(p) for p in pids]
        assert all(w.is_running() for w in workers)
        task.kill()
        task.wait(10)
        # Exited is what counts: a zombie (exited, not yet reaped by the parent it was handed to) runs nothing and
        # holds no memory, and psutil counts it as running (as _spawned_workers does not).
        deadline = time.monotonic() + 10
        while (alive := [w for w in workers if _executing(w)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"fold workers {[p.pid for p in alive]} outlived their task"
    finally:
        task.kill()
