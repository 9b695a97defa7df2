"""Where training runs: the device, the CPU threads a task may use, and mixed precision."""

from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads(parallel_tasks: int = 1) -> int:
    """Split the CPU cores among training tasks running side by side (GENDER_TORCH_THREADS wins)."""
    threads = int(os.environ.get("GENDER_TORCH_THREADS", 0)) or max(1, (os.cpu_count() or 1) // parallel_tasks)
    torch.set_num_threads(threads)
    return threads


def make_autocast(device: torch.device):
    """bf16 mixed precision on a GPU, full precision on the CPU."""

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    return autocast


def device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
