"""The S3 backend: a bucket and prefix (`s3://bucket/prefix`) on AWS or any S3-compatible server (MinIO), through
boto3. An S3 PUT is atomic by the protocol, so no reader ever sees half an object. The rest of the package
never builds a client itself.

S3 is configured the way AWS users expect (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles, AWS_ENDPOINT_URL for MinIO), or from an Airflow connection of type `aws` named by
GENDER_S3_CONN_ID (login = access key, password = secret, extra `endpoint_url`). Airflow is imported
only then, and boto3 only when an S3Storage is made, so this module works without either.

Every request goes through S3Storage._request, which turns botocore's errors into the project's
(StorageError, StorageConfigError, FileNotFoundError for a missing object), each naming the location
and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from functools import cached_property
from typing import NoReturn, TypeVar

from ..environment import get_number, get_text, get_whole, variable
from .base import PROBE_BODY, ObjectInfo, StorageConfigError, StorageError, check_key, check_prefix, is_probe, probe_key
from .locations import Location, register_scheme

log = logging.getLogger("gender_tasks.storage")
T = TypeVar("T")

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
# Extras of an Airflow `aws` connection that this package understands; any other is refused, not ignored.
CONN_EXTRAS = ("endpoint_url", "region_name", "aws_session_token", "profile_name", "verify")
HOW_TO_SET_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or name an Airflow connection "
    f"of type aws in {CONN_ID_VAR}"
)


def _env_seconds(name: str) -> float:
    """A positive number of seconds from the environment variable `name`; unset or empty: its default."""
    return get_number(name, error=StorageConfigError)


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
        check_key(key)
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

    def _request(self, location: str, call: Callable[[], T], *, codes: Collection[str] = (),
                 answer: Callable[[Exception], T] | None = None) -> T:  # fmt: skip
        """`call()`, one S3 request, with botocore's errors turned into the project's for `location` (see
        _explain); except an S3 error whose code is in `codes` (a missing object or bucket), which
        `answer(exc)` answers instead: with a result, or by raising the error that fits."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            if answer is not None and str(exc.response.get("Error", {}).get("Code")) in codes:
                return answer(exc)
            raise self._explain(exc, location) from exc
        except BotoCoreError as exc:
            raise self._explain(exc, location) from exc

    def _missing(self, key: str) -> Callable[[Exception], NoReturn]:
        """An `answer` for _request: the object at `key` does not exist."""

        def raise_missing(_exc: Exception) -> NoReturn:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None

        return raise_missing

    def _bucket_missing(self, _exc: Exception) -> NoReturn:
        """An `answer` for _request: the bucket does not exist."""
        raise self._no_bucket() from None

    def check(self, *, writable: bool = True) -> None:
        """Fail fast, with the fix, where the bucket cannot be used (before any long work).

        Proves the endpoint answers, the bucket exists and (if `writable`) that these credentials may
        write under this prefix: a small probe object is put and deleted (a reserved key, see
        PROBE_PREFIX). Uses the bounded check client, so a dead endpoint fails within seconds.
        """
        client = self._check_client
        self._request(self.uri, lambda: client.head_bucket(Bucket=self.bucket), codes=_NO_BUCKET,
                      answer=self._bucket_missing)  # fmt: skip
        if not writable:
            return
        probe = self._key(probe_key())
        self._request(f"{self.uri} (writing the probe object s3://{self.bucket}/{probe})",
                      lambda: client.put_object(Bucket=self.bucket, Key=probe, Body=PROBE_BODY), codes=_NO_BUCKET,
                      answer=self._bucket_missing)  # fmt: skip

        def left_behind(exc: Exception) -> None:
            # Writing works, which is what the pipeline needs (it never deletes): say so, go on.
            log.warning("could not delete the storage probe s3://%s/%s (%s); it is safe to delete", self.bucket,
                        probe, exc)  # fmt: skip

        self._request(f"{self.uri} (deleting the probe object s3://{self.bucket}/{probe})",
                      lambda: client.delete_object(Bucket=self.bucket, Key=probe), codes=_EVERY_CODE,
                      answer=left_behind)  # fmt: skip

    def put_bytes(self, key: str, data: bytes) -> None:
        s3_key = self._key(key)
        self._request(self.url(key), lambda: self.client.put_object(Bucket=self.bucket, Key=s3_key, Body=data))

    def get_bytes(self, key: str) -> bytes:
        s3_key = self._key(key)
        return self._request(self.url(key), lambda: self.client.get_object(Bucket=self.bucket, Key=s3_key)["Body"].read(),
                             codes=_NO_SUCH_KEY, answer=self._missing(key))  # fmt: skip

    def exists(self, key: str) -> bool:
        s3_key = self._key(key)

        def head() -> bool:
            self.client.head_object(Bucket=self.bucket, Key=s3_key)
            return True

        return self._request(self.url(key), head, codes=_NOT_FOUND, answer=lambda _exc: False)

    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix`, relative to this storage's own prefix (one listing: list_info's)."""
        return [o.key for o in self.list_info(prefix)]

    def delete(self, key: str) -> None:
        s3_key = self._key(key)
        self._request(self.url(key), lambda: self.client.delete_object(Bucket=self.bucket, Key=s3_key))

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy (CopyObject): the bytes never pass through this machine (objects up to 5 GB)."""
        target, source = self._key(dst), self._key(src)
        self._request(self.url(dst), lambda: self.client.copy_object(Bucket=self.bucket, Key=target,
                                                                     CopySource={"Bucket": self.bucket, "Key": source}),
                      codes=_NO_SUCH_KEY, answer=self._missing(src))  # fmt: skip

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose keys start with `prefix` (relative to this storage's own prefix), sorted by key,
        each with its size and modification time; the storage check's probes are left out."""
        check_prefix(prefix)
        base = self.prefix + "/" if self.prefix else ""

        def listing() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(base) :]
                    if not is_probe(key):
                        out.append(ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp()))
            return out

        return sorted(self._request(f"s3://{self.bucket}/{base}{prefix}", listing), key=lambda o: o.key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def local_path(self, key: str) -> None:
        """No file on this machine holds an S3 object."""
        return None

    @classmethod
    def open(cls, location: Location) -> S3Storage:
        """The opener registered for s3://bucket/prefix (see locations.register_scheme): the connection
        named by GENDER_S3_CONN_ID where it is set, else the standard AWS configuration."""
        if not location.netloc:
            raise StorageConfigError(f"storage URI {location.uri!r} names no bucket; use s3://<bucket>/<prefix>")
        conn_id = get_text(CONN_ID_VAR)
        options = s3_options_from_connection(conn_id) if conn_id else {}
        return cls(location.netloc, location.path, **options)


class _EveryCode:
    """Every S3 error code (`codes` for _request)."""

    def __contains__(self, code: object) -> bool:
        return True


# The S3 error codes of a missing object or bucket, as each request has them.
_NO_SUCH_KEY = ("NoSuchKey", "404")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_NO_BUCKET = ("404", "NoSuchBucket", "NotFound")
_EVERY_CODE = _EveryCode()


def _env_attempts() -> int:
    return get_whole("AWS_MAX_ATTEMPTS", error=StorageConfigError)


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


register_scheme("s3", S3Storage.open)
