"""Stored bytes are checked when read: a changed image, manifest, split, shard or local shard copy is found
and named (never used), and `python -m gender_tasks verify` finds and repairs planted corruption."""

import os
import stat

import numpy as np
import pytest
from helpers import copy_prepared, write_dataset

from gender_tasks import layout, pipeline
from gender_tasks.cli import main as cli_main
from gender_tasks.data.manifest import read_manifest
from gender_tasks.data.shards import ShardReader, index_key, local_cache_root, shard_key
from gender_tasks.errors import PermanentError
from gender_tasks.integrity import IntegrityError
from gender_tasks.storage import get_recorded, open_storage, put_recorded


@pytest.fixture(scope="module")
def ingested_once(tmp_path_factory):
    """A tiny dataset ingested and split once for the module (not preprocessed): (its folder, run record)."""
    base = tmp_path_factory.mktemp("ingested")
    src = write_dataset(base / "faces", 12)
    run = pipeline.prepare({"source": str(src), "storage": str(base / "store"), "profile": "tiny",
                            "models": ["cnn"], "min_rows": 10, "label_audit": False})  # fmt: skip
    return base, pipeline.split(pipeline.ingest(run))


@pytest.fixture
def ingested(ingested_once, tmp_path, monkeypatch):
    """The ingested run, copied for this test (the tests corrupt its objects): (run record, storage)."""
    monkeypatch.setenv("GENDER_CACHE_DIR", str(tmp_path / "local-cache"))
    run = copy_prepared(*ingested_once, tmp_path / "ingested")
    return run, open_storage(run["storage"])


def _image_keys(storage, run):
    return storage.list(layout.images_prefix(run["dataset"]["dataset_id"]))


def _flip_byte(storage, key, offset=-10):
    data = bytearray(storage.get_bytes(key))
    data[offset] ^= 0xFF
    storage.put_bytes(key, bytes(data))


def test_run_record_holds_the_manifest_and_split_checksums(ingested):
    run, storage = ingested
    assert len(run["dataset"]["manifest_sha256"]) == 64
    assert len(run["split"]["split_sha256"]) == 64 and run["split"]["repeats"][0]["split_sha256"]


def test_a_changed_stored_image_is_named_and_never_decoded(ingested):
    run, storage = ingested
    key = _image_keys(storage, run)[3]
    _flip_byte(storage, key)
    with pytest.raises(IntegrityError, match=r"the image .*" + key.rpartition("/")[2] + r" is corrupt.*verify"):
        pipeline.preprocess(run)
    # Nothing was committed: no cache index for a cache built from a bad image.
    assert not [k for k in storage.list(layout.dataset_prefix(run["dataset"]["dataset_id"])) if "index.json" in k]


def test_an_edited_label_in_the_manifest_is_found(ingested):
    run, storage = ingested
    dataset_id = run["dataset"]["dataset_id"]
    key = layout.manifest_key(dataset_id)
    text = storage.get_bytes(key).decode()
    edited = text.replace(",female,", ",male,", 1)
    assert edited != text
    storage.put_bytes(key, edited.encode())
    with pytest.raises(IntegrityError, match="manifest.csv is corrupt"):  # the recorded sha256 differs
        read_manifest(storage, key)
    # Even with its checksum record rewritten to match (or lost), the rows no longer hash to the dataset id.
    put_recorded(storage, key, edited.encode())
    with pytest.raises(IntegrityError, match=f"hash to dataset id .* not {dataset_id}"):
        read_manifest(storage, key, dataset_id=dataset_id)


def test_a_changed_split_is_refused_by_the_next_step(ingested):
    run, storage = ingested
    key = run["split"]["split_key"]
    text = storage.get_bytes(key).decode()
    storage.put_bytes(key, text.replace(",test", ",train", 1).encode())  # a test image moved into training
    with pytest.raises(IntegrityError, match="splits/.* is corrupt"):
        pipeline.validate(run)


def test_a_changed_stored_shard_is_named(ingested, tmp_path):
    run, storage = ingested
    run = pipeline.preprocess(run)
    prefix = run["caches"]["cache_prefixes"][0]
    _flip_byte(storage, shard_key(prefix, 0), offset=-5)
    with pytest.raises(IntegrityError, match=r"the shard .*shard-00000\.npy is corrupt"):
        ShardReader(storage, prefix, cache_dir=tmp_path / "fresh-cache")


def test_a_zeroed_local_shard_copy_is_replaced_not_used(ingested, tmp_path, caplog):
    run, storage = ingested
    run = pipeline.preprocess(run)
    prefix = run["caches"]["cache_prefixes"][0]
    cache = tmp_path / "machine-cache"
    expected = ShardReader(storage, prefix, cache_dir=cache).take(np.arange(10))
    (local,) = (cache / prefix).glob("shard-00000-*.npy")
    header = len(local.read_bytes()) - expected[0].size * 24  # keep the .npy header, zero the pixels
    data = bytearray(local.read_bytes())
    data[header:] = bytes(len(data) - header)
    local.write_bytes(bytes(data))
    again = ShardReader(storage, prefix, cache_dir=cache).take(np.arange(10))
    assert np.array_equal(again, expected) and again.std() > 0
    assert "does not match its checksum" in caplog.text


