"""Object storage: one small interface, two backends (a local directory and S3 through boto3).

Keys are POSIX-style relative paths ("datasets/<id>/manifest.csv"). Every write is atomic: a
local write goes to a temporary file renamed into place, and an S3 PUT is atomic by the protocol,
so no reader ever sees half an object. The rest of the package never builds a client itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Protocol
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_LOCAL_ROOT = Path(os.environ.get("GENDER_DATA_DIR", Path(__file__).resolve().parent.parent / ".data"))


class StorageError(RuntimeError):
    """Storage cannot be reached or used; the message says which location and what to do."""


class Storage(Protocol):
    uri: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str) -> str: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: keys are relative paths without '..' or empty parts")
    return key


class LocalStorage:
    """A directory on this machine: the embedded default."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the storage folder {self.root}: {exc}") from exc

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".part")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        """The file behind a key (local backend only): lets a browser open a report directly."""
        return self._path(key)


class S3Storage:
    """An S3 bucket and prefix, on AWS or any S3-compatible server (MinIO) via an endpoint URL.

    Credentials come the way AWS users expect: the standard environment variables, a named
    profile (AWS_PROFILE), instance roles. `endpoint_url` (or AWS_ENDPOINT_URL) selects MinIO.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, exc: Exception, key: str) -> StorageError:
        return StorageError(
            f"S3 request for {self.url(key)} failed: {exc}. Check that the bucket exists, the endpoint "
            "(AWS_ENDPOINT_URL) is reachable and credentials are set (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)."
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._wrap(exc, key) from exc

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise self._wrap(exc, key) from exc
        except BotoCoreError as exc:
            raise self._wrap(exc, key) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._wrap(exc, key) from exc
        except BotoCoreError as exc:
            raise self._wrap(exc, key) from exc

    def list(self, prefix: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._wrap(exc, prefix) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def default_storage_uri() -> str:
    return os.environ.get("GENDER_STORAGE") or (DEFAULT_LOCAL_ROOT / "store").as_uri()


def open_storage(uri: str | None = None) -> Storage:
    """Storage for a URI: `s3://bucket/prefix`, `file:///path`, or a plain path; empty: the default."""
    uri = uri or default_storage_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URI {uri!r} names no bucket; use s3://<bucket>/<prefix>")
        return S3Storage(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStorage(parsed.path)
    if parsed.scheme == "":
        return LocalStorage(uri)
    raise StorageError(f"unsupported storage URI {uri!r}; use s3://bucket/prefix or a local folder")


def put_many(storage: Storage, items: Iterable[tuple[str, bytes]], *, workers: int = 16) -> int:
    """Write many objects in parallel (S3 latency dominates single-threaded uploads)."""
    items = list(items)
    if not items:
        return 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda kv: storage.put_bytes(*kv), items):
            pass
    return len(items)


def copy_tree_to_local(storage: Storage, prefix: str, target: Path) -> list[Path]:
    """Download every object under `prefix` into `target` (used for S3 dataset sources)."""
    out = []
    for key in storage.list(prefix):
        rel = key[len(prefix):].lstrip("/")
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.get_bytes(key))
        out.append(path)
    return out


def remove_local_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
