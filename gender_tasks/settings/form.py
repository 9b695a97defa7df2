"""What a user may set for a run (`RunConfig`, the one source of defaults) and the JSON schema of each
setting: the DAG's trigger form is built from it (`form_fields`), and `check_limits` validates any run
against the same schema, so the form, the CLI and the REST API refuse the same values.

Plain data: the DAG imports this while Airflow parses it (jsonschema is imported only to check a run).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..environment import get_text
from ..models.registry import STUDY_MODELS, get_model_spec, model_names
from .profiles import CLASS_WEIGHTINGS, PROFILES, SettingsError

# JSON-schema `pattern` searches anywhere in the string: "some character that is not whitespace".
NOT_BLANK = r"\S"
# Schema keys that describe a field rather than constrain its value.
_DESCRIPTIVE = ("default", "title", "description", "examples", "values_display")


def _form(title: str, description: str = "", **schema) -> dict:
    """Field metadata: how the setting shows on the trigger form (a JSON-schema fragment)."""
    return {"form": {"title": title, **({"description": description} if description else {}), **schema}}


def _range(minimum: int, maximum: int | None = None) -> dict:
    """Bounds the server validates but Airflow's form does not clamp: its number box reads a top-level
    `minimum`/`maximum` and silently moves 0 to 1 on blur, so the bounds sit one level down (`allOf`),
    where JSON-schema validation still applies them and the refusal names the field and the bound.
    `form_fields` adds the range to the field's help text, where the form shows it. `multipleOf` 1 keeps
    out the fractions that WHOLE_NUMBER's "number" lets through the type check."""
    return {"allOf": [{"minimum": minimum, **({"maximum": maximum} if maximum is not None else {}), "multipleOf": 1}]}


def _limits(minimum: int, maximum: int | None = None, meaning: str = "") -> dict:
    """Field metadata of a whole-number setting that is not on the form: the bounds `check_limits`
    enforces (the same `_range` schema as the form's fields), and what the number means, for the message."""
    return {"schema": _range(minimum, maximum), "meaning": meaning}


# The JSON types of a whole-number field. Airflow's form gives a plain "integer" a number box that silently
# drops what is not a number ("abc" became empty: the profile's epochs); a field of two number types gets
# its free-text box instead, which refuses anything that is not a number on the spot ("Value must be one
# of: integer, number") and keeps the form from being submitted. `_range` refuses fractions.
WHOLE_NUMBER = ["integer", "number"]


def _bounds(spec: dict) -> dict:
    """The minimum / maximum of a field's schema (they sit under `allOf`, see `_range`)."""
    return {k: v for part in spec.get("allOf", []) for k, v in part.items() if k in ("minimum", "maximum")}


def _range_text(spec: dict) -> str:
    """The allowed range of a numeric field, in words ("1-500", "0 or more"), or "" for other fields."""
    limits = _bounds(spec)
    if "minimum" not in limits:
        return ""
    if "maximum" in limits:
        return f"{limits['minimum']}-{limits['maximum']}"
    return f"{limits['minimum']} or more"


def default_source() -> str:
    """GENDER_SOURCE, else the Kaggle dataset (profiles.KAGGLE_DATASET, the variable's default)."""
    return get_text("GENDER_SOURCE")


def default_storage() -> str | None:
    return get_text("GENDER_STORAGE")


