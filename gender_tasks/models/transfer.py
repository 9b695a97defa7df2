"""The study's three torchvision transfer models (section 3.2) and their pretrained weights.

Every model outputs one logit per image (binary cross-entropy with a sigmoid, as in the study).
The transfer models get the study's head: global average pooling -> dense ReLU -> dropout -> 1.
"""

from __future__ import annotations

import io
import logging

import torch
from torch import nn

from ..errors import PermanentError

log = logging.getLogger(__name__)

HEAD_UNITS = 128  # the study gives no width for the transfer heads; 128 matches its CNN's dense layer
HEAD_DROPOUT = 0.5
INCEPTION_AUX_MIN_SIZE = 299


def _study_head(in_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, HEAD_UNITS), nn.ReLU(inplace=True), nn.Dropout(HEAD_DROPOUT), nn.Linear(HEAD_UNITS, 1)
    )


class InceptionBinary(nn.Module):
    """InceptionV3 whose auxiliary classifier also predicts one logit; training returns (main, aux)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if isinstance(out, tuple):  # torchvision's InceptionOutputs in training mode
            return out.logits, out.aux_logits
        return out


def load_pretrained_state(name: str, weights: str) -> dict | None:
    """ImageNet weights for `name`: None for 'none'; torchvision's download (cached) for 'imagenet';
    or `<location>/<name>.pth` from a folder or object-storage prefix, for machines without internet."""
    if weights == "none":
        return None
    if weights == "imagenet":
        from torchvision import models as tvm

        enum = {
            "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2,
            "mobilenetv2": tvm.MobileNet_V2_Weights.IMAGENET1K_V2,
            "inceptionv3": tvm.Inception_V3_Weights.IMAGENET1K_V1,
        }[name]
        return enum.get_state_dict(progress=False, check_hash=True)  # cached under $TORCH_HOME
    from ..storage import local_path_of, open_location

    folder = local_path_of(weights)
    if folder is None:  # an object-storage prefix (s3://bucket/prefix)
        store = open_location(weights.rstrip("/"))
        data = store.get_bytes(f"{name}.pth")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    path = folder / f"{name}.pth"
    if not path.is_file():
        raise PermanentError(
            f"no pretrained weights for {name} at {path}; save torchvision's state dict there "
            f"(torch.save(torchvision.models.{name}(weights=...).state_dict(), path)) or use weights='none'"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def build_resnet50(image_size: int, weights: str = "none") -> nn.Module:
    from torchvision import models as tvm

    net = _with_state(tvm.resnet50(weights=None), load_pretrained_state("resnet50", weights))
    net.fc = _study_head(net.fc.in_features)
    return net


def build_mobilenetv2(image_size: int, weights: str = "none") -> nn.Module:
    from torchvision import models as tvm

    net = _with_state(tvm.mobilenet_v2(weights=None), load_pretrained_state("mobilenetv2", weights))
    net.classifier = _study_head(net.last_channel)
    return net


def build_inceptionv3(image_size: int, weights: str = "none") -> nn.Module:
    from torchvision import models as tvm

    state = load_pretrained_state("inceptionv3", weights)
    # transform_input re-maps ImageNet-normalised input to the [-1, 1] range Google's weights expect.
    net = _with_state(tvm.inception_v3(weights=None, aux_logits=True, init_weights=state is None,
                                       transform_input=state is not None), state)  # fmt: skip
    net.fc = _study_head(net.fc.in_features)
    if image_size >= INCEPTION_AUX_MIN_SIZE:
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, 1)
    else:
        # The auxiliary classifier pools a 17x17 map; below 299 px there is nothing left to pool.
        log.info("inceptionv3 at %d px: auxiliary classifier disabled (it needs %d px)", image_size,
                 INCEPTION_AUX_MIN_SIZE)  # fmt: skip
        net.aux_logits, net.AuxLogits = False, None
    return InceptionBinary(net)


def _with_state(net: nn.Module, state: dict | None) -> nn.Module:
    if state is not None:
        net.load_state_dict(state)
    return net
