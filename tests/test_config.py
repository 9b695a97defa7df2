import pytest

from gender_tasks.config import MODEL_NAMES, PROFILES, SettingsError, resolve_settings


def test_defaults_resolve_every_model_with_the_profile_sizes():
    s = resolve_settings({"profile": "paper"})
    assert s["models"] == list(MODEL_NAMES)
    assert s["per_model"]["inceptionv3"]["image_size"] == 299
    assert s["per_model"]["cnn"]["epochs"] == 20 and s["per_model"]["resnet50"]["epochs"] == 10
    assert s["weights"] == "imagenet"
    assert s["split"] == [0.7, 0.15, 0.15]


def test_overrides_keep_inception_at_its_minimum_and_the_frozen_share():
    s = resolve_settings({"profile": "paper", "epochs": 4, "image_size": 32, "models": ["resnet50", "inceptionv3"]})
    assert s["models"] == ["resnet50", "inceptionv3"]
    assert s["per_model"]["resnet50"] == {"image_size": 32, "epochs": 4, "freeze_epochs": 2}
    assert s["per_model"]["inceptionv3"]["image_size"] == 75


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


def test_every_profile_covers_every_model():
    for name, profile in PROFILES.items():
        assert set(profile["models"]) == set(MODEL_NAMES), name
        for spec in profile["models"].values():
            assert 0 <= spec["freeze_epochs"] < spec["epochs"]
