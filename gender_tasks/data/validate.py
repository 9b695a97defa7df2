"""Validate a split manifest with Great Expectations; a failing suite stops the run, in words.

The suite is data (`include/expectations/manifest_suite.json`); its bounds are suite parameters
filled from the run's settings. Columns the suite needs but the manifest does not store
(shorter side, class indicator, splits per image, split-share error) are derived here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from ..errors import PermanentError
from ..resources import include_path
from ..settings import Settings
from .manifest import decodable_mask

log = logging.getLogger(__name__)

SUITE_PATH = include_path("expectations", "manifest_suite.json")
EXAMPLES_SHOWN = 5


class ValidationFailed(PermanentError):
    """The data breaks expectations; `failures` lists them (JSON-safe), the message says them in words."""

    def __init__(self, message: str, failures: list[dict]):
        super().__init__(message)
        self.failures = failures


def _validation_frame(manifest: pd.DataFrame, fractions: list[float]) -> pd.DataFrame:
    df = manifest.copy()
    df["decodable"] = decodable_mask(df)
    df["min_side"] = df[["width", "height"]].min(axis=1)
    df["is_female"] = (df["label"] == "female").astype(float)
    df["splits_per_image"] = df.groupby("sha256")["split"].transform("nunique")
    targets = dict(zip(("train", "val", "test"), fractions, strict=True))
    class_sizes = df.groupby("label")["sha256"].transform("size")
    share = df.groupby(["label", "split"])["sha256"].transform("size") / class_sizes
    df["split_share_error"] = (share - df["split"].map(targets)).abs()
    # One point, or the one unavoidable misfit of the split: a class's largest group of images kept
    # together (one image without grouping, so the rounding of one image in a small class).
    df["split_share_tolerance"] = (_largest_group_rows(df) / class_sizes).clip(lower=0.01) + 1e-9
    return df


def _largest_group_rows(df: pd.DataFrame) -> pd.Series:
    """Per row, the size (rows of its class) of its class's largest group kept in one split:
    `split_group` from the split, or identical content (sha256) for manifests without it."""
    group = df["split_group"] if "split_group" in df.columns else df["sha256"]
    largest = df.assign(group=group).groupby(["label", "group"]).size().groupby("label").max()
    return df["label"].map(largest)


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _describe_failure(res, frame: pd.DataFrame) -> dict:
    cfg = res.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    meta = cfg.meta or {}
    says = meta.get("says", cfg.type)
    shown = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in kwargs.items()}
    try:
        says = says.format(**shown)
    except (KeyError, IndexError, ValueError):
        pass
    result = res.result or {}
    examples = []
    for idx in (result.get("partial_unexpected_index_list") or [])[:EXAMPLES_SHOWN]:
        row = frame.iloc[idx] if isinstance(idx, int) else None
        if row is not None:
            examples.append(f"{row['source_path']} ({row['label']}{'; ' + row['error'] if row.get('error') else ''})")
    detail = ""
    if "observed_value" in result:
        value = result["observed_value"]
        detail = f"observed {value:.3f}" if isinstance(value, float) and not value.is_integer() else f"observed {value}"
        if kwargs.get("column") == "is_female" and "is_female" in frame:
            detail += f" ({int(frame['is_female'].sum()):,} of {len(frame):,} images female)"
    elif result.get("unexpected_count") is not None:
        detail = f"{result['unexpected_count']} offending row(s)"
    return {"expectation": cfg.type, "column": kwargs.get("column"), "says": says, "detail": detail,
            "examples": examples, "fix": meta.get("fix", "")}  # fmt: skip


def validate_manifest(manifest: pd.DataFrame, settings: Settings, suite_path: Path = SUITE_PATH) -> dict:
    """Run the suite; return a JSON-safe summary, or raise ValidationFailed naming what broke."""
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    spec = json.loads(suite_path.read_text())
    frame = _validation_frame(manifest, settings.split).reset_index(drop=True)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = ExpectationSuite(name=spec["name"], expectations=spec["expectations"], meta=spec.get("meta"))
    params = {
        "min_rows": settings.min_rows,
        "max_rows": settings.max_rows,
        "min_class_share": settings.min_class_share,
        "max_class_share": 1 - settings.min_class_share,
        "min_image_side": settings.min_image_side,
    }
    result = batch.validate(suite, expectation_parameters=params)
    failures = [_describe_failure(r, frame) for r in result.results if not r.success]
    summary = {
        "success": bool(result.success),
        "evaluated": len(result.results),
        "failed": failures,
        "statistics": {k: v for k, v in result.describe_dict().get("statistics", {}).items()},
    }
    if failures:
        lines = [f"{len(failures)} of {len(result.results)} data expectations failed:"]
        for f in failures:
            line = f"- expected {f['says']}: {f['detail']}"
            if f["examples"]:
                line += "; e.g. " + ", ".join(f["examples"])
            lines.append(line + (f". Fix: {f['fix']}" if f["fix"] else ""))
        raise ValidationFailed("\n".join(lines), failures)
    log.info("validation passed: %d expectations", len(result.results))
    return summary
