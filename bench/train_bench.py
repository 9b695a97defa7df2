"""Training throughput: the pipeline's epoch against a bare loop, side by side, same device, one run.

For each model at its profile's input size:
  pipeline  train_one_epoch over the cached training split: uint8 batch gathering, transfer,
            per-image augmentation, normalisation, forward, backward, optimizer step
  bare      forward + backward + optimizer step on a random float tensor of the same shape and
            batch size, already on the device (the ceiling: no data handling at all)
and prints images/s for both and the ratio pipeline / bare (target >= 0.90).

    .venv/bin/python bench/train_bench.py [--source ../shared/data/generated_photos] [--profile cpu]
        [--models cnn,...] [--rounds 2] [--storage FOLDER (reuse an ingested store)] [--limit N] [--json OUT]

On a GPU it runs on cuda (bf16 autocast, channels_last, the split staged in GPU memory as the trainer
does); bench/gpu_check.sh runs it there.

Both are warmed up first (PyTorch's first CPU steps are several times slower than the rest), then
measured in alternating rounds; the best round of each counts (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gender_tasks import layout, pipeline
from gender_tasks.data.manifest import read_manifest
from gender_tasks.data.shards import ShardReader, memory_budget
from gender_tasks.models.network import set_backbone_frozen
from gender_tasks.settings import Settings
from gender_tasks.storage import open_storage
from gender_tasks.training.batches import load_splits
from gender_tasks.training.devices import configure_threads, make_autocast, pick_device
from gender_tasks.training.loop import setup_model, train_one_epoch

WARMUP_STEPS = 10
BARE_BATCHES = 16


def bare_loop(model_name: str, size: int, batch: int, steps: int, device, autocast) -> float:
    """images/s of forward + backward + Adam step on device-resident random data."""
    model, _ = setup_model(model_name, size, "none", 0, device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Distinct random batches: one batch repeated is memorised within steps, and the shrinking
    # activations and gradients turn denormal, which makes CPU arithmetic slower than on real data.
    pool = [torch.rand(batch, 3, size, size, device=device) for _ in range(min(steps, BARE_BATCHES))]
    if device.type == "cuda":
        pool = [x.contiguous(memory_format=torch.channels_last) for x in pool]
    labels = [(torch.rand(batch, device=device) > 0.5).float() for _ in pool]
    counter = iter(range(10**9))

    def step():
        i = next(counter) % len(pool)
        x, y = pool[i], labels[i]
        with autocast():
            out = model(x)
            logits = (out[0] if isinstance(out, tuple) else out).squeeze(1).float()
            loss = F.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARMUP_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def pipeline_epoch(model_name: str, size: int, settings: Settings, train, device, autocast, seed: int) -> float:
    """images/s of one whole training epoch as the pipeline runs it (full batches counted)."""
    model, inputs = setup_model(model_name, size, "none", 0, device)
    set_backbone_frozen(model_name, model, False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = settings.batch_size
    # Warm-up on a few batches of the same data.
    n_warm = batch * WARMUP_STEPS
    warm = train.subset(np.arange(min(n_warm, len(train))))
    train_one_epoch(model, model_name, warm, inputs, opt, torch.Generator().manual_seed(1), batch, autocast)
    train = inputs.stage(train)  # once per split in the trainer too (into GPU memory), not per epoch
    n = len(train.labels)
    t0 = time.perf_counter()
    train_one_epoch(model, model_name, train, inputs, opt, torch.Generator().manual_seed(seed), batch, autocast)
    elapsed = time.perf_counter() - t0
    trained = n if n % batch != 1 else n - 1  # a trailing batch of one is skipped
    return trained / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/generated_photos"))
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--models", default="cnn,resnet50,inceptionv3,mobilenetv2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--storage", help="a store to ingest into (the same data again uploads nothing)")
    parser.add_argument("--limit", type=int, help="train on at most this many images of the split")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    workdir = Path(tempfile.mkdtemp(prefix="train-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    run = pipeline.prepare({
        "source": args.source, "storage": args.storage or str(workdir / "store"), "profile": args.profile,
        "models": args.models.split(","), "label_audit": False,
    })  # fmt: skip
    run = pipeline.preprocess(pipeline.split(pipeline.ingest(run)))
    settings, dataset, split_info = Settings.from_dict(run["settings"]), run["dataset"], run["split"]
    storage = open_storage(settings.storage)
    manifest = read_manifest(storage, split_info["split_key"])

    device = pick_device()
    threads = configure_threads(1)
    autocast = make_autocast(device)
    hardware = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"device {device} ({hardware}), torch {torch.__version__}, {threads} threads, profile {args.profile}")
    print(f"{'model':<12} {'size':>4} {'batch':>5} {'train imgs':>10} {'pipeline img/s':>15} {'bare img/s':>11} "
          f"{'ratio':>6}")  # fmt: skip
    worst, rows = None, []
    for name in settings.models:
        size, batch = settings.per_model[name].image_size, settings.batch_size
        reader = ShardReader(storage, layout.cache_prefix(dataset["dataset_id"], size))
        train = load_splits(manifest, reader, ("train",), memory_budget(), device)["train"]
        if args.limit:
            train = train.subset(np.arange(min(args.limit, len(train))))
        steps = max(len(train.labels) // batch, 1)
        pipe, bare = [], []
        for r in range(args.rounds):
            pipe.append(pipeline_epoch(name, size, settings, train, device, autocast, seed=r))
            bare.append(bare_loop(name, size, batch, steps, device, autocast))
        ratio = max(pipe) / max(bare)
        worst = ratio if worst is None else min(worst, ratio)
        rows.append({"model": name, "size": size, "batch": batch, "train_images": len(train.labels),
                     "pipeline_images_per_s": max(pipe), "bare_images_per_s": max(bare), "ratio": ratio,
                     "rounds": args.rounds, "streamed": not hasattr(train, "images")})  # fmt: skip
        print(f"{name:<12} {size:>4} {batch:>5} {len(train.labels):>10} {max(pipe):>15.1f} {max(bare):>11.1f} "
              f"{ratio:>6.3f}")  # fmt: skip
    print(f"lowest ratio {worst:.3f} (target >= 0.90)")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "hardware": hardware, "torch": torch.__version__,
                                         "threads": threads, "profile": args.profile, "models": rows,
                                         "lowest_ratio": worst}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
