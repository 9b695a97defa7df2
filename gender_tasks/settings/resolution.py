"""What a run uses: `Settings`, a `RunConfig` resolved against its profile and the model registry
(immutable and typed), and the cache-key policy (`NOT_TRAINING_FIELDS`: which settings are part of a
trained model's identity).

Settings travel between Airflow tasks as plain JSON (`to_dict` / `Settings.from_dict`) and are saved
next to the outputs. Each model's plan (input size, epochs, frozen epochs) is a `ProfilePlan`, the
registry's own type: the profile's plan with the run's overrides applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..models.registry import ProfilePlan, get_model_spec, model_names
from ..storage.locations import is_storage_location
from .form import RunConfig, check_limits
from .profiles import PROFILES, WEIGHT_CHOICES, Recipe, SettingsError

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
    "class_weighting",  # acts through the recipe, which is part of the key
})  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Settings(RunConfig):
    """A resolved run: the config with every default filled in, plus what follows from it."""

    batch_size: int
    learning_rate: float
    fine_tune_learning_rate: float
    recipe: Recipe
    per_model: dict[str, ProfilePlan]
    label_audit_spec: ProfilePlan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (lists, dicts, numbers): what travels through XCom and is saved with the outputs."""
        return json_safe(dataclasses.asdict(self))

    def training_inputs(self) -> dict[str, Any]:
        """The settings every model's training depends on (all but NOT_TRAINING_FIELDS), as plain JSON."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_TRAINING_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        data = dict(data)
        data["per_model"] = {m: ProfilePlan(**p) for m, p in data["per_model"].items()}
        data["label_audit_spec"] = ProfilePlan(**data["label_audit_spec"])
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
    # Every range (the form's fields and the others) from one schema: form.field_schemas.
    check_limits(dataclasses.replace(config, models=models, storage=config.storage or None))
    _check_label_audit_model(config)
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
            "label_audit_folds": int(config.label_audit_folds or profile.label_audit_folds),
        },
        batch_size=profile.batch_size,
        learning_rate=profile.learning_rate,
        fine_tune_learning_rate=profile.fine_tune_learning_rate,
        recipe=(
            profile.recipe
            if config.class_weighting is None
            else dataclasses.replace(profile.recipe, class_weighting=config.class_weighting)
        ),
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
    return isinstance(value, str) and is_storage_location(value)


def _resolve_split(split) -> tuple[float, ...]:
    fractions = tuple(float(x) for x in split)
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise SettingsError(f"split must be three positive fractions summing to 1, got {list(fractions)}")
    return fractions


def _near_duplicate_distance(config: RunConfig) -> int:
    """The explicit distance (its range is checked with the others), else 2 for a fatal check, 4 otherwise."""
    distance = config.near_duplicate_distance
    if distance is None:
        distance = 2 if config.near_duplicates_fatal else 4
    return int(distance)


def _check_label_audit_model(config: RunConfig) -> None:
    if config.label_audit_model not in model_names():
        raise SettingsError(
            f"unknown label_audit_model {config.label_audit_model!r}; expected one of {list(model_names())}"
        )


def _profile_plan(name: str, profile: str):
    plans = get_model_spec(name).profiles
    if profile not in plans:
        raise SettingsError(
            f"model {name!r} has no plan for profile {profile!r}; its registry entry lists {list(plans)}"
        )
    return plans[profile]


def _train_plan(name: str, config: RunConfig) -> ProfilePlan:
    base = _profile_plan(name, config.profile)
    size, epochs, freeze, min_steps = base.image_size, base.epochs, base.freeze_epochs, base.min_steps
    if config.epochs is not None:  # at least 1: check_limits; epochs asked for are trained as asked
        min_steps = 0
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
    return ProfilePlan(image_size=size, epochs=epochs, freeze_epochs=freeze, min_steps=min_steps)


def _label_audit_plan(config: RunConfig) -> ProfilePlan:
    spec = get_model_spec(config.label_audit_model)
    base = _profile_plan(spec.name, config.profile)
    size = spec.audit_image_size.get(config.profile, base.image_size)
    if config.image_size is not None:
        size = max(int(config.image_size), spec.min_image_size)
    if config.epochs is not None:  # the run's epochs bound every training, the audit's folds too, exactly as given
        return ProfilePlan(image_size=size, epochs=int(config.epochs), freeze_epochs=0, min_steps=0)
    epochs = spec.audit_epochs.get(config.profile, base.epochs)
    return ProfilePlan(image_size=size, epochs=epochs, freeze_epochs=0, min_steps=base.min_steps)
