"""A run's settings: what a user sets (`RunConfig`, the one source of defaults) and what a run uses
(`Settings`: the config resolved against its profile and the model registry, immutable and typed).

- `profiles`: the training profiles and their recipes, and the names shared by the rest;
- `form`: `RunConfig`, the JSON schema of each setting (the DAG's trigger form, `form_fields`) and
  `check_limits`, which validates any run against that same schema;
- `resolution`: `Settings`, `resolve_settings`, the per-model plans (`models.registry.ProfilePlan`) and
  the cache-key policy (`NOT_TRAINING_FIELDS`).

Nothing here imports more than the model registry, which is plain data: the DAG imports this package
while Airflow parses it.
"""

from __future__ import annotations

from ..models.registry import ProfilePlan
from .form import RunConfig, check_limits, default_source, default_storage, field_schemas, form_fields
from .profiles import (
    AUGMENTATIONS,
    CLASSES,
    ENSEMBLE,
    KAGGLE_DATASET,
    OPTIMIZERS,
    PROFILES,
    SCHEDULES,
    STRONG_RECIPE,
    STUDY_RECIPE,
    WEIGHT_CHOICES,
    Profile,
    Recipe,
    SettingsError,
)
from .resolution import NOT_TRAINING_FIELDS, Settings, as_settings, json_safe, resolve_settings

__all__ = [
    "AUGMENTATIONS",
    "CLASSES",
    "ENSEMBLE",
    "KAGGLE_DATASET",
    "NOT_TRAINING_FIELDS",
    "OPTIMIZERS",
    "PROFILES",
    "SCHEDULES",
    "STRONG_RECIPE",
    "STUDY_RECIPE",
    "WEIGHT_CHOICES",
    "Profile",
    "ProfilePlan",
    "Recipe",
    "RunConfig",
    "Settings",
    "SettingsError",
    "as_settings",
    "check_limits",
    "default_source",
    "default_storage",
    "field_schemas",
    "form_fields",
    "json_safe",
    "resolve_settings",
]
