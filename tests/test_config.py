import pytest

from gender_tasks.models.registry import STUDY_MODELS, ProfilePlan, get_model_spec, model_names
from gender_tasks.settings import PROFILES, RunConfig, Settings, SettingsError, resolve_settings


def test_defaults_resolve_every_model_with_the_profile_sizes():
    s = resolve_settings({"profile": "paper"})
    assert s.models == STUDY_MODELS
    assert s.per_model["inceptionv3"].image_size == 299
    assert s.per_model["cnn"].epochs == 20 and s.per_model["resnet50"].epochs == 10
    assert s.weights == "imagenet"
    assert s.split == (0.7, 0.15, 0.15)


def test_settings_are_immutable_and_round_trip_through_json():
    import dataclasses
    import json

    s = resolve_settings({"profile": "tiny", "models": "cnn,resnet50", "external_eval": ["/x?age > 1"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1
    data = json.loads(json.dumps(s.to_dict()))
    assert Settings.from_dict(data) == s
    assert data["per_model"]["resnet50"] == {"image_size": 32, "epochs": 2, "freeze_epochs": 1, "min_steps": 0}


def test_overrides_keep_inception_at_its_minimum_and_the_frozen_share():
    s = resolve_settings({"profile": "paper", "epochs": 4, "image_size": 32, "models": ["resnet50", "inceptionv3"]})
    assert s.models == ("resnet50", "inceptionv3")
    assert s.per_model["resnet50"] == ProfilePlan(image_size=32, epochs=4, freeze_epochs=2)
    assert s.per_model["inceptionv3"].image_size == 75


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"models": ["vgg16"]}, "vgg16"),
        ({"profile": "gpu-xl"}, "gpu-xl"),
        ({"weights": "imagenet21k"}, "imagenet21k"),
        ({"bogus": 1}, "bogus"),
        ({"epochs": 0}, "epochs"),
        ({"split": [0.5, 0.5, 0.5]}, "split"),
        ({"image_size": 8, "models": ["cnn"]}, "image_size"),
    ],
)
def test_bad_settings_name_the_bad_item(overrides, named):
    with pytest.raises(SettingsError, match=named):
        resolve_settings(overrides)


def test_every_model_has_a_plan_for_every_profile():
    for name in model_names():
        plans = get_model_spec(name).profiles
        assert set(plans) == set(PROFILES), name
        for plan in plans.values():
            assert 0 <= plan.freeze_epochs < plan.epochs
            assert plan.image_size >= get_model_spec(name).min_image_size


def test_the_paper_profile_is_exactly_the_studys_recipe():
    from gender_tasks.settings import STUDY_RECIPE, Recipe

    s = resolve_settings({"profile": "paper"})
    # Adam at a constant 1e-3 (fine-tuning 1e-5), batch 32, flip + rotation + zoom, plain BCE, no TTA.
    assert s.recipe == STUDY_RECIPE == Recipe(optimizer="adam", weight_decay=0.0, schedule="constant",
                                              warmup_fraction=0.0, label_smoothing=0.0, augmentation="full",
                                              tta=False)  # fmt: skip
    assert (s.learning_rate, s.fine_tune_learning_rate, s.batch_size, s.weights) == (1e-3, 1e-5, 32, "imagenet")
    assert {m: (p.image_size, p.epochs, p.freeze_epochs) for m, p in s.per_model.items()} == {
        "cnn": (224, 20, 0),
        "resnet50": (224, 10, 5),
        "inceptionv3": (299, 10, 5),
        "mobilenetv2": (224, 10, 5),
    }
    assert s.repeats == 1


