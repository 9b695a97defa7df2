import io
import zipfile

import pytest
from conftest import write_dataset

from gender_tasks.ingest import IngestError, find_class_dirs, ingest_folder, manifest_key, read_manifest
from gender_tasks.sources import SourceError, resolve_source, safe_extract_zip


def test_ingest_writes_images_and_manifest_content_addressed(dataset_dir, local_storage):
    out = ingest_folder(dataset_dir, local_storage)
    assert out["images"] == 40 and out["uploaded"] == 40
    manifest = read_manifest(local_storage, manifest_key(out["dataset_id"]))
    assert set(manifest.columns) >= {"key", "label", "sha256", "bytes", "width", "height", "format", "source_path"}
    assert manifest["label"].value_counts().to_dict() == {"female": 20, "male": 20}
    for row in manifest.itertuples():
        assert row.sha256 in row.key and local_storage.exists(row.key)
    assert (manifest["width"] == 48).all() and (manifest["format"] == "jpeg").all()


def test_reingest_is_a_noop_with_the_same_id(dataset_dir, local_storage):
    first = ingest_folder(dataset_dir, local_storage)
    second = ingest_folder(dataset_dir, local_storage)
    assert second["dataset_id"] == first["dataset_id"] and second["uploaded"] == 0


def test_different_content_gets_a_different_id(tmp_path, local_storage):
    a = ingest_folder(write_dataset(tmp_path / "a", 5, seed=1), local_storage)
    b = ingest_folder(write_dataset(tmp_path / "b", 5, seed=2), local_storage)
    assert a["dataset_id"] != b["dataset_id"]


def test_class_folders_any_case_below_one_wrapping_folder(tmp_path, local_storage):
    root = tmp_path / "kaggle"
    write_dataset(root / "ThisPersonDoesNotExist", 4, folder_names={"female": "Female", "male": "MALE"})
    (root / "ThisPersonDoesNotExist" / "README.txt").write_text("not an image, outside the class folders")
    assert set(find_class_dirs(root)) == {"female", "male"}
    assert ingest_folder(root, local_storage)["images"] == 8


def test_unknown_class_folder_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", 3)
    (root / "Unknown").mkdir()
    with pytest.raises(IngestError, match=r"unknown class folder.*Unknown.*rename or remove"):
        find_class_dirs(root)


def test_non_image_file_is_named(tmp_path, local_storage):
    root = write_dataset(tmp_path / "d", 3)
    (root / "male" / "notes.txt").write_text("hello")
    with pytest.raises(IngestError, match=r"notes\.txt is not an image.*move or delete"):
        ingest_folder(root, local_storage)
    assert local_storage.list("") == []  # nothing half-written


def test_empty_class_is_named(tmp_path, local_storage):
    root = write_dataset(tmp_path / "d", {"female": 3, "male": 0})
    (root / "male").mkdir(exist_ok=True)
    with pytest.raises(IngestError, match=r"male holds no images"):
        ingest_folder(root, local_storage)
    assert local_storage.list("") == []


def test_undecodable_image_is_recorded_for_validation(tmp_path, local_storage):
    root = write_dataset(tmp_path / "d", 3)
    (root / "female" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    out = ingest_folder(root, local_storage)
    manifest = read_manifest(local_storage, manifest_key(out["dataset_id"]))
    bad = manifest[manifest["source_path"] == "female/broken.jpg"].iloc[0]
    assert str(bad["decodable"]) == "False" and bad["error"]


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

    from gender_tasks import sources

    root = write_dataset(tmp_path / "kaggle-cache" / "ThisPersonDoesNotExist", 2,
                         folder_names={"female": "Female", "male": "Male"})  # fmt: skip
    calls = []
    monkeypatch.setattr(sources, "check_kaggle_reachable", lambda timeout=5.0: None)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: calls.append(handle) or str(root.parent))
    path = resolve_source("kaggle:bwandowando/all-these-people-dont-exist")
    assert calls == ["bwandowando/all-these-people-dont-exist"]
    assert set(find_class_dirs(path)) == {"female", "male"}
