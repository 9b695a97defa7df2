import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, closed_port, isolate_aws_env

from gender_tasks.errors import PermanentError
from gender_tasks.integrity import IntegrityError, sha256_hex
from gender_tasks.layout import checksum_key
from gender_tasks.storage import (
    PROBE_PREFIX,
    LocalStorage,
    Location,
    S3Storage,
    StorageConfigError,
    StorageError,
    get_recorded,
    is_remote_location,
    is_storage_location,
    local_path_of,
    open_location,
    open_storage,
    put_many,
    put_recorded,
    read_verified,
    recorded_sha256,
    register_scheme,
    unregister_scheme,
)

# --- the interface, on every backend --------------------------------------------------------------------


@pytest.fixture(params=["local", "mem", pytest.param("s3", marks=pytest.mark.slow)])  # S3 through moto: slow tier
def any_storage(request):
    """conftest's any_storage (a local folder, a bucket prefix on the moto S3 server) and the in-memory test
    backend (memory_storage.py: a new backend is one module and its scheme's registration)."""
    return request.getfixturevalue(f"{request.param}_storage")


def test_roundtrip_list_and_exists(any_storage):
    any_storage.put_bytes("a/b/c.txt", b"hello")
    any_storage.put_bytes("a/d.txt", b"x")
    any_storage.put_bytes("ab.txt", b"y")
    assert any_storage.get_bytes("a/b/c.txt") == b"hello"
    assert any_storage.exists("a/d.txt") and not any_storage.exists("a/zzz")
    assert any_storage.list("a/") == ["a/b/c.txt", "a/d.txt"]
    assert any_storage.list("a") == ["a/b/c.txt", "a/d.txt", "ab.txt"]  # a string prefix, as S3 has it
    assert any_storage.list("") == ["a/b/c.txt", "a/d.txt", "ab.txt"]
    assert any_storage.list("nothing/") == []
    any_storage.delete("a/d.txt")
    assert any_storage.list("a/") == ["a/b/c.txt"]


def test_copy_gives_the_bytes_independently_and_list_info_sizes_and_ages_them(any_storage):
    import time

    any_storage.put_bytes("a/model.ts", b"weights")
    any_storage.copy("a/model.ts", "runs/r/model.ts")
    assert any_storage.get_bytes("runs/r/model.ts") == b"weights"
    any_storage.put_bytes("a/model.ts", b"retrained")  # replacing one key leaves the copy as it was
    any_storage.delete("a/model.ts")
    assert any_storage.get_bytes("runs/r/model.ts") == b"weights"
    with pytest.raises(FileNotFoundError, match="a/model.ts"):
        any_storage.copy("a/model.ts", "runs/r2/model.ts")
    assert not any_storage.exists("runs/r2/model.ts")
    (info,) = any_storage.list_info("runs/")
    assert info.key == "runs/r/model.ts" and info.size == len(b"weights")
    assert abs(info.modified - time.time()) < 600


def test_overwrite_replaces_whole_object(any_storage):
    any_storage.put_bytes("k.bin", b"old" * 1000)
    any_storage.put_bytes("k.bin", b"new")
    assert any_storage.get_bytes("k.bin") == b"new"


def test_missing_object_names_it(any_storage):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        any_storage.get_bytes("nope.txt")


@pytest.mark.timeout(30)
def test_a_local_object_that_is_no_plain_file_is_refused_unread_and_named(local_storage):
    # No step writes these; one put where an object should be must fail its reader at once (a plain read of a FIFO
    # waits for a writer forever), named, as corrupt bytes are.
    local_storage.put_bytes("a/kept.bin", b"x")
    os.mkfifo(local_storage.local_path("a/pipe.bin"))
    local_storage.local_path("a/folder.bin").mkdir()
    with pytest.raises(
        IntegrityError, match=r"a/pipe\.bin is not a regular file but a FIFO .*it was not read.*--repair"
    ):
        local_storage.get_bytes("a/pipe.bin")
    with pytest.raises(IntegrityError, match=r"a/folder\.bin is not a regular file but a folder.*remove that folder"):
        local_storage.get_bytes("a/folder.bin")
    assert local_storage.list("a/") == ["a/kept.bin", "a/pipe.bin"]  # listed, so that verify finds it
    assert not local_storage.exists("a/pipe.bin") and local_storage.get_bytes("a/kept.bin") == b"x"


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape(any_storage, key):
    with pytest.raises(StorageError, match="invalid storage key"):
        any_storage.put_bytes(key, b"x")


