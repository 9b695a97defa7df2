"""Checkpoints in object storage: everything needed to resume training after the last finished epoch.

A checkpoint is one torch-saved dict: {"model", "optimizer" (state dicts), "epoch" (0-based, the last
finished), "frozen" (the backbone's state in that epoch), "history" (per-epoch records so far)}. The
learning-rate schedule is not in it: it is a function of the global step (recipe.make_scheduler's
`first_step`), which the epoch gives, so a resumed run rebuilds it rather than trusting stored state.

A checkpoint is input like any stored object, never code: it is read with torch's weights-only
unpickler (tensors, numbers, strings, lists, dicts; a pickle naming any other global is refused
unexecuted), and only when its sha256 matches the one its sidecar (layout.CHECKPOINT_RECORD, written
after the checkpoint) recorded. A checkpoint that fails any check (no sidecar, another checksum, bytes
torch cannot load, a state of another shape) is not an error: it is only a head start, so it is
logged, deleted with its sidecar, and training starts from the first epoch in the same attempt; a
retry would read the same bad bytes, and a bad checkpoint must not block its model for good.
"""

from __future__ import annotations

import io
import json
import logging

import torch

from .. import layout
from ..integrity import sha256_hex
from ..storage import Storage

log = logging.getLogger(__name__)

_STATE_KEYS = ("model", "optimizer", "epoch", "frozen", "history")


def record_key(key: str) -> str:
    """The sidecar of the checkpoint at `key`: its sha256 and size, in the same folder."""
    folder, _, _ = key.rpartition("/")
    return f"{folder}/{layout.CHECKPOINT_RECORD}" if folder else layout.CHECKPOINT_RECORD


def save_checkpoint(storage: Storage, key: str, *, model, optimizer, epoch: int, frozen: bool,
                    history: list[dict]) -> None:  # fmt: skip
    """The checkpoint, then its sidecar: a checkpoint is trusted only once its checksum is recorded."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "frozen": frozen,
             "history": history}  # fmt: skip
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    storage.put_bytes(key, data)
    storage.put_bytes(record_key(key), json.dumps({"sha256": sha256_hex(data), "bytes": len(data)}).encode())


def discard_checkpoint(storage: Storage, key: str) -> None:
    """Delete the checkpoint and its sidecar (the checkpoint first: a sidecar alone is never loaded)."""
    storage.delete(key)
    storage.delete(record_key(key))


def load_checkpoint(storage: Storage, key: str, model: torch.nn.Module) -> dict | None:
    """The checkpoint at `key` for `model`, or None: there is none, or it failed a check (then it was
    logged and deleted, and the caller trains from the start). Storage errors propagate (retryable)."""
    if not storage.exists(key):
        return None
    state, problem = _read(storage, key, model)
    if problem:
        log.warning("discarding the checkpoint %s: %s; training starts again from the first epoch",
                    storage.url(key), problem)  # fmt: skip
        discard_checkpoint(storage, key)
        return None
    return state


def _read(storage: Storage, key: str, model: torch.nn.Module) -> tuple[dict | None, str]:
    """(state, "") for a checkpoint that passes every check, else (None, why not)."""
    try:
        record = json.loads(storage.get_bytes(record_key(key)))
    except FileNotFoundError:
        return None, f"it has no checksum record ({layout.CHECKPOINT_RECORD}; killed while writing it?)"
    except ValueError:
        return None, f"its checksum record {layout.CHECKPOINT_RECORD} is not valid JSON"
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None, f"its checksum record {layout.CHECKPOINT_RECORD} holds no sha256"
    try:
        data = storage.get_bytes(key)
    except FileNotFoundError:
        return None, "it was deleted while being read"
    if sha256_hex(data) != record["sha256"]:
        return None, (f"its sha256 is not the one recorded when it was written ({len(data):,} bytes, "
                      f"{record.get('bytes', '?')} recorded): changed or damaged since")  # fmt: skip
    try:
        # weights_only: torch's restricted unpickler; anything but tensors and plain containers is refused.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (untrusted bytes: any failure to parse them is "not a checkpoint")
        return None, f"torch cannot load it as weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return state, _shape_problem(state, model)


def _shape_problem(state, model: torch.nn.Module) -> str:
    """Why `state` is not a checkpoint of `model` ('' if it is)."""
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        return f"it is not a training checkpoint (a dict of {', '.join(_STATE_KEYS)})"
    if not isinstance(state["epoch"], int) or state["epoch"] < 0 or not isinstance(state["frozen"], bool):
        return "its epoch or frozen flag is not a number / a flag"
    if not isinstance(state["history"], list) or not all(isinstance(h, dict) for h in state["history"]):
        return "its history is not a list of per-epoch records"
    if len(state["history"]) != state["epoch"] + 1:
        return f"its history holds {len(state['history'])} epochs, not the {state['epoch'] + 1} it finished"
    if not isinstance(state["optimizer"], dict) or not isinstance(state["model"], dict):
        return "its model or optimizer state is not a state dict"
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) if isinstance(t, torch.Tensor) else None for name, t in state["model"].items()}
    if found != expected:
        return "its weights are not those of this model (other tensor names or shapes)"
    return ""
