import logging
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import png_claiming, write_dataset

from gender_tasks.data import ingest as ingest_mod
from gender_tasks.data.folders import IngestError, find_class_dirs
from gender_tasks.data.ingest import ingest_folder
from gender_tasks.data.manifest import read_manifest
from gender_tasks.data.sources import SourceError, resolve_source, safe_extract_zip
from gender_tasks.layout import manifest_key
from gender_tasks.storage import LocalStorage, StorageConfigError, StorageError, open_storage


def assert_nothing_written(storage) -> None:
    """Not one object (nor a temporary file) anywhere in the storage: a refusal wrote nothing."""
    if isinstance(storage, LocalStorage):
        assert [p for p in storage.root.rglob("*") if p.is_file()] == []
    else:  # the whole bucket, not only the storage's prefix
        assert storage.client.list_objects_v2(Bucket=storage.bucket).get("KeyCount", 0) == 0


def test_ingest_writes_images_and_manifest_content_addressed(dataset_dir, local_storage):
    out = ingest_folder(dataset_dir, local_storage)
    assert out["images"] == 40 and out["uploaded"] == 40
    manifest = read_manifest(local_storage, manifest_key(out["dataset_id"]))
    assert set(manifest.columns) >= {"key", "label", "sha256", "bytes", "width", "height", "format", "source_path"}
    assert manifest["label"].value_counts().to_dict() == {"female": 20, "male": 20}
    for row in manifest.itertuples():
        assert row.sha256 in row.key and local_storage.exists(row.key)
    assert (manifest["width"] == 48).all() and (manifest["format"] == "jpeg").all()
    assert manifest["phash"].str.fullmatch(r"[0-9a-f]{16}").all()  # the perceptual hash, computed once here


def test_reingest_is_a_noop_with_the_same_id(dataset_dir, local_storage):
    first = ingest_folder(dataset_dir, local_storage)
    second = ingest_folder(dataset_dir, local_storage)
    assert second["dataset_id"] == first["dataset_id"] and second["uploaded"] == 0


@pytest.mark.timeout(60)
def test_reingest_uploads_again_the_images_that_went_from_a_committed_dataset(dataset_dir, local_storage, caplog):
    # The manifest says the dataset is there, but images went since: deleted by hand or by a lifecycle rule, a
    # `verify --repair` stopped before it removed the manifest, or a FIFO put in an image's place. The source is
    # here, so the next ingest puts them back, and says so, instead of leaving preprocess to fail on them.
    first = ingest_folder(dataset_dir, local_storage)
    keys = read_manifest(local_storage, manifest_key(first["dataset_id"]))["key"].tolist()
    local_storage.delete(keys[0])
    local_storage.local_path(keys[1]).unlink()
    os.mkfifo(local_storage.local_path(keys[1]))
    with caplog.at_level(logging.WARNING, logger="gender_tasks.data.ingest"):
        again = ingest_folder(dataset_dir, local_storage)
    assert again["dataset_id"] == first["dataset_id"] and again["uploaded"] == 2
    assert "but 2 of its 40 images are not (removed or damaged since it was ingested" in caplog.text
    assert all(len(local_storage.get_bytes(key)) > 0 for key in keys)  # every image readable, none blocks
    assert ingest_folder(dataset_dir, local_storage)["uploaded"] == 0


def test_different_content_gets_a_different_id(tmp_path, local_storage):
    a = ingest_folder(write_dataset(tmp_path / "a", 8, seed=1), local_storage)
    b = ingest_folder(write_dataset(tmp_path / "b", 8, seed=2), local_storage)
    assert a["dataset_id"] != b["dataset_id"]


def test_class_folders_any_case_below_one_wrapping_folder(tmp_path, local_storage):
    root = tmp_path / "kaggle"
    write_dataset(root / "ThisPersonDoesNotExist", 8, folder_names={"female": "Female", "male": "MALE"})
    (root / "ThisPersonDoesNotExist" / "README.txt").write_text("not an image, outside the class folders")
    assert set(find_class_dirs(root)) == {"female", "male"}
    assert ingest_folder(root, local_storage)["images"] == 16


def test_unknown_class_folder_is_named(tmp_path, any_storage):
    root = write_dataset(tmp_path / "d", 3)
    (root / "Unknown").mkdir()
    (root / "Unknown" / "x.jpg").write_bytes((root / "male" / "male_0000.jpg").read_bytes())
    with pytest.raises(IngestError, match=r"unknown class folder.*Unknown.*rename or remove"):
        ingest_folder(root, any_storage)
    assert_nothing_written(any_storage)


