"""Storage locations: the one place that reads a location's scheme (`s3://bucket/prefix`, `file:///path`, a
plain path) and opens the backend registered for it.

A backend module registers its scheme when it is imported (`register_scheme("s3", S3Storage.open)`);
the package imports every built-in backend, so `open_location` knows them all. Other modules ask here
(is_remote_location, local_path_of, is_storage_location) and never look at a scheme themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..environment import default_data_dir, get_text
from .base import Storage, StorageConfigError

# The scheme of a local folder: given as a file:// URI or as a plain path.
LOCAL_SCHEME = "file"


@dataclass(frozen=True)
class Location:
    """A storage location, parsed: what a backend's opener is given."""

    uri: str  # as the user gave it
    scheme: str  # "file" for a plain path too
    netloc: str  # the bucket of s3://bucket/prefix; "" for a local folder
    path: str  # the prefix of s3://bucket/prefix; a local folder's path (a file:// URI's decoded)


Opener = Callable[[Location], Storage]
_OPENERS: dict[str, Opener] = {}


def register_scheme(scheme: str, opener: Opener) -> None:
    """Let `open_location` open `<scheme>://...` locations with `opener` (a backend's constructor from a
    Location); a backend module calls this once, when it is imported. Registering a scheme again replaces it."""
    _OPENERS[scheme.lower()] = opener


def unregister_scheme(scheme: str) -> None:
    _OPENERS.pop(scheme.lower(), None)


def parse_location(uri: str) -> Location:
    """`uri` split into scheme, bucket (netloc) and path; a plain path has the local scheme."""
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return Location(uri, LOCAL_SCHEME, "", uri)
    if parsed.scheme == LOCAL_SCHEME:
        return Location(uri, LOCAL_SCHEME, parsed.netloc, unquote(parsed.path))
    return Location(uri, parsed.scheme, parsed.netloc, parsed.path)


def default_storage_uri() -> str:
    """GENDER_STORAGE, else store/ in the default data folder (environment.default_data_dir)."""
    return get_text("GENDER_STORAGE") or (default_data_dir() / "store").as_uri()


def open_location(uri: str) -> Storage:
    """The storage at `uri`: `s3://bucket/prefix`, `file:///path`, a plain path, or the scheme of any other
    registered backend."""
    location = parse_location(uri)
    opener = _OPENERS.get(location.scheme)
    if opener is None:
        raise StorageConfigError(f"unsupported storage URI {uri!r}; use s3://bucket/prefix or a local folder")
    return opener(location)


def open_storage(uri: str | None = None) -> Storage:
    """Storage for a URI: `s3://bucket/prefix`, `file:///path`, or a plain path; empty: the default."""
    return open_location(uri or default_storage_uri())


def is_remote_location(text: str) -> bool:
    """Whether `text` names a location that a registered backend other than the local one serves
    (s3://bucket/prefix): what is read through open_location, not from the file system. Anything
    else (a plain path, a file:// URI, an unknown scheme) is not."""
    scheme = parse_location(text).scheme
    return scheme != LOCAL_SCHEME and scheme in _OPENERS


def local_path_of(text: str) -> Path | None:
    """The path on this machine that `text` names (a plain path, `~` expanded, or a file:// URI); None for
    a remote location (see is_remote_location)."""
    if is_remote_location(text):
        return None
    location = parse_location(text)
    return Path(location.path if location.scheme == LOCAL_SCHEME else text).expanduser()


def is_storage_location(value: object) -> bool:
    """Whether `value` names a storage location explicitly: a URI of a registered scheme (s3://...,
    file://...) or an absolute or ./-relative path. A bare word ("imagenet") is not one."""
    if not isinstance(value, str):
        return False
    scheme = urlparse(value).scheme
    if not scheme:
        return value.startswith(("/", "."))
    return value[len(scheme) :].startswith("://") and scheme in _OPENERS