@dataclass(frozen=True)
class RunConfig:
    """What a user may set for a run, with the defaults. Fields with `form` metadata are on the trigger form;
    fields with `schema` metadata are checked against it too (`check_limits`) but not shown."""

    source: str = field(default_factory=default_source, metadata=_form(
        "Dataset source", "A folder with female/ and male/ subfolders, a .zip of one, s3://bucket/prefix, "
        "or kaggle:owner/slug.", type="string", minLength=1, pattern=NOT_BLANK))  # fmt: skip
    # Optional fields allow null: Airflow's form marks a field required unless its type includes "null".
    storage: str | None = field(default_factory=default_storage, metadata=_form(
        "Object storage", "s3://bucket/prefix (AWS or MinIO via AWS_ENDPOINT_URL) or a local folder; "
        "empty: the embedded default folder.", type=["null", "string"], pattern=NOT_BLANK))  # fmt: skip
    profile: str = field(default="cpu", metadata=_form(
        "Training profile", "paper: the study's settings (GPU); cpu: minutes on a laptop; tiny: tests.",
        type="string", enum=list(PROFILES)))  # fmt: skip
    models: tuple[str, ...] = field(default=STUDY_MODELS, metadata=_form(
        "Models to train", "Pick one or more; they train in parallel, slowest first. Trigger stays disabled "
        "while none is picked: pick at least one.",
        type="array", items={"type": "string"}, minItems=1, uniqueItems=True))  # fmt: skip
    epochs: int | None = field(default=None, metadata=_form(
        "Epochs", "Overrides the profile's epochs for every model and the label audit's folds, trained exactly "
        "as given (empty: the profile's, raised on a small dataset to the profile's minimum of optimizer steps).",
        type=["null", *WHOLE_NUMBER], **_range(1, 500)))  # fmt: skip
    image_size: int | None = field(default=None, metadata=_form(
        "Image size (px)", "Overrides the profile's input size (InceptionV3 never below 75).",
        type=["null", *WHOLE_NUMBER], **_range(22, 512)))  # fmt: skip
    weights: str | None = field(default=None, metadata=_form(
        "Pretrained weights", "none, imagenet, or a folder / s3:// prefix holding <model>.pth (empty: the profile's).",
        type=["null", "string"], pattern=NOT_BLANK))  # fmt: skip
    seed: int = field(default=42, metadata=_form(
        "Seed", "For the split, initialisation and augmentation.", type=WHOLE_NUMBER, **_range(0)))  # fmt: skip
    repeats: int = field(default=1, metadata=_form(
        "Repeats", "Rerun the split and every model with seeds seed, seed+1, ...; the report then gives the "
        "mean, spread and a corrected paired test over the repeats.", type=WHOLE_NUMBER, **_range(1, 20)))  # fmt: skip
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    min_rows: int = 10
    max_rows: int = 1_000_000
    min_class_share: float = 0.2
    min_image_side: int = 32
    max_image_pixels: int = 40_000_000
    # Limits on what ingest reads from a source: any one file, and all of them (an unpacked zip too).
    max_file_bytes: int = 100_000_000
    max_source_bytes: int = 10_000_000_000
    # Perceptual-hash (64-bit phash) distance under which two images in different splits are flagged.
    # On real face crops, pairs at 0-2 bits were the same picture; at 4 some were different people,
    # so a run that makes near-duplicates fatal uses 2 unless a distance is given explicitly.
    near_duplicate_distance: int | None = field(default=None, metadata=_limits(
        0, 64, "bits of perceptual-hash distance, empty for 2 if near_duplicates_fatal else 4"))  # fmt: skip
    near_duplicates_fatal: bool = False
    # Images this close (phash bits) are kept in one split, so a copy cannot leak test data into
    # training; -1 keeps only byte-identical images together.
    split_group_distance: int = field(default=2, metadata=_limits(
        -1, 64, "bits of perceptual-hash distance, -1 for byte-identical images only"))  # fmt: skip
    label_audit: bool = field(default=True, metadata=_form(
        "Label audit", "Out-of-fold predictions for every image, ranking likely mislabels.", type="boolean"))  # fmt: skip
    # Empty: the profile's (10 for paper and cpu, 5 for tiny).
    label_audit_folds: int | None = field(default=None, metadata=_limits(2, None, "folds of the label audit"))
    label_audit_model: str = "cnn"
    # How the training loss weighs the classes (Recipe.class_weighting); empty: the profile's. Not on the form.
    class_weighting: str | None = field(default=None, metadata={
        "schema": {"enum": [None, *CLASS_WEIGHTINGS]},
        "meaning": "balanced: each class's training loss weighted to count alike; none: every image alike; "
                   "empty: the profile's"})  # fmt: skip
    external_eval: tuple[str, ...] | None = field(default=None, metadata=_form(
        "External evaluation sets", "Extra labeled folders every model is evaluated on, each 'path' or "
        "'path?<filter over its labels.csv>' (column OP value with == != < <= > >=, and/or/not, parentheses), "
        "e.g. '/data/utkface?age >= 16'.",
        type=["null", "array"], items={"type": "string", "minLength": 1, "pattern": NOT_BLANK}))  # fmt: skip

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None = None) -> RunConfig:
        """The defaults with `overrides` applied (None values keep the default); unknown names are refused."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            guesses = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
            hint = "; ".join(f"did you mean {g[0]!r} instead of {u!r}?" for u, g in guesses.items() if g)
            raise SettingsError(f"unknown setting(s) {unknown}" + (f" ({hint})" if hint else "")
                                + f"; expected some of {sorted(known)}")  # fmt: skip
        for name, value in overrides.items():
            if value is not None:
                _check_type(name, value)
        return cls(**{k: v for k, v in overrides.items() if v is not None})


def _check_type(name: str, value: Any) -> None:
    """Refuse a value of the wrong JSON type for a setting (e.g. "abc" or 3.5 for an integer), naming it:
    a run started through the API gets this from `prepare` in seconds instead of failing hours later."""
    hint = typing.get_type_hints(RunConfig)[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [k for k in (typing.get_args(hint) if union else (hint,)) if k is not type(None)]
    ok = False
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        if origin is bool:
            ok |= isinstance(value, bool)
        elif origin is int:
            ok |= isinstance(value, int) and not isinstance(value, bool)
        elif origin is float:
            ok |= isinstance(value, int | float) and not isinstance(value, bool)
        elif origin is tuple:  # a list from JSON, or one comma-separated string (the CLI's models)
            ok |= isinstance(value, list | tuple | str)
        else:
            ok |= isinstance(value, origin)
    if not ok:
        wanted = " or ".join(sorted({"a whole number" if k is int else "a number" if k is float else "true/false"
                                     if k is bool else "a list" if typing.get_origin(k) is tuple else "text"
                                     for k in kinds}))  # fmt: skip
        raise SettingsError(f"setting {name!r} must be {wanted}, got {value!r} ({type(value).__name__})")


def form_fields() -> dict[str, dict]:
    """The trigger form's fields: {name: {"default": ..., title, description, JSON-schema keys}}."""
    defaults = RunConfig()
    out = {}
    for f in dataclasses.fields(RunConfig):
        if "form" in f.metadata:
            value = getattr(defaults, f.name)
            spec = {"default": list(value) if isinstance(value, tuple) else value, **f.metadata["form"]}
            if _range_text(spec):  # the form shows no bounds of its own: the help text says them
                spec["description"] = f"{spec.get('description', '')} Allowed: {_range_text(spec)}.".strip()
            out[f.name] = spec
    # Whatever is registered. `items.enum` is what the server validates; Airflow's form renders an array
    # with `examples` as a multi-select of those values (labelled by `values_display`).
    names = list(model_names())
    out["models"]["items"] = {**out["models"]["items"], "enum": names}
    out["models"]["examples"] = names
    out["models"]["values_display"] = {n: get_model_spec(n).display_name for n in names}
    return out


