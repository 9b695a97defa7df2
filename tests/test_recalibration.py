"""loop.recalibrate_batchnorm: BatchNorm statistics recomputed for the final weights (no training here)."""

from __future__ import annotations

import pytest
import torch

from gender_tasks.training.batches import SplitData
from gender_tasks.training.devices import make_autocast
from gender_tasks.training.loop import recalibrate_batchnorm, setup_model

CPU = torch.device("cpu")


def _data(n: int = 40, size: int = 32) -> SplitData:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), generator=gen, dtype=torch.uint8)
    return SplitData(images, (torch.arange(n) % 2).float(), [f"k{i}" for i in range(n)])


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.slow
def test_statistics_become_those_of_the_training_images_under_the_final_weights():
    model, inputs = setup_model("mobilenetv2", 32, "none", 0, CPU)
    for bn in _batchnorms(model):  # statistics far from anything the weights produce: a lagging average
        bn.running_mean.add_(5.0)
        bn.running_var.mul_(10.0)
    data = _data()
    used = recalibrate_batchnorm(model, "mobilenetv2", data, inputs, 8, make_autocast(CPU))
    assert used == 40
    first_conv, first_bn = model.features[0][0], model.features[0][1]
    with torch.no_grad():
        out = first_conv(inputs(data.images))
    # Five equal batches: the average of the batch means is the mean over all 40 images.
    assert torch.allclose(first_bn.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-4)
    batch_vars = torch.stack([out[i : i + 8].var(dim=(0, 2, 3), unbiased=True) for i in range(0, 40, 8)])
    assert torch.allclose(first_bn.running_var, batch_vars.mean(0), rtol=1e-3)
    assert all(bn.momentum == 0.1 for bn in _batchnorms(model))  # the layers' own momentum, restored
    assert not model.training and not any(m.training for m in model.modules())
    # The same weights and data give the same statistics (a resumed run exports the same model).
    before = [bn.running_mean.clone() for bn in _batchnorms(model)]
    recalibrate_batchnorm(model, "mobilenetv2", data, inputs, 8, make_autocast(CPU))
    assert all(torch.allclose(a, bn.running_mean) for a, bn in zip(before, _batchnorms(model), strict=True))


def test_a_frozen_backbone_keeps_its_statistics_and_the_cap_is_honoured():
    model, inputs = setup_model("mobilenetv2", 32, "none", 0, CPU)
    saved = [bn.running_mean.clone() for bn in _batchnorms(model)]
    assert recalibrate_batchnorm(model, "mobilenetv2", _data(), inputs, 8, make_autocast(CPU), frozen=True) == 0
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(saved, _batchnorms(model), strict=True))
    assert recalibrate_batchnorm(model, "mobilenetv2", _data(), inputs, 8, make_autocast(CPU), max_images=16) == 16
    assert not torch.equal(saved[0], model.features[0][1].running_mean)


def test_a_network_without_batchnorm_is_left_alone():
    model, inputs = setup_model("cnn", 32, "none", 0, CPU)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, "cnn", _data(), inputs, 8, make_autocast(CPU)) == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
