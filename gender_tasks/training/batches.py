"""A split's images as tensors, and the step that turns a uint8 batch into the model's input.

A split comes from the sharded cache (data.shards) one of two ways, with the same interface
(`labels`, `keys`, `len`, `batches(order, batch_size)`, `subset(positions)`):

- `SplitData`: its images in one in-memory uint8 tensor, when the task's splits fit the memory
  budget (GENDER_MEMORY_BUDGET_MB): the fast path, what every dataset of the study's size takes;
- `StreamedSplit`: only the cache rows; each batch is gathered from the memory-mapped shards by a
  DataLoader worker, so the task's memory does not grow with the dataset.

Both yield the same images in the same order for the same `order`, so a seed trains the same
model whichever path the budget picks.

On a GPU an in-memory split's uint8 images move into GPU memory when they fit (`Inputs.stage`; the
paper profile's ~5,000 training images at 299 px are 1.3 GB), so a batch is one index on the device
and nothing crosses PCIe during an epoch. Where they do not fit they go to pinned host memory, and
batches are gathered into pinned buffers and copied on a side stream one batch ahead
(`PinnedBatches`): a copy from pageable memory would block the host until the GPU drained its queue.
A streamed split's DataLoader pins its batches itself. On the CPU nothing moves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..data.parallel import allow_worker_processes
from ..data.shards import ShardBatches, ShardReader
from ..evaluation.metrics import encode_labels
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, get_model_spec
from .augment import augment_batch
from .devices import fits_on_device

log = logging.getLogger(__name__)

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def _cut(order: torch.Tensor | None, n: int, batch_size: int) -> list:
    """Positions of each batch: `order` cut into batch_size pieces; None: slices in stored order."""
    if order is None:
        return [slice(start, start + batch_size) for start in range(0, n, batch_size)]
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 NHWC, on the CPU (staged for a GPU: in its memory, or pinned)
    labels: torch.Tensor  # float 0/1 (staged: on the GPU)
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor | None, batch_size: int) -> Batches:
        """(uint8 NHWC images, labels) batches in `order` (None: stored order, as views), without a
        host sync on a GPU: the order moves to the device once; pinned images are copied a batch ahead."""
        if self.labels.is_cuda and order is not None:
            if not self.images.is_cuda:
                yield from PinnedBatches(self.images, self.labels.device, batch_size).batches(order, self.labels)
                return
            order = order.to(self.images.device, non_blocking=True)
        for idx in _cut(order, len(self), batch_size):
            yield self.images[idx], self.labels[idx]

    def subset(self, positions: np.ndarray) -> SplitData:
        idx = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        return SplitData(self.images[idx], self.labels[idx], [self.keys[i] for i in positions])


@dataclass
class StreamedSplit:
    """A split read batch by batch from the shards: its rows in the cache, labels and keys only."""

    reader: ShardReader
    rows: np.ndarray  # each image's row in the cache, in split order
    labels: torch.Tensor  # float 0/1
    keys: list[str]
    workers: int = 1
    pin_memory: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor | None, batch_size: int) -> Batches:
        """The same batches as SplitData.batches, gathered from the shards by DataLoader workers
        (reading the next batches while the model trains on this one)."""
        from torch.utils.data import DataLoader

        if self.workers:
            allow_worker_processes()
        positions = np.arange(len(self)) if order is None else order.numpy()
        cut = [positions[start : start + batch_size] for start in range(0, len(self), batch_size)]
        dataset = ShardBatches(self.reader, self.rows, self.labels.numpy(), batches=cut)
        # Its own generator: a DataLoader otherwise draws its workers' seed from torch's global one, which
        # dropout draws from too, and the streamed model would train differently from the in-memory one.
        yield from DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.workers,
                              pin_memory=self.pin_memory, generator=torch.Generator())  # fmt: skip

    def subset(self, positions: np.ndarray) -> StreamedSplit:
        positions = np.asarray(positions, dtype=np.int64)
        return StreamedSplit(self.reader, self.rows[positions], self.labels[torch.from_numpy(positions)],
                             [self.keys[i] for i in positions], self.workers, self.pin_memory)  # fmt: skip


Split = SplitData | StreamedSplit


def _loader_workers() -> int:
    """One reader process beside training where there is a core to spare (under Celery too: see
    data.parallel.allow_worker_processes)."""
    return 1 if (os.cpu_count() or 1) >= 2 else 0


def rows_data(rows: pd.DataFrame, reader: ShardReader, *, stream: bool, device: torch.device | None = None,
              ) -> Split:  # fmt: skip
    """`rows` (manifest rows, one per distinct image) in memory, or streamed from the shards."""
    positions = reader.indices_of(rows["sha256"])
    labels = torch.from_numpy(encode_labels(rows["label"]).astype(np.float32))
    keys = rows["key"].tolist()
    if stream:
        pin = device is not None and device.type == "cuda"
        return StreamedSplit(reader, positions, labels, keys, _loader_workers(), pin)
    # keep_mapped=False: once copied, the shards' pages leave this process's resident memory.
    return SplitData(torch.from_numpy(reader.take(positions, keep_mapped=False)), labels, keys)


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of `split`, one per distinct image."""
    return manifest[manifest["split"] == split].drop_duplicates("sha256")