def test_non_image_file_is_named(tmp_path, any_storage):
    root = write_dataset(tmp_path / "d", 3)
    (root / "male" / "notes.txt").write_text("hello")
    (root / "female" / "scores.csv").write_text("hello")
    with pytest.raises(IngestError, match=r"scores\.csv is not an image.*1 more.*notes\.txt.*move or delete"):
        ingest_folder(root, any_storage)
    assert_nothing_written(any_storage)  # nothing half-written


def test_empty_class_is_named(tmp_path, any_storage):
    root = write_dataset(tmp_path / "d", {"female": 3, "male": 0})
    (root / "male").mkdir(exist_ok=True)
    with pytest.raises(IngestError, match=r"male holds no images; every class needs at least one"):
        ingest_folder(root, any_storage)
    assert_nothing_written(any_storage)


def test_undecodable_image_is_refused_before_anything_is_written(tmp_path, any_storage):
    root = write_dataset(tmp_path / "d", 8)
    (root / "female" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(IngestError, match=r"female/broken\.jpg is not an image Pillow can read.*remove or replace"):
        ingest_folder(root, any_storage)
    assert_nothing_written(any_storage)


def test_every_accepted_image_was_decoded_by_the_scan(dataset_dir, local_storage):
    out = ingest_folder(dataset_dir, local_storage)
    manifest = read_manifest(local_storage, manifest_key(out["dataset_id"]))
    assert manifest["decodable"].astype(str).eq("True").all() and manifest["error"].fillna("").eq("").all()


def test_missing_source_says_what_to_give(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist.*female/ and male/"):
        resolve_source(str(tmp_path / "nowhere"))


def test_zip_source_and_escaping_entries(tmp_path):
    root = write_dataset(tmp_path / "d", 2)
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        for p in root.rglob("*.jpg"):
            zf.write(p, p.relative_to(root).as_posix())
    extracted = resolve_source(str(good), tmp_path / "work")
    assert set(find_class_dirs(extracted)) == {"female", "male"}

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../etc/evil.jpg", b"x")
    with pytest.raises(SourceError, match=r"outside the target folder"):
        safe_extract_zip(evil, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_zip_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("female/a.jpg", b"\0" * (5 * 1024 * 1024))
    with pytest.raises(SourceError, match=r"decompression bomb"):
        safe_extract_zip(bomb, tmp_path / "out")


def test_kaggle_unreachable_fails_fast_with_the_fix(monkeypatch):
    import socket
    import time

    def no_network(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", no_network)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot be reached.*make run SOURCE="):
        resolve_source("kaggle:bwandowando/all-these-people-dont-exist")
    assert time.monotonic() - started < 5


def test_kaggle_download_path_uses_kagglehub(monkeypatch, tmp_path):
    import kagglehub

    from gender_tasks.data import sources

    root = write_dataset(tmp_path / "kaggle-cache" / "ThisPersonDoesNotExist", 2,
                         folder_names={"female": "Female", "male": "Male"})  # fmt: skip
    calls = []
    monkeypatch.setattr(sources, "check_kaggle_reachable", lambda timeout=5.0: None)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: calls.append(handle) or str(root.parent))
    path = resolve_source("kaggle:bwandowando/all-these-people-dont-exist")
    assert calls == ["bwandowando/all-these-people-dont-exist"]
    assert set(find_class_dirs(path)) == {"female", "male"}


# --- S3: ingest into a bucket prefix, an S3 source, and what storage problems look like ----------


@pytest.mark.slow
def test_ingest_into_s3_prefix_then_reingest_uploads_nothing(dataset_dir, s3_bucket, monkeypatch):
    from gender_tasks.storage import S3Storage

    storage = open_storage(f"s3://{s3_bucket}/team/pipeline")
    out = ingest_folder(dataset_dir, storage)
    assert out["images"] == 40 and out["uploaded"] == 40
    assert out["manifest_uri"] == f"s3://{s3_bucket}/team/pipeline/datasets/{out['dataset_id']}/manifest.csv"
    raw = storage.client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert (
        all(o["Key"].startswith(f"team/pipeline/datasets/{out['dataset_id']}/") for o in raw) and len(raw) == 42
    )  # images, manifest and its sha256
    manifest = read_manifest(storage, manifest_key(out["dataset_id"]))
    for row in manifest.itertuples():
        assert storage.exists(row.key) and row.sha256 in row.key
    assert storage.get_bytes(manifest.key.iloc[0]) == (dataset_dir / manifest.source_path.iloc[0]).read_bytes()

    puts = []
    original = S3Storage.put_bytes
    monkeypatch.setattr(S3Storage, "put_bytes", lambda self, k, d: puts.append(k) or original(self, k, d))
    again = ingest_folder(dataset_dir, open_storage(f"s3://{s3_bucket}/team/pipeline"))
    assert again["dataset_id"] == out["dataset_id"] and again["uploaded"] == 0 and puts == []


def test_interrupted_ingest_leaves_no_manifest_and_resumes(dataset_dir, any_storage, monkeypatch):
    written = []
    original = type(any_storage).put_bytes

    def flaky(self, key, data):
        if "/images/" in key:  # the 16th image fails (not the ingest's lease, written too)
            if len(written) == 15:
                raise StorageError("connection reset (simulated)")
            written.append(key)
        return original(self, key, data)

    monkeypatch.setattr(type(any_storage), "put_bytes", flaky)
    with pytest.raises(StorageError, match="simulated"):
        ingest_folder(dataset_dir, any_storage, upload_workers=1)
    assert not any(k.endswith("manifest.csv") for k in any_storage.list(""))  # not committed: invisible
    monkeypatch.setattr(type(any_storage), "put_bytes", original)
    out = ingest_folder(dataset_dir, any_storage)
    assert out["uploaded"] == 40 - 15 and any_storage.exists(manifest_key(out["dataset_id"]))


def test_ingest_logs_progress_files_and_rate(dataset_dir, any_storage, caplog):
    with caplog.at_level(logging.INFO, logger="gender_tasks.data.ingest"):
        out = ingest_folder(dataset_dir, any_storage)
    text = caplog.text
    assert "ingest: scanned 40/40 files" in text
    assert f"ingest {out['dataset_id']}: uploaded 40/40 files" in text and "MB/s" in text


@pytest.mark.slow
def test_s3_source_ingests_like_the_same_local_folder(dataset_dir, s3_bucket, local_storage, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}")
    client = storage.client
    client.put_object(Bucket=s3_bucket, Key="sources/faces/female/", Body=b"")  # a console "folder" marker
    for path in sorted(dataset_dir.rglob("*.jpg")):
        client.put_object(Bucket=s3_bucket, Key=f"sources/faces/{path.relative_to(dataset_dir).as_posix()}",
                          Body=path.read_bytes())  # fmt: skip
    root = resolve_source(f"s3://{s3_bucket}/sources/faces/", tmp_path / "work")
    from_s3 = ingest_folder(root, local_storage)
    from_folder = ingest_folder(dataset_dir, local_storage)
    assert from_s3["images"] == 40 and from_s3["dataset_id"] == from_folder["dataset_id"]


def test_a_source_in_any_registered_storage_is_downloaded_and_ingests_like_the_folder(dataset_dir, mem_storage,
                                                                                     local_storage, tmp_path):  # fmt: skip
    # mem:// is the test backend (memory_storage.py): sources are read through the scheme registry, not by s3:// only
    for path in sorted(dataset_dir.rglob("*.jpg")):
        mem_storage.put_bytes(f"sources/faces/{path.relative_to(dataset_dir).as_posix()}", path.read_bytes())
    source = f"{mem_storage.uri}/sources/faces/"
    root = resolve_source(source, tmp_path / "work")
    assert root.is_relative_to(tmp_path / "work")
    from_source = ingest_folder(root, local_storage)
    from_folder = ingest_folder(dataset_dir, local_storage)
    assert from_source["images"] == 40 and from_source["dataset_id"] == from_folder["dataset_id"]
    # Named by its own scheme, not as "the S3 source".
    with pytest.raises(SourceError, match=rf"^the MEM source {mem_storage.uri}/nothing holds no objects"):
        resolve_source(f"{mem_storage.uri}/nothing", tmp_path / "w2")


def test_s3_source_that_does_not_exist(s3_bucket, tmp_path):
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket}/nothing/here holds no objects; check the bucket"):
        resolve_source(f"s3://{s3_bucket}/nothing/here", tmp_path / "w1")
    with pytest.raises(StorageConfigError, match=r"bucket 'missing-source-bucket'.*does not exist: create it"):
        resolve_source("s3://missing-source-bucket/faces", tmp_path / "w2")


@pytest.mark.slow
def test_s3_source_keys_escaping_the_target_are_refused(s3_bucket, tmp_path):
    client = open_storage(f"s3://{s3_bucket}").client
    client.put_object(Bucket=s3_bucket, Key="faces/female/ok.jpg", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="faces/female/../../../escaped.jpg", Body=b"x")
    with pytest.raises(SourceError, match=r"faces/female/\.\./\.\./\.\./escaped\.jpg.*outside the target folder"):
        resolve_source(f"s3://{s3_bucket}/faces", tmp_path / "work")
    assert not any((tmp_path / "work").rglob("*.jpg")) and not (tmp_path / "escaped.jpg").exists()


def test_unreachable_storage_fails_before_the_scan(dataset_dir, monkeypatch, tmp_path):
    from helpers import closed_port, isolate_aws_env

    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(ingest_mod, "scan_folder", lambda *a, **k: pytest.fail("scanned before checking storage"))
    with pytest.raises(StorageError, match=r"cannot reach S3 for s3://bucket/prefix.*AWS_ENDPOINT_URL"):
        ingest_folder(dataset_dir, open_storage("s3://bucket/prefix"))


def test_missing_credentials_refuse_ingest(dataset_dir, moto_endpoint, monkeypatch, tmp_path):
    from helpers import isolate_aws_env

    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    says = r"no usable AWS credentials for s3://bucket/prefix.*AWS_ACCESS_KEY_ID"
    with pytest.raises(StorageConfigError, match=says):
        ingest_folder(dataset_dir, open_storage("s3://bucket/prefix"))


# --- bad files: refused before anything is written, named with the fix ---------------------------


def test_decompression_bomb_is_refused_without_decoding(tmp_path, any_storage, monkeypatch):
    from PIL import ImageFile

    root = write_dataset(tmp_path / "d", 3)
    (root / "female" / "bomb.png").write_bytes(png_claiming(20_000, 20_000))  # over Pillow's own limit
    (root / "male" / "large.png").write_bytes(png_claiming(7_000, 7_000))  # under Pillow's, over max_pixels
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    with pytest.raises(IngestError) as err:
        ingest_folder(root, any_storage)
    text = str(err.value)
    assert text.startswith("2 file(s) refused, nothing was written")
    assert "female/bomb.png is refused undecoded as a decompression bomb" in text and "remove or downscale" in text
    assert "male/large.png is 7000x7000 px, over the 40,000,000 px limit" in text and "raise max_image_pixels" in text
    # judged from their headers alone: the bombs were never decoded (the good images were, by the scan)
    assert (20_000, 20_000) not in decoded and (7_000, 7_000) not in decoded and (48, 48) in decoded
    assert_nothing_written(any_storage)


def test_unreadable_file_is_refused(tmp_path, any_storage):
    root = write_dataset(tmp_path / "d", 3)
    (root / "male" / "gone.jpg").symlink_to(tmp_path / "deleted-meanwhile.jpg")  # a dangling link: unreadable
    with pytest.raises(IngestError, match=r"male/gone\.jpg cannot be read \(No such file or directory\): fix"):
        ingest_folder(root, any_storage)
    assert_nothing_written(any_storage)


def test_file_changing_during_ingest_is_refused(tmp_path, local_storage, monkeypatch):
    root = write_dataset(tmp_path / "d", 8)
    scan = ingest_mod.scan_folder

    def scan_then_edit(*a, **k):
        out = scan(*a, **k)
        (root / "female" / "female_0001.jpg").write_bytes(b"edited")
        return out

    monkeypatch.setattr(ingest_mod, "scan_folder", scan_then_edit)
    with pytest.raises(IngestError, match=r"female_0001\.jpg changed while it was being ingested; re-run"):
        ingest_folder(root, local_storage, upload_workers=1)
    assert not any(k.endswith("manifest.csv") for k in local_storage.list(""))


def test_zip_source_with_bad_entries_writes_nothing(tmp_path, local_storage):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("female/ok.jpg", b"x")
        zf.writestr("female/../../../../tmp/evil.jpg", b"x")
    from gender_tasks import pipeline

    run = pipeline.prepare({"source": str(evil), "storage": str(local_storage.root)})
    with pytest.raises(SourceError, match=r"female/\.\./\.\./\.\./\.\./tmp/evil\.jpg.*outside the target folder"):
        pipeline.ingest(run)
    assert_nothing_written(local_storage)
    assert not Path("/tmp/evil.jpg").exists()


@pytest.mark.slow
def test_scanning_in_worker_processes_gives_the_same_rows_and_refusals(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "faces", 12, seed=3)
    on_threads = [s.row for s in ingest_mod.scan_folder(root)]
    monkeypatch.setattr(ingest_mod, "MIN_FILES_FOR_PROCESSES", 0)
    monkeypatch.setattr(ingest_mod, "SCAN_CHUNK_FILES", 5)  # 24 files: 5 chunks, the last one short
    assert [s.row for s in ingest_mod.scan_folder(root, processes=2)] == on_threads

    bad = next((root / "male").iterdir())
    bad.write_bytes(bad.read_bytes()[:-300])  # truncated: its header reads, only a decode (in a worker) fails
    with pytest.raises(IngestError, match=rf"1 file\(s\) refused.*{bad.name} does not decode"):
        ingest_mod.scan_folder(root, processes=2)


def test_s3_source_over_the_size_limit_or_the_free_disk_is_refused_before_download(s3_bucket, tmp_path, monkeypatch):
    from gender_tasks.data import sources

    client = open_storage(f"s3://{s3_bucket}").client
    for i in range(3):
        client.put_object(Bucket=s3_bucket, Key=f"faces/female/{i}.jpg", Body=b"x" * 4_000)
    with pytest.raises(
        SourceError,
        match=rf"s3://{s3_bucket}/faces would download to 12\.0 kB, over the 10\.0 kB "
        r"limit \(setting max_source_bytes\): refused before a byte was written",
    ):
        resolve_source(f"s3://{s3_bucket}/faces", tmp_path / "work", max_bytes=10_000)
    monkeypatch.setattr(sources, "DISK_SPARE_BYTES", 0)
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: SimpleNamespace(free=5_000))
    with pytest.raises(SourceError, match=r"would download to 12\.0 kB but \S+ has 5\.0 kB free.*free disk space"):
        resolve_source(f"s3://{s3_bucket}/faces", tmp_path / "work")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.jpg"))


