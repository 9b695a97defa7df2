"""Storage outages fail fast and say where and what to do (issue 14, point 1).

Two dead S3 endpoints, both on 127.0.0.1: a closed port (connection refused at once) and a silent
server (accepts TCP connections, never answers: only a read timeout ends the wait). The time bounds
asserted here are loose correctness bounds on the timeouts (a missing timeout would hang for minutes),
not performance claims.
"""

import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from botocore.exceptions import ClientError
from helpers import isolate_aws_env

from gender_tasks.errors import PermanentError
from gender_tasks.storage import (
    PROBE_PREFIX,
    S3_CHECK_CONNECT_TIMEOUT_S,
    S3_CHECK_MAX_ATTEMPTS,
    S3_CHECK_READ_TIMEOUT_S,
    S3_CONNECT_TIMEOUT_S,
    S3_MAX_ATTEMPTS,
    S3_READ_TIMEOUT_S,
    LocalStorage,
    S3Storage,
    StorageConfigError,
    StorageError,
    open_storage,
)

pytestmark = pytest.mark.slow  # the tests wait out connect and read timeouts of dead endpoints

# --- two dead endpoints --------------------------------------------------------------------------


@pytest.fixture
def closed_endpoint() -> str:
    """An endpoint URL on a port nothing listens on: the port was bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint():
    """An endpoint URL whose server accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)  # so the accept loop notices `stop`
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept_and_hold() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)  # kept open, never answered: the client must time out reading

    thread = threading.Thread(target=accept_and_hold, name="silent-s3", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for conn in held:
            conn.close()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Test credentials, no AWS configuration of this machine; the endpoint is the test's to set."""
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    return monkeypatch


def _opened(how: str, endpoint: str, monkeypatch) -> S3Storage:
    if how == "S3Storage":
        return S3Storage("some-bucket", "pipeline", endpoint_url=endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return open_storage("s3://some-bucket/pipeline")


# --- check() on a dead endpoint: a StorageError naming it, within a bound ----------------------------


@pytest.mark.parametrize("how", ["S3Storage", "open_storage"])
def test_check_on_a_closed_port_fails_naming_the_endpoint(how, closed_endpoint, aws_env):
    storage = _opened(how, closed_endpoint, aws_env)
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach S3 for s3://some-bucket/pipeline.*{closed_endpoint}") as err:
        storage.check()
    assert time.monotonic() - started < 30
    assert "AWS_ENDPOINT_URL" in str(err.value) and "GENDER_S3_CONN_ID" in str(err.value)
    assert not isinstance(err.value, PermanentError)  # transient by nature: the DAG retries it


@pytest.mark.parametrize("how", ["S3Storage", "open_storage"])
def test_check_on_a_silent_endpoint_fails_naming_the_endpoint(how, silent_endpoint, aws_env):
    storage = _opened(how, silent_endpoint, aws_env)
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach S3 for s3://some-bucket/pipeline.*{silent_endpoint}") as err:
        storage.check()
    assert time.monotonic() - started < 60
    text = str(err.value)
    assert "did not answer" in text and "AWS_ENDPOINT_URL" in text and "GENDER_S3_READ_TIMEOUT" in text
    assert not isinstance(err.value, PermanentError)


def test_requests_on_a_silent_endpoint_end_at_the_read_timeout(silent_endpoint, aws_env):
    # Not only check(): every request has a read timeout (without one botocore waits 60 s an attempt).
    aws_env.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    aws_env.setenv("GENDER_S3_READ_TIMEOUT", "1")
    aws_env.setenv("AWS_MAX_ATTEMPTS", "2")
    storage = open_storage("s3://some-bucket/pipeline")
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"s3://some-bucket/pipeline/k\.txt.*{silent_endpoint}.*did not answer"):
        storage.put_bytes("k.txt", b"x")
    assert time.monotonic() - started < 30


# --- the timeouts and attempts in force --------------------------------------------------------------


def test_s3_timeouts_and_attempts_defaults_and_env(aws_env):
    storage = open_storage("s3://some-bucket/p")
    config = storage.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (S3_CONNECT_TIMEOUT_S, S3_READ_TIMEOUT_S)
    assert config.retries == {"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}
    check = storage._check_client.meta.config
    assert (check.connect_timeout, check.read_timeout) == (S3_CHECK_CONNECT_TIMEOUT_S, S3_CHECK_READ_TIMEOUT_S)
    assert check.retries == {"total_max_attempts": S3_CHECK_MAX_ATTEMPTS, "mode": "standard"}
    # The check's bound, attempts x the longer timeout, stays well under a minute.
    assert S3_CHECK_MAX_ATTEMPTS * max(S3_CHECK_CONNECT_TIMEOUT_S, S3_CHECK_READ_TIMEOUT_S) <= 15

    aws_env.setenv("GENDER_S3_CONNECT_TIMEOUT", "2")
    aws_env.setenv("GENDER_S3_READ_TIMEOUT", "1.5")
    aws_env.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = open_storage("s3://some-bucket/p")
    config = storage.client.meta.config
    assert (config.connect_timeout, config.read_timeout, config.retries["total_max_attempts"]) == (2, 1.5, 1)
    check = storage._check_client.meta.config  # never longer than what is configured
    assert (check.connect_timeout, check.read_timeout, check.retries["total_max_attempts"]) == (2, 1.5, 1)


@pytest.mark.parametrize(
    "var, value",
    [("GENDER_S3_READ_TIMEOUT", "soon"), ("GENDER_S3_CONNECT_TIMEOUT", "0"), ("AWS_MAX_ATTEMPTS", "-1")],
)
def test_bad_timeout_or_attempts_setting_is_named(var, value, aws_env):
    aws_env.setenv(var, value)
    with pytest.raises(StorageConfigError, match=rf"{var}='{value}' is not a"):
        open_storage("s3://some-bucket/p")


# --- check() proves the storage writable --------------------------------------------------------------


def test_s3_check_writes_and_removes_a_probe(s3_storage):
    s3_storage.check()
    assert s3_storage.client.list_objects_v2(Bucket=s3_storage.bucket).get("KeyCount") == 0
    s3_storage.check(writable=False)
    # A probe left behind (its delete refused, or a check killed midway) is never listed as data.
    s3_storage.client.put_object(Bucket=s3_storage.bucket, Key=f"pipeline/{PROBE_PREFIX}/left", Body=b"x")
    s3_storage.put_bytes("data.txt", b"y")
    assert s3_storage.list("") == ["data.txt"]


def test_s3_check_refused_write_says_so(s3_storage):
    real = s3_storage._check_client

    class ReadOnly:
        meta = real.meta

        def head_bucket(self, **kw):
            return real.head_bucket(**kw)

        def put_object(self, **kw):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")

    s3_storage._check_client = ReadOnly()
    with pytest.raises(StorageConfigError, match=rf"refused access to {s3_storage.uri} \(writing the probe object "
                       rf"s3://{s3_storage.bucket}/pipeline/{PROBE_PREFIX}/.*may read and write"):  # fmt: skip
        s3_storage.check()
    s3_storage.check(writable=False)  # a source is only read: that passes


def test_local_check_writes_and_removes_a_probe(local_storage):
    local_storage.check()
    assert list(local_storage.root.iterdir()) == []
    (local_storage.root / PROBE_PREFIX).mkdir()
    (local_storage.root / PROBE_PREFIX / "left").write_bytes(b"x")
    assert local_storage.list("") == []


def test_local_storage_under_a_file_is_refused_with_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StorageConfigError, match=r"cannot create the storage folder .*a-file/store.*writable folder"):
        open_storage(str(tmp_path / "a-file" / "store"))
    # A folder that turns into a file after it was opened: check() says so.
    storage = LocalStorage(tmp_path / "store")
    storage.root.rmdir()
    storage.root.write_text("now a file")
    with pytest.raises(StorageConfigError, match=r"storage folder .*store cannot be written .*choose another folder"):
        storage.check()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_local_objects_respect_the_umask(local_storage, umask, mode):
    old = os.umask(umask)
    try:
        local_storage.put_bytes("d/k.bin", b"x")
        local_storage.put_bytes("d/k.bin", b"y")  # a rewrite too
    finally:
        os.umask(old)
    assert stat.S_IMODE(local_storage.local_path("d/k.bin").stat().st_mode) == mode


# --- the CLI checks the storage before it starts Airflow ----------------------------------------------


def test_cli_preflight_refuses_a_dead_storage_before_airflow(closed_endpoint, aws_env, dataset_dir, capsys):
    from gender_tasks import cli

    def airflow_started():
        raise AssertionError("the pre-flight let the run reach Airflow")

    aws_env.setattr(cli, "airflow_env_defaults", airflow_started)
    aws_env.setenv("AWS_ENDPOINT_URL", closed_endpoint)
    started = time.monotonic()
    assert cli.main(["run", "--storage", "s3://b/p", "--source", str(dataset_dir)]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach S3 for s3://b/p") and closed_endpoint in err
    assert "AWS_ENDPOINT_URL" in err


@pytest.mark.parametrize("endpoint", ["closed_endpoint", "silent_endpoint"])
def test_cli_run_on_a_dead_storage_exits_2_without_importing_airflow(endpoint, request, dataset_dir, tmp_path):
    url = request.getfixturevalue(endpoint)
    code = (
        "import sys\n"
        "from gender_tasks.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert not any(m == 'airflow' or m.startswith('airflow.') for m in sys.modules), 'airflow was imported'\n"
        "sys.exit(rc)\n"
    )
    drop = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "GENDER_S3_CONN_ID",
            "GENDER_S3_CONNECT_TIMEOUT", "GENDER_S3_READ_TIMEOUT")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing-access-key", AWS_SECRET_ACCESS_KEY="testing-secret",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))  # fmt: skip
    argv = ["run", "--storage", "s3://b/p", "--source", str(dataset_dir)]
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: cannot reach S3 for s3://b/p" in done.stderr and url in done.stderr


class _AirflowReached(Exception):
    pass


def test_cli_preflight_passes_a_usable_storage_and_refuses_an_unwritable_folder(s3_bucket, dataset_dir, tmp_path,
                                                                               monkeypatch, capsys):  # fmt: skip
    from gender_tasks import cli

    def airflow_started():
        raise _AirflowReached()

    monkeypatch.setattr(cli, "airflow_env_defaults", airflow_started)
    with pytest.raises(_AirflowReached):  # the pre-flight passed: the run went on to start Airflow
        cli.main(["run", "--storage", f"s3://{s3_bucket}/p", "--source", str(dataset_dir)])
    (tmp_path / "a-file").write_text("not a folder")
    assert cli.main(["run", "--storage", str(tmp_path / "a-file" / "store"), "--source", str(dataset_dir)]) == 2
    assert "a-file/store" in capsys.readouterr().err