def test_the_default_local_cache_is_private(monkeypatch, tmp_path):
    monkeypatch.delenv("GENDER_CACHE_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    root = local_cache_root()
    assert root.name == f"gender-shard-cache-{os.getuid()}"
    from gender_tasks.data.shards import private_folder

    private_folder(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    root.chmod(0o777)  # another user could now plant files in it
    with pytest.raises(PermanentError, match="not private: others may write in it"):
        private_folder(root)


def test_recorded_objects_without_a_record_are_read_with_a_warning(local_storage, caplog):
    local_storage.put_bytes("datasets/ds-x/attributes.csv", b"sha256,age\n")
    assert get_recorded(local_storage, "datasets/ds-x/attributes.csv") == b"sha256,age\n"
    assert "no recorded checksum" in caplog.text


def test_verify_finds_names_and_repairs_planted_corruption(ingested, capsys):
    run, storage = ingested
    run = pipeline.preprocess(run)
    uri, dataset_id = run["storage"], run["dataset"]["dataset_id"]
    assert cli_main(["verify", "--storage", uri]) == 0
    clean = capsys.readouterr().out
    assert "0 corrupt" in clean and "checked" in clean

    image = _image_keys(storage, run)[0]
    shard = shard_key(run["caches"]["cache_prefixes"][0], 0)
    _flip_byte(storage, image)
    _flip_byte(storage, shard, offset=-3)
    assert cli_main(["verify", "--storage", uri]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {storage.url(image)}" in out and f"CORRUPT {storage.url(shard)}" in out
    assert "2 corrupt" in out and "--repair" in out

    assert cli_main(["verify", "--storage", uri, "--dataset", dataset_id, "--repair"]) == 1
    out = capsys.readouterr().out
    index = index_key(run["caches"]["cache_prefixes"][0])
    for removed in (image, shard, layout.manifest_key(dataset_id), index):
        assert f"removed {storage.url(removed)}" in out
        assert not storage.exists(removed)
    assert cli_main(["verify", "--storage", uri]) == 0
    capsys.readouterr()

    # The next run rebuilds what was removed: ingest uploads the image again, preprocess rewrites the cache.
    conf = {k: run["settings"][k] for k in ("source", "storage", "profile", "models", "min_rows", "label_audit")}
    again = pipeline.preprocess(pipeline.split(pipeline.ingest(pipeline.prepare(conf))))
    assert again["dataset"]["dataset_id"] == dataset_id and storage.exists(image) and storage.exists(index)
    assert cli_main(["verify", "--storage", uri]) == 0


@pytest.mark.timeout(60)
def test_a_fifo_where_an_image_was_stored_fails_its_reader_at_once_and_verify_repairs_it(ingested, capsys):
    # A FIFO in a local store: a plain read waits for a writer forever, so preprocess would hang for good.
    run, storage = ingested
    uri, dataset_id = run["storage"], run["dataset"]["dataset_id"]
    image = _image_keys(storage, run)[0]
    path = storage.local_path(image)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(
        IntegrityError, match=r"is not a regular file but a FIFO \(named pipe\).*it was not read.*--repair"
    ):
        pipeline.preprocess(run)
    # listed where the object was, so verify finds it; reported whatever its kind, never opened for a blocking read
    assert image in storage.list(layout.images_prefix(dataset_id)) and not storage.exists(image)
    assert cli_main(["verify", "--storage", uri]) == 1
    out = capsys.readouterr().out
    assert (
        f"CORRUPT {storage.url(image)}: not a regular file but a FIFO (named pipe); rebuilt by the next ingest" in out
    )
    assert cli_main(["verify", "--storage", uri, "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"removed {storage.url(image)}" in out and f"removed {storage.url(layout.manifest_key(dataset_id))}" in out
    assert not os.path.lexists(path)
    conf = {k: run["settings"][k] for k in ("source", "storage", "profile", "models", "min_rows", "label_audit")}
    pipeline.preprocess(pipeline.split(pipeline.ingest(pipeline.prepare(conf))))  # rebuilt from the source
    assert stat.S_ISREG(os.lstat(path).st_mode) and cli_main(["verify", "--storage", uri]) == 0


def test_verify_names_a_bad_storage_and_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert cli_main(["verify", "--storage", str(tmp_path / "file" / "store")]) == 2
    assert "error:" in capsys.readouterr().err


def test_verify_checks_model_files_and_checkpoints_against_their_records(local_storage, capsys):
    import json

    from gender_tasks.integrity import sha256_hex

    folder = layout.trained_prefix("ds-0123456789abcdef", "cnn", "k" * 20)
    files = {"predictions.csv": b"key,split\n", "history.json": b"[]", "metrics.json": b"{}", "model.ts": b"weights"}
    for name, data in files.items():
        local_storage.put_bytes(f"{folder}/{name}", data)
    card = {"files": {name: sha256_hex(data) for name, data in files.items()}}
    local_storage.put_bytes(f"{folder}/model_card.json", json.dumps(card).encode())
    other = layout.trained_prefix("ds-0123456789abcdef", "resnet50", "j" * 20)
    local_storage.put_bytes(f"{other}/{layout.CHECKPOINT}", b"state")
    local_storage.put_bytes(
        f"{other}/{layout.CHECKPOINT_RECORD}", json.dumps({"sha256": sha256_hex(b"state")}).encode()
    )
    uri = str(local_storage.root)
    assert cli_main(["verify", "--storage", uri]) == 0
    local_storage.put_bytes(f"{folder}/model.ts", b"weightz")  # changed weights
    local_storage.put_bytes(f"{other}/{layout.CHECKPOINT}", b"stale")
    assert cli_main(["verify", "--storage", uri, "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {local_storage.url(folder + '/model.ts')}: sha256" in out and "in its model card" in out
    assert f"CORRUPT {local_storage.url(other + '/' + layout.CHECKPOINT)}" in out
    # The card goes with the bad file (the next run trains the model again); the checkpoint with its record.
    assert not local_storage.exists(f"{folder}/model_card.json") and local_storage.exists(f"{folder}/metrics.json")
    assert not local_storage.exists(f"{other}/{layout.CHECKPOINT_RECORD}")


def test_verify_checks_a_scorings_predictions_and_parts_and_gc_keeps_them(local_storage, capsys):
    """A scoring's predictions.csv and its parts carry recorded checksums: verify checks them. Repairing the
    predictions removes the summary.json that marks the scoring done, so scoring the images again assembles
    them afresh from the parts; `gc` leaves scorings alone."""
    from gender_tasks.housekeeping import collect_garbage

    prefix, part = layout.score_prefix("s" * 24), layout.part_key("m" * 64, "b" * 32)
    put_recorded(local_storage, part, b"file,prob_male\na.jpg,0.9\n")
    put_recorded(local_storage, f"{prefix}/predictions.csv", b"file,prob_male\na.jpg,0.9\n")
    put_recorded(local_storage, f"{prefix}/summary.html", b"<html></html>")
    local_storage.put_bytes(f"{prefix}/summary.json", b"{}")
    uri = str(local_storage.root)
    assert cli_main(["verify", "--storage", uri]) == 0
    assert "checked 4 object(s)" in capsys.readouterr().out  # summary.json carries no checksum: unverifiable
    local_storage.put_bytes(f"{prefix}/predictions.csv", b"file,prob_male\na.jpg,0.1\n")  # edited after the fact
    local_storage.put_bytes(part, b"file,prob_male\na.jpg,0.2\n")
    assert cli_main(["verify", "--storage", uri, "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {local_storage.url(prefix + '/predictions.csv')}: sha256" in out
    assert "scoring the same images with the same model again (from the stored parts)" in out
    assert f"CORRUPT {local_storage.url(part)}" in out and "the next scoring of its images" in out
    assert not local_storage.exists(f"{prefix}/summary.json") and local_storage.exists(f"{prefix}/summary.html")
    assert not local_storage.exists(part) and not local_storage.exists(layout.checksum_key(part))
    assert [r for r in collect_garbage(local_storage, keep_days=0, dry_run=True) if "scoring/" in r.key] == []


def test_verify_repairs_a_scorings_edited_page_so_that_scoring_again_rewrites_it(local_storage, capsys):
    """summary.html (the page the UI serves) carries a recorded checksum too: an edited page is corrupt, and
    repairing it removes the summary.json that marks the scoring done, leaving the predictions."""
    prefix = layout.score_prefix("t" * 24)
    put_recorded(local_storage, f"{prefix}/{layout.SCORED_PREDICTIONS}", b"file,prob_male\na.jpg,0.9\n")
    put_recorded(local_storage, f"{prefix}/{layout.SCORING_PAGE}", b"<html>scored</html>")
    local_storage.put_bytes(f"{prefix}/{layout.SCORING_SUMMARY}", b"{}")
    local_storage.put_bytes(f"{prefix}/{layout.SCORING_PAGE}", b"<html><script>alert(1)</script></html>")
    assert cli_main(["verify", "--storage", str(local_storage.root), "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {local_storage.url(prefix + '/' + layout.SCORING_PAGE)}: sha256" in out
    assert "scoring the same images with the same model again (from the stored parts)" in out
    assert not local_storage.exists(f"{prefix}/{layout.SCORING_PAGE}")
    assert not local_storage.exists(f"{prefix}/{layout.SCORING_SUMMARY}")
    assert local_storage.exists(f"{prefix}/{layout.SCORED_PREDICTIONS}")
