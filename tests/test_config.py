import pytest

from gender_tasks.models.registry import STUDY_MODELS, get_model_spec, model_names
from gender_tasks.settings import PROFILES, Settings, SettingsError, TrainPlan, resolve_settings


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
    assert data["per_model"]["resnet50"] == {"image_size": 32, "epochs": 2, "freeze_epochs": 1}


def test_overrides_keep_inception_at_its_minimum_and_the_frozen_share():
    s = resolve_settings({"profile": "paper", "epochs": 4, "image_size": 32, "models": ["resnet50", "inceptionv3"]})
    assert s.models == ("resnet50", "inceptionv3")
    assert s.per_model["resnet50"] == TrainPlan(image_size=32, epochs=4, freeze_epochs=2)
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
