"""Classify a folder of images with an exported model (torch.export `model.pt2`), no training code
needed, and load exported models safely wherever they are used (the ensemble, external evaluation,
`predict`, scoring).

The model file carries its input sizes and class names (`meta.json` inside the archive). A model's
files are verified before they are used: the model card written last beside them (model_card.json)
records every file's sha256 under "files", and model.pt2 is loaded only once its bytes match; a stored
model whose bytes changed (tampered with, or damaged) is an IntegrityError, never loaded. The archive is
then checked for anything torch.export.load would unpickle or evaluate (evaluation/pt2.py). A standalone
model.pt2 with no card beside it (a user's own copy) loads with a warning that it cannot be verified,
unless the caller knows the sha256 it must have.

A `model.ts` (TorchScript) of a run from an earlier version still loads, verified the same way (its
card records model.ts); TorchScript is deprecated in torch 2.14, so a warning says to retrain.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import layout, tables
from ..data.folders import IMAGE_SUFFIXES, is_skipped, log_skipped, read_regular, shown
from ..data.images import decode_resize
from ..errors import PermanentError, decode_failure
from ..integrity import IntegrityError, repair_hint, verify_bytes
from ..settings import Settings
from ..storage import Storage, local_path_of, open_location
from .pt2 import UnsafeArchive, is_pt2, load_archive

log = logging.getLogger(__name__)

MODEL_FILE = layout.MODEL_FILE
LEGACY_MODEL_FILE = layout.LEGACY_MODEL_FILE  # TorchScript, written by earlier versions
MODEL_FILES = (MODEL_FILE, LEGACY_MODEL_FILE)
MODEL_CARD = layout.MODEL_OUTPUTS[-1]
FILES_RECORD = "files"  # the model card's {file name: sha256} of the files written before it
MAX_MODEL_BYTES = 2_000_000_000  # an ensemble of the four paper-profile models is ~0.3 GB
MAX_CARD_BYTES = 10_000_000
MAX_IMAGE_BYTES = Settings.max_file_bytes  # the ingest's per-file limit
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A model file inside a storage: <root>/runs/<run>[/repeats/<r>]/models/<model>/ or <root>/datasets/<id>/models/<m>/<key>/
_STORED = re.compile(r"^(?P<root>.+?)/(runs/[^/]+(/repeats/\d+)?/models/[^/]+|datasets/[^/]+/models/[^/]+/[^/]+)$")
_FIX = "give the model.pt2 of a trained run (runs/<run_key>/models/<model>/model.pt2 in the storage, or its URI)"


class ModelFileError(PermanentError):
    """The model file is missing, or not a model this pipeline exported; the message says which and the fix."""


class ImagesFolderError(PermanentError):
    """The folder to classify is missing, not a folder, or holds no images."""


# --- model cards: the sha256 of every file written before them ----------------------------------------------


def card_checksums(card: bytes, names, *, what: str, fix: str) -> dict[str, str] | None:
    """The sha256s the model card `card` (bytes) records for `names`, or None where it records none
    (a card written before cards held checksums). A card that is not a JSON object, or a record that
    lacks one of `names`, is an IntegrityError naming `what` (the card) with `fix`."""
    try:
        parsed = json.loads(card)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise IntegrityError(f"{what} is not a model card (a JSON object): damaged or replaced. {fix}")
    files = parsed.get(FILES_RECORD)
    if files is None:
        return None
    bad = [n for n in names if not isinstance(files, dict) or not _SHA256.match(str(files.get(n, "")))]
    if bad:
        raise IntegrityError(f"{what} records no valid sha256 for {', '.join(bad)}: damaged or edited. {fix}")
    return {n: files[n] for n in names}


def stored_checksums(storage: Storage, prefix: str, names) -> dict[str, str]:
    """The sha256s recorded for `names` by the model card in the storage folder `prefix` (a run's or a
    keyed model's): a card is required there, with its record (IntegrityError, naming it, if not)."""
    key, fix = f"{prefix}/{MODEL_CARD}", repair_hint(storage.uri)
    try:
        card = storage.get_bytes(key)
    except FileNotFoundError:
        raise IntegrityError(f"{storage.url(key)} is missing: the model files beside it cannot be verified. {fix}") \
            from None  # fmt: skip
    sums = card_checksums(card, names, what=storage.url(key), fix=fix)
    if sums is None:
        raise IntegrityError(f"{storage.url(key)} records no checksums of the model's files (written by an earlier "
                             f"version): they cannot be verified. {fix}")  # fmt: skip
    return sums


def stored_model_file(storage: Storage, prefix: str) -> str:
    """The model file the card in `prefix` records: model.pt2, or the model.ts of a run from an earlier
    version (IntegrityError, naming the card, where it records neither or no card is there)."""
    key, fix = f"{prefix}/{MODEL_CARD}", repair_hint(storage.uri)
    try:
        parsed = json.loads(storage.get_bytes(key))
    except FileNotFoundError:
        raise IntegrityError(f"{storage.url(key)} is missing: the model files beside it cannot be verified. {fix}") \
            from None  # fmt: skip
    except ValueError:
        parsed = None
    files = parsed.get(FILES_RECORD) if isinstance(parsed, dict) else None
    return LEGACY_MODEL_FILE if isinstance(files, dict) and MODEL_FILE not in files and LEGACY_MODEL_FILE in files \
        else MODEL_FILE  # fmt: skip


def load_stored_model(storage: Storage, prefix: str) -> tuple[torch.nn.Module, dict]:
    """The model file in the storage folder `prefix` (model.pt2, or an earlier run's model.ts), verified
    against the model card beside it (required)."""
    name = stored_model_file(storage, prefix)
    key = f"{prefix}/{name}"
    sha = stored_checksums(storage, prefix, [name])[name]
    data = verify_bytes(storage.get_bytes(key), sha, what=storage.url(key), fix=repair_hint(storage.uri))
    return _load_module(data, storage.url(key))


# --- loading a model file ----------------------------------------------------------------------------------


def load_exported(model: str | Path, expected_sha256: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Load a model.pt2 (or an earlier run's model.ts) from a path or a storage URI (s3://bucket/.../model.pt2,
    file://...), verified first.

    With `expected_sha256` its bytes must have that sha256. Without, a model card beside it (the same
    folder) must record its sha256; with no card there it loads with a warning that it cannot be verified
    (a user's standalone copy). Either way a mismatch is an IntegrityError raised before anything loads,
    and a file that is missing or not a model is a ModelFileError."""
    text = str(model)
    data, card, fix = _read_model(text)
    unverified = ""
    if expected_sha256 is None:
        has_card = card is not None
        name = text.rpartition("/")[2]
        recorded = card_checksums(card, [name], what=_beside(text, MODEL_CARD), fix=fix) if has_card else None
        if recorded:
            expected_sha256 = recorded[name]
        else:
            unverified = "its model card records no checksums (written by an earlier version)" if has_card else \
                f"no {MODEL_CARD} beside it records its sha256 (a standalone model file)"  # fmt: skip
    if expected_sha256 is not None:
        verify_bytes(data, expected_sha256, what=text, fix=fix)
    loaded = _load_module(data, text)
    if unverified:  # said once it loads: a file that is no model at all gets only its error
        log.warning("%s cannot be verified: %s", text, unverified)
    return loaded


def _beside(text: str, name: str) -> str:
    return f"{text.rpartition('/')[0]}/{name}" if "/" in text else name


def _fix_for(model: str) -> str:
    """How to repair the bad model file `model` (a storage URI or a local path, as given): the storage's
    repair command when it lies in a model folder of a storage, else replace the file."""
    m = _STORED.match(model.rpartition("/")[0])
    if m:
        return repair_hint(m["root"])
    return "replace it with an intact copy of the model file it was copied from"


def _read_model(text: str) -> tuple[bytes, bytes | None, str]:
    """(the model file's bytes, the bytes of the model card beside it or None, the fix for bad bytes)."""
    path = local_path_of(text)
    if path is None:  # in object storage (s3://bucket/.../model.pt2)
        parent, _, name = text.rpartition("/")
        storage = open_location(parent)
        try:
            data = storage.get_bytes(name)
        except FileNotFoundError:
            raise ModelFileError(f"model {text} does not exist: {_FIX}") from None
        try:
            card = storage.get_bytes(MODEL_CARD) if name in MODEL_FILES else None
        except FileNotFoundError:
            card = None
        return data, card, _fix_for(text)
    data = _read_local(path, MAX_MODEL_BYTES, text)
    card_path = path.parent / MODEL_CARD
    card = None
    if path.name in MODEL_FILES and os.path.lexists(card_path):
        card = _read_local(card_path, MAX_CARD_BYTES, str(card_path), "model card")
    return data, card, _fix_for(text)


def _read_local(path: Path, max_bytes: int, given: str, kind: str = "model file") -> bytes:
    """A local model file's (or card's) bytes: a regular file (a FIFO or device is refused, never opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{kind} {shown(given)} does not exist: {_FIX}") from None
    except OSError as exc:
        raise ModelFileError(f"{kind} {shown(given)} cannot be read ({exc.strerror or exc}): fix its "
                             "permissions or give another file") from None  # fmt: skip
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{shown(given)} is a folder, not a model file: {_FIX}")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{shown(given)} is not a regular file (a FIFO or device; never opened): {_FIX}")
    try:
        return read_regular(path, max_bytes)
    except OSError as exc:
        raise ModelFileError(f"{kind} {shown(given)} cannot be read ({exc.strerror or exc}): {_FIX}") from None


def _load_module(data: bytes, what: str) -> tuple[torch.nn.Module, dict]:
    """The exported module in `data` and its meta.json (with `input_sizes`); a ModelFileError where `data`
    is not one. A .pt2 is checked first for anything that loading would unpickle or evaluate (pt2.py)."""
    if is_pt2(data):
        try:
            module, extra = load_archive(data)
        except UnsafeArchive as exc:
            raise ModelFileError(f"{shown(what)} is refused unloaded: {exc}. Loading it could run code; {_FIX}") \
                from None  # fmt: skip
        except Exception as exc:  # noqa: BLE001  (untrusted bytes: any failure to parse them is "not a model")
            raise ModelFileError(f"{shown(what)} is not a model exported by this pipeline (torch.export cannot load "
                                 f"it: {_reason(exc)}): {_FIX}") from None  # fmt: skip
        text = extra.get("meta.json", "")
    else:
        module, text = _load_torchscript(data, what)
    try:
        meta = json.loads(text)
        sizes = [int(s) for s in meta.get("input_sizes") or [meta["image_size"]]]
        classes = meta["classes"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelFileError(f"{shown(what)} has no meta.json of this pipeline (input size, classes): "
                             f"{_FIX}") from None  # fmt: skip
    if not isinstance(classes, list) or len(classes) != 2:
        raise ModelFileError(f"{shown(what)} names {classes!r} as its classes, not two: {_FIX}")
    if not sizes or any(not 1 <= s <= 4096 for s in sizes):
        raise ModelFileError(f"{shown(what)} declares input sizes {sizes!r}: {_FIX}")
    meta["input_sizes"] = sizes
    return module, meta


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text.split(". ")[0][:200] if text else type(exc).__name__


def _load_torchscript(data: bytes, what: str) -> tuple[torch.nn.Module, str]:
    """A model.ts written by an earlier version (TorchScript's own loader: tensors and code objects of its
    format, no Python pickle): loads, with a warning that the format is deprecated."""
    extra = {"meta.json": ""}
    try:
        with warnings.catch_warnings():  # said once below, in words the user can act on
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001  (untrusted bytes: any failure to parse them is "not a model")
        raise ModelFileError(f"{shown(what)} is not a model exported by this pipeline (neither a torch.export "
                             f"archive nor TorchScript: {_reason(exc)}): {_FIX}") from None  # fmt: skip
    log.warning("%s is TorchScript (model.ts), exported by an earlier version: it loads, but TorchScript is "
                "deprecated in PyTorch; train the run again to get a model.pt2", shown(what))  # fmt: skip
    return module.eval(), extra["meta.json"]


def input_batches(arrays: list[list[np.ndarray]]) -> list[torch.Tensor]:
    """The model's inputs for a batch: `arrays[i]` holds every image decoded at input size i (uint8 HWC),
    as one float NCHW tensor in [0, 1] per input size."""
    return [torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float() / 255.0 for a in arrays]


def decode_inputs(data: bytes, meta: dict) -> list[np.ndarray]:
    """One image's bytes decoded at each of the model's input sizes (decode_resize, as training decodes)."""
    return [decode_resize(data, size) for size in meta["input_sizes"]]


# --- classifying a folder ----------------------------------------------------------------------------------


def list_images(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The images under `folder` (by suffix, recursively) and the entries skipped with why.

    Nothing is followed out of the folder and nothing but regular files is taken: a symbolic link is
    skipped unless it names a regular file inside the folder, a FIFO or device is skipped (never
    opened: it would block the read or never end), and linked folders are not descended into. Hidden and
    system entries (folders.is_skipped: `.DS_Store`, macOS's `._name` twins and `__MACOSX/`, `Thumbs.db`) are
    passed over as ingest passes them over, and counted in the log.
    """
    folder = Path(folder)
    try:
        st = os.stat(folder)
    except OSError:
        raise ImagesFolderError(f"images folder {shown(folder)} does not exist: give the folder of images to "
                                "classify (--images)") from None  # fmt: skip
    if not stat.S_ISDIR(st.st_mode):
        raise ImagesFolderError(f"{shown(folder)} is not a folder: give the folder of images to classify (--images)")
    root = Path(os.path.realpath(folder))
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    hidden: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        hidden += [Path(dirpath, name) for name in sorted(dirnames + filenames) if is_skipped(name)]
        dirnames[:] = [d for d in dirnames if not is_skipped(d)]
        filenames = [name for name in filenames if not is_skipped(name)]
        linked = sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        if linked:
            log.warning("not searching %d linked folder(s) (links are not followed), e.g. %s", len(linked),
                        shown(Path(dirpath, linked[0])))  # fmt: skip
        dirnames[:] = sorted(d for d in dirnames if d not in linked)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            why = _skip_reason(path, root)
            if why:
                skipped.append((path, why))
            else:
                files.append(path)
    log_skipped(hidden)
    return files, skipped


def _skip_reason(path: Path, root: Path) -> str:
    """Why an entry is not read ('' for a regular file inside the folder)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if not Path(os.path.realpath(path)).is_relative_to(root):
                return "a symbolic link out of the images folder: skipped (never opened)"
            st = os.stat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, device or folder): skipped (never opened)"
    return ""


def predict_folder(model: str | Path, folder: Path, out_csv: Path, batch_size: int = 64) -> int:
    files, skipped = list_images(folder)
    if not files:
        raise ImagesFolderError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {shown(folder)}"
                                f"{f' ({len(skipped)} entries skipped)' if skipped else ''}: give a folder that "
                                "holds images")  # fmt: skip
    module, meta = load_exported(model)
    rows = [{"file": str(path), "predicted": "", "prob_male": np.nan, "error": why} for path, why in skipped]
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        arrays, ok = [], []
        for path in chunk:
            try:
                arrays.append(decode_inputs(read_regular(path, MAX_IMAGE_BYTES), meta))
                ok.append(path)
            except Exception as exc:  # one unreadable file must not stop the rest
                rows.append({"file": str(path), "predicted": "", "prob_male": np.nan, "error": decode_failure(exc)})
        if not arrays:
            continue
        with torch.inference_mode():
            prob = module(*input_batches([list(per_size) for per_size in zip(*arrays, strict=True)])).numpy()
        for path, p in zip(ok, prob, strict=True):
            rows.append({"file": str(path), "predicted": meta["classes"][int(p >= 0.5)],
                         "prob_male": float(p), "error": ""})  # fmt: skip
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tables.to_csv(pd.DataFrame(rows, columns=["file", "predicted", "prob_male", "error"]), out_csv, index=False)
    log.info("predicted %d images with %s -> %s", len(rows), meta.get("model"), out_csv)
    return len(rows)
