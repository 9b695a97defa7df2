"""The recipe's class weighting: each class's training loss weighted n / (2 * n_class) under "balanced"."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gender_tasks.settings import STRONG_RECIPE
from gender_tasks.training.batches import SplitData
from gender_tasks.training.devices import make_autocast
from gender_tasks.training.loop import class_weights, epoch_generator, predict_proba, setup_model, train_one_epoch
from gender_tasks.training.recipe import make_optimizer

CPU = torch.device("cpu")
NONE = dataclasses.replace(STRONG_RECIPE, class_weighting="none")
BALANCED = dataclasses.replace(STRONG_RECIPE, class_weighting="balanced")


def _noise(females: int, males: int, size: int = 24) -> SplitData:
    """Images of pure noise: nothing in them tells the classes apart, so a model can learn only their shares."""
    n = females + males
    images = torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.tensor([0.0] * females + [1.0] * males)
    return SplitData(images, labels, [f"k{i}" for i in range(n)])


def test_balanced_weights_make_each_class_weigh_half():
    labels = torch.tensor([0.0] * 30 + [1.0] * 10)
    female, male = class_weights(labels, "balanced")
    assert (female, male) == pytest.approx((40 / 60, 40 / 20))
    assert female * 30 == pytest.approx(male * 10) and female * 30 + male * 10 == pytest.approx(40)
    assert class_weights(labels, "none") is None
    assert class_weights(torch.tensor([0.0, 1.0] * 5), "balanced") is None  # equal classes: weights of exactly 1
    assert class_weights(torch.zeros(6), "balanced") is None  # one class: nothing to balance
    with pytest.raises(ValueError, match="class_weighting: expected 'none' or 'balanced', got 'inverse'"):
        class_weights(labels, "inverse")


def _trained(data: SplitData, recipe, epochs: int = 6):
    model, inputs = setup_model("cnn", 24, "none", 0, CPU)
    optimizer = make_optimizer(model.parameters(), 3e-3, recipe)
    for epoch in range(epochs):
        train_one_epoch(model, "cnn", data, inputs, optimizer, epoch_generator(0, epoch), 8, make_autocast(CPU),
                        recipe=recipe)  # fmt: skip
    return model, inputs


def test_on_equal_classes_balanced_training_is_plain_training_to_the_bit():
    data = _noise(12, 12)
    plain, _ = _trained(data, NONE, epochs=2)
    balanced, _ = _trained(data, BALANCED, epochs=2)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), balanced.state_dict().values(), strict=True)
    )


def test_on_imbalanced_noise_plain_training_learns_the_majority_and_balanced_does_not():
    data = _noise(36, 12)  # three females to a male; the images say nothing
    said = {}
    for recipe in (NONE, BALANCED):
        model, inputs = _trained(data, recipe)
        prob, _ = predict_proba(model, data, inputs, 48, make_autocast(CPU))
        said[recipe.class_weighting] = float(prob.mean())
    # Plain BCE drifts toward the training share of males (0.25); weighted, both classes pull alike (0.5).
    assert said["none"] < 0.4, said
    assert abs(said["balanced"] - 0.5) < 0.1, said


def test_a_run_sets_its_class_weighting_and_a_bad_value_is_refused_naming_the_choices():
    from gender_tasks.settings import SettingsError, resolve_settings

    profile = resolve_settings({"profile": "cpu"}).recipe
    for how in ("none", "balanced"):
        s = resolve_settings({"profile": "cpu", "class_weighting": how})
        assert s.recipe == dataclasses.replace(profile, class_weighting=how)
    # Set to what the profile gives anyway, it is the same training: the models keep their identity.
    same = resolve_settings({"profile": "cpu", "class_weighting": profile.class_weighting})
    assert same.training_inputs() == resolve_settings({"profile": "cpu"}).training_inputs()
    with pytest.raises(SettingsError, match=r"class_weighting: 'inverse' is not one of .*allowed: one of \['none', "
                                            r"'balanced'\] or empty"):  # fmt: skip
        resolve_settings({"profile": "cpu", "class_weighting": "inverse"})
