"""A split's images as tensors, where its batches are gathered from, and the step that turns a uint8
batch into the model's input.

On a GPU a split's uint8 images live in GPU memory when they fit (`Inputs.stage`; the paper profile's
~5,000 training images at 299 px are 1.3 GB), so a batch is one index on the device and nothing
crosses PCIe during an epoch. Where they do not fit they go to pinned host memory, and training
batches are gathered into pinned buffers and copied on a side stream one batch ahead (`PinnedBatches`):
a copy from pageable memory would block the host until the GPU has drained its queue. On the CPU
nothing moves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..evaluation.metrics import encode_labels
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, get_model_spec
from .augment import augment_batch
from .devices import fits_on_device

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 NHWC, on the CPU (or staged: on the GPU, or pinned)
    labels: torch.Tensor  # float 0/1
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def split_data(manifest: pd.DataFrame, images: np.ndarray, index: dict[str, int], split: str) -> SplitData:
    """The rows of `split` (one per distinct image) gathered from the preprocessed cache."""
    rows = manifest[manifest["split"] == split].drop_duplicates("sha256")
    idx = np.fromiter((index[s] for s in rows["sha256"]), dtype=np.int64, count=len(rows))
    return SplitData(
        images=torch.from_numpy(images[idx]),
        labels=torch.from_numpy(encode_labels(rows["label"]).astype(np.float32)),
        keys=rows["key"].tolist(),
    )


class Inputs:
    """uint8 NHWC batch -> float NCHW on the device, [0, 1], optionally augmented and normalised.

    Also the place a split is staged for this device (`stage`), and the compiled forward of the model
    (`compiled`, set by loop.setup_model when GENDER_TORCH_COMPILE asks for it; used for full batches).
    """

    def __init__(self, model_name: str, device: torch.device, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        self.normalise = get_model_spec(model_name).imagenet_normalised
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.compiled: torch.nn.Module | None = None
        self._staged: dict[int, tuple[torch.Tensor, SplitData]] = {}
        self._resident_bytes = 0

    def __call__(self, xb: torch.Tensor, aug: dict | None = None) -> torch.Tensor:
        x = xb.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if aug is not None:
            x = augment_batch(x, aug)
        if self.normalise:
            x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def stage(self, data: SplitData) -> SplitData:
        """`data` where this device gathers batches fastest: the same object on the CPU; on a GPU, the
        images in GPU memory when they fit (first come, first served: training stages its split
        first), else in pinned host memory; labels always on the GPU. Done once per split."""
        if self.device.type != "cuda":
            return data
        hit = self._staged.get(id(data.images))
        if hit is not None and hit[0] is data.images:  # the source is kept alive, so its id stays unique
            return hit[1]
        with torch.inference_mode(False):  # staged tensors are reused for training: not inference tensors
            nbytes = data.images.numel() * data.images.element_size()
            if fits_on_device(nbytes, self.device, self._resident_bytes):
                images = data.images.to(self.device)
                self._resident_bytes += nbytes
            else:
                log.info("%d images (%.1f GB) stay in pinned host memory: GPU memory is short", len(data),
                         nbytes / 1e9)  # fmt: skip
                images = data.images if data.images.is_pinned() else data.images.pin_memory()
            staged = SplitData(images, data.labels.to(self.device), data.keys)
        self._staged[id(data.images)] = (data.images, staged)
        return staged


def train_batches(data: SplitData, bounds: list[tuple[int, int]], order: torch.Tensor,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(uint8 images, labels) of each batch `order[start:end]` for `bounds`, on `device`, without a
    host sync: indices move to the GPU once per epoch; pinned images are copied one batch ahead."""
    if device.type != "cuda":
        for start, end in bounds:
            idx = order[start:end]
            yield data.images[idx], data.labels[idx]
        return
    order_dev = order.to(device, non_blocking=True)
    if data.images.device.type == "cuda":
        for start, end in bounds:
            idx = order_dev[start:end]
            yield data.images[idx], data.labels[idx]
        return
    copier = PinnedBatches(data.images, device, max((e - s for s, e in bounds), default=1))
    pending = copier.start(order[bounds[0][0] : bounds[0][1]]) if bounds else None
    for i, (start, end) in enumerate(bounds):
        current = pending
        if i + 1 < len(bounds):  # queue the next copy before the GPU works on this batch
            pending = copier.start(order[bounds[i + 1][0] : bounds[i + 1][1]])
        yield copier.wait(current), data.labels[order_dev[start:end]]


class PinnedBatches:
    """Gather batches of a pinned uint8 tensor into two pinned buffers and copy them to the GPU on a
    side stream, so the copy of batch i+1 overlaps the compute of batch i."""

    def __init__(self, images: torch.Tensor, device: torch.device, batch_size: int):
        self.images, self.device = images, device
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype).pin_memory() for _ in "ab"]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def start(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        slot, self.turn = self.turn, 1 - self.turn
        if self.done[slot] is not None:
            self.done[slot].synchronize()  # this buffer's previous copy has left it (not a device-wide sync)
        buf = self.buffers[slot][: len(idx)]
        torch.index_select(self.images, 0, idx, out=buf)
        with torch.cuda.stream(self.stream):
            out = buf.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.done[slot] = event
        return out, event

    def wait(self, pending: tuple[torch.Tensor, torch.cuda.Event]) -> torch.Tensor:
        out, event = pending
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)  # the compute stream waits on the GPU, the host does not
        out.record_stream(main)  # allocated on the side stream, used on the main one
        return out
