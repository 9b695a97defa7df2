"""Faulty sources fail fast, permanently and named (issue 14): a corrupt zip entry, names that would
clash in the copy (the same entry twice, a file that is also a folder, names that differ only in case),
a class folder 1,200 levels deep, a full disk while unpacking, downloading or storing, and a dead S3
source endpoint. Each ends in a PermanentError subclass (the DAG does not retry it) that names the item
as the user gave it (an entry of the zip, an S3 URL, a path below the source folder), never the
temporary copy, and leaves nothing behind: no new object in storage, no half-unpacked copy.

Disks are not filled: the write that would fail is made to fail as the kernel would (OSError ENOSPC).
The time bounds are liveness bounds (a hang, or minutes of retries), not performance claims.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import struct
import tempfile
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path

import pytest
from helpers import PER_CLASS, SENTINEL, isolate_aws_env, listing, one_image, write_dataset, zip_of
from test_storage_outages import closed_endpoint, silent_endpoint  # noqa: F401 (fixtures)

from gender_tasks import layout, pipeline
from gender_tasks.data import ingest as ingest_mod
from gender_tasks.data import sources
from gender_tasks.data.folders import MAX_DEPTH, IngestError, name_problem
from gender_tasks.data.ingest import ingest_folder
from gender_tasks.data.manifest import read_manifest
from gender_tasks.data.sources import SourceError, safe_extract_zip
from gender_tasks.errors import PermanentError
from gender_tasks.storage import DiskFullError, LocalStorage, StorageError, open_storage
from gender_tasks.storage import local as storage_mod

BOUND_S = 30  # the bound for every refusal: a liveness check, not a benchmark
TEMP_MARKS = ("gender-ingest-", "gender-src-")


def refused(run: dict, error: type[Exception], says: str) -> Exception:
    """pipeline.ingest(run) raises `error` matching `says`, within BOUND_S, naming no temporary copy."""
    started = time.monotonic()
    with pytest.raises(error, match=says) as err:
        pipeline.ingest(run)
    elapsed = time.monotonic() - started
    assert isinstance(err.value, PermanentError)  # the DAG fails it without retries
    assert elapsed < BOUND_S, f"refused only after {elapsed:.0f} s"
    assert not any(mark in str(err.value) for mark in TEMP_MARKS), f"a temporary path in: {err.value}"
    return err.value


def flip_a_byte_of(archive: Path, name: str) -> None:
    """Corrupt the stored data of entry `name` in place: its CRC-32 no longer matches."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    raw = bytearray(archive.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))


@pytest.fixture
def faces(tmp_path) -> Path:
    return write_dataset(tmp_path / "faces", PER_CLASS, size=40)


@pytest.fixture
def store(local_storage) -> LocalStorage:
    local_storage.put_bytes(SENTINEL, b"from an earlier run")
    return local_storage


def run_for(source: str, storage) -> dict:
    return pipeline.prepare({"source": source, "storage": storage.uri})


# --- zip entries: corrupt, twice, clashing ----------------------------------------------------------


def test_zip_entry_with_a_bad_crc_is_named_and_nothing_is_unpacked(faces, tmp_path, store):
    archive = zip_of(faces, tmp_path / "faces.zip")  # ZIP_STORED: the member bytes lie as they are
    flip_a_byte_of(archive, "female/female_0003.jpg")
    before = listing(store)
    says = rf"entry 'female/female_0003\.jpg' of {re.escape(str(archive))} is corrupt \(Bad CRC-32"
    refused(run_for(str(archive), store), SourceError, says + ".*re-download or re-create")
    assert listing(store) == before
    # unpacked entry by entry, the CRC checked as each is written: what was unpacked is removed again
    with pytest.raises(SourceError, match=says):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "members, says",
    [
        ((("female/a.jpg", 1), ("female/a.jpg", 2)), r"entry 'female/a\.jpg' of \S+ is in the archive 2 times"),
        ((("female/a.jpg", 1), ("female/a.jpg/b.jpg", 2)), r"entry 'female/a\.jpg' of \S+ is both a file and a folder"),
        ((("female/a.jpg", 1), ("female/A.JPG", 2)), r"entry 'female/A\.JPG' of \S+ and .*differ only in case"),
        ((("female/a.jpg", 1), ("Female/b.jpg", 2)), r"entry 'Female' of \S+ and entry 'female' of .*differ only in case"),
        ((("female/./a.jpg", 1), ("female/b.jpg", 2)), r"entry 'female/\./a\.jpg' of \S+ has empty, '\.' or '\.\.' parts"),
    ],
    ids=["the same name twice", "a file that is also a folder", "names in two cases", "class folders in two cases",
         "a '.' part"],
)  # fmt: skip
def test_zip_entries_that_would_clash_in_the_copy_are_refused_by_name(members, says, faces, tmp_path, store):
    images = [p.read_bytes() for p in sorted((faces / "female").iterdir())]
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(faces.rglob("*.jpg")):
            zf.write(p, "x/" + p.relative_to(faces).as_posix())  # a valid dataset, one wrapping folder down
        with pytest.warns(UserWarning, match="Duplicate name") if members[0][0] == members[1][0] else nullcontext():
            for name, i in members:
                zf.writestr("x/" + name, images[i])
    before = listing(store)
    refused(run_for(str(archive), store), SourceError, says.replace("entry '", "entry 'x/"))
    assert listing(store) == before


