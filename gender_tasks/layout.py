"""Where every artifact lives in object storage: the one owner of the storage layout.

Every key the pipeline reads or writes is built here, and nothing here imports more than the
standard library, so the UI plugin can find a report without loading the training stack.

    datasets/<dataset_id>/images/<label>/<sha256>.<ext>   the images, content-addressed
    datasets/<dataset_id>/manifest.csv                    one row per image; written last (commit marker)
    datasets/<dataset_id>/attributes.csv                  optional per-image attributes (labels.csv)
    datasets/<dataset_id>/splits/seed<seed>-<fractions>[-nd<d>].csv   the manifest with its split column
    datasets/<dataset_id>/cache/<size>px/shard-*.npy, index.json   decoded, resized uint8 shards (data.shards)
    datasets/<dataset_id>/models/<model>/<train_key>/...  a trained model, keyed by what determines it
                                                          (training/keys.py): checkpoint.pt (and its
                                                          checksum, checkpoint.json) while it trains,
                                                          then its outputs (below)
    datasets/<dataset_id>/label_audit/<audit_key>.csv     out-of-fold predictions, keyed the same way
    datasets/<dataset_id>/leases/<holder>.json            work in progress on the dataset (leases.py): gc keeps
                                                          the whole dataset while one is fresh
    runs/<run_key>/models/<model>/...                     a copy of the keyed outputs: metrics, history,
                                                          predictions, model.pt2, model_card, trained.json
    runs/<run_key>/models/ensemble/...                    the weighted mean probability of the run's models (no checkpoint)
    runs/<run_key>/repeats/<r>/models/<model>/...         repeat r >= 1 of a run with repeats (seed + r); repeat 0
                                                          is the run's own folder, as in a run without repeats
    runs/<run_key>/label_audit.csv, label_audit.json      a copy of the keyed audit, and where it came from
    runs/<run_key>/external/<set>.json                    external evaluation sets
    runs/<run_key>/report.html, results.json              the comparison report and its numbers (results.json
                                                          last: the run is finished)
    runs/<run_key>/leases/<holder>.json                   a step of the run in progress (leases.py)
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

DATASETS = "datasets"
RUNS = "runs"
CHECKPOINT = "checkpoint.pt"
# Beside a checkpoint, written after it: its sha256 and size ({"sha256", "bytes"}), checked before it is loaded.
CHECKPOINT_RECORD = "checkpoint.json"
# The exported model: a torch.export archive (training/export.py). Runs of earlier versions hold a TorchScript
# model.ts instead, which still loads (evaluation/predict.py) and is kept with its run.
MODEL_FILE = "model.pt2"
LEGACY_MODEL_FILE = "model.ts"
# A trained model's outputs, in the order they are written: the last one marks the model complete.
MODEL_OUTPUTS = ("predictions.csv", "history.json", "metrics.json", MODEL_FILE, "model_card.json")
# In a run's model folder: which keyed model the run's copy came from (what `gc` keeps for the run).
TRAINED_RECORD = "trained.json"
# Leases of work in progress (leases.py), one object per holder, in the folder of what they protect.
LEASES = "leases"

# storage.put_recorded keeps the sha256 of an object that is not content-addressed beside it, under
# the object's key plus this suffix; garbage collection keeps or removes it with its object.
CHECKSUM_SUFFIX = ".sha256"

# A run key holds only these characters; anything else in an Airflow run id (':' '+' ' ') becomes '_'.
_UNSAFE_RUN_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
SAFE_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def run_key_for(run_id: str) -> str:
    """A storage-safe folder name for an Airflow run id (which holds ':' and '+')."""
    return _UNSAFE_RUN_KEY_CHARS.sub("_", run_id).strip("_") or "run"


# --- datasets ---------------------------------------------------------------------------------------


def dataset_prefix(dataset_id: str) -> str:
    return f"{DATASETS}/{dataset_id}"


def images_prefix(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/images/"


def image_key(dataset_id: str, label: str, sha256: str, source_path: str) -> str:
    """Content-addressed: the same bytes under the same label always get the same key."""
    ext = PurePosixPath(source_path).suffix.lower() or ".bin"
    return f"{images_prefix(dataset_id)}{label}/{sha256}{ext}"


def checksum_key(key: str) -> str:
    """Where storage.put_recorded keeps the sha256 of the object at `key`."""
    return key + CHECKSUM_SUFFIX


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def image_sha(key: str) -> str | None:
    """The sha256 an image key names (its content address), or None for a key that names none."""
    stem = PurePosixPath(key).stem
    return stem if "/images/" in key and _SHA256.match(stem) else None


def manifest_key(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/manifest.csv"


def attributes_key(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/attributes.csv"


def split_key(dataset_id: str, seed: int, fractions: list[float], group_distance: int = -1, decode: int = 1) -> str:
    """`decode`: the version of the image decode whose perceptual hashes grouped near-identical images."""
    tag = "-".join(str(round(f * 100)) for f in fractions)
    # "-balanced": splits made before the row-balanced (group-aware) assignment are not reused under its key.
    grouping = f"-nd{group_distance}" if group_distance >= 0 else ""
    # "-d<n>": the phashes of another decode group images differently (decode 1 hashed 16-bit images as blank).
    version = f"-d{decode}" if decode > 1 else ""
    return f"{dataset_prefix(dataset_id)}/splits/seed{seed}-{tag}{grouping}-balanced{version}.csv"


def cache_prefix(dataset_id: str, size: int) -> str:
    """The sharded image cache of a dataset at one input size (its objects are data.shards' to name)."""
    return f"{dataset_prefix(dataset_id)}/cache/{size}px"


# --- trained models and audits, keyed by their inputs ------------------------------------------------


def trained_prefix(dataset_id: str, model_name: str, train_key: str) -> str:
    return f"{dataset_prefix(dataset_id)}/models/{model_name}/{train_key}"


def trained_file_key(dataset_id: str, model_name: str, train_key: str, name: str) -> str:
    """One file of a keyed model: checkpoint.pt while it trains, then MODEL_OUTPUTS."""
    return f"{trained_prefix(dataset_id, model_name, train_key)}/{name}"


def audit_result_key(dataset_id: str, audit_key: str) -> str:
    return f"{dataset_prefix(dataset_id)}/label_audit/{audit_key}.csv"


def audit_fold_key(dataset_id: str, audit_key: str, fold: int) -> str:
    """One finished fold of an audit still running: a killed audit resumes after its last finished fold."""
    return f"{dataset_prefix(dataset_id)}/label_audit/{audit_key}/fold-{fold}.csv"


def dataset_lease_key(dataset_id: str, holder: str) -> str:
    """The lease of one holder (leases.holder_name) working on a dataset: an ingest, a step of a run using it."""
    return f"{dataset_prefix(dataset_id)}/{LEASES}/{holder}.json"


def is_lease_key(key: str) -> bool:
    """Whether `key` is a lease of a run, of a dataset or of a scoring (run_lease_key, dataset_lease_key,
    scoring_lease_key)."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == SCORING:
        return parts[1] == LEASES and parts[2].endswith(".json")
    return len(parts) == 4 and parts[0] in (RUNS, DATASETS) and parts[2] == LEASES and parts[3].endswith(".json")


def describe_key(key: str) -> tuple[str, str, str]:
    """What a stored key is, for garbage collection: (kind, owner, detail).

    kind is "run" (owner: the run key), "manifest", "image", "checkpoint", "trained" (detail: the keyed
    model's prefix), "audit", "audit_fold" (detail: its audit's key) or "dataset" (anything else of a
    dataset; owner: the dataset id), or "other".
    """
    key = key.removesuffix(CHECKSUM_SUFFIX)  # a checksum record is what its object is
    parts = key.split("/")
    if parts[0] == RUNS and len(parts) >= 3:
        return "run", parts[1], ""
    if parts[0] != DATASETS or len(parts) < 3:
        return "other", "", ""
    dataset_id, rest = parts[1], parts[2:]
    if rest == ["manifest.csv"]:
        return "manifest", dataset_id, ""
    if rest[0] == "images":
        return "image", dataset_id, ""
    if rest[0] == "models" and len(rest) == 4:
        kind = "checkpoint" if rest[3] in (CHECKPOINT, CHECKPOINT_RECORD) else "trained"
        return kind, dataset_id, trained_prefix(dataset_id, rest[1], rest[2])
    if rest[0] == "label_audit" and len(rest) == 3:  # a fold: detail is the audit it belongs to
        return "audit_fold", dataset_id, audit_result_key(dataset_id, rest[1])
    if rest[0] == "label_audit":
        return "audit", dataset_id, key
    return "dataset", dataset_id, ""


# --- scorings of new images (scoring.py) -----------------------------------------------------------

SCORING = "scoring"
SCORING_PARTS = "parts"
SCORED_PREDICTIONS = "predictions.csv"  # assembled from the parts; checksum recorded beside it
SCORING_PAGE = "summary.html"  # the page the UI plugin serves; checksum recorded beside it
SCORING_SUMMARY = "summary.json"  # written last: the scoring is complete


def score_prefix(score_key: str) -> str:
    """A finished scoring: predictions.csv, summary.html, summary.json."""
    return f"{SCORING}/{score_key}"


def part_key(model_sha: str, batch_key: str) -> str:
    """One scored batch (checksum recorded beside it), kept so that a killed scoring resumes after it."""
    return f"{SCORING}/{SCORING_PARTS}/{model_sha[:16]}/{batch_key}.csv"


def scoring_lease_key(holder: str) -> str:
    """The lease of a scoring in progress (leases.holder_name names the holder): `gc` leaves scoring/ alone."""
    return f"{SCORING}/{LEASES}/{holder}.json"


def is_scoring_key(key: str) -> bool:
    """Whether `key` is a scoring's output or part. (describe_key calls these "other"; describe_scoring_key
    tells them apart for `gc`.)"""
    return key.split("/", 1)[0] == SCORING and key.count("/") >= 2 and not is_lease_key(key)


def describe_scoring_key(key: str) -> tuple[str, str] | None:
    """What a key under scoring/ is, for garbage collection: ("scoring", score key) for a scoring's outputs,
    ("part", the model's folder) for a scored batch, ("lease", "") for a lease; None for anything else.
    A checksum record (CHECKSUM_SUFFIX) is what its object is."""
    if is_lease_key(key):
        return ("lease", "") if key.split("/", 1)[0] == SCORING else None
    parts = key.removesuffix(CHECKSUM_SUFFIX).split("/")
    if parts[0] != SCORING:
        return None
    if len(parts) == 4 and parts[1] == SCORING_PARTS:
        return "part", parts[2]
    if len(parts) == 3 and parts[1] not in (SCORING_PARTS, LEASES):
        return "scoring", parts[1]
    return None


# --- runs -------------------------------------------------------------------------------------------


def run_prefix(run_key: str) -> str:
    return f"{RUNS}/{run_key}"


def run_lease_key(run_key: str, holder: str) -> str:
    """The lease of one step of a run in progress (leases.holder_name names the holder)."""
    return f"{run_prefix(run_key)}/{LEASES}/{holder}.json"


def repeat_run_key(run_key: str, repeat: int) -> str:
    """The run key that repeat `repeat` writes its models under: the run's own for repeat 0 (so a run
    with one repeat looks as it always did), runs/<run_key>/repeats/<r>/ for the others."""
    return run_key if int(repeat) == 0 else f"{run_key}/repeats/{int(repeat)}"


def model_prefix(run_key: str, model_name: str) -> str:
    return f"{run_prefix(run_key)}/models/{model_name}"


def model_file_key(run_key: str, model_name: str, name: str) -> str:
    """One file of a trained model: checkpoint.pt, metrics.json, history.json, predictions.csv,
    model.pt2, model_card.json."""
    return f"{model_prefix(run_key, model_name)}/{name}"


def label_audit_key(run_key: str) -> str:
    return f"{run_prefix(run_key)}/label_audit.csv"


def label_audit_record_key(run_key: str) -> str:
    """Which keyed audit the run's label_audit.csv was copied from."""
    return f"{run_prefix(run_key)}/label_audit.json"


def external_prefix(run_key: str) -> str:
    return f"{run_prefix(run_key)}/external/"


def external_key(run_key: str, set_name: str) -> str:
    return f"{external_prefix(run_key)}{set_name}.json"


def report_key(run_key: str) -> str:
    return f"{run_prefix(run_key)}/report.html"


def results_key(run_key: str) -> str:
    return f"{run_prefix(run_key)}/results.json"
