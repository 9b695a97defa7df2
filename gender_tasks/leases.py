"""Leases: how work in progress tells `gc` (housekeeping.py) to keep its objects.

Ages alone cannot tell a live run from a dead one: `gc --keep-days 0` judged every run expired,
the one training right now included, and an ingest uploading for longer than an hour lost its
images. So work in progress holds a lease, as S3 multipart uploads, DVC and PostgreSQL's backends
do: a small object in storage that the holder rewrites every `heartbeat_s` seconds while it works
and removes when it ends, whether it succeeded or failed (its objects then age as any others).

    runs/<run_key>/leases/<holder>.json          each pipeline step of a run, while it runs
    datasets/<dataset_id>/leases/<holder>.json   an ingest uploading; every step of a run using the dataset

A lease is fresh while its object was written less than `expiry_s` ago (GENDER_LEASE_EXPIRY_S,
default 15 heartbeats), judged by the object's modification time in storage: the clock `gc` ages
every object by. Past that its holder is taken for dead (killed with kill -9, a lost machine):
it blocks `gc` for no longer. Each holder writes its own key, so concurrent steps of one run (the
mapped trainings) never remove each other's lease.

A holder that cannot renew for half the expiry (storage unreachable, the process stopped) may have
been taken for dead: `Lease.lapsed` says so, for good, and work that commits (ingest's manifest)
checks what it wrote is still there before committing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .environment import get_number, variable
from .errors import PermanentError
from .storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

HEARTBEAT_VAR = "GENDER_LEASE_HEARTBEAT_S"
EXPIRY_VAR = "GENDER_LEASE_EXPIRY_S"
DEFAULT_HEARTBEAT_S = variable(HEARTBEAT_VAR).default  # 60 s
# 900 s, 15 heartbeats: a slow storage or a busy machine skips some without losing the lease.
DEFAULT_EXPIRY_S = variable(EXPIRY_VAR).default
# The expiry must leave the heartbeat room for a few failed renewals.
MIN_BEATS_PER_EXPIRY = 3
_HOLDER_CHARS = re.compile(r"[^a-z0-9]+")


class LeaseConfigError(PermanentError):
    """The lease timings in the environment are not usable; the message names the variable and a value that works."""


def heartbeat_seconds() -> float:
    return get_number(HEARTBEAT_VAR, error=LeaseConfigError)


def expiry_seconds() -> float:
    """How long a lease not renewed stays fresh; at least MIN_BEATS_PER_EXPIRY heartbeats."""
    expiry = get_number(EXPIRY_VAR, error=LeaseConfigError)
    beat = heartbeat_seconds()
    if expiry < MIN_BEATS_PER_EXPIRY * beat:
        raise LeaseConfigError(
            f"{EXPIRY_VAR}={expiry:g} is under {MIN_BEATS_PER_EXPIRY} heartbeats ({HEARTBEAT_VAR}={beat:g}): a lease "
            f"would lapse on one slow renewal; set {EXPIRY_VAR} to {MIN_BEATS_PER_EXPIRY * beat:g} or more"
        )
    return expiry


def holder_name(what: str) -> str:
    """A lease object's name: what holds it (e.g. "train") and a random part, unique per holder."""
    return f"{_HOLDER_CHARS.sub('-', what.lower()).strip('-') or 'lease'}-{uuid.uuid4().hex[:12]}"


def is_fresh(info: ObjectInfo, now: float, expiry: float) -> bool:
    """Whether a listed lease object was renewed less than `expiry` seconds before `now`."""
    return now - info.modified < expiry


def describe_holder(storage: Storage, key: str) -> str:
    """'<owner> (pid <pid> on <host>)' from a lease object, for gc's messages; what a lease holds is not trusted."""
    try:
        record = json.loads(storage.get_bytes(key))
    except (FileNotFoundError, ValueError):
        return "an unknown holder"
    if not isinstance(record, dict):
        return "an unknown holder"
    owner, pid, host = (str(record.get(k, "?"))[:200] for k in ("owner", "pid", "host"))
    return f"{owner} (pid {pid} on {host})"


class Lease:
    """One held lease: `renew()` writes it; a daemon thread calls it every `heartbeat_s` (hold_lease)."""

    def __init__(self, storage: Storage, key: str, *, owner: str, heartbeat_s: float, expiry_s: float):
        self.storage, self.key, self.owner = storage, key, owner
        self.heartbeat_s, self.expiry_s = heartbeat_s, expiry_s
        self.started = time.time()
        self._lock = threading.Lock()
        self._released = False
        self._renewed_at: float | None = None  # time.monotonic() of the last write that succeeded
        self._lapsed = False

    def renew(self) -> None:
        """Write the lease now; raises what storage raises (the heartbeat logs it and tries again)."""
        record = {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                  "renewed": time.time(), "heartbeat_s": self.heartbeat_s, "expiry_s": self.expiry_s}  # fmt: skip
        with self._lock:  # never after release: a late heartbeat must not bring a removed lease back
            if self._released:
                return
            self.storage.put_bytes(self.key, json.dumps(record).encode())
            done = time.monotonic()
            if self._renewed_at is not None and done - self._renewed_at > self._lapse_s:
                self._lapsed = True
            self._renewed_at = done

    @property
    def _lapse_s(self) -> float:
        return self.expiry_s / 2  # half: for a storage clock that runs ahead of ours

    @property
    def lapsed(self) -> bool:
        """Whether `gc` may have taken this lease for dead at some point (it went unrenewed too long)."""
        if self._renewed_at is None:
            return False
        return self._lapsed or time.monotonic() - self._renewed_at > self._lapse_s

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # any storage failure: the next beat tries again; `lapsed` records a long gap
                log.warning("could not renew the lease %s (%s: %s); trying again in %gs", self.key,
                            type(exc).__name__, exc, self.heartbeat_s)  # fmt: skip

    def release(self) -> None:
        with self._lock:
            self._released = True
            try:
                self.storage.delete(self.key)
            except Exception as exc:  # the work itself is done: gc takes the lease for dead after expiry_s
                log.warning("could not remove the lease %s (%s: %s); gc will treat it as abandoned after %gs",
                            self.key, type(exc).__name__, exc, self.expiry_s)  # fmt: skip


@contextmanager
def hold_lease(storage: Storage, key: str, *, owner: str, heartbeat_s: float | None = None,
               expiry_s: float | None = None) -> Iterator[Lease]:  # fmt: skip
    """Hold the lease `key` (layout.run_lease_key / dataset_lease_key) while the block runs.

    It is written before the block starts (a storage that cannot take it fails the work before it
    begins), renewed every `heartbeat_s` (GENDER_LEASE_HEARTBEAT_S) by a daemon thread, and removed
    when the block ends, however it ends.
    """
    beat = heartbeat_seconds() if heartbeat_s is None else heartbeat_s
    expiry = expiry_seconds() if expiry_s is None else expiry_s
    lease = Lease(storage, key, owner=owner, heartbeat_s=beat, expiry_s=expiry)
    lease.renew()
    stop = threading.Event()
    thread = threading.Thread(target=lease._beat, args=(stop,), name=f"lease {key}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        lease.release()
        thread.join(timeout=1.0)  # a renewal in flight ends on its own; after release it writes nothing