def test_the_cpu_profile_uses_the_ablations_recipe():
    s = resolve_settings({"profile": "cpu"})
    r = s.recipe
    assert (r.optimizer, r.weight_decay, r.schedule, r.warmup_fraction) == ("adamw", 0.05, "warmup_cosine", 0.15)
    assert (r.label_smoothing, r.augmentation, r.tta, r.class_weighting) == (0.1, "flip", True, "balanced")
    assert (s.learning_rate, s.batch_size) == (2e-3, 32)
    assert {m: (p.image_size, p.epochs) for m, p in s.per_model.items()} == {
        "cnn": (64, 48),
        "resnet50": (64, 5),
        "inceptionv3": (75, 5),
        "mobilenetv2": (64, 20),
    }
    # The label audit's CNN folds train at the size and epochs its ranking was measured at (bench/RESULTS.md),
    # not the CNN's own plan; min_steps as the CNN's.
    assert (s.label_audit_spec.image_size, s.label_audit_spec.epochs) == (32, 24)
    assert s.label_audit_spec.min_steps == s.per_model["cnn"].min_steps
    assert resolve_settings({"profile": "tiny"}).label_audit_spec.epochs == 2
    # A run's own epochs bound the audit's folds too (a quick run is quick), exactly as given, like the models'.
    quick = resolve_settings({"profile": "cpu", "epochs": 3})
    assert quick.label_audit_spec == ProfilePlan(image_size=32, epochs=3, freeze_epochs=0, min_steps=0)
    assert quick.per_model["cnn"].epochs == 3 and quick.per_model["cnn"].min_steps == 0
    assert resolve_settings({"profile": "tiny"}).recipe == r


def test_repeats_are_checked_and_each_repeat_gets_its_own_seed():
    s = resolve_settings({"profile": "tiny", "repeats": 3, "seed": 7})
    assert [s.for_repeat(r).seed for r in range(s.repeats)] == [7, 8, 9]
    with pytest.raises(SettingsError, match="repeats"):
        resolve_settings({"repeats": 0})


def test_the_warmup_cosine_schedule_rises_then_decays_to_zero():
    from gender_tasks.settings import PROFILES, STUDY_RECIPE
    from gender_tasks.training.recipe import lr_factor, steps_per_epoch

    recipe = PROFILES["cpu"].recipe
    factors = [lr_factor(s, 100, recipe) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 15) and factors[14] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[14:], factors[15:], strict=False))  # decays after the warm-up
    assert lr_factor(100, 100, recipe) == pytest.approx(0.0)
    assert {lr_factor(s, 100, STUDY_RECIPE) for s in range(100)} == {1.0}
    assert steps_per_epoch(65, 32) == 2 and steps_per_epoch(66, 32) == 3  # a last batch of one is skipped


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"split_group_distance": 65}, "split_group_distance: 65 is greater than the maximum of 64 (allowed: -1 to 64"),
        ({"split_group_distance": -2}, "split_group_distance: -2 is less than the minimum of -1 (allowed: -1 to 64"),
        (
            {"near_duplicate_distance": 65},
            "near_duplicate_distance: 65 is greater than the maximum of 64 (allowed: 0 to",
        ),
        ({"label_audit_folds": 1}, "label_audit_folds: 1 is less than the minimum of 2 (allowed: 2 or more"),
        ({"repeats": 21}, "repeats: 21 is greater than the maximum of 20 (Repeats: minimum 1, maximum 20)"),
        ({"epochs": 0}, "epochs: 0 is less than the minimum of 1 (Epochs: minimum 1, maximum 500)"),
    ],
)
def test_a_setting_out_of_range_is_refused_naming_it_the_value_and_the_range(overrides, says):
    with pytest.raises(SettingsError) as err:
        resolve_settings(overrides)
    assert str(err.value).startswith(says)


def test_every_range_comes_from_one_schema():
    """The limits resolve_settings enforces are the trigger form's schema (and, off the form, the same kind of
    schema): no second hand-written copy of a bound."""
    from gender_tasks.settings import field_schemas, form_fields

    schemas, form = field_schemas(), form_fields()
    for name in ("epochs", "image_size", "seed", "repeats"):
        assert schemas[name]["allOf"] == form[name]["allOf"], name
    for name, bounds in (("split_group_distance", (-1, 64)), ("near_duplicate_distance", (0, 64)),
                         ("label_audit_folds", (2, None))):  # fmt: skip
        (limits,) = schemas[name]["allOf"]
        assert (limits["minimum"], limits.get("maximum")) == bounds, name
    # The edges are allowed.
    s = resolve_settings({"split_group_distance": -1, "near_duplicate_distance": 64, "label_audit_folds": 2,
                          "repeats": 20, "epochs": 500})  # fmt: skip
    assert (s.split_group_distance, s.near_duplicate_distance, s.label_audit_folds) == (-1, 64, 2)