def _logged(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{what} ")]


def test_many_repeated_images_are_all_named_in_the_log_in_one_pass(tmp_path, local_storage, caplog):
    """A real dataset (UTKFace crop_part1: 99 groups of identical files, 14 of them under both labels) must be
    fixable in one pass: the message shows ten groups, the log above it every copy of every group."""
    root = write_dataset(tmp_path / "d", 14)
    for i in range(12):  # 12 groups: 11 copies within female, one image also under male
        source = root / "female" / f"female_{i:04d}.jpg"
        target = root / ("male" if i == 11 else "female") / f"copy_{i:02d}.jpg"
        target.write_bytes(source.read_bytes())
    (root / "female" / "third_00.jpg").write_bytes((root / "female" / "female_0000.jpg").read_bytes())
    caplog.set_level(logging.ERROR, logger="gender_tasks")
    with pytest.raises(IngestError) as exc:
        ingest_folder(root, local_storage)
    message = str(exc.value)
    assert message.startswith("12 image(s) appear more than once, nothing was written: ")
    assert "(and 2 more; all 12 are listed in the log above). Delete the copies, keeping one of each" in message
    assert message.count(" are the same image") == 10
    logged = _logged(caplog, "repeated image")
    assert len(logged) == 12 and all(line.startswith("repeated image ") and " of 12: " in line for line in logged)
    assert any("female_0000.jpg (female), " in line and "third_00.jpg (female)" in line for line in logged)
    assert any("copy_11.jpg (male) are the same image under both labels" in line for line in logged)
    assert_nothing_written(local_storage)


def test_many_refused_files_are_all_named_in_the_log(tmp_path, local_storage, caplog):
    root = write_dataset(tmp_path / "d", 4)
    for i in range(13):
        (root / "female" / f"broken_{i:02d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for i in range(11):
        (root / "male" / f"notes_{i:02d}.txt").write_text("hello")
    caplog.set_level(logging.ERROR, logger="gender_tasks")
    with pytest.raises(IngestError, match=r"notes_00\.txt is not an image .*\(and 10 more: .*notes_09\.txt, and 1 "
                                          r"others; all 11 are listed in the log above\); class folders must"):  # fmt: skip
        ingest_folder(root, local_storage)
    assert [line.rsplit(": ", 1)[1] for line in _logged(caplog, "not an image")] == [
        str(root / "male" / f"notes_{i:02d}.txt") for i in range(11)
    ]
    for i in range(11):
        (root / "male" / f"notes_{i:02d}.txt").unlink()
    caplog.clear()
    with pytest.raises(IngestError, match=r"^13 file\(s\) refused, nothing was written: .*\(and 3 more; all 13 are "):
        ingest_folder(root, local_storage)
    logged = _logged(caplog, "refused file")
    assert len(logged) == 13 and "broken_12.jpg is not an image Pillow can read" in logged[-1]
    assert_nothing_written(local_storage)
