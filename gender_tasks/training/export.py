"""Export a trained model as TorchScript with its pre- and post-processing inside: float [0, 1] NCHW
RGB in, P(male) out, its model card as `meta.json` in the archive. It loads without this code."""

from __future__ import annotations

import copy
import io
import json

import torch

from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, get_model_spec
from ..settings import CLASSES


class _Exportable(torch.nn.Module):
    """The trained network with its input normalisation and sigmoid (and, with `tta`, the mean with its
    mirror image's prediction, as the run evaluated it): needs no training code."""

    def __init__(self, net: torch.nn.Module, normalise: bool, tta: bool = False):
        super().__init__()
        self.net = net
        self.normalise = normalise
        self.tta = tta
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = (x - self.mean) / self.std
        prob = torch.sigmoid(self.net(x).squeeze(1))
        if self.tta:
            prob = (prob + torch.sigmoid(self.net(x.flip(3)).squeeze(1))) / 2
        return prob


def export_torchscript(model: torch.nn.Module, model_name: str, image_size: int, card: dict,
                       tta: bool = False) -> bytes:  # fmt: skip
    """TorchScript of the model with its pre/post-processing; `card` rides along as meta.json."""
    net = copy.deepcopy(model).float().cpu().eval()
    wrapper = _Exportable(net, get_model_spec(model_name).imagenet_normalised, tta).eval()
    example = torch.rand(2, 3, image_size, image_size)
    with torch.inference_mode():
        scripted = torch.jit.trace(wrapper, example, check_trace=False)
    meta = {"model": model_name, "image_size": image_size, "classes": list(CLASSES),
            "input": "float32 NCHW RGB in [0, 1]", "output": "P(male)", "tta": tta, **card}  # fmt: skip
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files={"meta.json": json.dumps(meta, default=str)})
    return buf.getvalue()
