"""A run's settings: what a user sets (`RunConfig`, the one source of defaults) and what a run uses
(`Settings`: the config resolved against its profile and the model registry, immutable and typed).

Settings travel between Airflow tasks as plain JSON (`to_dict` / `Settings.from_dict`) and are saved
next to the outputs. The DAG's trigger form is built from `RunConfig`'s fields (`form_fields`), so
the form and the code cannot disagree about a default. Nothing here imports more than the model
registry, which is plain data: the DAG imports this module while Airflow parses it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import PermanentError
from .models.registry import STUDY_MODELS, get_model_spec, model_names

# The ensemble's name in storage keys, tables and results: the mean P(male) of a run's trained models.
ENSEMBLE = "ensemble"
CLASSES = ("female", "male")  # label ids follow the study's Keras loader (sorted names): female 0, male 1
WEIGHT_CHOICES = ("none", "imagenet")
KAGGLE_DATASET = "kaggle:bwandowando/all-these-people-dont-exist"
# JSON-schema `pattern` searches anywhere in the string: "some character that is not whitespace".
NOT_BLANK = r"\S"


class SettingsError(PermanentError):
    """A run setting is missing, unknown or out of range; the message names it and the fix."""


OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")
AUGMENTATIONS = ("full", "flip")


@dataclass(frozen=True)
class Recipe:
    """How every model of a profile trains and predicts, beyond sizes and epochs. The defaults are the
    study's (Adam at a constant rate, flip + rotation + zoom, plain BCE, no test-time augmentation)."""

    optimizer: str = "adam"  # "adamw": decoupled weight decay
    weight_decay: float = 0.0
    schedule: str = "constant"  # "warmup_cosine": per step, linear warm-up then cosine decay to 0
    warmup_fraction: float = 0.0  # of all training steps, for "warmup_cosine"
    label_smoothing: float = 0.0  # BCE targets eps/2 and 1 - eps/2
    augmentation: str = "full"  # "full": flip, rotation +-10 deg, zoom +-10 %; "flip": horizontal flips only
    tta: bool = False  # predict the mean P(male) of the image and its mirror image (also in the export)


STUDY_RECIPE = Recipe()  # the study's: what the `paper` profile uses

# The stronger recipe chosen by the ablation in bench/RESULTS.md ("Recipe ablation (issue 11)", 3 seeds):
# +0.02-0.03 test accuracy per model at the same sizes and epochs, and a third of the seed-to-seed spread.
STRONG_RECIPE = Recipe(optimizer="adamw", weight_decay=0.05, schedule="warmup_cosine", warmup_fraction=0.15,
                       label_smoothing=0.1, augmentation="flip", tta=True)  # fmt: skip


@dataclass(frozen=True)
class Profile:
    """The settings a training profile gives every model; per-model plans live in the model registry."""

    description: str
    weights: str
    batch_size: int
    learning_rate: float  # the peak rate under a schedule
    fine_tune_learning_rate: float
    recipe: Recipe = STUDY_RECIPE


PROFILES: dict[str, Profile] = {
    # The study's settings (sections 3 and 4); the per-model epochs and sizes are in the registry.
    "paper": Profile("The study's settings: ImageNet weights, 224/299 px, 20 / 10 epochs. Meant for a GPU.",
                     weights="imagenet", batch_size=32, learning_rate=1e-3, fine_tune_learning_rate=1e-5),
    "cpu": Profile("Small images, few epochs, weights from scratch, a stronger recipe (AdamW, warm-up + cosine, "
                   "label smoothing, flips, flip TTA): a full run in minutes on a laptop CPU.",
                   weights="none", batch_size=32, learning_rate=2e-3, fine_tune_learning_rate=1e-4,
                   recipe=STRONG_RECIPE),
    "tiny": Profile("Tests and smoke checks only: tiny images, one or two epochs, the cpu recipe.",
                    weights="none", batch_size=16, learning_rate=2e-3, fine_tune_learning_rate=1e-4,
                    recipe=STRONG_RECIPE),
}  # fmt: skip


@dataclass(frozen=True)
class TrainPlan:
    """How one model trains in this run: input size, epochs, and how many of them are frozen."""

    image_size: int
    epochs: int
    freeze_epochs: int


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


# The JSON types of a whole-number field. Airflow's form gives a plain "integer" a number box that silently
# drops what is not a number ("abc" became empty: the profile's epochs); a field of two number types gets
# its free-text box instead, which refuses anything that is not a number on the spot ("Value must be one
# of: integer, number") and keeps the form from being submitted. `_range` refuses fractions.
WHOLE_NUMBER = ["integer", "number"]


def _range_text(spec: dict) -> str:
    """The allowed range of a numeric field, in words ("1-500", "0 or more"), or "" for other fields."""
    limits = {k: v for part in spec.get("allOf", []) for k, v in part.items()}
    if "minimum" not in limits:
        return ""
    if "maximum" in limits:
        return f"{limits['minimum']}-{limits['maximum']}"
    return f"{limits['minimum']} or more"


def default_source() -> str:
    return os.environ.get("GENDER_SOURCE") or KAGGLE_DATASET


