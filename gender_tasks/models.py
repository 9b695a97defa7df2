"""The study's four models (section 3): a custom CNN and three torchvision transfer models.

Every model outputs one logit per image (binary cross-entropy with a sigmoid, as in the study).
The transfer models get the study's head: global average pooling -> dense ReLU -> dropout -> 1.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from torch import nn

from .config import MODEL_NAMES

log = logging.getLogger(__name__)

HEAD_UNITS = 128  # the study gives no width for the transfer heads; 128 matches its CNN's dense layer
HEAD_DROPOUT = 0.5
INCEPTION_AUX_MIN_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StudyCNN(nn.Module):
    """3 x [Conv2D(32/64/128, 3x3, ReLU) + MaxPool(2)] -> Flatten -> Dense(128, ReLU) -> Dropout(0.5) -> 1."""

    def __init__(self, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = 3, image_size
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels, side = width, (side - 2) // 2  # 'valid' conv, then halve (Keras defaults)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for the CNN; use at least 16")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(128, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


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


def _torchvision_arch(name: str, pretrained_state: dict | None) -> nn.Module:
    from torchvision import models as tvm

    if name == "resnet50":
        net = tvm.resnet50(weights=None)
    elif name == "mobilenetv2":
        net = tvm.mobilenet_v2(weights=None)
    elif name == "inceptionv3":
        # transform_input re-maps ImageNet-normalised input to the [-1, 1] range Google's weights expect.
        net = tvm.inception_v3(
            weights=None, aux_logits=True, init_weights=pretrained_state is None,
            transform_input=pretrained_state is not None,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    if pretrained_state is not None:
        net.load_state_dict(pretrained_state)
    return net


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
    if weights.startswith("s3://"):
        from .storage import open_storage

        bucket_prefix = weights.rstrip("/")
        store = open_storage(bucket_prefix)
        data = store.get_bytes(f"{name}.pth")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    path = Path(weights.removeprefix("file://")) / f"{name}.pth"
    if not path.is_file():
        raise FileNotFoundError(
            f"no pretrained weights for {name} at {path}; save torchvision's state dict there "
            f"(torch.save(torchvision.models.{name}(weights=...).state_dict(), path)) or use weights='none'"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(name: str, image_size: int, weights: str = "none") -> nn.Module:
    """The model `name` with the study's head, its backbone initialised from `weights`."""
    if name == "cnn":
        return StudyCNN(image_size)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    net = _torchvision_arch(name, load_pretrained_state(name, weights))
    if name == "resnet50":
        net.fc = _study_head(net.fc.in_features)
    elif name == "mobilenetv2":
        net.classifier = _study_head(net.last_channel)
    else:
        net.fc = _study_head(net.fc.in_features)
        if image_size >= INCEPTION_AUX_MIN_SIZE:
            net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, 1)
        else:
            # The auxiliary classifier pools a 17x17 map; below 299 px there is nothing left to pool.
            log.info("inceptionv3 at %d px: auxiliary classifier disabled (it needs %d px)", image_size,
                     INCEPTION_AUX_MIN_SIZE)  # fmt: skip
            net.aux_logits, net.AuxLogits = False, None
        return InceptionBinary(net)
    return net


def head_modules(name: str, model: nn.Module) -> list[nn.Module]:
    """The modules trained while the backbone is frozen."""
    if name == "cnn":
        return [model]
    if name == "resnet50":
        return [model.fc]
    if name == "mobilenetv2":
        return [model.classifier]
    heads = [model.net.fc]
    if model.net.AuxLogits is not None:
        heads.append(model.net.AuxLogits.fc)
    return heads


def set_backbone_frozen(name: str, model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the head; frozen batch-norm layers keep their statistics."""
    for p in model.parameters():
        p.requires_grad = not frozen
    for m in head_modules(name, model):
        for p in m.parameters():
            p.requires_grad = True


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def uses_imagenet_normalisation(name: str) -> bool:
    return name != "cnn"


def set_train_mode(name: str, model: nn.Module, frozen: bool) -> None:
    """model.train(), except that a frozen backbone's batch-norm layers stay in inference mode
    (as Keras does for a frozen base): their running statistics are part of the frozen weights."""
    model.train()
    if frozen:
        head_ids = {id(m) for h in head_modules(name, model) for m in h.modules()}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head_ids:
                m.eval()