def test_put_many_writes_in_parallel_lazily_and_reports_progress(any_storage):
    reads = []

    def loader(i):
        def load():
            reads.append(i)
            return f"object {i}".encode()

        return load

    seen = []
    items = [(f"many/{i:03d}.txt", loader(i)) for i in range(40)] + [("many/plain.txt", b"bytes too")]
    assert put_many(any_storage, items, workers=8, progress=lambda done, n: seen.append((done, n))) == 41
    assert sorted(reads) == list(range(40))
    assert [d for d, _ in seen] == list(range(1, 42)) and sum(n for _, n in seen) == sum(
        len(f"object {i}") for i in range(40)) + len(b"bytes too")  # fmt: skip
    assert len(any_storage.list("many/")) == 41 and any_storage.get_bytes("many/007.txt") == b"object 7"


def test_put_many_raises_the_first_failure(any_storage):
    def boom():
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        put_many(any_storage, [("x/ok.txt", b"1"), ("x/bad.txt", boom)], workers=2)
    assert not any_storage.exists("x/bad.txt")


def test_check_passes_on_usable_storage(any_storage):
    any_storage.check()
    any_storage.check(writable=False)
    assert not any(k.startswith(PROBE_PREFIX) for k in any_storage.list(""))


def test_reopened_from_its_uri_it_is_the_same_storage(any_storage):
    any_storage.put_bytes("a/k.txt", b"shared")
    again = open_location(any_storage.uri)
    assert type(again) is type(any_storage) and again.uri == any_storage.uri
    assert again.get_bytes("a/k.txt") == b"shared" and again.url("a/k.txt") == any_storage.url("a/k.txt")


def test_local_path_is_the_file_on_this_machine_or_none(any_storage):
    any_storage.put_bytes("r/report.html", b"<p>")
    path = any_storage.local_path("r/report.html")
    if isinstance(any_storage, LocalStorage):
        assert path.read_bytes() == b"<p>" and path.as_uri() == any_storage.url("r/report.html")
    else:
        assert path is None


# --- verify-on-read, the same on every backend: a sha256 sidecar beside the object ----------------------


def test_recorded_objects_have_a_sha256_sidecar_and_read_back_verified(any_storage):
    sha = put_recorded(any_storage, "d/manifest.csv", b"sha256,label\n")
    assert sha == sha256_hex(b"sha256,label\n")
    assert any_storage.get_bytes(checksum_key("d/manifest.csv")) == sha.encode() + b"\n"
    assert any_storage.list("d/") == ["d/manifest.csv", "d/manifest.csv.sha256"]
    assert recorded_sha256(any_storage, "d/manifest.csv") == sha
    assert get_recorded(any_storage, "d/manifest.csv") == b"sha256,label\n"
    assert read_verified(any_storage, "d/manifest.csv", sha) == b"sha256,label\n"


def test_corrupted_bytes_are_found_and_named_with_the_repair(any_storage):
    put_recorded(any_storage, "d/split.json", b'{"train": [1, 2]}')
    any_storage.put_bytes("d/split.json", b'{"train": [1, 3]}')  # changed in storage since
    for read in (lambda: get_recorded(any_storage, "d/split.json"),
                 lambda: read_verified(any_storage, "d/split.json", sha256_hex(b'{"train": [1, 2]}'))):  # fmt: skip
        with pytest.raises(IntegrityError, match="is corrupt") as err:
            read()
        assert any_storage.url("d/split.json") in str(err.value)
        assert f"verify --storage {any_storage.uri} --repair" in str(err.value)
    any_storage.put_bytes(checksum_key("d/split.json"), b"not a checksum\n")
    with pytest.raises(IntegrityError, match=r"the checksum record .*split\.json\.sha256 is corrupt"):
        get_recorded(any_storage, "d/split.json")


