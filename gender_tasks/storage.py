"""Object storage: one small interface, two backends (a local directory and S3 through boto3).

Keys are POSIX-style relative paths ("datasets/<id>/manifest.csv"). Every write is atomic: a
local write goes to a temporary file renamed into place, and an S3 PUT is atomic by the protocol,
so no reader ever sees half an object. The rest of the package never builds a client itself.

S3 is configured the way AWS users expect (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles, AWS_ENDPOINT_URL for MinIO), or from an Airflow connection of type `aws` named by
GENDER_S3_CONN_ID (login = access key, password = secret, extra `endpoint_url`). Airflow is imported
only then, so this module works without it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from .environment import default_data_dir, get_number, get_text, get_whole, variable
from .errors import PermanentError
from .integrity import mismatch, repair_hint, sha256_hex, verify_bytes
from .layout import checksum_key

log = logging.getLogger(__name__)

CONN_ID_VAR = "GENDER_S3_CONN_ID"
# How long a dead S3 endpoint can hold things up, and why.
#
# botocore's "standard" retry mode retries only what can pass (connection errors, timeouts, 5xx,
# throttling), with jittered exponential backoff; 4xx errors (no bucket, access denied) fail at once.
# Its backoff for connection errors is short (50 ms doubling), so the attempts of one request on a
# dead endpoint cost about attempts x timeout:
#   - a closed port is refused at once: 5 attempts take well under a second;
#   - a blackholed host: 5 x S3_CONNECT_TIMEOUT_S, under a minute;
#   - an endpoint that accepts and never answers: 5 x S3_READ_TIMEOUT_S = 100 s. Without a read
#     timeout botocore waits 60 s per attempt: it was 6 attempts (see total_max_attempts below), so
#     6 minutes a request and 20 minutes a task with its Airflow retries.
# The exception that results, StorageError, stays retryable by Airflow (not a PermanentError): an
# unreachable endpoint is transient by nature (a MinIO restart, a network partition), and the DAG's
# retries (2, a minute apart) outlast such an outage where botocore's sub-second backoff cannot. So a
# task on a dead endpoint spends at most about 3 x 100 s + 2 x 60 s, some 7 minutes; ingest, which
# starts with the fast check() below, about 3 x 11 s + 2 x 60 s. `python -m gender_tasks run` checks
# the storage before Airflow starts (cli._preflight), so there a dead endpoint fails in seconds.
#
# AWS_MAX_ATTEMPTS (the standard variable) overrides the attempt count.
S3_MAX_ATTEMPTS = variable("AWS_MAX_ATTEMPTS").default  # 5
# botocore's default connect timeout is 60 s, which makes an unreachable endpoint look like a hang.
S3_CONNECT_TIMEOUT_S = variable("GENDER_S3_CONNECT_TIMEOUT").default  # 10 s
# The wait for each answer (botocore: 60 s). S3 answers within a second or two; 20 s leaves room for
# a MinIO on slow disks that stores a large object before it answers.
S3_READ_TIMEOUT_S = variable("GENDER_S3_READ_TIMEOUT").default  # 20 s
# check() is the "fail before any long work" path: 2 attempts (one blip forgiven), short timeouts, so
# a dead endpoint fails it in about 2 x 5 s and even a server that answers the first request and
# hangs the next two (head, put, delete) stays within 30 s.
S3_CHECK_MAX_ATTEMPTS = 2
S3_CHECK_CONNECT_TIMEOUT_S = 3.0
S3_CHECK_READ_TIMEOUT_S = 5.0
# check() proves a storage writable by writing and deleting a small object under this reserved key;
# list() never shows it.
PROBE_PREFIX = ".gender-probe"
PROBE_BODY = b"gender_tasks storage check: safe to delete\n"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Extras of an Airflow `aws` connection that this package understands; any other is refused, not ignored.
CONN_EXTRAS = ("endpoint_url", "region_name", "aws_session_token", "profile_name", "verify")
HOW_TO_SET_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or name an Airflow connection "
    f"of type aws in {CONN_ID_VAR}"
)


class StorageError(RuntimeError):
    """Storage cannot be reached or used; the message says which location and what to do."""


class StorageConfigError(StorageError, PermanentError):
    """Storage is misconfigured (no credentials, no such bucket, access denied): a retry cannot help."""


class DiskFullError(PermanentError):
    """A local disk (or the user's quota on it) is full: a retry would write into the same full disk.
    The message says which folder, how much it has free, about how much is needed, and the fix."""


# A write that fails with one of these found no room: no space left on the device, or the quota used up.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    """A byte count as people read it: 12.3 kB, 4.5 MB, 10.0 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def disk_full(exc: OSError, folder: str | Path, needed: int, *, what: str, fix: str) -> DiskFullError:
    """The DiskFullError for `exc` (an OSError in DISK_FULL_ERRNOS) raised writing into `folder`: `what`
    names the folder to the user ("the storage folder"), `needed` is about how many bytes were still to
    be written, `fix` what to do. `folder` is measured, never shown, where `what` names it already."""
    existing = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), Path("/"))
    try:
        free = human_bytes(shutil.disk_usage(existing).free)
    except OSError:
        free = "an unknown amount"
    full = "the disk quota there is used up" if exc.errno == errno.EDQUOT else "its disk has no space left"
    return DiskFullError(f"{what} is full ({full}: {free} free, about {human_bytes(needed)} more needed); {fix}")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as a listing sees it: what garbage collection weighs (size) and ages (modified)."""

    key: str
    size: int
    modified: float  # seconds since the epoch


class Storage(Protocol):
    uri: str

    def check(self, *, writable: bool = True) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str) -> str: ...
    def copy(self, src: str, dst: str) -> None: ...
    def list_info(self, prefix: str) -> list[ObjectInfo]: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: keys are relative paths without '..' or empty parts")
    return key


def _is_temp(key: str) -> bool:
    """A local write in flight (see LocalStorage.put_bytes) or a check() probe: never listed."""
    name = key.rpartition("/")[2]
    return (name.startswith(".") and name.endswith(".part")) or key.startswith(PROBE_PREFIX + "/")


def _probe_key() -> str:
    return f"{PROBE_PREFIX}/{uuid.uuid4().hex}"


def _env_seconds(name: str) -> float:
    """A positive number of seconds from the environment variable `name`; unset or empty: its default."""
    return get_number(name, error=StorageConfigError)


def _check_prefix(prefix: str) -> str:
    """A list prefix: empty, or a key that may end in '/'."""
    if prefix:
        _check_key(prefix.removesuffix("/"))
    return prefix


HOW_TO_FREE_STORAGE = (
    "free space on that disk, or choose other storage (--storage, GENDER_STORAGE or the DAG param storage)"
)


def _write_atomically(path: Path, data: bytes, *, root: Path | None = None) -> None:
    """Write `path` through a temporary file renamed into place: no reader sees half of it.

    A full disk (or quota) removes the temporary file and raises DiskFullError naming `root` (the
    storage folder; default: the file's folder), not the raw OSError: a retry cannot make room.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkstemp: it creates the file 0600 whatever the umask, so other users (a web
        # server, a worker under another uid) could not read what the pipeline wrote. os.open with
        # 0o666 lets the kernel apply the umask (and default ACLs), as for any ordinary file; O_EXCL
        # and a random name keep concurrent writers of one key apart.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        folder = root or path.parent
        raise disk_full(exc, folder, len(data), what=f"the storage folder {folder}", fix=HOW_TO_FREE_STORAGE) from None


class LocalStorage:
    """A directory on this machine: the embedded default."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageConfigError(
                f"cannot create the storage folder {self.root}: {exc}; choose a writable folder (GENDER_STORAGE)"
            ) from exc

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def check(self, *, writable: bool = True) -> None:
        """Fail fast, before any long work, where the folder cannot be created or (if `writable`) written.

        Writing proves it where os.access cannot (read-only mounts, ACLs, a full disk, root squash):
        a probe object is written the way put_bytes writes (not through it: the probe is no data write
        that callers or tests count) and deleted.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # again: it may have gone since __init__
            if writable:
                probe = self._path(_probe_key())
                _write_atomically(probe, PROBE_BODY, root=self.root)  # a full disk: DiskFullError, not "permissions"
                probe.unlink()
                try:
                    (self.root / PROBE_PREFIX).rmdir()
                except OSError:
                    pass  # another check's probe is in it, or it is gone already: either is fine
            elif not os.access(self.root, os.R_OK | os.X_OK):
                raise PermissionError(f"no read access to {self.root}")
        except OSError as exc:
            what = "written" if writable else "read"
            raise StorageConfigError(
                f"the storage folder {self.root} cannot be {what} ({exc}); fix its permissions or choose another "
                "folder (--storage, GENDER_STORAGE or the DAG param storage)"
            ) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        _write_atomically(self._path(key), data, root=self.root)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix` (a plain string prefix, as in S3)."""
        _check_prefix(prefix)
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not _is_temp(k))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def copy(self, src: str, dst: str) -> None:
        """`dst` gets `src`'s bytes: a hard link where the file system allows (no space, no time), else a
        copy; either way through a temporary name, so no reader sees half of it. Objects are never
        written in place (put_bytes replaces the file), so the two keys cannot change each other."""
        source, target = self._path(src), self._path(dst)
        if not source.is_file():
            raise FileNotFoundError(f"{self.url(src)} does not exist")
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, tmp)
            except OSError as exc:  # another device, or a file system without hard links
                if exc.errno in DISK_FULL_ERRNOS:  # not even a directory entry fits: a copy would not either
                    raise
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(exc, self.root, source.stat().st_size, what=f"the storage folder {self.root}",
                                fix=HOW_TO_FREE_STORAGE) from None  # fmt: skip
            raise

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Like list(), with each object's size and modification time."""
        out = []
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                continue  # deleted since the listing
            out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return out

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        """The file behind a key (local backend only): lets a browser open a report directly."""
        return self._path(key)


class S3Storage:
    """An S3 bucket and prefix, on AWS or any S3-compatible server (MinIO) via an endpoint URL.

    Credentials come the way AWS users expect: the standard environment variables, a named
    profile (AWS_PROFILE), instance roles; or explicitly (`credentials`, from an Airflow
    connection). `endpoint_url` (or AWS_ENDPOINT_URL) selects MinIO.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None,
                 credentials: dict | None = None, region_name: str | None = None, profile_name: str | None = None,
                 verify: bool | str | None = None, max_attempts: int | None = None,
                 connect_timeout: float | None = None, read_timeout: float | None = None):  # fmt: skip
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url or get_text("AWS_ENDPOINT_URL")
        self.max_attempts = max_attempts or _env_attempts()
        self.connect_timeout = connect_timeout or _env_seconds("GENDER_S3_CONNECT_TIMEOUT")
        self.read_timeout = read_timeout or _env_seconds("GENDER_S3_READ_TIMEOUT")
        self._make_check_client: Callable[[], object] | None = None
        if client is None:
            from botocore.exceptions import ProfileNotFound

            config = Config(
                # total_max_attempts counts the first try; botocore's `max_attempts` counts only the
                # retries (so 5 meant 6 attempts), unlike AWS_MAX_ATTEMPTS, which counts them all.
                retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                max_pool_connections=64,  # at least as many as put_many's threads
            )
            # check()'s own client: the same session and endpoint, fewer attempts and shorter timeouts
            # (never longer than the ones configured), made only when check() first runs.
            check_config = Config(
                retries={"total_max_attempts": min(S3_CHECK_MAX_ATTEMPTS, self.max_attempts), "mode": "standard"},
                connect_timeout=min(S3_CHECK_CONNECT_TIMEOUT_S, self.connect_timeout),
                read_timeout=min(S3_CHECK_READ_TIMEOUT_S, self.read_timeout),
            )
            try:
                session = boto3.session.Session(**(credentials or {}), region_name=region_name,
                                                profile_name=profile_name)  # fmt: skip
                client = session.client("s3", endpoint_url=self.endpoint_url, verify=verify, config=config)
                self._make_check_client = lambda: session.client(
                    "s3", endpoint_url=self.endpoint_url, verify=verify, config=check_config
                )
            except ProfileNotFound as exc:
                raise StorageConfigError(
                    f"cannot open {self.uri}: {exc}; define that profile in ~/.aws/config, or unset AWS_PROFILE"
                ) from None
            except ValueError as exc:  # botocore: "Invalid endpoint: ..."
                raise StorageConfigError(
                    f"cannot open {self.uri}: {exc}; the endpoint URL needs a scheme and host, e.g. http://minio:9000 "
                    "(AWS_ENDPOINT_URL, or the connection's endpoint_url)"
                ) from None
        self.client = client

    @cached_property
    def _check_client(self):
        """The client check() uses: bounded, see S3_CHECK_*. A client given to __init__ is used as it is."""
        return self._make_check_client() if self._make_check_client else self.client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, location: str) -> str:
        # The client's endpoint also covers AWS_ENDPOINT_URL_S3 and the AWS default for the region.
        endpoint = self.endpoint_url or getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return f"{location} (endpoint {endpoint or 'AWS default'})"

    def _explain(self, exc: Exception, location: str) -> StorageError:
        """Turn a botocore error into one that says what is wrong and what to do."""
        from botocore import exceptions as bx

        where = self._where(location)
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return StorageConfigError(f"no usable AWS credentials for {where}: {exc}. To fix, {HOW_TO_SET_CREDENTIALS}")
        if isinstance(exc, bx.ReadTimeoutError):
            return StorageError(
                f"cannot reach S3 for {where}: the endpoint accepted the connection but did not answer ({exc}). "
                "The server is hung or is not an S3 server (a wrong port?): check that AWS_ENDPOINT_URL (or the "
                f"endpoint_url of the connection in {CONN_ID_VAR}) points at a working S3 or MinIO, or raise "
                "GENDER_S3_READ_TIMEOUT if it is merely slow"
            )
        unreachable = (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)
        if isinstance(exc, unreachable):
            return StorageError(
                f"cannot reach S3 for {where}: {exc}. Check that the server is running and that AWS_ENDPOINT_URL "
                f"(or the endpoint_url of the connection in {CONN_ID_VAR}) points at it"
            )
        if isinstance(exc, bx.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                        "InvalidToken"):  # fmt: skip
                return StorageConfigError(
                    f"S3 refused access to {where}: {exc}. Check the credentials in use ({HOW_TO_SET_CREDENTIALS}) "
                    "and that they may read and write this bucket"
                )
        return StorageError(
            f"S3 request for {where} failed: {exc}. Check that the bucket exists, the endpoint is reachable and "
            f"credentials are set ({HOW_TO_SET_CREDENTIALS})"
        )

    def _no_bucket(self) -> StorageConfigError:
        return StorageConfigError(
            f"the bucket {self.bucket!r} of {self._where(self.uri)} does not exist: create it (e.g. "
            f"`aws s3 mb s3://{self.bucket}`, or the MinIO console) or fix the storage URI"
        )

    def check(self, *, writable: bool = True) -> None:
        """Fail fast, with the fix, where the bucket cannot be used (before any long work).

        Proves the endpoint answers, the bucket exists and (if `writable`) that these credentials may
        write under this prefix: a small probe object is put and deleted (a reserved key, see
        PROBE_PREFIX). Uses the bounded check client, so a dead endpoint fails within seconds.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._check_client
        location = self.uri
        try:
            client.head_bucket(Bucket=self.bucket)
            if not writable:
                return
            probe = self._key(_probe_key())
            location = f"{self.uri} (writing the probe object s3://{self.bucket}/{probe})"
            client.put_object(Bucket=self.bucket, Key=probe, Body=PROBE_BODY)
            location = f"{self.uri} (deleting the probe object s3://{self.bucket}/{probe})"
            try:
                client.delete_object(Bucket=self.bucket, Key=probe)
            except ClientError as exc:
                # Writing works, which is what the pipeline needs (it never deletes): say so, go on.
                log.warning("could not delete the storage probe s3://%s/%s (%s); it is safe to delete", self.bucket,
                            probe, exc)  # fmt: skip
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                raise self._no_bucket() from None
            raise self._explain(exc, location) from exc
        except BotoCoreError as exc:
            raise self._explain(exc, location) from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._explain(exc, self.url(key)) from exc

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise self._explain(exc, self.url(key)) from exc
        except BotoCoreError as exc:
            raise self._explain(exc, self.url(key)) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._explain(exc, self.url(key)) from exc
        except BotoCoreError as exc:
            raise self._explain(exc, self.url(key)) from exc

    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix`, relative to this storage's own prefix (one listing: list_info's)."""
        return [o.key for o in self.list_info(prefix)]

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._explain(exc, self.url(key)) from exc

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy (CopyObject): the bytes never pass through this machine (objects up to 5 GB)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.copy_object(Bucket=self.bucket, Key=self._key(dst),
                                    CopySource={"Bucket": self.bucket, "Key": self._key(src)})  # fmt: skip
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(src)} does not exist") from None
            raise self._explain(exc, self.url(dst)) from exc
        except BotoCoreError as exc:
            raise self._explain(exc, self.url(dst)) from exc

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose keys start with `prefix` (relative to this storage's own prefix), sorted by key,
        each with its size and modification time; the storage check's probes are left out."""
        from botocore.exceptions import BotoCoreError, ClientError

        _check_prefix(prefix)
        base = self.prefix + "/" if self.prefix else ""
        out: list[ObjectInfo] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(base) :]
                    if not key.startswith(PROBE_PREFIX + "/"):
                        out.append(ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp()))
        except (BotoCoreError, ClientError) as exc:
            raise self._explain(exc, f"s3://{self.bucket}/{base}{prefix}") from exc
        return sorted(out, key=lambda o: o.key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def _env_attempts() -> int:
    return get_whole("AWS_MAX_ATTEMPTS", error=StorageConfigError)


def default_storage_uri() -> str:
    """GENDER_STORAGE, else store/ in the default data folder (environment.default_data_dir)."""
    return get_text("GENDER_STORAGE") or (default_data_dir() / "store").as_uri()


def s3_options_from_connection(conn_id: str) -> dict:
    """S3Storage keyword arguments from the Airflow connection `conn_id` (type aws).

    Works inside a task (through the Task SDK) and outside one (AIRFLOW_CONN_<ID> variables,
    secrets backends). Values the connection leaves empty fall back to the standard AWS chain.
    """
    try:
        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError as exc:
        raise StorageConfigError(
            f"{CONN_ID_VAR}={conn_id!r} is set but Airflow cannot be imported ({exc}); install apache-airflow, "
            f"or unset {CONN_ID_VAR} and use the standard AWS variables"
        ) from None
    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        raise StorageConfigError(
            f"{CONN_ID_VAR}={conn_id!r} names no Airflow connection: create it (Admin > Connections, "
            f"`airflow connections add`, or AIRFLOW_CONN_{conn_id.upper()}) or unset {CONN_ID_VAR}"
        ) from None
    if conn.conn_type != "aws":
        raise StorageConfigError(
            f"the Airflow connection {conn_id!r} ({CONN_ID_VAR}) has type {conn.conn_type!r}; it must be of type "
            "aws (login = access key id, password = secret access key, extra endpoint_url for MinIO)"
        )
    extra = conn.extra_dejson
    unknown = sorted(set(extra) - set(CONN_EXTRAS))
    if unknown:
        raise StorageConfigError(
            f"the Airflow connection {conn_id!r} has extra field(s) {unknown} that this pipeline does not "
            f"support; it understands {list(CONN_EXTRAS)}: remove the others"
        )
    if bool(conn.login) != bool(conn.password):
        has = "a login but no password" if conn.login else "a password but no login"
        raise StorageConfigError(
            f"the Airflow connection {conn_id!r} has {has}: set both (access key id and secret access key), "
            "or neither to use the standard AWS chain"
        )
    options: dict = {
        k: extra[k] for k in ("endpoint_url", "region_name", "profile_name", "verify") if extra.get(k) not in (None, "")
    }
    if str(options.get("verify")).lower() in ("true", "false"):  # the UI's JSON may hold it as text
        options["verify"] = str(options["verify"]).lower() == "true"
    if conn.login:
        options["credentials"] = {"aws_access_key_id": conn.login, "aws_secret_access_key": conn.password}
        if extra.get("aws_session_token"):
            options["credentials"]["aws_session_token"] = extra["aws_session_token"]
    return options


def open_storage(uri: str | None = None) -> Storage:
    """Storage for a URI: `s3://bucket/prefix`, `file:///path`, or a plain path; empty: the default."""
    uri = uri or default_storage_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageConfigError(f"storage URI {uri!r} names no bucket; use s3://<bucket>/<prefix>")
        conn_id = get_text(CONN_ID_VAR)
        options = s3_options_from_connection(conn_id) if conn_id else {}
        return S3Storage(parsed.netloc, parsed.path, **options)
    if parsed.scheme == "file":
        return LocalStorage(parsed.path)
    if parsed.scheme == "":
        return LocalStorage(uri)
    raise StorageConfigError(f"unsupported storage URI {uri!r}; use s3://bucket/prefix or a local folder")


def read_verified(storage: Storage, key: str, sha256: str, *, what: str = "") -> bytes:
    """The object at `key`, checked against the sha256 recorded when it was written.

    A mismatch raises integrity.IntegrityError (permanent), naming the object and how to repair it.
    """
    data = storage.get_bytes(key)
    return verify_bytes(data, sha256, what=what or storage.url(key), fix=repair_hint(storage.uri))


def put_recorded(storage: Storage, key: str, data: bytes) -> str:
    """Write `data` at `key` with its sha256 beside it (checksum_key), for objects that are not
    content-addressed but are read back later (manifests, splits, cache indexes, audits); returns the sha256.

    The checksum goes first: a write interrupted between the two leaves a checksum without its object,
    which readers take as a missing object (and the writer's rerun rewrites both), never an object
    that cannot be checked.
    """
    sha = sha256_hex(data)
    storage.put_bytes(checksum_key(key), sha.encode() + b"\n")
    storage.put_bytes(key, data)
    return sha


def recorded_sha256(storage: Storage, key: str) -> str | None:
    """The sha256 recorded beside `key` by put_recorded, or None for an object written without one."""
    try:
        text = storage.get_bytes(checksum_key(key)).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    if not _SHA256_HEX.match(text):
        raise mismatch(f"the checksum record {storage.url(checksum_key(key))}", "(a sha256)", text or "(empty)",
                       repair_hint(storage.uri))  # fmt: skip
    return text


def get_recorded(storage: Storage, key: str, sha256: str | None = None) -> bytes:
    """The object at `key`, checked against `sha256` (from a run record) or else the sha256 recorded
    beside it. An object written before checksums were recorded (no record) is read with a warning.
    """
    expected = sha256 or recorded_sha256(storage, key)
    if expected is None:
        data = storage.get_bytes(key)
        log.warning("%s has no recorded checksum (written by an earlier version): read unverified; "
                    "`python -m gender_tasks verify --repair` lists such objects", storage.url(key))  # fmt: skip
        return data
    return read_verified(storage, key, expected)


def put_many(storage: Storage, items: Iterable[tuple[str, bytes | Callable[[], bytes]]], *, workers: int = 16,
             progress: Callable[[int, int], None] | None = None) -> int:  # fmt: skip
    """Write many objects in parallel (S3 latency dominates single-threaded uploads); returns the count.

    An item's data may be a zero-argument callable that returns the bytes, read only when its turn
    comes, so a large dataset never sits in memory whole. `progress(done, nbytes)` is called after
    each write, from this thread. The first failure stops the rest and is raised.
    """
    items = list(items)
    if not items:
        return 0

    def put(item: tuple[str, bytes | Callable[[], bytes]]) -> int:
        key, data = item
        payload = data() if callable(data) else data
        storage.put_bytes(key, payload)
        return len(payload)

    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="put_many")
    try:
        futures = [pool.submit(put, item) for item in items]
        for done, future in enumerate(as_completed(futures), 1):
            nbytes = future.result()
            if progress is not None:
                progress(done, nbytes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return len(items)