def default_storage() -> str | None:
    return os.environ.get("GENDER_STORAGE") or None


@dataclass(frozen=True)
class RunConfig:
    """What a user may set for a run, with the defaults. Fields with `form` metadata are on the trigger form."""

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
        "Epochs", "Overrides the profile's epochs for every model (empty: the profile's).",
        type=["null", *WHOLE_NUMBER], **_range(1, 500)))  # fmt: skip
    image_size: int | None = field(default=None, metadata=_form(
        "Image size (px)", "Overrides the profile's input size (InceptionV3 never below 75).",
        type=["null", *WHOLE_NUMBER], **_range(16, 512)))  # fmt: skip
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
    near_duplicate_distance: int | None = None
    near_duplicates_fatal: bool = False
    # Images this close (phash bits) are kept in one split, so a copy cannot leak test data into
    # training; -1 keeps only byte-identical images together.
    split_group_distance: int = 2
    label_audit: bool = field(default=True, metadata=_form(
        "Label audit", "Out-of-fold predictions for every image, ranking likely mislabels.", type="boolean"))  # fmt: skip
    label_audit_folds: int = 5
    label_audit_model: str = "cnn"
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


def check_form_limits(config: RunConfig) -> None:
    """Refuse any form field outside its form schema (the same limits the trigger form enforces), so a
    run started without the form (CLI, API, `dag.test`) is refused the same way instead of clamped."""
    from jsonschema import Draft202012Validator

    for f in dataclasses.fields(RunConfig):
        if "form" not in f.metadata:
            continue
        value = getattr(config, f.name)
        value = list(value) if isinstance(value, tuple) else value
        schema = {k: v for k, v in form_fields()[f.name].items() if k not in ("default", "title", "description")}
        error = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
        if error is not None:
            where = "".join(f"[{p!r}]" for p in error.absolute_path)
            message = "must not be blank" if error.validator == "pattern" else error.message
            raise SettingsError(f"{f.name}{where}: {message} ({form_fields()[f.name]['title']}: "
                                f"{_form_hint(f.name)})")  # fmt: skip


def _form_hint(name: str) -> str:
    spec = form_fields()[name]
    limits = {k: v for part in spec.get("allOf", []) for k, v in part.items()}
    bounds = [f"{k} {limits[k]}" for k in ("minimum", "maximum") if k in limits]
    if "enum" in spec.get("items", {}):
        return f"choose from {spec['items']['enum']}"
    if "enum" in spec:
        return f"choose from {spec['enum']}"
    return ", ".join(bounds) or spec.get("description", "see the trigger form")


# Settings that do not change what a trained model learns: where data comes from and goes (the dataset id
# and the split stand for the data itself), which models a run trains, checks that pass or stop a run,
# and what is only evaluated afterwards. `epochs` and `image_size` act through the per-model plans, and
# the label audit's fields identify the audit, not the models (training/keys.py adds them back for it).
# Every other field, including any added later, is part of a trained model's identity: a new recipe
# setting retrains by default instead of silently reusing a model trained without it.
NOT_TRAINING_FIELDS = frozenset({
    "source", "storage", "models", "epochs", "image_size", "per_model",
    "min_rows", "max_rows", "min_class_share", "min_image_side", "max_image_pixels", "max_file_bytes",
    "max_source_bytes",
    "near_duplicate_distance", "near_duplicates_fatal", "external_eval",
    "label_audit", "label_audit_folds", "label_audit_model", "label_audit_spec",
    "repeats",  # each repeat trains with its own seed, which is part of the key
})  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Settings(RunConfig):
    """A resolved run: the config with every default filled in, plus what follows from it."""

    batch_size: int
    learning_rate: float
    fine_tune_learning_rate: float
    recipe: Recipe
    per_model: dict[str, TrainPlan]
    label_audit_spec: TrainPlan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (lists, dicts, numbers): what travels through XCom and is saved with the outputs."""
        return json_safe(dataclasses.asdict(self))

    def training_inputs(self) -> dict[str, Any]:
        """The settings every model's training depends on (all but NOT_TRAINING_FIELDS), as plain JSON."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_TRAINING_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        data = dict(data)
        data["per_model"] = {m: TrainPlan(**p) for m, p in data["per_model"].items()}
        data["label_audit_spec"] = TrainPlan(**data["label_audit_spec"])
        data["recipe"] = Recipe(**data["recipe"])
        for key in ("models", "split", "external_eval"):
            data[key] = tuple(data[key])
        return cls(**data)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def for_repeat(self, repeat: int) -> Settings:
        """The settings of repeat `repeat` of this run: the same, with seed + repeat (a new split, new
        initialisation, order and augmentation)."""
        return self.replace(seed=self.seed + int(repeat))


def json_safe(value):
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def as_settings(value: Settings | dict) -> Settings:
    """Settings from either form (a task receives them as the dict XCom carried)."""
    return value if isinstance(value, Settings) else Settings.from_dict(value)


# --- resolution --------------------------------------------------------------------------------------


