"""A storage backend held in this process's memory, `mem://<bucket>/<prefix>`: the proof that a new backend
is one module and the registration of its scheme.

Importing this module registers the scheme; from then on open_storage("mem://...") (and so a run's
`storage` setting, a model or weights location, a dataset source) opens it, and it passes the same
contract tests as the local and S3 backends (the `any_storage` fixture). A bucket lives as long as the
process, or until drop_bucket.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from gender_tasks.storage import Location, ObjectInfo, StorageConfigError, register_scheme
from gender_tasks.storage.base import PROBE_BODY, check_key, check_prefix, is_probe, probe_key

SCHEME = "mem"
_BUCKETS: dict[str, dict[str, tuple[bytes, float]]] = {}  # bucket -> {full key: (bytes, modified)}
_LOCK = threading.Lock()


class MemoryStorage:
    """A bucket and prefix in memory; every open of the same bucket sees the same objects."""

    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"{SCHEME}://{bucket}/{self.prefix}".rstrip("/")
        with _LOCK:
            self._objects = _BUCKETS.setdefault(bucket, {})

    @classmethod
    def open(cls, location: Location) -> MemoryStorage:
        if not location.netloc:
            raise StorageConfigError(f"storage URI {location.uri!r} names no bucket; use mem://<bucket>/<prefix>")
        return cls(location.netloc, location.path)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def check(self, *, writable: bool = True) -> None:
        if writable:
            probe = self._key(probe_key())
            self._put(probe, PROBE_BODY)
            self._pop(probe)

    def _put(self, full_key: str, data: bytes) -> None:
        with _LOCK:
            self._objects[full_key] = (bytes(data), time.time())

    def _pop(self, full_key: str) -> None:
        with _LOCK:
            self._objects.pop(full_key, None)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(self._key(key), data)

    def get_bytes(self, key: str) -> bytes:
        with _LOCK:
            found = self._objects.get(self._key(key))
        if found is None:
            raise FileNotFoundError(f"{self.url(key)} does not exist")
        return found[0]

    def exists(self, key: str) -> bool:
        with _LOCK:
            return self._key(key) in self._objects

    def list(self, prefix: str) -> list[str]:
        return [o.key for o in self.list_info(prefix)]

    def delete(self, key: str) -> None:
        self._pop(self._key(key))

    def copy(self, src: str, dst: str) -> None:
        target = self._key(dst)
        self._put(target, self.get_bytes(src))

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        check_prefix(prefix)
        base = self.prefix + "/" if self.prefix else ""
        with _LOCK:
            items = sorted(self._objects.items())
        return [
            ObjectInfo(full[len(base) :], len(data), modified)
            for full, (data, modified) in items
            if full.startswith(base + prefix) and not is_probe(full[len(base) :])
        ]

    def url(self, key: str) -> str:
        return f"{SCHEME}://{self.bucket}/{self._key(key)}"

    def local_path(self, key: str) -> Path | None:
        return None


def drop_bucket(bucket: str) -> None:
    with _LOCK:
        _BUCKETS.pop(bucket, None)


register_scheme(SCHEME, MemoryStorage.open)
