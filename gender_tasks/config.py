"""Run settings: the training profiles and the one resolved, validated settings dict a run uses.

A run's settings are plain JSON (they travel through XCom and are saved next to the outputs).
`resolve_settings` merges a profile with a user's overrides and rejects anything unknown.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import PermanentError

MODEL_NAMES = ("cnn", "resnet50", "inceptionv3", "mobilenetv2")
WEIGHT_CHOICES = ("none", "imagenet")
CLASSES = ("female", "male")

# InceptionV3's stem cannot take inputs under 75 px.
MIN_IMAGE_SIZE = {"cnn": 16, "resnet50": 32, "inceptionv3": 75, "mobilenetv2": 32}

# Each profile gives, per model: input size, epochs, frozen-backbone epochs.
PROFILES: dict[str, dict[str, Any]] = {
    # The study's settings (section 3 and 4): CNN 20 epochs; transfer models 10 epochs,
    # frozen backbone first, then fine-tuned; InceptionV3 at its native 299 px.
    "paper": {
        "description": "The study's settings: ImageNet weights, 224/299 px, 20 / 10 epochs. Meant for a GPU.",
        "weights": "imagenet",
        "batch_size": 32,
        "learning_rate": 1e-3,
        "fine_tune_learning_rate": 1e-5,
        "models": {
            "cnn": {"image_size": 224, "epochs": 20, "freeze_epochs": 0},
            "resnet50": {"image_size": 224, "epochs": 10, "freeze_epochs": 5},
            "inceptionv3": {"image_size": 299, "epochs": 10, "freeze_epochs": 5},
            "mobilenetv2": {"image_size": 224, "epochs": 10, "freeze_epochs": 5},
        },
    },
    # A laptop profile: small images, few epochs, from scratch (no download needed).
    # Freezing a randomly initialised backbone teaches nothing, so no frozen epochs here.
    "cpu": {
        "description": "Small images, few epochs, weights from scratch: a full run in minutes on a laptop CPU.",
        "weights": "none",
        "batch_size": 32,
        "learning_rate": 1e-3,
        "fine_tune_learning_rate": 1e-4,
        "models": {
            "cnn": {"image_size": 64, "epochs": 12, "freeze_epochs": 0},
            "resnet50": {"image_size": 64, "epochs": 5, "freeze_epochs": 0},
            "inceptionv3": {"image_size": 75, "epochs": 5, "freeze_epochs": 0},
            "mobilenetv2": {"image_size": 64, "epochs": 5, "freeze_epochs": 0},
        },
    },
    # For tests and smoke checks: the whole DAG in well under a minute per model.
    "tiny": {
        "description": "Tests and smoke checks only: tiny images, one or two epochs.",
        "weights": "none",
        "batch_size": 16,
        "learning_rate": 1e-3,
        "fine_tune_learning_rate": 1e-4,
        "models": {
            "cnn": {"image_size": 32, "epochs": 2, "freeze_epochs": 0},
            "resnet50": {"image_size": 32, "epochs": 2, "freeze_epochs": 1},
            "inceptionv3": {"image_size": 75, "epochs": 1, "freeze_epochs": 0},
            "mobilenetv2": {"image_size": 32, "epochs": 2, "freeze_epochs": 1},
        },
    },
}

DEFAULTS: dict[str, Any] = {
    "source": "kaggle:bwandowando/all-these-people-dont-exist",
    "storage": "",  # empty: the embedded default (a local directory), see storage.default_storage_uri
    "profile": "cpu",
    "models": list(MODEL_NAMES),
    "epochs": None,  # None: the profile's per-model epochs
    "image_size": None,  # None: the profile's per-model sizes
    "weights": None,  # None: the profile's weights
    "seed": 42,
    "split": [0.70, 0.15, 0.15],
    "min_rows": 10,
    "max_rows": 1_000_000,
    "min_class_share": 0.2,
    "min_image_side": 32,
    "max_image_pixels": 40_000_000,
    # Perceptual-hash (64-bit phash) distance under which two images in different splits are flagged.
    # On real face crops, pairs at 0-2 bits were the same picture; at 4 some were different people,
    # so a run that makes near-duplicates fatal uses 2 unless a distance is given explicitly.
    "near_duplicate_distance": None,
    "near_duplicates_fatal": False,
    # Images this close (phash bits) are kept in one split, so a copy cannot leak test data into
    # training; -1 keeps only byte-identical images together.
    "split_group_distance": 2,
    "label_audit": True,  # out-of-fold predictions for every image, to rank likely mislabels
    "label_audit_folds": 5,
    "label_audit_model": "cnn",
    "external_eval": [],  # extra labeled folders: "path" or "path?<pandas query over its labels.csv>"
}


class SettingsError(PermanentError):
    """A run setting is missing, unknown or out of range; the message names it and the fix."""


def resolve_settings(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the complete settings of a run: defaults, then the profile, then `overrides`."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; expected some of {sorted(DEFAULTS)}")
    settings = copy.deepcopy(DEFAULTS)
    settings.update({k: v for k, v in overrides.items() if v is not None})

    profile_name = settings["profile"]
    if profile_name not in PROFILES:
        raise SettingsError(f"unknown profile {profile_name!r}; expected one of {sorted(PROFILES)}")
    profile = PROFILES[profile_name]

    models = settings["models"]
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_NAMES]
    if bad or not models:
        raise SettingsError(f"unknown model(s) {bad or models!r}; expected some of {list(MODEL_NAMES)}")
    settings["models"] = [m for m in MODEL_NAMES if m in models]  # canonical order, no repeats

    weights = settings["weights"] or profile["weights"]
    if weights not in WEIGHT_CHOICES and not _is_weights_location(weights):
        raise SettingsError(
            f"unknown weights {weights!r}; expected 'none', 'imagenet', or a folder / s3:// prefix "
            "holding <model>.pth state dicts"
        )
    settings["weights"] = weights

    for key in ("batch_size", "learning_rate", "fine_tune_learning_rate"):
        settings[key] = profile[key]

    per_model = {}
    for name in settings["models"]:
        spec = dict(profile["models"][name])
        if settings["epochs"] is not None:
            epochs = int(settings["epochs"])
            if epochs < 1:
                raise SettingsError(f"epochs must be at least 1, got {epochs}")
            # Keep the profile's frozen/unfrozen proportion.
            frac = spec["freeze_epochs"] / spec["epochs"]
            spec["epochs"] = epochs
            spec["freeze_epochs"] = min(epochs - 1, round(frac * epochs)) if epochs > 1 else 0
        if settings["image_size"] is not None:
            spec["image_size"] = int(settings["image_size"])
        if spec["image_size"] < MIN_IMAGE_SIZE[name]:
            if settings["image_size"] is not None and name == "inceptionv3":
                spec["image_size"] = MIN_IMAGE_SIZE[name]  # the one model that cannot go smaller
            else:
                raise SettingsError(
                    f"image_size {spec['image_size']} is too small for {name}; use at least {MIN_IMAGE_SIZE[name]}"
                )
        per_model[name] = spec
    settings["per_model"] = per_model

    if settings["near_duplicate_distance"] is None:
        settings["near_duplicate_distance"] = 2 if settings["near_duplicates_fatal"] else 4
    if not 0 <= int(settings["near_duplicate_distance"]) <= 64:
        raise SettingsError(
            f"near_duplicate_distance must be between 0 and 64 bits, got {settings['near_duplicate_distance']}"
        )
    if not -1 <= int(settings["split_group_distance"]) <= 64:
        raise SettingsError(
            f"split_group_distance must be -1 (off) or 0-64 bits, got {settings['split_group_distance']}"
        )
    if settings["label_audit_model"] not in MODEL_NAMES:
        raise SettingsError(
            f"unknown label_audit_model {settings['label_audit_model']!r}; expected one of {list(MODEL_NAMES)}"
        )
    if int(settings["label_audit_folds"]) < 2:
        raise SettingsError(f"label_audit_folds must be at least 2, got {settings['label_audit_folds']}")
    if isinstance(settings["external_eval"], str):
        settings["external_eval"] = [settings["external_eval"]] if settings["external_eval"] else []
    audit_spec = dict(profile["models"][settings["label_audit_model"]])
    if settings["image_size"] is not None:
        audit_spec["image_size"] = max(int(settings["image_size"]), MIN_IMAGE_SIZE[settings["label_audit_model"]])
    audit_spec["freeze_epochs"] = 0
    settings["label_audit_spec"] = audit_spec

    split = [float(x) for x in settings["split"]]
    if len(split) != 3 or abs(sum(split) - 1.0) > 1e-6 or min(split) <= 0:
        raise SettingsError(f"split must be three positive fractions summing to 1, got {split}")
    settings["split"] = split
    settings["seed"] = int(settings["seed"])
    return settings


def _is_weights_location(value: str) -> bool:
    return isinstance(value, str) and (value.startswith(("s3://", "file://", "/")) or value.startswith("."))
