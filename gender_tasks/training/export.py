"""Export a trained model as a torch.export program (`model.pt2`) with its pre- and post-processing
inside: float [0, 1] NCHW RGB in, P(male) out, and its model card as `meta.json` in the archive. It
loads without this code (torch.export.load, or `predict`, which checks the archive first: see
evaluation/exported.py).

Why torch.export and not TorchScript (deprecated: every torch.jit.load warns in torch 2.14) or ONNX:
the program is the same ATen graph PyTorch runs, so exported and in-process probabilities agree
exactly, it needs no new dependency, and torch.export is the format PyTorch keeps (AOTInductor and
ExecuTorch compile from it). The batch dimension is dynamic.

Every export declares its inputs in meta.json: `input_sizes` (one square RGB input per size, in that
order; a single model has one), `image_size` (the single input's size, as model.ts files had), the
class names, the normalisation and whether it averages with the mirror image (test-time augmentation).
"""

from __future__ import annotations

import copy
import inspect
import io
import json

import torch

from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, get_model_spec
from ..settings import CLASSES

# The most images one call may score: the exported program's batch dimension ranges up to this.
MAX_BATCH = 1 << 16
INPUT = "float32 NCHW RGB in [0, 1], one tensor per input size (meta.json input_sizes)"


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


def save_program(module: torch.nn.Module, sizes: list[int], meta: dict) -> bytes:
    """torch.export `module`, in eval mode (one float NCHW input per size in `sizes`, the batch dimension dynamic and
    shared) and save it with `meta` as meta.json; returns the .pt2 archive's bytes."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    generator = torch.Generator().manual_seed(0)  # the example inputs are stored in the archive: same bytes each time
    example = tuple(torch.rand(2, 3, size, size, generator=generator) for size in sizes)
    shapes = tuple({0: batch} for _ in sizes)
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[0].kind == inspect.Parameter.VAR_POSITIONAL:  # forward(*xs): the shapes of xs, nested
        shapes = (shapes,)
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=shapes)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"meta.json": json.dumps(meta, default=str)})
    return buf.getvalue()


def export_model(model: torch.nn.Module, model_name: str, image_size: int, card: dict, tta: bool = False) -> bytes:
    """The .pt2 of the model with its pre/post-processing; `card` rides along in meta.json."""
    net = copy.deepcopy(model).float().cpu().eval()
    normalised = get_model_spec(model_name).imagenet_normalised
    wrapper = _Exportable(net, normalised, tta).eval()
    meta = {"model": model_name, "image_size": image_size, "input_sizes": [image_size], "classes": list(CLASSES),
            "input": INPUT, "output": "P(male)", "tta": tta,
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)} if normalised else None,
            "resize": "decode_resize: Pillow bilinear (reducing_gap 2.0) to image_size x image_size, 8-bit RGB",
            **card}  # fmt: skip
    return save_program(wrapper, [image_size], meta)
