"""Build a registered model and switch its backbone between frozen and trainable (imports torch)."""

from __future__ import annotations

from torch import nn

from .registry import get_model_spec


def build_model(name: str, image_size: int, weights: str = "none") -> nn.Module:
    """The model `name` with the study's head, its backbone initialised from `weights`."""
    spec = get_model_spec(name)
    if image_size < spec.min_image_size:
        raise ValueError(f"image_size {image_size} is too small for {name}; use at least {spec.min_image_size}")
    return spec.build(image_size, weights)


def head_modules(name: str, model: nn.Module) -> list[nn.Module]:
    """The modules trained while the backbone is frozen (the registry's `head` attribute paths)."""
    heads = []
    for path in get_model_spec(name).head:
        module = model
        for attr in filter(None, path.split(".")):
            module = getattr(module, attr, None)
            if module is None:
                break
        if module is not None:  # InceptionV3 below 299 px has no auxiliary head
            heads.append(module)
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


def set_train_mode(name: str, model: nn.Module, frozen: bool) -> None:
    """model.train(), except that a frozen backbone's batch-norm layers stay in inference mode
    (as Keras does for a frozen base): their running statistics are part of the frozen weights."""
    model.train()
    if frozen:
        head_ids = {id(m) for h in head_modules(name, model) for m in h.modules()}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head_ids:
                m.eval()