def resolve_settings(overrides: dict[str, Any] | RunConfig | None = None) -> Settings:
    """The complete settings of a run: defaults, then the profile, then `overrides`; refuses bad values."""
    config = overrides if isinstance(overrides, RunConfig) else RunConfig.from_overrides(overrides)
    if config.profile not in PROFILES:
        raise SettingsError(f"unknown profile {config.profile!r}; expected one of {sorted(PROFILES)}")
    profile = PROFILES[config.profile]
    models = _resolve_models(config.models)
    # "" for storage (a CLI flag left empty) means the default, like null from the form.
    check_form_limits(dataclasses.replace(config, models=models, storage=config.storage or None))
    _check_ranges(config)
    return Settings(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(RunConfig)}
        | {
            "models": models,
            "weights": _resolve_weights(config.weights or profile.weights),
            "seed": int(config.seed),
            "repeats": int(config.repeats),
            "split": _resolve_split(config.split),
            "near_duplicate_distance": _near_duplicate_distance(config),
            "storage": config.storage or None,
            "external_eval": _as_tuple(config.external_eval or ()),
        },
        batch_size=profile.batch_size,
        learning_rate=profile.learning_rate,
        fine_tune_learning_rate=profile.fine_tune_learning_rate,
        recipe=profile.recipe,
        per_model={name: _train_plan(name, config) for name in models},
        label_audit_spec=_label_audit_plan(config),
    )


def _as_tuple(value) -> tuple:
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def _resolve_models(models) -> tuple[str, ...]:
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    known = model_names()
    bad = [m for m in models if m not in known]
    if bad or not models:
        raise SettingsError(f"unknown model(s) {bad or list(models)!r}; expected some of {list(known)}")
    return tuple(m for m in known if m in models)  # canonical (registry) order, no repeats


def _resolve_weights(weights: str) -> str:
    if weights not in WEIGHT_CHOICES and not _is_weights_location(weights):
        raise SettingsError(
            f"unknown weights {weights!r}; expected 'none', 'imagenet', or a folder / s3:// prefix "
            "holding <model>.pth state dicts"
        )
    return weights


def _is_weights_location(value: str) -> bool:
    return isinstance(value, str) and (value.startswith(("s3://", "file://", "/")) or value.startswith("."))


def _resolve_split(split) -> tuple[float, ...]:
    fractions = tuple(float(x) for x in split)
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise SettingsError(f"split must be three positive fractions summing to 1, got {list(fractions)}")
    return fractions


def _near_duplicate_distance(config: RunConfig) -> int:
    distance = config.near_duplicate_distance
    if distance is None:
        distance = 2 if config.near_duplicates_fatal else 4
    if not 0 <= int(distance) <= 64:
        raise SettingsError(f"near_duplicate_distance must be between 0 and 64 bits, got {distance}")
    return int(distance)


def _check_ranges(config: RunConfig) -> None:
    if not -1 <= int(config.split_group_distance) <= 64:
        raise SettingsError(f"split_group_distance must be -1 (off) or 0-64 bits, got {config.split_group_distance}")
    if config.label_audit_model not in model_names():
        raise SettingsError(
            f"unknown label_audit_model {config.label_audit_model!r}; expected one of {list(model_names())}"
        )
    if not 1 <= int(config.repeats) <= 20:
        raise SettingsError(f"repeats must be between 1 and 20, got {config.repeats}")
    if int(config.label_audit_folds) < 2:
        raise SettingsError(f"label_audit_folds must be at least 2, got {config.label_audit_folds}")


def _profile_plan(name: str, profile: str):
    plans = get_model_spec(name).profiles
    if profile not in plans:
        raise SettingsError(
            f"model {name!r} has no plan for profile {profile!r}; its registry entry lists {list(plans)}"
        )
    return plans[profile]


def _train_plan(name: str, config: RunConfig) -> TrainPlan:
    base = _profile_plan(name, config.profile)
    size, epochs, freeze = base.image_size, base.epochs, base.freeze_epochs
    if config.epochs is not None:
        if int(config.epochs) < 1:
            raise SettingsError(f"epochs must be at least 1, got {config.epochs}")
        # Keep the profile's frozen/unfrozen proportion.
        frac = freeze / epochs
        epochs = int(config.epochs)
        freeze = min(epochs - 1, round(frac * epochs)) if epochs > 1 else 0
    if config.image_size is not None:
        size = int(config.image_size)
    minimum = get_model_spec(name).min_image_size
    if size < minimum:
        if config.image_size is not None and get_model_spec(name).raise_small_inputs:
            size = minimum  # a run-wide size applies to the other models; this one cannot go smaller
        else:
            raise SettingsError(f"image_size {size} is too small for {name}; use at least {minimum}")
    return TrainPlan(image_size=size, epochs=epochs, freeze_epochs=freeze)


def _label_audit_plan(config: RunConfig) -> TrainPlan:
    name = config.label_audit_model
    base = _profile_plan(name, config.profile)
    size = base.image_size
    if config.image_size is not None:
        size = max(int(config.image_size), get_model_spec(name).min_image_size)
    return TrainPlan(image_size=size, epochs=base.epochs, freeze_epochs=0)