def test_s3_keys_that_would_clash_in_the_copy_are_refused_by_url(s3_bucket, faces, tmp_path, local_storage):
    client = open_storage(f"s3://{s3_bucket}").client
    for p in sorted(faces.rglob("*.jpg")):
        client.put_object(Bucket=s3_bucket, Key=f"faces/{p.relative_to(faces).as_posix()}", Body=p.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="faces/male/x.jpg", Body=one_image(faces))
    client.put_object(Bucket=s3_bucket, Key="faces/male/x.jpg/y.jpg", Body=one_image(faces))
    refused(run_for(f"s3://{s3_bucket}/faces", local_storage), SourceError,
            rf"s3://{s3_bucket}/faces/male/x\.jpg is both a file and a folder \(beside s3://{s3_bucket}/faces/male/"
            r"x\.jpg/y\.jpg\): one of them cannot be copied; rename or remove the object")  # fmt: skip
    client.delete_object(Bucket=s3_bucket, Key="faces/male/x.jpg/y.jpg")
    client.put_object(Bucket=s3_bucket, Key="faces/male/X.jpg", Body=one_image(faces))
    refused(run_for(f"s3://{s3_bucket}/faces", local_storage), SourceError,
            rf"s3://{s3_bucket}/faces/male/X\.jpg and s3://{s3_bucket}/faces/male/x\.jpg differ only in case")  # fmt: skip
    assert local_storage.list("") == []


# --- a scan of a copy names the items as the user knows them ---------------------------------------