def test_objects_without_a_sidecar_read_with_a_warning_and_missing_ones_are_named(any_storage, caplog):
    any_storage.put_bytes("d/old.csv", b"a,b\n")
    assert recorded_sha256(any_storage, "d/old.csv") is None
    assert get_recorded(any_storage, "d/old.csv") == b"a,b\n"
    assert f"{any_storage.url('d/old.csv')} has no recorded checksum" in caplog.text
    with pytest.raises(FileNotFoundError, match="d/gone.csv"):
        get_recorded(any_storage, "d/gone.csv")


# --- local specifics ----------------------------------------------------------------------------


def test_local_write_is_atomic_and_leaves_no_temp_files(local_storage, monkeypatch):
    local_storage.put_bytes("k.bin", b"old")

    class Boom(Exception):
        pass

    def fail_replace(*a, **k):
        raise Boom()

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(Boom):
        local_storage.put_bytes("k.bin", b"new")
    monkeypatch.undo()
    assert local_storage.get_bytes("k.bin") == b"old"
    assert [p.name for p in local_storage.root.iterdir()] == ["k.bin"]


def test_local_list_hides_writes_in_flight(local_storage):
    local_storage.put_bytes("d/k.bin", b"x")
    (local_storage.root / "d" / ".k.bin.abc123.part").write_bytes(b"half")
    assert local_storage.list("d/") == ["d/k.bin"]


def test_local_delete_leaves_no_empty_folders_and_keeps_the_rest(local_storage):
    """As in S3, a folder is only where objects are: a run's last lease released, its leases/ folder goes
    too (and every parent it leaves empty), but never a folder that still holds something, nor the root."""
    s = local_storage
    s.put_bytes("runs/r1/leases/train-abc", b"lease")
    s.put_bytes("runs/r1/report.html", b"<html>")
    s.put_bytes("runs/r2/leases/ingest-def", b"lease")
    s.delete("runs/r1/leases/train-abc")
    assert not (s.root / "runs/r1/leases").exists() and (s.root / "runs/r1").is_dir()
    s.delete("runs/r2/leases/ingest-def")
    assert not (s.root / "runs/r2").exists() and (s.root / "runs").is_dir()  # r1 still holds its report
    s.delete("runs/r1/report.html")
    s.delete("runs/nothing/here")  # deleting what is not there prunes nothing and fails nowhere
    assert s.root.is_dir() and list(s.root.iterdir()) == []
    (s.root / "runs/r3").mkdir(parents=True)
    (s.root / "runs/r3/.k.abc.part").write_bytes(b"half")  # a write in flight keeps its folder
    s.put_bytes("runs/r3/k", b"x")
    s.delete("runs/r3/k")
    assert (s.root / "runs/r3/.k.abc.part").exists()


