import pytest
import torch

from gender_tasks.errors import PermanentError
from gender_tasks.models import network as M
from gender_tasks.models.transfer import INCEPTION_AUX_MIN_SIZE
from gender_tasks.training.augment import augment_batch, augment_params

SIZES = {"cnn": 32, "resnet50": 32, "inceptionv3": 75, "mobilenetv2": 32}
AUX_SIZE = INCEPTION_AUX_MIN_SIZE


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIZES))
def test_forward_backward_at_input_size(name):
    torch.manual_seed(0)
    model = M.build_model(name, SIZES[name], "none")
    model.train()
    x = torch.rand(2, 3, SIZES[name], SIZES[name])
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_inception_at_299_trains_its_auxiliary_classifier_too():
    model = M.build_model("inceptionv3", AUX_SIZE, "none").train()
    main, aux = model(torch.rand(2, 3, AUX_SIZE, AUX_SIZE))
    assert main.shape == aux.shape == (2, 1)
    M.set_backbone_frozen("inceptionv3", model, True)
    assert M.trainable_parameter_count(model) == 2048 * 128 + 128 + 128 + 1 + 768 + 1
    model.eval()
    assert model(torch.rand(1, 3, AUX_SIZE, AUX_SIZE)).shape == (1, 1)


EXPECTED_HEAD = {  # study head: Dense(128, ReLU) -> Dropout -> Dense(1)
    "resnet50": 2048 * 128 + 128 + 128 + 1,
    "mobilenetv2": 1280 * 128 + 128 + 128 + 1,
    "inceptionv3": 2048 * 128 + 128 + 128 + 1,  # below 299 px: no auxiliary classifier
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED_HEAD))
def test_frozen_and_unfrozen_parameter_counts(name):
    model = M.build_model(name, SIZES[name], "none")
    total = sum(p.numel() for p in model.parameters())
    M.set_backbone_frozen(name, model, True)
    assert M.trainable_parameter_count(model) == EXPECTED_HEAD[name]
    M.set_backbone_frozen(name, model, False)
    assert M.trainable_parameter_count(model) == total


def test_frozen_backbone_keeps_batchnorm_statistics():
    model = M.build_model("mobilenetv2", 32, "none")
    M.set_backbone_frozen("mobilenetv2", model, True)
    M.set_train_mode("mobilenetv2", model, frozen=True)
    bn = model.features[0][1]
    before = bn.running_mean.clone()
    model(torch.rand(4, 3, 32, 32))
    assert torch.equal(before, bn.running_mean) and not bn.training


def test_cnn_matches_the_study_architecture():
    model = M.build_model("cnn", 64, "none")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [d.out_features for d in dense] == [128, 1]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules())


@pytest.mark.slow
def test_offline_weights_from_a_state_dict_file(tmp_path):
    from torchvision.models import mobilenet_v2

    reference = mobilenet_v2(weights=None)
    torch.save(reference.state_dict(), tmp_path / "mobilenetv2.pth")
    model = M.build_model("mobilenetv2", 32, str(tmp_path))
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)
    with pytest.raises(PermanentError, match=r"resnet50\.pth"):
        M.build_model("resnet50", 32, str(tmp_path))


def test_offline_weights_from_a_folder_or_any_registered_storage(tmp_path, mem_storage):
    import io

    from gender_tasks.models.transfer import load_pretrained_state

    state = {"w": torch.arange(3.0)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "resnet50.pth").write_bytes(buffer.getvalue())
    mem_storage.put_bytes("weights/resnet50.pth", buffer.getvalue())  # mem://: the test backend (memory_storage.py)
    for weights in (str(tmp_path / "w"), (tmp_path / "w").as_uri(), f"{mem_storage.uri}/weights/"):
        assert torch.equal(load_pretrained_state("resnet50", weights)["w"], state["w"])
    with pytest.raises(PermanentError, match=rf"no pretrained weights for mobilenetv2 at {tmp_path / 'w'}/mob"):
        load_pretrained_state("mobilenetv2", (tmp_path / "w").as_uri())
    with pytest.raises(FileNotFoundError, match=rf"{mem_storage.uri}/weights/mobilenetv2\.pth does not exist"):
        load_pretrained_state("mobilenetv2", f"{mem_storage.uri}/weights")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIZES))
def test_every_model_builds_at_its_registered_minimum_size_and_no_smaller(name):
    """The registry's min_image_size is what the network takes: a run the settings accept does not fail in
    training (the CNN's was 16 while its three conv + pool blocks need 22), and the form's lower bound is the
    smallest of them."""
    from gender_tasks.models.registry import get_model_spec
    from gender_tasks.settings import SettingsError, resolve_settings
    from gender_tasks.settings.form import field_schemas

    minimum = get_model_spec(name).min_image_size
    with torch.no_grad():
        out = M.build_model(name, minimum, "none").eval()(torch.rand(1, 3, minimum, minimum))
    assert (out[0] if isinstance(out, tuple) else out).shape == (1, 1)
    with pytest.raises(ValueError, match=f"too small for .*use at least {minimum}"):
        M.build_model(name, minimum - 1, "none")
    if not get_model_spec(name).raise_small_inputs:
        # refused when the run is set up (by the form's bound, or the model's own), naming the size and the minimum
        with pytest.raises(SettingsError, match=f"image_size:? {minimum - 1} is .*(minimum of|at least) {minimum}"):
            resolve_settings({"models": [name], "image_size": minimum - 1})
    assert field_schemas()["image_size"]["allOf"][0]["minimum"] == min(get_model_spec(m).min_image_size for m in SIZES)


def test_unknown_model_fails_loudly():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        M.build_model("vgg", 32)


def test_augmentation_draws_parameters_per_image():
    gen = torch.Generator().manual_seed(0)
    params = augment_params(64, gen)
    assert params["flip"].any() and not params["flip"].all()
    assert params["angle"].unique().numel() == 64 and params["zoom"].unique().numel() == 64
    x = torch.rand(1, 3, 16, 16).repeat(64, 1, 1, 1)
    y = augment_batch(x, params)
    assert y.shape == x.shape
    assert not torch.allclose(y[0], y[1])  # same input image, different transforms


def test_flip_alone_mirrors_the_image():
    x = torch.rand(2, 3, 8, 8)
    params = {"flip": torch.tensor([True, False]), "angle": torch.zeros(2), "zoom": torch.ones(2)}
    y = augment_batch(x, params)
    assert torch.allclose(y[0], x[0].flip(-1), atol=1e-5)
    assert torch.allclose(y[1], x[1], atol=1e-5)
