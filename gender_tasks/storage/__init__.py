"""Object storage: one small interface (base.Storage) and its backends, a local directory (local) and S3
through boto3 (s3), each opened from a location by locations.open_location.

Keys are POSIX-style relative paths ("datasets/<id>/manifest.csv"); every write is atomic, so no
reader ever sees half an object. The rest of the package never builds a client itself, and never reads
a location's scheme itself: it asks locations (open_storage, is_remote_location, local_path_of,
is_storage_location).

A new backend is one module: a class with Storage's methods and a `register_scheme("<scheme>", opener)`
call, imported here.
"""

from .base import (
    DISK_FULL_ERRNOS,
    PROBE_PREFIX,
    DiskFullError,
    ObjectInfo,
    Storage,
    StorageConfigError,
    StorageError,
    disk_full,
    file_kind,
    get_recorded,
    human_bytes,
    put_many,
    put_recorded,
    read_verified,
    recorded_sha256,
)
from .local import LocalStorage
from .locations import (
    Location,
    default_storage_uri,
    is_remote_location,
    is_storage_location,
    local_path_of,
    open_location,
    open_storage,
    register_scheme,
    unregister_scheme,
)
from .s3 import (
    CONN_ID_VAR,
    S3_CHECK_CONNECT_TIMEOUT_S,
    S3_CHECK_MAX_ATTEMPTS,
    S3_CHECK_READ_TIMEOUT_S,
    S3_CONNECT_TIMEOUT_S,
    S3_MAX_ATTEMPTS,
    S3_READ_TIMEOUT_S,
    S3Storage,
    s3_options_from_connection,
)

__all__ = [
    "CONN_ID_VAR",
    "DISK_FULL_ERRNOS",
    "PROBE_PREFIX",
    "S3_CHECK_CONNECT_TIMEOUT_S",
    "S3_CHECK_MAX_ATTEMPTS",
    "S3_CHECK_READ_TIMEOUT_S",
    "S3_CONNECT_TIMEOUT_S",
    "S3_MAX_ATTEMPTS",
    "S3_READ_TIMEOUT_S",
    "DiskFullError",
    "LocalStorage",
    "Location",
    "ObjectInfo",
    "S3Storage",
    "Storage",
    "StorageConfigError",
    "StorageError",
    "default_storage_uri",
    "disk_full",
    "file_kind",
    "get_recorded",
    "human_bytes",
    "is_remote_location",
    "is_storage_location",
    "local_path_of",
    "open_location",
    "open_storage",
    "put_many",
    "put_recorded",
    "read_verified",
    "recorded_sha256",
    "register_scheme",
    "s3_options_from_connection",
    "unregister_scheme",
]