def test_local_writes_beside_deletes_that_prune_their_folder_never_fail(local_storage):
    """Writers and copies into a folder that deletes beside them keep emptying and removing: a write whose
    folder went between its mkdir and its file makes the folder again, so none fails and none is lost."""
    import threading
    import traceback

    s, errors, stop = local_storage, [], threading.Event()
    s.put_bytes("src/model.pt2", b"weights")

    def churn() -> None:  # one object in and out: the folder (and its parent) empties and goes, again and again
        while not stop.is_set():
            s.put_bytes("run/leases/churn", b"1")
            s.delete("run/leases/churn")

    def writer(i: int) -> None:
        try:
            for j in range(300):
                key = f"run/leases/w{i}-{j}"
                s.put_bytes(key, b"2") if j % 2 else s.copy("src/model.pt2", key)
                assert s.get_bytes(key) in (b"2", b"weights")
                s.delete(key)
        except Exception as exc:  # noqa: BLE001 - collected and shown below
            errors.append("".join(traceback.format_exception(exc)))

    churners = [threading.Thread(target=churn) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in churners + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in churners:
        t.join()
    assert errors == []
    assert not (s.root / "run").exists() and s.list("") == ["src/model.pt2"]


def test_open_storage_selects_backend(tmp_path, s3_env):
    assert isinstance(open_storage(str(tmp_path / "s")), LocalStorage)
    assert isinstance(open_storage((tmp_path / "t").as_uri()), LocalStorage)
    s3 = open_storage("s3://some-bucket/some/prefix/")
    assert isinstance(s3, S3Storage) and s3.uri == "s3://some-bucket/some/prefix"
    assert s3.url("k.txt") == "s3://some-bucket/some/prefix/k.txt"
    with pytest.raises(StorageError, match="unsupported"):
        open_storage("ftp://host/x")
    with pytest.raises(StorageError, match="names no bucket"):
        open_storage("s3:///prefix")


# --- locations: the one place that reads a scheme ---------------------------------------------------------


def _old_weights_check(value) -> bool:
    """settings._is_weights_location as it was, before is_storage_location took its place."""
    return isinstance(value, str) and (value.startswith(("s3://", "file://", "/")) or value.startswith("."))


@pytest.mark.parametrize("value", ["s3://bucket/weights", "file:///w", "/abs/w", "./w", "../w", ".w", "imagenet",
                                   "none", "weights/dir", "ftp://host/w", "http://host/w", "kaggle:o/s", "", None, 3,
                                   "s3:bucket", "~/w"])  # fmt: skip
def test_is_storage_location_answers_as_the_settings_check_did(value):
    assert is_storage_location(value) == _old_weights_check(value)


def test_locations_tell_remote_from_local(tmp_path, mem_storage):
    folder = tmp_path / "a b%"  # a file:// URI quotes it
    assert local_path_of(str(folder)) == local_path_of(folder.as_uri()) == folder
    assert local_path_of("~/w") == Path.home() / "w"
    for remote in ("s3://bucket/p", mem_storage.uri):
        assert is_remote_location(remote) and local_path_of(remote) is None and is_storage_location(remote)
    for local in (str(folder), folder.as_uri(), "relative/dir", "kaggle:owner/slug", "http://host/x"):
        assert not is_remote_location(local)
    assert LocalStorage(folder).root == folder  # the storage a URI names is the folder it was made from
    assert open_location(LocalStorage(folder).uri).root == folder


def test_a_scheme_is_opened_by_the_backend_registered_for_it(tmp_path):
    opened = []
    register_scheme("test-x", lambda location: opened.append(location) or LocalStorage(tmp_path / location.netloc))
    try:
        storage = open_location("test-x://bucket/some/prefix")
        assert storage.root == tmp_path / "bucket" and is_remote_location("test-x://bucket")
        assert opened == [Location("test-x://bucket/some/prefix", "test-x", "bucket", "/some/prefix")]
    finally:
        unregister_scheme("test-x")
    with pytest.raises(StorageConfigError, match=r"unsupported storage URI 'test-x://bucket'"):
        open_location("test-x://bucket")


# --- S3: what goes wrong, said with the location and the fix -------------------------------------


def test_s3_unreachable_endpoint_names_it_and_the_fix_fast(monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = open_storage("s3://some-bucket/pipeline")
    started = time.monotonic()
    says = rf"cannot reach S3 for s3://some-bucket/pipeline.*127\.0\.0\.1:{port}"
    with pytest.raises(StorageError, match=says) as err:
        storage.check()
    assert "AWS_ENDPOINT_URL" in str(err.value)
    assert not isinstance(err.value, PermanentError)  # may be transient: the DAG retries it
    with pytest.raises(StorageError, match=r"cannot reach S3 for s3://some-bucket/pipeline/k\.txt"):
        storage.put_bytes("k.txt", b"x")
    assert time.monotonic() - started < 10


def test_s3_missing_credentials_say_how_to_set_them(moto_endpoint, monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    with pytest.raises(StorageConfigError, match=r"no usable AWS credentials for s3://some-bucket/p") as err:
        open_storage("s3://some-bucket/p").check()
    text = str(err.value)
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_PROFILE" in text and "GENDER_S3_CONN_ID" in text
    assert isinstance(err.value, PermanentError)  # not retried


def test_s3_missing_bucket_says_create_it(s3_env):
    storage = open_storage("s3://no-such-bucket-here/p")
    with pytest.raises(StorageConfigError, match=r"bucket 'no-such-bucket-here'.*does not exist: create it"):
        storage.check()
    with pytest.raises(StorageConfigError, match=r"does not exist: create it"):
        storage.list("datasets/")


# --- S3 from an Airflow connection (GENDER_S3_CONN_ID) --------------------------------------------


def _conn_env(monkeypatch, conn_id: str, conn: dict) -> None:
    monkeypatch.setenv("GENDER_S3_CONN_ID", conn_id)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def test_airflow_connection_gives_endpoint_and_credentials(moto_endpoint, s3_bucket, monkeypatch, tmp_path):
    # Only the connection knows the endpoint and the keys: no AWS credentials are set, and
    # AWS_ENDPOINT_URL points at a closed port, so a working round trip proves both came from it.
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _conn_env(monkeypatch, "gender_s3_test", {
        "conn_type": "aws", "login": "conn-access-key", "password": "conn-secret-key",
        "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
    })  # fmt: skip
    storage = open_storage(f"s3://{s3_bucket}/via-conn")
    assert storage.endpoint_url == moto_endpoint
    storage.check()
    storage.put_bytes("hello.txt", b"from a connection")
    assert storage.get_bytes("hello.txt") == b"from a connection"


@pytest.mark.parametrize(
    "conn, says",
    [
        (None, r"GENDER_S3_CONN_ID='gender_s3_bad' names no Airflow connection: create it"),
        ({"conn_type": "http", "host": "example.com"}, r"has type 'http'; it must be of type aws"),
        ({"conn_type": "aws", "login": "only-a-login"}, r"has a login but no password: set both"),
        ({"conn_type": "aws", "extra": {"role_arn": "arn:aws:iam::1:role/x"}}, r"\['role_arn'\].*remove the others"),
    ],
)
def test_bad_airflow_connection_is_named_with_the_fix(conn, says, monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("GENDER_S3_CONN_ID", "gender_s3_bad")
    monkeypatch.delenv("AIRFLOW_CONN_GENDER_S3_BAD", raising=False)
    if conn is not None:
        _conn_env(monkeypatch, "gender_s3_bad", conn)
    with pytest.raises(StorageConfigError, match=says):
        open_storage("s3://bucket/p")


@pytest.mark.slow  # a fresh interpreter
def test_storage_imports_airflow_only_when_a_connection_is_named(tmp_path):
    code = (
        "import sys\n"
        "from gender_tasks.storage import open_storage\n"
        "open_storage('s3://bucket/prefix'); open_storage(sys.argv[1])\n"
        "assert not any(m == 'airflow' or m.startswith('airflow.') for m in sys.modules), 'airflow was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GENDER_S3_CONN_ID"}
    env.update(AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_s3_unknown_profile_or_bad_endpoint_is_named(monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StorageConfigError, match=r"cannot open s3://bucket/p: .*no-such-profile.*unset AWS_PROFILE"):
        open_storage("s3://bucket/p")
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio:9000")
    with pytest.raises(StorageConfigError, match=r"minio:9000.*needs a scheme and host, e\.g\. http://minio:9000"):
        open_storage("s3://bucket/p")
