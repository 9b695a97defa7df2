"""Hostile sources (issue 14): each is refused by `pipeline.ingest` with a PermanentError (so the DAG
does not retry it) that names the offending file and the fix, within seconds, leaving no new object
in storage: every case on a local folder, and one of each kind on an S3 server (S3_CASES).

A case is `build(root, tmp_path, monkeypatch) -> (source, settings overrides)`; `root` already holds
a valid dataset (8 faces per class, enough for the 70/15/15 split) that the case then spoils.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import PER_CLASS, SENTINEL, listing, make_face, one_image, png_claiming, write_dataset, zip_of

from gender_tasks import pipeline
from gender_tasks.data.manifest import read_manifest
from gender_tasks.errors import PermanentError
from gender_tasks.layout import manifest_key

SECONDS = 20  # a correctness bound, not a benchmark: a hang (a FIFO opened) would never end


# --- point 3: source files are trusted ------------------------------------------------------------


def fifo(root, tmp, mp):
    os.mkfifo(root / "female" / "pipe.jpg")  # opening it would block forever
    return str(root), {}


def socket_file(root, tmp, mp):
    os.mknod(root / "male" / "sock.jpg", stat.S_IFSOCK | 0o600)
    return str(root), {}


def link_to_dev_zero(root, tmp, mp):
    (root / "female" / "zero.jpg").symlink_to("/dev/zero")  # would read forever
    return str(root), {}


def link_to_text_outside(root, tmp, mp):
    (tmp / "secret.txt").write_text("password=hunter2")
    (root / "female" / "secret.jpg").symlink_to(tmp / "secret.txt")
    return str(root), {}


def linked_subfolder_outside(root, tmp, mp):
    write_dataset(tmp / "elsewhere", {"female": 2}, seed=7)
    (root / "female" / "more").symlink_to(tmp / "elsewhere" / "female")
    return str(root), {}


def linked_class_folder_outside(root, tmp, mp):
    write_dataset(tmp / "elsewhere", {"male": PER_CLASS}, seed=7)
    shutil.rmtree(root / "male")
    (root / "male").symlink_to(tmp / "elsewhere" / "male")
    return str(root), {}


def link_loop(root, tmp, mp):
    (root / "female" / "loop").symlink_to(root / "female")
    return str(root), {}


def case_colliding_classes(root, tmp, mp):
    write_dataset(root, {"female": 2}, folder_names={"female": "Female"}, seed=7)
    return str(root), {}


def file_over_the_size_limit(root, tmp, mp):
    (root / "male" / "huge.jpg").write_bytes(one_image(root) + b"\0" * 60_000)
    return str(root), {"max_file_bytes": 50_000}


def source_over_the_total_limit(root, tmp, mp):
    return str(root), {"max_source_bytes": 10_000}


# --- point 4: raw errors, retried, with data left behind -----------------------------------------


def non_utf8_name(root, tmp, mp):
    (Path(os.fsdecode(os.fsencode(root / "female") + b"/caf\xe9.jpg"))).write_bytes(one_image(root)[:-1])
    return str(root), {}


def control_character_name(root, tmp, mp):
    (root / "male" / "two\nlines.jpg").write_bytes(one_image(root)[:-1])
    return str(root), {}


def labels_ragged(root, tmp, mp):
    (root / "labels.csv").write_text("file,age\nfemale/female_0000.jpg,31\nfemale/female_0001.jpg,45,extra\n")
    return str(root), {}


def labels_short_row(root, tmp, mp):
    (root / "labels.csv").write_text("file,age,ethnicity\nfemale/female_0000.jpg,31,a\nfemale/female_0001.jpg\n")
    return str(root), {}


def labels_latin1(root, tmp, mp):
    (root / "labels.csv").write_bytes("file,city\nfemale/female_0000.jpg,Malmö\n".encode("latin-1"))
    return str(root), {}


def labels_link_outside(root, tmp, mp):
    (tmp / "other.csv").write_text("file,age\n")
    (root / "labels.csv").symlink_to(tmp / "other.csv")
    return str(root), {}


def empty_zip(root, tmp, mp):
    with zipfile.ZipFile(tmp / "empty.zip", "w"):
        pass
    return str(tmp / "empty.zip"), {}


def ten_thousand_copies(root, tmp, mp):
    shutil.rmtree(root / "male")
    (root / "male").mkdir()
    make_face("male", np.random.default_rng(3), 32).save(root / "male" / "m.jpg", "JPEG")
    for i in range(10_000):
        os.link(root / "male" / "m.jpg", root / "male" / f"copy_{i:05d}.jpg")  # the same bytes, fast
    return str(root), {}


def too_few_distinct_images(root, tmp, mp):
    for p in sorted((root / "male").iterdir())[3:]:
        p.unlink()
    return str(root), {}


def same_image_in_both_classes(root, tmp, mp):
    (root / "male" / "also_male.jpg").write_bytes(one_image(root))
    return str(root), {}


def truncated_jpeg(root, tmp, mp):
    data = one_image(root)
    (root / "female" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return str(root), {}


def zero_bytes(root, tmp, mp):
    (root / "male" / "empty.jpg").write_bytes(b"")
    return str(root), {}


def text_as_jpg(root, tmp, mp):
    (root / "female" / "notes.jpg").write_text("this is not a picture\n")
    return str(root), {}


def one_pixel(root, tmp, mp):
    make_face("male", np.random.default_rng(5), 1).save(root / "male" / "dot.png", "PNG")
    return str(root), {}


# --- point 5: archives that would fill the disk ---------------------------------------------------


def zip_over_the_total_limit(root, tmp, mp):
    return str(zip_of(root, tmp / "faces.zip")), {"max_source_bytes": 20_000}


def zip_larger_than_the_free_disk(root, tmp, mp):
    from gender_tasks.data import sources

    mp.setattr(sources.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 5_000, 5_000))
    return str(zip_of(root, tmp / "faces.zip")), {}


# --- refused before this issue: kept refused, now on both storages --------------------------------


def zip_slip(root, tmp, mp):
    with zipfile.ZipFile(tmp / "evil.zip", "w") as zf:
        zf.writestr("female/ok.jpg", one_image(root))
        zf.writestr("female/../../../../tmp/evil.jpg", b"x")
    return str(tmp / "evil.zip"), {}


def zip_bomb(root, tmp, mp):
    with zipfile.ZipFile(tmp / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("female/a.jpg", b"\0" * (5 * 1024 * 1024))
    return str(tmp / "bomb.zip"), {}


def not_a_zip(root, tmp, mp):
    (tmp / "faces.zip").write_bytes(b"PK not really")
    return str(tmp / "faces.zip"), {}


def pixel_bomb(root, tmp, mp):
    (root / "female" / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    return str(root), {}


def unknown_class_folder(root, tmp, mp):
    write_dataset(root, {"female": 2}, folder_names={"female": "other"}, seed=7)
    return str(root), {}


def not_an_image(root, tmp, mp):
    (root / "male" / "notes.txt").write_text("hello")
    return str(root), {}


def empty_class(root, tmp, mp):
    shutil.rmtree(root / "male")
    (root / "male").mkdir()
    return str(root), {}


def dangling_link(root, tmp, mp):
    (root / "male" / "gone.jpg").symlink_to(root / "male" / "deleted-meanwhile.jpg")
    return str(root), {}


def missing_source(root, tmp, mp):
    return str(tmp / "nowhere"), {}


def file_not_zip(root, tmp, mp):
    return str(root / "female" / "female_0000.jpg"), {}


CASES = {
    # name: (build, what the message must say: the file, then the fix)
    "fifo": (fifo, r"female/pipe\.jpg is a FIFO \(named pipe\), not a regular file: remove it"),
    "socket": (socket_file, r"male/sock\.jpg is a socket, not a regular file: remove it"),
    "link to /dev/zero": (link_to_dev_zero, r"female/zero\.jpg is a symbolic link to /dev/zero, outside the source"),
    "link to a text file outside": (
        link_to_text_outside,
        r"female/secret\.jpg is a symbolic link to \S*/secret\.txt, "
        r"outside the source folder .*copy the file in or remove the link",
    ),
    "linked subfolder outside": (linked_subfolder_outside, r"female/more is a symbolic link to \S*elsewhere/female"),
    "linked class folder outside": (
        linked_class_folder_outside,
        r"/male is a symbolic link to \S*elsewhere/male, "
        r"outside the source folder .*point the source at the real folder",
    ),
    "link loop": (link_loop, r"female/loop leads to a folder already scanned .*remove the link"),
    "Female beside female": (case_colliding_classes, r"two folders for one class, 'Female' and 'female'.*merge them"),
    "file over the size limit": (
        file_over_the_size_limit,
        r"male/huge\.jpg is 6\d\.\d kB, over the 50\.0 kB per-file limit "
        r"\(setting max_file_bytes\).*raise max_file_bytes",
    ),
    "source over the total limit": (
        source_over_the_total_limit,
        r"faces holds \d+\.\d kB of images, over the 10\.0 kB limit \(setting max_source_bytes\)",
    ),
    "non-UTF-8 name": (non_utf8_name, r"female/caf\\xe9\.jpg has a name that is not valid UTF-8: rename it"),
    "control character in a name": (control_character_name, r"male/two\\nlines\.jpg has control characters .*rename"),
    "labels.csv ragged row": (labels_ragged, r"labels\.csv line 3 has 3 fields, the header has 2: fix that row"),
    "labels.csv short row": (labels_short_row, r"labels\.csv line 3 has 1 fields, the header has 3: fix that row"),
    "labels.csv in latin-1": (labels_latin1, r"labels\.csv line 2 is not UTF-8 \(byte 0xf6\): re-save it as UTF-8"),
    "labels.csv linked from outside": (labels_link_outside, r"labels\.csv is a symbolic link to \S*other\.csv"),
    "empty zip": (empty_zip, r"empty\.zip holds no files; zip the folder that has female/ and male/"),
    "10,000 copies of one image": (
        ten_thousand_copies,
        r"male/\S+\.jpg \(male\), .* and 9,998 more copies are the "
        r"same image.*Delete the copies",
    ),
    "too few distinct images": (
        too_few_distinct_images,
        r"too few distinct images .*male 3.*needs at least 5 per "
        r"class.*add images",
    ),
    "one image in both classes": (
        same_image_in_both_classes,
        r"female/female_0001\.jpg \(female\), \S*male/also_male"
        r"\.jpg \(male\) are the same image under both labels",
    ),
    "truncated jpeg": (truncated_jpeg, r"female/cut\.jpg does not decode .*truncated or corrupt; replace it"),
    "zero bytes": (zero_bytes, r"male/empty\.jpg is empty \(0 bytes\): remove it"),
    "text as jpg": (text_as_jpg, r"female/notes\.jpg is not an image Pillow can read .*remove or replace it"),
    "1x1 image": (one_pixel, r"male/dot\.png is 1x1 px, under the 32 px minimum .*lower min_image_side"),
    "zip over the total limit": (
        zip_over_the_total_limit,
        r"faces\.zip would expand to \d+\.\d kB, over the 20\.0 kB limit "
        r"\(setting max_source_bytes\): refused before a byte was written",
    ),
    "zip larger than the free disk": (
        zip_larger_than_the_free_disk,
        r"faces\.zip would expand to \d+\.\d kB but \S+ has 5\.0 kB free .*"
        r"refused before a byte was written; free disk space",
    ),
    "zip slip": (zip_slip, r"female/\.\./\.\./\.\./\.\./tmp/evil\.jpg.*outside the target folder"),
    "zip bomb": (zip_bomb, r"female/a\.jpg.*expands \d+x .*decompression bomb"),
    "not a zip": (not_a_zip, r"faces\.zip is not a readable zip file"),
    "pixel bomb": (pixel_bomb, r"female/bomb\.png is refused undecoded as a decompression bomb"),
    "unknown class folder": (unknown_class_folder, r"unknown class folder.*'other'.*rename or remove"),
    "not an image": (not_an_image, r"male/notes\.txt is not an image.*move or delete it"),
    "empty class": (empty_class, r"male holds no images; every class needs at least one"),
    "dangling link": (dangling_link, r"male/gone\.jpg cannot be read \(No such file or directory\)"),
    "missing source": (missing_source, r"nowhere' does not exist. Give a folder with female/ and male/"),
    "file that is not a zip": (file_not_zip, r"female_0000\.jpg' is a file but not a \.zip; give a folder or a zip"),
}


# On S3 too, one case for each way the scan refuses (what the walk meets, a file's bytes or decoding, an archive,
# the labels file, a limit, the whole set's content): the refusal comes from the source's scan, before the
# storage is written, so the other cases would repeat the same storage calls (a lease, its removal, a listing).
S3_CASES = ("fifo", "link to a text file outside", "truncated jpeg", "pixel bomb", "zip slip",
            "labels.csv ragged row", "source over the total limit", "too few distinct images")  # fmt: skip


@pytest.mark.timeout(SECONDS * 3)  # the hang guard: a FIFO opened for reading would block forever
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_source_is_refused_up_front(case, local_storage, tmp_path, monkeypatch):
    _refused_up_front(case, local_storage, tmp_path, monkeypatch)


@pytest.mark.slow  # a moto S3 server
@pytest.mark.timeout(SECONDS * 3)
@pytest.mark.parametrize("case", S3_CASES)
def test_hostile_source_is_refused_up_front_on_s3(case, s3_storage, tmp_path, monkeypatch):
    _refused_up_front(case, s3_storage, tmp_path, monkeypatch)


def _refused_up_front(case, storage, tmp_path, monkeypatch):
    build, says = CASES[case]
    root = write_dataset(tmp_path / "faces", PER_CLASS, size=40)
    source, overrides = build(root, tmp_path, monkeypatch)
    storage.put_bytes(SENTINEL, b"from an earlier run")
    before = listing(storage)
    run = pipeline.prepare({"source": source, "storage": storage.uri, **overrides})
    started = time.monotonic()
    with pytest.raises(PermanentError, match=says) as err:  # PermanentError: the DAG fails it without retries
        pipeline.ingest(run)
    elapsed = time.monotonic() - started
    assert listing(storage) == before, "a refusal must leave no new object"
    assert elapsed < SECONDS, f"refused only after {elapsed:.0f} s"
    assert "\udc80" not in str(err.value) and "\x00" not in str(err.value)  # printable as it stands


# --- not refused: what the walk follows, and what it skips out loud ------------------------------


def test_symlinked_subfolder_inside_the_source_is_followed(tmp_path, local_storage):
    """Links that stay inside the source are followed, folders and files alike (as git-annex lays
    out a dataset: names in place, content under a hidden folder)."""
    root = write_dataset(tmp_path / "faces", PER_CLASS)
    write_dataset(root / ".store", {"female": 3, "male": 1}, seed=7)
    (root / "female" / "batch2").symlink_to(root / ".store" / "female")
    (root / "male" / "alias.jpg").symlink_to(root / ".store" / "male" / "male_0000.jpg")
    run = pipeline.prepare({"source": str(root), "storage": local_storage.uri})
    out = pipeline.ingest(run)["dataset"]
    manifest = read_manifest(local_storage, manifest_key(out["dataset_id"]))
    assert {f"female/batch2/female_{i:04d}.jpg" for i in range(3)} | {"male/alias.jpg"} <= set(manifest["source_path"])
    assert out["images"] == 2 * PER_CLASS + 4


def test_hidden_entries_are_skipped_and_said(tmp_path, local_storage, caplog):
    root = write_dataset(tmp_path / "faces", PER_CLASS)
    write_dataset(root / "female", {"male": 2}, seed=7, folder_names={"male": ".cache"})  # a male face, hidden
    (root / "male" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    run = pipeline.prepare({"source": str(root), "storage": local_storage.uri})
    with caplog.at_level(logging.WARNING, logger="gender_tasks.data.folders"):
        out = pipeline.ingest(run)["dataset"]
    manifest = read_manifest(local_storage, manifest_key(out["dataset_id"]))
    assert not manifest["source_path"].str.contains(r"\.cache|\.DS_Store").any() and out["images"] == 2 * PER_CLASS
    assert "skipped 2 hidden or system file(s) or folder(s)" in caplog.text and "female/.cache" in caplog.text


def test_what_macos_and_windows_write_beside_the_images_is_skipped_and_said(tmp_path, local_storage, caplog):
    # A zip made by macOS's Finder: the compressed folder beside `__MACOSX/`, which holds an AppleDouble `._`
    # twin (not an image) of every file; and a folder of pictures Windows Explorer has shown: Thumbs.db and
    # desktop.ini in the class folders. Neither is a class folder or an image: a user's source as it comes.
    folder = write_dataset(tmp_path / "finder" / "faces", PER_CLASS)
    (folder / "female" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not a picture")
    (folder / "male" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    for image in sorted((folder / "female").glob("*.jpg"))[:3]:
        twin = tmp_path / "finder" / "__MACOSX" / "faces" / "female" / f"._{image.name}"
        twin.parent.mkdir(parents=True, exist_ok=True)
        twin.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    archive = zip_of(tmp_path / "finder", tmp_path / "faces.zip")
    assert any(name.startswith("__MACOSX/") for name in zipfile.ZipFile(archive).namelist())
    for source in (archive, folder):
        caplog.clear()
        run = pipeline.prepare({"source": str(source), "storage": local_storage.uri})
        with caplog.at_level(logging.WARNING, logger="gender_tasks.data.folders"):
            out = pipeline.ingest(run)["dataset"]
        manifest = read_manifest(local_storage, manifest_key(out["dataset_id"]))
        assert out["images"] == 2 * PER_CLASS and manifest["source_path"].str.endswith(".jpg").all()
        assert "skipped 2 hidden or system file(s) or folder(s)" in caplog.text
        assert "Thumbs.db" in caplog.text and "desktop.ini" in caplog.text
        assert caplog.text.count("e.g. entry '__MACOSX' of") == (source == archive)  # said once


def test_a_dataset_at_the_root_of_a_drive_ingests_past_the_drives_own_folders(tmp_path, local_storage, caplog):
    # female/ and male/ copied to the root of a USB stick or a fresh disk, beside what the file system keeps there
    root = write_dataset(tmp_path / "drive", PER_CLASS)
    for name in ("System Volume Information", "$RECYCLE.BIN", "lost+found"):
        (root / name).mkdir()
        (root / name / "IndexerVolumeGuid").write_bytes(b"{0}")
    run = pipeline.prepare({"source": str(root), "storage": local_storage.uri})
    with caplog.at_level(logging.WARNING, logger="gender_tasks.data.folders"):
        assert pipeline.ingest(run)["dataset"]["images"] == 2 * PER_CLASS
    assert "skipped 3 hidden or system file(s) or folder(s)" in caplog.text and "lost+found" in caplog.text


@pytest.mark.slow  # runs the DAG with dag.test (3 s here)
def test_the_dag_fails_a_refusal_without_retrying(tmp_path, local_storage):
    """`_call` turns a PermanentError into AirflowFailException: Airflow fails the task, no retries."""
    import importlib.util

    from airflow.sdk.exceptions import AirflowFailException
    from helpers import REPO

    spec = importlib.util.spec_from_file_location("dag_hostile", REPO / "dags" / "gender_classification.py")
    dag_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dag_module)
    root = write_dataset(tmp_path / "faces", PER_CLASS)
    os.mkfifo(root / "male" / "pipe.jpg")
    run = pipeline.prepare({"source": str(root), "storage": local_storage.uri})
    with pytest.raises(AirflowFailException, match=r"IngestError: .*male/pipe\.jpg is a FIFO"):
        dag_module._call(pipeline.ingest, run)


def test_min_distinct_images_fill_every_split():
    from gender_tasks.data.split import _fill_splits, min_groups_per_class

    for fractions in ([0.7, 0.15, 0.15], [0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]):
        need = min_groups_per_class(fractions)
        assert set(_fill_splits([1] * need, fractions)) == {0, 1, 2}, fractions
        assert set(_fill_splits([1] * (need - 1), fractions)) != {0, 1, 2}, fractions