def load_splits(manifest: pd.DataFrame, reader: ShardReader, splits: tuple[str, ...], budget: int,
                device: torch.device | None = None) -> dict[str, Split]:  # fmt: skip
    """Every split in memory when all of them fit `budget` bytes together, else every one streamed."""
    rows = {s: split_rows(manifest, s) for s in splits}
    needed = reader.nbytes(sum(len(r) for r in rows.values()))
    stream = needed > budget
    log.info("%d images (%d MB decoded) %s the memory budget of %d MB: %s", sum(len(r) for r in rows.values()),
             needed >> 20, "exceed" if stream else "fit", budget >> 20,
             "streaming batches from the shards" if stream else "in memory")  # fmt: skip
    return {s: rows_data(r, reader, stream=stream, device=device) for s, r in rows.items()}


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

    def stage(self, data: Split) -> Split:
        """`data` where this device gathers batches fastest: unchanged on the CPU and when streamed; on a
        GPU, an in-memory split's images in GPU memory when they fit (first come, first served: training
        stages its split first), else in pinned host memory; its labels on the GPU. Once per split."""
        if self.device.type != "cuda" or not isinstance(data, SplitData):
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


class PinnedBatches:
    """Gather batches of a pinned uint8 tensor into two pinned buffers and copy them to the GPU on a
    side stream, so the copy of batch i+1 overlaps the compute of batch i."""

    def __init__(self, images: torch.Tensor, device: torch.device, batch_size: int):
        self.images, self.device = images, device
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype).pin_memory() for _ in "ab"]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def batches(self, order: torch.Tensor, labels: torch.Tensor) -> Batches:
        """(images on the GPU, labels) per batch of `order`, each copy queued one batch ahead."""
        cut = _cut(order, len(order), len(self.buffers[0]))
        order_dev = order.to(self.device, non_blocking=True)
        pending = self._start(cut[0]) if cut else None
        for i, idx in enumerate(cut):
            current = pending
            if i + 1 < len(cut):  # queue the next copy before the GPU works on this batch
                pending = self._start(cut[i + 1])
            start = i * len(self.buffers[0])
            yield self._wait(current), labels[order_dev[start : start + len(idx)]]

    def _start(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
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

    def _wait(self, pending: tuple[torch.Tensor, torch.cuda.Event]) -> torch.Tensor:
        out, event = pending
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)  # the compute stream waits on the GPU, the host does not
        out.record_stream(main)  # allocated on the side stream, used on the main one
        return out
