"""Checkpoints in object storage: everything needed to resume training after the last finished epoch.

A checkpoint is one torch-saved dict: {"model", "optimizer" (state dicts), "epoch" (0-based, the last
finished), "frozen" (the backbone's state in that epoch), "history" (per-epoch records so far),
"scheduler" (the learning-rate schedule's state dict: the steps taken; None without one)}.
"""

from __future__ import annotations

import io

import torch

from ..storage import Storage


def save_checkpoint(storage: Storage, key: str, *, model, optimizer, epoch: int, frozen: bool,
                    history: list[dict], scheduler=None) -> None:  # fmt: skip
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "frozen": frozen,
             "history": history, "scheduler": scheduler.state_dict() if scheduler is not None else None}  # fmt: skip
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.put_bytes(key, buf.getvalue())


def load_checkpoint(storage: Storage, key: str) -> dict | None:
    if not storage.exists(key):
        return None
    return torch.load(io.BytesIO(storage.get_bytes(key)), map_location="cpu", weights_only=False)
