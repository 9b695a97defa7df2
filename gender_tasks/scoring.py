"""Batch scoring: a trained model's P(male) for a folder, a zip or an s3:// prefix of new, unlabeled images.

    scoring/<score_key>/predictions.csv   one row per image: its name in the source, sha256, P(male), the
                                          predicted class, confidence, the model's identity; an image that
                                          does not decode gets its error instead
    scoring/<score_key>/summary.html      class shares, a confidence histogram, the images the model is least
                                          sure of, and how the images' statistics differ from the training set's
    scoring/<score_key>/summary.json      the same numbers; written last: the scoring is complete
    scoring/parts/<model>/<batch_key>.csv one batch's rows while (and after) it runs: a killed scoring resumes
                                          after its last finished batch
    scoring/leases/<holder>.json          while it runs (leases.py): `gc` then removes nothing under scoring/,
                                          nor the run whose model it uses (it also holds that run's lease)

The model is verified against its card before it is used (evaluation.predict.load_stored_model) and is
either named (a run and a model) or "the best model of the latest successful run": the run whose
results.json (written last by the report) is newest, and in it the model with the highest validation
accuracy (the ensemble included) that the report did not flag (its health checks, results.json's
`warnings`: a model collapsed to one class is never chosen for the user; named, it is scored with a warning).

Hostile input gets the ingest's rules (data.sources.resolve_source for zips and S3, then
data.folders.list_unlabeled_images: regular files only, no links out, no bad names, size limits), all
judged before a byte is scored: a refused source writes nothing. Images are decoded by
data.images.decode_resize at each of the model's input sizes, as training decoded them.

It streams: `batch_size` images are read, hashed, decoded and scored at a time, each batch's rows are
written as one part keyed by the model and the batch's contents, and the summary is accumulated in
fixed-size histograms (and a heap of the least sure images), so memory does not grow with the number of
images beyond the listing and the final CSV. The score key is a hash of the model and every batch key:
scoring unchanged images with the same model again finds every part and the finished summary, loads no
model and writes nothing.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layout, tables
from .data.folders import IngestError, list_unlabeled_images, read_regular, shown
from .data.images import decode_resize, decode_rgb, jpeg_data_uri
from .data.sources import resolve_source
from .errors import PermanentError, decode_failure
from .integrity import sha256_hex
from .leases import hold_lease, holder_name
from .settings import RunConfig
from .storage import Storage, get_recorded, is_remote_location, open_storage, put_recorded

log = logging.getLogger(__name__)

BATCH_SIZE = 256
LEAST_SURE = 24  # images shown in the summary as the ones the model is least sure of
THUMBNAIL = 64
HISTOGRAM_BINS = 10  # confidence histogram over [0.5, 1]
STAT_BINS = 20  # image statistics histograms over [0, 1]
TRAINING_SAMPLE = 500  # training images whose statistics the new images are compared with
# Population stability index above which a statistic is flagged as differing from the training images'.
DRIFT_PSI = 0.25
STATS = ("brightness", "contrast", "red", "green", "blue")
COLUMNS = ["file", "sha256", "prob_male", "predicted", "confidence", "error", "run_key", "model", "model_sha256",
           *STATS]  # fmt: skip


class ScoringError(PermanentError):
    """Bad scoring input (no such run or model, nothing to score); the message names it and the fix."""


# --- which model ----------------------------------------------------------------------------------------------


def latest_finished_run(storage: Storage) -> str:
    """The run key of the newest run whose results.json (the report's last write) is stored."""
    finished = [o for o in storage.list_info(f"{layout.RUNS}/")
                if o.key.count("/") == 2 and o.key.endswith("/results.json")]  # fmt: skip
    if not finished:
        raise ScoringError(f"{storage.uri} holds no finished training run (runs/<run_key>/results.json): train one "
                           "first (the gender_classification DAG), or name the model's run")  # fmt: skip
    return max(finished, key=lambda o: (o.modified, o.key)).key.split("/")[1]


def _card(storage: Storage, run_key: str, model: str) -> dict | None:
    try:
        return json.loads(storage.get_bytes(layout.model_file_key(run_key, model, layout.MODEL_OUTPUTS[-1])))
    except FileNotFoundError:
        return None


def choose_model(storage: Storage, run: str = "latest", model: str = "best") -> dict:
    """{"run_key", "model", "val_accuracy", "model_file", "model_sha256", "flagged"}: the named model of the
    named run, or (model "best") the run's model with the highest validation accuracy (of equals, the first by
    name) among those its report did not flag; run "latest": the newest finished run. "flagged": the checks the
    chosen model failed (only a named model can have any). Its files are verified when it is loaded."""
    from .evaluation.predict import stored_checksums, stored_model_file

    run_key = latest_finished_run(storage) if run in ("", "latest") else layout.run_key_for(run)
    if not layout.SAFE_RUN_KEY.match(run_key):
        raise ScoringError(f"run {run!r} is not a run key: give a run id of the gender_classification DAG, or latest")
    names = sorted({k.split("/")[3] for k in storage.list(f"{layout.model_prefix(run_key, '')}")
                    if k.count("/") == 4 and k.endswith("/" + layout.MODEL_OUTPUTS[-1])})  # fmt: skip
    if not names:
        raise ScoringError(f"run {run_key} has no trained model in {storage.uri} (runs/{run_key}/models/*/"
                           "model_card.json): give the run id of a finished training run, or latest")  # fmt: skip
    if model not in ("", "best") and model not in names:
        raise ScoringError(f"run {run_key} has no model {model!r}: it has {', '.join(names)} (or best)")
    flagged = _flagged_models(storage, run_key)
    if model in ("", "best"):
        candidates = [n for n in names if n not in flagged]
        if not candidates:
            raise ScoringError(f"every model of run {run_key} was flagged by its report ({_flags(flagged)}): none is "
                               "fit to score with. Train again (bench/RESULTS.md, robustness), or name a model to "
                               "score with it anyway")  # fmt: skip
        if flagged:
            log.info("choosing the best model of run %s among %s; left out, flagged by the report: %s", run_key,
                     ", ".join(candidates), _flags(flagged))  # fmt: skip
    else:
        candidates = [model]
        if model in flagged:
            log.warning("scoring with %s of run %s as asked, though its report flagged it (%s): its predictions may "
                        "be one class or chance", model, run_key, ", ".join(flagged[model]))  # fmt: skip
    scored = []
    for name in candidates:
        card = _card(storage, run_key, name) or {}
        val = card.get("val_accuracy")
        scored.append((float(val) if isinstance(val, int | float) else float("-inf"), name))
    val_accuracy, name = scored[0]
    for value, candidate in scored[1:]:  # the highest; of equals, the first by name
        if value > val_accuracy:
            val_accuracy, name = value, candidate
    prefix = layout.model_prefix(run_key, name)
    model_file = stored_model_file(storage, prefix)
    sha = stored_checksums(storage, prefix, [model_file])[model_file]
    return {"run_key": run_key, "model": name, "val_accuracy": None if val_accuracy == float("-inf") else val_accuracy,
            "model_file": storage.url(f"{prefix}/{model_file}"), "model_sha256": sha,
            "flagged": flagged.get(name, [])}  # fmt: skip


def _flagged_models(storage: Storage, run_key: str) -> dict[str, list[str]]:
    """{model: the checks it failed} from the run's results.json `warnings` (the report's health checks), for
    the models stored in the run's folder: its first repeat's. A run of a version without health checks has
    none; a results.json that does not parse is refused (the choice could not be checked)."""
    key = layout.results_key(run_key)
    try:
        results = json.loads(storage.get_bytes(key))
    except FileNotFoundError:  # a named run whose report never finished: nothing was checked
        return {}
    except ValueError as exc:
        raise ScoringError(f"{storage.url(key)} is not readable JSON ({exc}): the run's health checks cannot be "
                           "read. Run its report again, or score another run") from None  # fmt: skip
    out: dict[str, list[str]] = {}
    warnings = results.get("warnings") if isinstance(results, dict) else None
    for w in warnings if isinstance(warnings, list) else []:
        if isinstance(w, dict) and isinstance(w.get("model"), str) and w.get("repeat", 0) == 0:
            out.setdefault(w["model"], []).append(str(w.get("check")))
    return out


def _flags(flagged: dict[str, list[str]]) -> str:
    return "; ".join(f"{m}: {', '.join(checks)}" for m, checks in sorted(flagged.items()))


def request_from(params: dict, events: list[dict], *, manual: bool) -> dict:
    """score_images' arguments for one DAG run: its params, and the extras of the asset events that triggered
    it (a training run that published models: {"run_key", "storage"}), whose run is scored when the params
    say "latest". A run with no source fails when triggered by hand and is skipped (with the reason) when
    scheduled."""
    source = str(params.get("source") or "").strip()
    storage = params.get("storage") or None
    run = str(params.get("run") or "latest")
    published = [e for e in events if isinstance(e, dict) and e.get("run_key")]
    if published and run == "latest":
        run = str(published[-1]["run_key"])
        storage = storage or published[-1].get("storage")
    if not source:
        why = ("no images to score: set the param source (a folder, a .zip or an s3:// prefix), or "
               "GENDER_SCORING_SOURCE for scheduled runs")  # fmt: skip
        if manual:
            raise ScoringError(why)
        return {"skipped": why}
    return {"source": source, "storage_uri": storage, "run": run, "model": str(params.get("model") or "best"),
            "batch_size": int(params.get("batch_size") or BATCH_SIZE)}  # fmt: skip


# --- image statistics ---------------------------------------------------------------------------------------


def image_stats(rgb: np.ndarray) -> tuple[float, ...]:
    """(brightness, contrast, red, green, blue) of a uint8 HWC image, each in [0, 1]: the mean luminance,
    its standard deviation (x2, so a full-range image reaches 1), and the channel means."""
    x = rgb.astype(np.float32) / 255.0
    luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    means = x.reshape(-1, 3).mean(axis=0)
    return float(luma.mean()), float(min(1.0, 2 * luma.std())), float(means[0]), float(means[1]), float(means[2])


def _histogram(values, bins: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    return np.histogram(np.clip(np.asarray(values, dtype=float), low, high), bins=bins, range=(low, high))[0]


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two histograms over the same bins (0: the same shape)."""
    e = (expected + 0.5) / (expected.sum() + 0.5 * len(expected))
    a = (actual + 0.5) / (actual.sum() + 0.5 * len(actual))
    return float(np.sum((a - e) * np.log(a / e)))


def training_stats(storage: Storage, run_key: str, model: str, size: int) -> dict:
    """Histograms of the statistics of up to TRAINING_SAMPLE of the model's training images (the first
    by key: content addresses, so an unbiased sample), decoded as the model saw them; or {"error"}."""
    from .evaluation.predict import stored_checksums

    prefix = layout.model_prefix(run_key, model)
    try:
        sha = stored_checksums(storage, prefix, ["predictions.csv"])["predictions.csv"]
        preds = tables.read_csv(io.BytesIO(get_recorded(storage, f"{prefix}/predictions.csv", sha)),
                                keep_default_na=False)  # fmt: skip
        keys = sorted(preds.loc[preds["split"] == "train", "key"])[:TRAINING_SAMPLE]
        rows = []
        for key in keys:
            data = storage.get_bytes(key)
            expected = layout.image_sha(key)
            if expected and sha256_hex(data) != expected:
                continue  # a damaged image: `verify` reports it; the sample does without it
            rows.append(image_stats(decode_resize(data, size)))
    except (FileNotFoundError, OSError, ValueError, KeyError, PermanentError) as exc:
        return {"error": f"the training images could not be read ({type(exc).__name__}: {exc})"[:300]}
    if not rows:
        return {"error": "the run's predictions name no training image"}
    values = np.array(rows)
    return {"images": len(rows), "mean": values.mean(axis=0).tolist(),
            "histograms": [_histogram(values[:, i], STAT_BINS).tolist() for i in range(len(STATS))]}  # fmt: skip


# --- the streaming summary --------------------------------------------------------------------------------


@dataclass
class Summary:
    """What the summary report needs, accumulated batch by batch in fixed-size state."""

    scored: int = 0
    failed: int = 0
    counts: dict = field(default_factory=dict)
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.int64))
    stats_sum: np.ndarray = field(default_factory=lambda: np.zeros(len(STATS)))
    stats_hist: np.ndarray = field(default_factory=lambda: np.zeros((len(STATS), STAT_BINS), dtype=np.int64))
    least_sure: list = field(default_factory=list)  # heap of (-margin, file, prob, thumbnail or "")

    def add(self, rows: list[dict], thumbnails: dict[str, str]) -> None:
        ok = [r for r in rows if not r["error"]]
        self.failed += len(rows) - len(ok)
        if not ok:
            return
        self.scored += len(ok)
        for r in ok:
            self.counts[r["predicted"]] = self.counts.get(r["predicted"], 0) + 1
        self.confidence += _histogram([r["confidence"] for r in ok], HISTOGRAM_BINS, 0.5, 1.0)
        values = np.array([[r[s] for s in STATS] for r in ok], dtype=float)
        self.stats_sum += values.sum(axis=0)
        for i in range(len(STATS)):
            self.stats_hist[i] += _histogram(values[:, i], STAT_BINS)
        for r in ok:
            item = (-abs(r["prob_male"] - 0.5), r["file"], r["prob_male"], thumbnails.get(r["file"], ""))
            if len(self.least_sure) < LEAST_SURE:
                heapq.heappush(self.least_sure, item)
            elif item > self.least_sure[0]:
                heapq.heapreplace(self.least_sure, item)

    def least_sure_rows(self) -> list[dict]:
        return [{"file": f, "prob_male": p, "thumbnail": t} for _, f, p, t in sorted(self.least_sure, reverse=True)]


def _thumbnail(data: bytes) -> str:
    """A small JPEG of the image as a data: URI (the summary is one self-contained page)."""
    img = decode_rgb(data, THUMBNAIL)
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    return jpeg_data_uri(img, quality=80)


def _row_from_csv(row: dict) -> dict:
    out = dict(row)
    for name in ("prob_male", "confidence", *STATS):
        out[name] = float(out[name]) if out.get(name) not in ("", None) else float("nan")
    return out


# --- scoring ------------------------------------------------------------------------------------------------


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def score_images(source: str, storage_uri: str | None = None, *, run: str = "latest", model: str = "best",
                 batch_size: int = BATCH_SIZE, max_file_bytes: int = RunConfig.max_file_bytes,
                 max_source_bytes: int = RunConfig.max_source_bytes, workdir: Path | None = None) -> dict:  # fmt: skip
    """Score every image that `source` (a folder, a .zip or an s3:// prefix) holds with the chosen model
    (see choose_model), into scoring/<score_key>/ of the storage; returns a small summary (XCom-safe)."""
    if not source or not str(source).strip():
        raise ScoringError("no images to score: give a folder, a .zip or an s3:// prefix of images (param source)")
    storage = open_storage(storage_uri)
    chosen = choose_model(storage, run, model)  # before any download: a wrong model fails in seconds
    if not is_remote_location(source) and not Path(source).expanduser().exists():
        raise ScoringError(f"images to score {source!r} do not exist: give a folder, a .zip or an s3:// prefix")
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="gender-score-", dir=workdir))
    # While it works, the scoring leases scoring/ (its stored parts, reused or not, stay until it has assembled
    # them) and the run whose model it scores with: `gc` removes neither under it (housekeeping.py).
    owner = f"scoring of {source} with {chosen['model']} of run {chosen['run_key']}"
    holder = holder_name("score")
    try:
        with hold_lease(storage, layout.scoring_lease_key(holder), owner=owner), \
                hold_lease(storage, layout.run_lease_key(chosen["run_key"], holder), owner=owner):  # fmt: skip
            if _card(storage, chosen["run_key"], chosen["model"]) is None:  # removed between the choice and the lease
                raise ScoringError(f"run {chosen['run_key']!r} was removed (by gc?) while its model was chosen: "
                                   "score again to choose from the runs there are now")  # fmt: skip
            root = resolve_source(source, base, max_bytes=max_source_bytes)
            files = list_unlabeled_images(root, max_file_bytes=max_file_bytes, max_total_bytes=max_source_bytes)
            out = _score_files(storage, root, files, chosen, source=source, batch_size=batch_size,
                               max_file_bytes=max_file_bytes)  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out["seconds"] = round(time.monotonic() - started, 2)
    return out


def _score_files(storage: Storage, root: Path, files: list[tuple[Path, int]], chosen: dict, *, source: str,
                 batch_size: int, max_file_bytes: int) -> dict:  # fmt: skip
    model_sha = chosen["model_sha256"]
    identity = {"run_key": chosen["run_key"], "model": chosen["model"], "model_sha256": model_sha}
    loaded: list = []  # the model, loaded at the first batch that is not already scored

    def model():
        if not loaded:
            from .evaluation.predict import load_stored_model

            loaded.extend(load_stored_model(storage, layout.model_prefix(chosen["run_key"], chosen["model"])))
        return loaded

    summary, batch_keys, reused = Summary(), [], 0
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        blobs = []
        for path, _ in chunk:
            try:
                data = read_regular(path, max_file_bytes)
            except OSError as exc:  # swapped for a FIFO or grown since the listing: refused, as ingest does
                raise IngestError(f"{shown(path)} cannot be read ({exc.strerror or exc}): nothing was written; "
                                  "fix or remove it") from None  # fmt: skip
            blobs.append((_relative(path, root), data))
        listing = "".join(f"{name}\t{sha256_hex(data)}\n" for name, data in blobs)
        batch_key = hashlib.sha256(f"{model_sha}\n{listing}".encode()).hexdigest()[:32]
        batch_keys.append(batch_key)
        key = layout.part_key(model_sha, batch_key)
        thumbnails: dict[str, str] = {}
        if storage.exists(key):
            rows = [_row_from_csv(r) for r in tables.read_csv(io.BytesIO(get_recorded(storage, key)), dtype=str,
                                                              keep_default_na=False).to_dict("records")]  # fmt: skip
            reused += 1
        else:
            module, meta = model()
            rows = _score_batch(module, meta, blobs, identity)
            put_recorded(storage, key, _csv(rows))
        least = -min((s[0] for s in summary.least_sure), default=-1.0) if len(summary.least_sure) >= LEAST_SURE \
            else 1.0  # fmt: skip
        for (name, data), row in zip(blobs, rows, strict=True):
            if not row["error"] and abs(row["prob_male"] - 0.5) <= least:
                try:
                    thumbnails[name] = _thumbnail(data)
                except Exception:  # noqa: BLE001  (the row is scored; its picture is only a nicety)
                    thumbnails[name] = ""
        summary.add(rows, thumbnails)
        del blobs
    score_key = hashlib.sha256(f"{model_sha}\n{''.join(k + chr(10) for k in batch_keys)}".encode()).hexdigest()[:24]
    prefix = layout.score_prefix(score_key)
    done = {"score_key": score_key, "storage": storage.uri, "images": len(files),
            "predictions_uri": storage.url(f"{prefix}/{layout.SCORED_PREDICTIONS}"),
            "summary_uri": storage.url(f"{prefix}/{layout.SCORING_PAGE}"), **identity}  # fmt: skip
    if storage.exists(f"{prefix}/{layout.SCORING_SUMMARY}"):
        log.info("%d images of %s were scored with this model before (%s): nothing to do", len(files), source,
                 storage.url(prefix))  # fmt: skip
        return {**done, "unchanged": True}
    # The parts, in order, as one CSV (the rows are re-read from storage: nothing was kept in memory).
    parts = [get_recorded(storage, layout.part_key(model_sha, k)) for k in batch_keys]
    header, *_ = parts[0].split(b"\n", 1)
    body = b"".join(p.split(b"\n", 1)[1] for p in parts)
    del parts
    put_recorded(storage, f"{prefix}/{layout.SCORED_PREDICTIONS}", header + b"\n" + body)
    del body
    size = min(loaded[1]["input_sizes"]) if loaded else _model_size(storage, chosen)
    train = training_stats(storage, chosen["run_key"], chosen["model"], size)
    report = _summary_json(summary, train, chosen, source, len(files), reused, len(batch_keys))
    put_recorded(storage, f"{prefix}/{layout.SCORING_PAGE}", render_summary(report).encode())
    storage.put_bytes(f"{prefix}/{layout.SCORING_SUMMARY}", json.dumps(report, indent=1).encode())  # last: complete
    log.info("scored %d images of %s with %s of run %s (%d of %d batches already scored) -> %s", len(files), source,
             chosen["model"], chosen["run_key"], reused, len(batch_keys), storage.url(prefix))  # fmt: skip
    return {**done, "unchanged": False, "scored": summary.scored, "failed": summary.failed,
            "counts": summary.counts, "reused_batches": reused}  # fmt: skip


def _model_size(storage: Storage, chosen: dict) -> int:
    card = _card(storage, chosen["run_key"], chosen["model"]) or {}
    return int(card.get("image_size") or min(card.get("member_sizes") or [64]))


def _score_batch(module, meta: dict, blobs: list[tuple[str, bytes]], identity: dict) -> list[dict]:
    """Decode (each image at every input size), score, and return one row per image in order."""
    import torch

    from .evaluation.predict import decode_inputs, input_batches

    decoded, rows = [], []
    for name, data in blobs:
        try:
            decoded.append((name, data, decode_inputs(data, meta)))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (PIL raises many types for a broken file)
            decoded.append((name, data, None))
            rows.append((name, decode_failure(exc)))
    good = [d for d in decoded if d[2] is not None]
    probs = np.zeros(0)
    if good:
        with torch.inference_mode():
            probs = module(*input_batches([list(a) for a in zip(*(d[2] for d in good), strict=True)])).numpy()
    by_name = dict(zip((d[0] for d in good), probs, strict=True))
    errors = dict(rows)
    out = []
    for name, data, arrays in decoded:
        row = {"file": name, "sha256": sha256_hex(data), **identity}
        if arrays is None:
            out.append({**row, "prob_male": float("nan"), "predicted": "", "confidence": float("nan"),
                        "error": errors[name], **dict.fromkeys(STATS, float("nan"))})  # fmt: skip
            continue
        p = float(by_name[name])
        stats = image_stats(arrays[0])
        out.append({**row, "prob_male": p, "predicted": meta["classes"][int(p >= 0.5)], "confidence": max(p, 1 - p),
                    "error": "", **dict(zip(STATS, stats, strict=True))})  # fmt: skip
    return out


def _csv(rows: list[dict]) -> bytes:
    import pandas as pd

    return tables.to_csv(pd.DataFrame(rows, columns=COLUMNS), index=False, float_format="%.7g").encode()


def _summary_json(summary: Summary, train: dict, chosen: dict, source: str, images: int, reused: int,
                  batches: int) -> dict:  # fmt: skip
    scored = max(summary.scored, 1)
    new_mean = (summary.stats_sum / scored).tolist()
    drift = []
    for i, stat in enumerate(STATS):
        entry = {"statistic": stat, "new_mean": new_mean[i], "new_histogram": summary.stats_hist[i].tolist()}
        if "histograms" in train:
            value = psi(np.array(train["histograms"][i]), summary.stats_hist[i])
            entry |= {"train_mean": train["mean"][i], "train_histogram": train["histograms"][i], "psi": value,
                      "differs": value > DRIFT_PSI}  # fmt: skip
        drift.append(entry)
    return {"source": source, "images": images, "scored": summary.scored, "failed": summary.failed,
            "model": chosen, "class_shares": {c: n / scored for c, n in sorted(summary.counts.items())},
            "counts": summary.counts,
            "confidence_histogram": {"edges": np.linspace(0.5, 1.0, HISTOGRAM_BINS + 1).round(3).tolist(),
                                     "counts": summary.confidence.tolist()},
            "least_sure": summary.least_sure_rows(), "training_images": train.get("images"),
            "training_error": train.get("error"), "drift": drift, "drift_threshold_psi": DRIFT_PSI,
            "batches": batches, "reused_batches": reused,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


# --- the summary page ---------------------------------------------------------------------------------------


def _bars(counts: list[int], labels: list[str]) -> str:
    top = max(max(counts, default=0), 1)
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td><div style='background:#4a78c2;height:12px;width:"
                   f"{round(300 * n / top)}px'></div></td><td>{n}</td></tr>" for n, label in zip(counts, labels, strict=True))  # fmt: skip
    return f"<table class='bars'>{rows}</table>"


def _figure(row: dict) -> str:
    img = f'<img src="{html.escape(row["thumbnail"])}" alt="">' if row["thumbnail"] else ""
    return (
        f"<figure>{img}<figcaption>{html.escape(row['file'])}<br>P(male) {row['prob_male']:.3f}</figcaption></figure>"
    )


def render_summary(report: dict) -> str:
    """The summary as one self-contained HTML page (inline styles, data: images, no script)."""
    e = html.escape
    m = report["model"]
    shares = "".join(f"<tr><td>{e(c)}</td><td>{report['counts'][c]}</td><td>{s:.1%}</td></tr>"
                     for c, s in report["class_shares"].items())  # fmt: skip
    edges = report["confidence_histogram"]["edges"]
    conf = _bars(
        report["confidence_histogram"]["counts"], [f"{a:.2f}–{b:.2f}" for a, b in zip(edges, edges[1:], strict=False)]
    )
    unsure = "".join(_figure(r) for r in report["least_sure"])
    drift_rows = "".join(
        f"<tr><td>{e(d['statistic'])}</td><td>{d['new_mean']:.3f}</td>"
        + (f"<td>{d['train_mean']:.3f}</td><td>{d['psi']:.3f}</td><td>{'differs' if d['differs'] else 'similar'}</td>"
           if "psi" in d else "<td colspan=3>n/a</td>")
        + "</tr>"
        for d in report["drift"]
    )  # fmt: skip
    flag_note = (f'<b id="flagged">Its report flagged this model ({e(", ".join(m["flagged"]))}): its predictions may be '
                 "one class or chance. It was named for this scoring; the best model chooses among the others.</b><br>"
                 if m.get("flagged") else "")  # fmt: skip
    train_note = (f"{report['training_images']} training images of the model's run" if report.get("training_images")
                  else e(report.get("training_error") or "no training statistics"))  # fmt: skip
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Scoring summary</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{padding:2px 8px;text-align:left}}figure{{display:inline-block;margin:4px;width:9em;font-size:80%}}
figure img{{width:64px;height:64px;object-fit:cover}}</style></head><body>
<h1>Scoring summary</h1>
<p id="model">Model <b>{e(m["model"])}</b> of run <b>{e(m["run_key"])}</b> (validation accuracy
{"n/a" if m["val_accuracy"] is None else f"{m['val_accuracy']:.3f}"}), sha256 <code>{e(m["model_sha256"])}</code>.<br>
{flag_note}
Source {e(report["source"])}: {report["images"]} images, {report["scored"]} scored, {report["failed"]} not decodable.</p>
<h2>Class shares</h2><table id="class-shares"><tr><th>class</th><th>images</th><th>share</th></tr>{shares}</table>
<h2>Confidence</h2><div id="confidence">{conf}</div>
<h2>Least sure</h2><div id="least-sure">{unsure}</div>
<h2>Compared with the training images</h2><p>{train_note}; a population stability index over
{report["drift_threshold_psi"]} marks a statistic whose distribution differs.</p>
<table id="drift"><tr><th>statistic</th><th>new mean</th><th>training mean</th><th>PSI</th><th></th></tr>{drift_rows}
</table><p>Generated {e(report["generated_at"])}.</p></body></html>"""
