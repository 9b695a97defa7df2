"""Gather every model's outputs into one self-contained HTML report and machine-readable results.

    runs/<run_key>/report.html    the study's Table 1 beside ours, uncertainty, plots, audits
    runs/<run_key>/results.json   the same numbers as data

This module reads a run's outputs from storage (`gather_inputs`); `sections` turns them into the
report's sections, each a function of that data, and `build_report` joins them and writes both files.
The page's template lives in `include/report.html.j2`, one macro per section.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from .. import layout, tables
from ..data.attributes import read_attributes
from ..data.images import decode_square, jpeg_data_uri
from ..data.manifest import read_image, read_manifest
from ..data.split import split_counts as count_splits
from ..resources import include_path
from ..settings import ENSEMBLE, Settings
from ..storage import Storage, get_recorded
from . import sections
from .sections import ReportInputs

log = logging.getLogger(__name__)


def git_version() -> str:
    """`git describe` of the checkout the code runs from ("unknown" outside one): the report's record of
    which code made it. Not training.keys.code_version, the hash of the training source in model keys."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_model_outputs(storage: Storage, run_key: str, model_name: str) -> dict:
    def read(name: str) -> bytes:
        return storage.get_bytes(layout.model_file_key(run_key, model_name, name))

    history_key = layout.model_file_key(run_key, model_name, "history.json")
    return {
        "metrics": json.loads(read("metrics.json")),
        "history": json.loads(read("history.json")) if storage.exists(history_key) else [],  # none for the ensemble
        "predictions": tables.read_csv(io.BytesIO(read("predictions.csv")), keep_default_na=False),
    }


def _reported_models(storage: Storage, run_key: str, settings: Settings) -> list[str]:
    """The run's models, then the ensemble where the run made one."""
    has_ensemble = storage.exists(layout.model_file_key(run_key, ENSEMBLE, "metrics.json"))
    return [*settings.models, *([ENSEMBLE] if has_ensemble else [])]


def _audit_thumbnail(storage: Storage, key: str) -> str | None:
    try:
        return jpeg_data_uri(decode_square(read_image(storage, key), sections.AUDIT_THUMBNAIL_PX), quality=85)
    except (FileNotFoundError, OSError, ValueError) as exc:  # a missing or undecodable image: no thumbnail
        log.warning("label audit thumbnail of %s: %s", key, exc)
        return None


def read_audit(storage: Storage, run_key: str) -> pd.DataFrame | None:
    """The label audit's table (training.label_audit writes it), or None where the audit did not run."""
    key = layout.label_audit_key(run_key)
    if not storage.exists(key):
        return None
    return tables.read_csv(io.BytesIO(get_recorded(storage, key)), keep_default_na=False)


def _external_sets(storage: Storage, run_key: str) -> list[dict]:
    return [
        json.loads(storage.get_bytes(k)) for k in storage.list(layout.external_prefix(run_key)) if k.endswith(".json")
    ]


def gather_inputs(
    storage: Storage,
    *,
    run_key: str,
    settings: Settings,
    dataset: dict,
    validation: dict,
    split_key: str,
    task_durations: dict | None = None,
    run_id: str | None = None,
    label_audit: dict | None = None,
    repeat_split_keys: list[str] | None = None,
    ensemble_skipped: str | None = None,
) -> ReportInputs:
    """Read everything the report shows from storage: every reported model's outputs in every repeat, the
    ensembles' choices, the split, the attributes, the label audit (and the thumbnails of the images it
    shows: only those are read, so the report's cost does not grow with the dataset) and the external sets."""
    models = _reported_models(storage, run_key, settings)
    outputs = []
    for r in range(settings.repeats):
        key = layout.repeat_run_key(run_key, r)
        outputs.append({m: load_model_outputs(storage, key, m) for m in models})
    ensemble = [o[ENSEMBLE]["metrics"] for o in outputs] if ENSEMBLE in models else None
    repeat_splits = {}
    if settings.repeats >= 2:  # the corrected t-test's n_train and n_test
        repeat_splits = count_splits(read_manifest(storage, (repeat_split_keys or [split_key])[0]))
    audit = read_audit(storage, run_key)
    shown = [] if audit is None else audit["key"].head(sections.AUDIT_SHOWN)
    thumbnails = [_audit_thumbnail(storage, k) for k in shown]
    return ReportInputs(
        run_key=run_key,
        settings=settings,
        dataset=dataset,
        validation=validation,
        paper=json.loads(include_path("paper_table1.json").read_text()),
        outputs=outputs,
        ensemble_metrics=ensemble,
        manifest=read_manifest(storage, split_key),
        repeat_split_counts=repeat_splits,
        attributes=read_attributes(storage, dataset["dataset_id"]),
        audit_table=audit,
        audit_thumbnails=thumbnails,
        external=_external_sets(storage, run_key),
        code_version=git_version(),
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        platform={"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()},
        run_id=run_id,
        task_durations=task_durations or {},
        label_audit=label_audit,
        ensemble_skipped=ensemble_skipped,
    )


def build_report(storage: Storage, **context) -> dict:
    """Write report.html and results.json for a run; returns their URIs and the headline numbers.
    `context`: gather_inputs's keywords (the run's key, settings, dataset, validation, split and the rest);
    `ensemble_skipped` says why the run made no ensemble (pipeline.skip_reason), said in the report.

    Every per-image section reads repeat 0 (the run's own folder); with repeats, Table 1 shows the
    mean over the repeats with its 95% t-interval, and the repeats section the rest."""
    gathered = gather_inputs(storage, **context)
    run_key = gathered.run_key
    report = sections.build_sections(gathered)
    page = sections.render_page(sections.page_context(report, gathered))
    storage.put_bytes(layout.results_key(run_key), sections.results_json(report))
    storage.put_bytes(layout.report_key(run_key), page.encode())
    log.info("report written to %s", storage.url(layout.report_key(run_key)))
    small = report.results["small_splits"]
    if small:
        log.warning("few images to judge by: %d validation and %d test images, one image moves an accuracy by up "
                    "to %.3f; the checks and the ensemble read validation, Table 1 reads test (the report says more)",
                    small["validation_images"], small["test_images"], small["one_image"])  # fmt: skip
    return {
        "report_uri": storage.url(layout.report_key(run_key)),
        "results_uri": storage.url(layout.results_key(run_key)),
        "test_accuracy": {r["model"]: r["ours"]["test_accuracy"] for r in report.results["table"]},
    }