def test_refusals_in_a_zip_or_s3_copy_name_the_entry_or_object(faces, tmp_path, local_storage, s3_bucket):
    data = one_image(faces)
    (faces / "female" / "cut.jpg").write_bytes(data[: len(data) // 2])
    archive = zip_of(faces, tmp_path / "faces.zip")
    refused(run_for(str(archive), local_storage), IngestError,
            rf"entry 'female/cut\.jpg' of {archive} does not decode .*truncated or corrupt")  # fmt: skip
    client = open_storage(f"s3://{s3_bucket}").client
    for p in sorted(faces.rglob("*.jpg")):
        client.put_object(Bucket=s3_bucket, Key=f"src/{p.relative_to(faces).as_posix()}", Body=p.read_bytes())
    refused(run_for(f"s3://{s3_bucket}/src", local_storage), IngestError,
            rf"s3://{s3_bucket}/src/female/cut\.jpg does not decode")  # fmt: skip
    (faces / "female" / "cut.jpg").unlink()
    out = pipeline.ingest(run_for(str(zip_of(faces, tmp_path / "good.zip")), local_storage))["dataset"]
    assert out["source_root"] == str(tmp_path / "good.zip")  # the report names the zip, not its copy


# --- depth -------------------------------------------------------------------------------------------


def _remove_chain(base: Path) -> None:
    """Remove the chain of folders "d" below `base` without recursing down it (shutil.rmtree recurses
    once a level, so pytest's own clean-up of its temporary folders would fail on it): the second link
    is moved up beside the first, the first (now shallow) removed, and so on."""
    link = base / "d"
    while (link / "d").is_dir():
        os.rename(link / "d", base / "d.next")
        shutil.rmtree(link)
        os.rename(base / "d.next", link)
    shutil.rmtree(link, ignore_errors=True)


@pytest.fixture
def deep_folder():
    """`make(base, levels)`: `levels` nested folders "d" below `base` (a path relative to a temporary
    folder of its own, outside pytest's, which this fixture removes again), made one level at a time
    through directory descriptors: pathlib's and os.makedirs' recursion would not reach the bottom.
    About 2 characters a level, so the whole path stays under PATH_MAX."""
    home = Path(tempfile.mkdtemp(prefix="deep-source-"))
    made: list[Path] = []

    def make(base: str, levels: int) -> Path:
        base_path = home / base
        base_path.mkdir(parents=True, exist_ok=True)
        made.append(base_path)
        fd = os.open(base_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(levels):
                os.mkdir("d", dir_fd=fd)
                fd, parent = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
                os.close(parent)
        finally:
            os.close(fd)
        deepest = Path(os.path.join(base_path, *["d"] * levels))
        assert len(os.fsencode(deepest)) < 4000 and deepest.is_dir()
        return deepest

    yield make
    for base in made:
        _remove_chain(base)
    shutil.rmtree(home)


def test_a_class_folder_1200_levels_deep_is_refused_unread(deep_folder, faces, store):
    deepest = deep_folder("faces/female", 1200)
    shutil.copytree(faces, deepest.parents[1199].parent, dirs_exist_ok=True)  # a valid dataset around it
    source = deepest.parents[1199].parent
    (deepest / "deep.jpg").write_bytes(one_image(faces))
    before = listing(store)
    err = refused(run_for(str(source), store), IngestError,
                  rf"female(/d){{{MAX_DEPTH + 1}}} is more than {MAX_DEPTH} folders below its class folder: refused "
                  "unread")  # fmt: skip
    assert len(str(err)) < 2_000  # names the first level too deep, not the 1,200 below it
    assert listing(store) == before


def test_a_chain_of_1200_wrapping_folders_is_refused(deep_folder, store):
    deepest = deep_folder("src", 1200)
    write_dataset(deepest, PER_CLASS, size=40)
    refused(run_for(str(deepest.parents[1199]), store), IngestError,
            rf"src holds only a chain of more than {MAX_DEPTH} single folders .*point the source at the folder")  # fmt: skip


def test_a_zip_entry_1200_levels_deep_is_refused_before_unpacking(faces, tmp_path, store):
    archive = zip_of(faces, tmp_path / "faces.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("female/" + "d/" * 1200 + "deep.jpg", one_image(faces))
    refused(run_for(str(archive), store), SourceError,
            rf"entry 'female/d/d/\S*…' of {archive} is 1201 folders deep, more than any dataset needs")  # fmt: skip


# --- a full disk -------------------------------------------------------------------------------------


class _FullDisk(io.FileIO):
    """A file on a disk that fills up: its first write stores half the bytes, then fails as the kernel does."""

    def write(self, data) -> int:
        super().write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)


def fill_the_disk_after(monkeypatch, module, files: int) -> list[str]:
    """`module`'s open() writes `files` files, then the disk is full; returns the paths opened for writing."""
    opened: list[str] = []

    def fake_open(path, mode="r", *args, **kwargs):
        if "x" not in mode and "w" not in mode:
            return open(path, mode, *args, **kwargs)
        opened.append(str(path))
        if len(opened) <= files:
            return open(path, mode, *args, **kwargs)
        return _FullDisk(path, mode.replace("b", ""))

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    return opened


def test_a_full_disk_while_unpacking_names_the_temporary_folder_and_leaves_no_copy(faces, tmp_path, store,
                                                                                     monkeypatch):  # fmt: skip
    archive = zip_of(faces, tmp_path / "faces.zip")
    opened = fill_the_disk_after(monkeypatch, sources, files=5)
    before = listing(store)
    tmp_root = Path(tempfile.gettempdir()).resolve()
    refused(run_for(str(archive), store), DiskFullError,
            rf"the temporary folder {tmp_root} used to unpack the source is full \(its disk has no space left: "
            r"\S+ \S+ free, about [\d.]+ (bytes|kB|MB) more needed\); free space there, or set TMPDIR")  # fmt: skip
    assert len(opened) == 6 and listing(store) == before
    assert not Path(opened[0]).exists() and not Path(opened[0]).parents[1].exists()  # the copy is gone

    opened.clear()
    with pytest.raises(DiskFullError):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-unpacked


def test_a_full_disk_while_downloading_an_s3_source(s3_bucket, faces, tmp_path, monkeypatch):
    client = open_storage(f"s3://{s3_bucket}").client
    for p in sorted(faces.rglob("*.jpg")):
        client.put_object(Bucket=s3_bucket, Key=f"faces/{p.relative_to(faces).as_posix()}", Body=p.read_bytes())
    fill_the_disk_after(monkeypatch, sources, files=3)
    with pytest.raises(DiskFullError, match=r"the temporary folder \S+ used to download the source is full") as err:
        sources.resolve_source(f"s3://{s3_bucket}/faces", tmp_path / "work" / "w")
    assert "TMPDIR" in str(err.value) and not (tmp_path / "work" / "w" / "remote").exists()


class _OsWithAFullDisk:
    """The os module as storage/local.py sees it, with a disk that is full after `files` files are written."""

    def __init__(self, files: int):
        self.files, self.written = files, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode="r", *args, **kwargs):
        self.written += 1
        if self.written > self.files:
            return _FullDisk(fd, "w")
        return os.fdopen(fd, mode, *args, **kwargs)

    def link(self, src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))


def test_a_full_storage_disk_during_ingest_removes_what_this_ingest_wrote(faces, local_storage, monkeypatch):
    # an earlier attempt stopped (a retryable error) after 5 images: those stay, a retry resumes from them
    real_put = LocalStorage.put_bytes
    puts = []

    def blip_after_5(self, key, data):
        if "/images/" in key:  # images only: no other object the ingest may write (a lease) counts
            if len(puts) == 5:
                raise StorageError("connection reset (simulated)")
            puts.append(key)
        real_put(self, key, data)

    monkeypatch.setattr(LocalStorage, "put_bytes", blip_after_5)
    with pytest.raises(StorageError, match="simulated"):
        ingest_folder(faces, local_storage, upload_workers=1)
    monkeypatch.setattr(LocalStorage, "put_bytes", real_put)
    before = local_storage.list("datasets/")
    assert len(before) == 5 and before == sorted(puts)

    full = _OsWithAFullDisk(files=1 + 4)  # the storage check's probe, then (about) 4 images
    monkeypatch.setattr(storage_mod, "os", full)
    started = time.monotonic()
    with pytest.raises(DiskFullError) as err:
        ingest_folder(faces, local_storage, upload_workers=2)
    assert time.monotonic() - started < BOUND_S
    text = str(err.value)
    dataset_id = before[0].split("/")[1]
    assert f"the storage folder {local_storage.root} is full (its disk has no space left: " in text
    assert "free space on that disk, or choose other storage" in text
    assert f"Ingesting dataset {dataset_id} needs about " in text and " kB there in all" in text
    removed = re.search(
        r"The (\d+) object\(s\) this ingest had written were removed again: nothing is left half-written", text
    )
    assert removed and int(removed[1]) >= 1, text  # 4, less any other write the ingest makes first
    assert "fix its permissions" not in text
    assert local_storage.list("datasets/") == before  # no orphan, and the earlier attempt's objects kept
    assert not [p for p in local_storage.root.rglob("*.part")]  # no temporary file either
    assert not local_storage.exists(layout.manifest_key(dataset_id))

    monkeypatch.setattr(storage_mod, "os", os)
    out = ingest_folder(faces, local_storage)  # with room again, it completes
    assert (
        out["uploaded"] == 2 * PER_CLASS - 5
        and read_manifest(local_storage, layout.manifest_key(dataset_id)).shape[0] == 2 * PER_CLASS
    )


def test_a_full_storage_disk_at_the_check_or_a_copy_says_so(local_storage, monkeypatch):
    local_storage.put_bytes("a/k.txt", b"x" * 100)
    monkeypatch.setattr(storage_mod, "os", _OsWithAFullDisk(files=0))
    says = rf"the storage folder {local_storage.root} is full .*about \d+ bytes more needed"
    with pytest.raises(DiskFullError, match=says):
        local_storage.check()  # not "fix its permissions"
    with pytest.raises(DiskFullError, match=says):
        local_storage.copy("a/k.txt", "b/k.txt")
    with pytest.raises(DiskFullError, match=says):
        local_storage.put_bytes("c/k.txt", b"y")
    monkeypatch.setattr(storage_mod, "os", os)
    assert local_storage.list("") == ["a/k.txt"] and not [p for p in local_storage.root.rglob(".*.part")]


def test_a_file_changing_during_upload_leaves_no_orphan(faces, local_storage, monkeypatch):
    loads = []
    real_load = ingest_mod._load

    def edit_after_6(item, max_bytes):
        loads.append(item)
        if len(loads) == 7:
            item.path.write_bytes(b"edited")
        return real_load(item, max_bytes)

    monkeypatch.setattr(ingest_mod, "_load", edit_after_6)
    # 6 written before the edited image, and more: the upload thread goes on until the failure stops it
    with pytest.raises(IngestError, match=r"changed while it was being ingested.*The \d+ object\(s\) this ingest had "
                       r"written were removed again"):  # fmt: skip
        ingest_folder(faces, local_storage, upload_workers=1)
    assert local_storage.list("") == []


# --- a dead S3 source endpoint ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["closed_endpoint", "silent_endpoint"])
def test_a_dead_s3_source_endpoint_is_a_source_error_within_the_bound(endpoint, request, monkeypatch, tmp_path,
                                                                      local_storage):  # fmt: skip
    url = request.getfixturevalue(endpoint)
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")  # default attempts and timeouts
    err = refused(run_for("s3://faces-bucket/faces", local_storage), SourceError,
                  rf"the S3 source s3://faces-bucket/faces cannot be read: cannot reach S3 for s3://faces-bucket/faces "
                  rf"\(endpoint {url}\).*AWS_ENDPOINT_URL")  # fmt: skip
    assert not isinstance(err, StorageError)
    assert local_storage.list("") == []


# --- names: emoji sequences accepted, characters that hide or reorder text refused ----------------


def test_emoji_sequences_in_names_are_accepted(tmp_path, local_storage):
    faces = write_dataset(tmp_path / "faces", PER_CLASS, size=40)
    (faces / "female" / "female_0000.jpg").rename(faces / "female" / "👩\u200d🔬.jpg")
    (faces / "male" / "male_0000.jpg").rename(faces / "male" / "❤\ufe0f\u200d🔥 mehr.jpg")
    (faces / "male" / "🧪\u200d🧪").mkdir()
    (faces / "male" / "male_0001.jpg").rename(faces / "male" / "🧪\u200d🧪" / "ی\u200cی.jpg")
    out = pipeline.ingest(run_for(str(faces), local_storage))["dataset"]
    names = set(read_manifest(local_storage, layout.manifest_key(out["dataset_id"]))["source_path"])
    assert {"female/👩\u200d🔬.jpg", "male/❤\ufe0f\u200d🔥 mehr.jpg", "male/🧪\u200d🧪/ی\u200cی.jpg"} <= names


@pytest.mark.parametrize(
    "name, says",
    [
        ("cod\u202egpj.exe.jpg", r"bidirectional-text control.*\(U\+202E RIGHT-TO-LEFT OVERRIDE\)"),
        ("a\u2066b.jpg", r"bidirectional-text control.*\(U\+2066 LEFT-TO-RIGHT ISOLATE\)"),
        ("a\u200bb.jpg", r"invisible formatting character in its name \(U\+200B ZERO WIDTH SPACE\)"),
        ("a\u200db.jpg", r"joiners are accepted only between two non-ASCII characters"),
        ("bell\x07.jpg", r"has control characters .*\(U\+0007\): rename it"),
        ("del\x7f.jpg", r"has control characters .*\(U\+007F\): rename it"),
    ],
)
def test_names_with_hiding_or_control_characters_are_refused(name, says, tmp_path, local_storage):
    faces = write_dataset(tmp_path / "faces", PER_CLASS, size=40)
    (faces / "female" / "female_0000.jpg").rename(faces / "female" / name)
    refused(run_for(str(faces), local_storage), IngestError, says)
    assert local_storage.list("") == []


def test_name_problem_keeps_refusing_what_it_refused():
    for bad in ("two\nlines.jpg", "tab\t.jpg", "nul\x00.jpg", "line\u2028sep.jpg", "soft\u00adhyphen.jpg",
                "\u200d.jpg", "bom\ufeff.jpg", "tag\U000e0041.jpg"):  # fmt: skip
        assert name_problem(bad), bad
    for good in ("face.jpg", "café.jpg", "👩\u200d🔬.jpg", "❤️.jpg", "👍🏽.jpg", "1️⃣.jpg", "नमस्ते.jpg"):
        assert name_problem(good) == "", good