def test_plans_are_the_registrys_type_and_keep_their_json():
    s = resolve_settings({"profile": "tiny", "models": ["cnn", "resnet50"]})
    assert all(type(p) is ProfilePlan for p in [*s.per_model.values(), s.label_audit_spec])
    assert s.to_dict()["label_audit_spec"] == {"image_size": 32, "epochs": 2, "freeze_epochs": 0, "min_steps": 0}
    assert Settings.from_dict(s.to_dict()).per_model == s.per_model


def test_on_a_small_split_the_cpu_profile_trains_at_least_its_minimum_of_steps():
    from gender_tasks.training.loop import plan_for
    from gender_tasks.training.recipe import steps_per_epoch

    s = resolve_settings({"profile": "cpu"})
    resnet = s.per_model["resnet50"]
    assert (resnet.min_steps, s.per_model["cnn"].min_steps, s.label_audit_spec.min_steps) == (110, 264, 264)
    # The shared faces' ~700 training images make 22 steps an epoch: the profile's epochs as they are.
    assert plan_for(resnet, 696, 32) == resnet and plan_for(s.per_model["cnn"], 696, 32) == s.per_model["cnn"]
    # 100 faces a class (140 training images) make 5 steps an epoch: 22 epochs reach the 110 steps.
    small = plan_for(resnet, 140, 32)
    assert small.epochs == 22 and small.epochs * steps_per_epoch(140, 32) >= 110 > 21 * steps_per_epoch(140, 32)
    assert (small.image_size, small.freeze_epochs, small.min_steps) == (64, 0, 110)
    # Frozen epochs keep their share.
    assert ProfilePlan(64, 10, 5, min_steps=100).scaled_to(5) == ProfilePlan(64, 20, 10, min_steps=100)
    # Epochs asked for are trained as asked; the study's profile and the tests' have no minimum.
    assert resolve_settings({"profile": "cpu", "epochs": 2}).per_model["resnet50"].min_steps == 0
    for profile in ("paper", "tiny"):
        plans = resolve_settings({"profile": profile}).per_model.values()
        assert all(p.min_steps == 0 for p in plans), profile


def test_a_train_task_small_enough_for_the_minimum_gets_the_time_for_it():
    from gender_tasks.timeouts import run_budget

    s = resolve_settings({"profile": "cpu"})
    run = {"settings": s.to_dict(), "dataset": {"images": 200}}
    without = {"settings": s.replace(per_model={m: ProfilePlan(p.image_size, p.epochs) for m, p in
                                                s.per_model.items()}).to_dict(), "dataset": {"images": 200}}  # fmt: skip
    with_minimum, plain = (
        run_budget("train", run, model_name="resnet50"),
        run_budget("train", without, model_name="resnet50"),
    )
    # Sized on the whole dataset (more than its training split): 110 steps of 32 are 18 passes over 200 images.
    assert "200 images at 64 px x 18 epochs" in with_minimum.sized_for and "x 5 epochs" in plain.sized_for
    assert with_minimum.seconds > plain.seconds


def test_the_label_audits_folds_are_the_profiles_unless_a_run_sets_them():
    """Ten folds where the audit is meant to be read (paper, cpu), five in the tests' tiny profile; a run's
    label_audit_folds wins (the audit's key and time limit take the resolved number)."""
    assert {p: resolve_settings({"profile": p}).label_audit_folds for p in ("paper", "cpu", "tiny")} == {
        "paper": 10, "cpu": 10, "tiny": 5}  # fmt: skip
    assert resolve_settings({"profile": "cpu", "label_audit_folds": 3}).label_audit_folds == 3
    assert RunConfig().label_audit_folds is None  # nothing to resolve against before the profile is known
