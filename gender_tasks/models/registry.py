"""The model registry: everything the pipeline knows about a model, in one entry per model.

An entry is plain data (no torch at import: the DAG reads the names while Airflow parses it).
Its builder is named by import path and imported only when a model is built. Adding a model is
one `register(ModelSpec(...))` call, plus its module for a custom network.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace

# The input normalisation of torchvision's ImageNet weights (for models with imagenet_normalised).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ProfilePlan:
    """How one model trains in one profile: input size, epochs, how many of them are frozen, and the fewest
    optimizer steps it takes on a small training split."""

    image_size: int
    epochs: int
    freeze_epochs: int = 0
    # On a training split too small for `epochs` to make this many optimizer steps, the epochs are raised
    # until they do (scaled_to). A profile's epochs are sized for a dataset of some hundreds of images a
    # class; on a tenth of that, a network trained from scratch gets a tenth of the steps, and its
    # eval-mode predictions can fall into one class (bench/RESULTS.md, robustness). 0: epochs as given.
    min_steps: int = 0

    def scaled_to(self, steps_per_epoch: int) -> ProfilePlan:
        """This plan for a training split of `steps_per_epoch` optimizer steps an epoch: the epochs raised
        (the frozen ones in proportion) until training takes at least min_steps steps; itself if it does."""
        if self.epochs * steps_per_epoch >= self.min_steps:
            return self
        epochs = -(-self.min_steps // max(steps_per_epoch, 1))
        return replace(self, epochs=epochs, freeze_epochs=round(self.freeze_epochs * epochs / self.epochs))


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the id used in settings, storage keys and task names
    display_name: str  # in the report
    builder: str  # "module:function" building the network: f(image_size, weights) -> nn.Module
    min_image_size: int
    profiles: dict[str, ProfilePlan]  # one plan per training profile (paper, cpu, tiny)
    # Training GFLOP per image at the paper profile (forward + backward, torch.utils.flop_counter) times
    # its epochs: orders the training tasks slowest first.
    relative_cost: float
    # Modules trained while the backbone is frozen, as attribute paths; "" is the whole model.
    head: tuple[str, ...] = ("",)
    # Inputs are normalised with the ImageNet mean and std (pretrained torchvision backbones expect it).
    imagenet_normalised: bool = False
    # Takes pretrained backbone weights (imagenet or a folder of state dicts); others always train from scratch.
    pretrained: bool = False
    # A run-wide image_size below min_image_size raises this model to its minimum instead of refusing the run.
    raise_small_inputs: bool = False
    # Epochs and input size (px) of the label audit's folds when this model is the audit's, per profile, where
    # they differ from the profile's plan (the audit trains one model a fold: its ranking was measured at these).
    audit_epochs: dict[str, int] = field(default_factory=dict)
    audit_image_size: dict[str, int] = field(default_factory=dict)

    def build(self, image_size: int, weights: str = "none"):
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(image_size, weights if self.pretrained else "none")


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a model; the study's four are registered below."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def model_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {list(_REGISTRY)}") from None


def _plans(paper: tuple, cpu: tuple, tiny: tuple) -> dict[str, ProfilePlan]:
    return {"paper": ProfilePlan(*paper), "cpu": ProfilePlan(*cpu), "tiny": ProfilePlan(*tiny)}


# The study's models (section 3). Profiles: paper = the study's settings (CNN 20 epochs; transfer
# models 10 epochs, 5 frozen, InceptionV3 at its native 299 px); cpu = from scratch on a laptop (no
# frozen epochs: freezing a random backbone teaches nothing. The CNN 48 epochs and MobileNetV2 20, four times
# the recipe ablation's 12 / 5, each doubling measured on held-out faces and the robustness grid,
# bench/RESULTS.md; the label audit's CNN folds train 24 epochs at 32 px: they rank mislabels as well as or better
# than 12 at 64 px, in half the time, bench/audit_bench.py. min_steps: at least the steps the ablation's 12 / 5
# epochs make on the shared faces' ~700 training images, 22 an epoch); tiny = tests.
# The CNN's three 'valid' 3x3 conv + 2x2 pool blocks need 22 px to leave a pixel (22 -> 10 -> 4 -> 1).
register(ModelSpec(
    name="cnn", display_name="CNN", builder="gender_tasks.models.cnn:build_cnn", min_image_size=22,
    profiles=_plans(paper=(224, 20, 0), cpu=(64, 48, 0, 264), tiny=(32, 2, 0)), relative_cost=55,
    audit_epochs={"cpu": 24}, audit_image_size={"cpu": 32},
))  # fmt: skip
register(ModelSpec(
    name="resnet50", display_name="ResNet50", builder="gender_tasks.models.transfer:build_resnet50",
    min_image_size=32, profiles=_plans(paper=(224, 10, 5), cpu=(64, 5, 0, 110), tiny=(32, 2, 1)), relative_cost=243,
    head=("fc",), imagenet_normalised=True, pretrained=True,
))  # fmt: skip
register(ModelSpec(
    name="inceptionv3", display_name="Inception V3", builder="gender_tasks.models.transfer:build_inceptionv3",
    # Its stem cannot take inputs under 75 px.
    min_image_size=75, profiles=_plans(paper=(299, 10, 5), cpu=(75, 5, 0, 110), tiny=(75, 1, 0)), relative_cost=342,
    head=("net.fc", "net.AuxLogits.fc"), imagenet_normalised=True, pretrained=True, raise_small_inputs=True,
))  # fmt: skip
register(ModelSpec(
    name="mobilenetv2", display_name="MobileNet V2", builder="gender_tasks.models.transfer:build_mobilenetv2",
    min_image_size=32, profiles=_plans(paper=(224, 10, 5), cpu=(64, 20, 0, 110), tiny=(32, 2, 1)), relative_cost=123,
    head=("classifier",), imagenet_normalised=True, pretrained=True,
))  # fmt: skip

STUDY_MODELS = ("cnn", "resnet50", "inceptionv3", "mobilenetv2")