def field_schemas() -> dict[str, dict]:
    """The JSON schema each checked setting's value must satisfy: the form's (what Airflow validates a
    trigger against, less the descriptive keys) for the form's fields, the `_limits` of the others."""
    schemas = {name: {k: v for k, v in spec.items() if k not in _DESCRIPTIVE} for name, spec in form_fields().items()}
    for f in dataclasses.fields(RunConfig):
        if "schema" in f.metadata:
            schemas[f.name] = f.metadata["schema"]
    return schemas


def check_limits(config: RunConfig) -> None:
    """Refuse any setting outside its schema (`field_schemas`: the same limits the trigger form enforces),
    so a run started without the form (CLI, API, `dag.test`) is refused the same way instead of clamped.
    The message names the field, the bad value and what is allowed."""
    from jsonschema import Draft202012Validator

    forms = form_fields()
    for name, schema in field_schemas().items():
        value = getattr(config, name)
        value = list(value) if isinstance(value, tuple) else value
        error = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
        if error is not None:
            where = "".join(f"[{p!r}]" for p in error.absolute_path)
            message = "must not be blank" if error.validator == "pattern" else error.message
            if name in forms:
                raise SettingsError(f"{name}{where}: {message} ({forms[name]['title']}: {_form_hint(forms[name])})")
            meaning = next(f.metadata["meaning"] for f in dataclasses.fields(RunConfig) if f.name == name)
            raise SettingsError(f"{name}{where}: {message} (allowed: {_words(schema)}; {meaning})")


def _words(spec: dict) -> str:
    """A range in words: "-1 to 64", "2 or more"; or the choices: "one of ['none', 'balanced'] or empty"."""
    if "enum" in spec:
        choices = [c for c in spec["enum"] if c is not None]
        return f"one of {choices}" + (" or empty" if None in spec["enum"] else "")
    limits = _bounds(spec)
    return f"{limits['minimum']} to {limits['maximum']}" if "maximum" in limits else f"{limits['minimum']} or more"


def _bounds_text(spec: dict) -> str:
    limits = _bounds(spec)
    return ", ".join(f"{k} {limits[k]}" for k in ("minimum", "maximum") if k in limits)


def _form_hint(spec: dict) -> str:
    if "enum" in spec.get("items", {}):
        return f"choose from {spec['items']['enum']}"
    if "enum" in spec:
        return f"choose from {spec['enum']}"
    return _bounds_text(spec) or spec.get("description", "see the trigger form")
