"""Where training runs: the device, the CPU threads a task may use, mixed precision, whether a split's
images fit in GPU memory, and whether to compile the model."""

from __future__ import annotations

import logging
import os

import torch

from ..environment import get_flag, get_text, get_whole
from ..errors import PermanentError
from ..scheduling import tasks_per_gpu

log = logging.getLogger(__name__)

COMPILE_VAR = "GENDER_TORCH_COMPILE"  # unset/0: eager; 1: torch.compile (inductor); or a backend name
THREADS_VAR = "GENDER_TORCH_THREADS"  # unset/0: cores / parallel tasks (a label audit fold's process: 1)
RESIDENT_VAR = "GENDER_GPU_RESIDENT"  # unset/auto (or 1): by the memory check; 0: never (pinned host memory)
# GPU memory left free beside the images: the model, its gradients, Adam's state and the activations of
# a batch of 32 at 299 px take under 6 GiB for the largest model here (InceptionV3, bf16 autocast).
MIN_HEADROOM_BYTES = 6 << 30
HEADROOM_SHARE = 0.25


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or `taskset`'s share), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def explicit_threads() -> int:
    """GENDER_TORCH_THREADS: the torch threads a training is given, or 0 (unset) for the default."""
    return get_whole(THREADS_VAR, error=PermanentError) or 0


def configure_threads(parallel_tasks: int = 1) -> int:
    """Split the CPU cores among training tasks running side by side (GENDER_TORCH_THREADS wins)."""
    threads = explicit_threads() or max(1, usable_cores() // parallel_tasks)
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


def resident_budget(free: int, total: int, sharing: int) -> int:
    """Bytes of images one training may keep on a GPU with `free` of `total` bytes free, shared by
    `sharing` trainings: its share of the card, less a headroom for the model and activations. Each
    task judges alone at its start, so it takes only its share, not whatever happens to be free."""
    sharing = max(sharing, 1)
    headroom = max(MIN_HEADROOM_BYTES, int(total * HEADROOM_SHARE)) // sharing
    return max(0, min(free, total // sharing) - headroom)


def fits_on_device(nbytes: int, device: torch.device, already: int = 0) -> bool:
    """Whether `nbytes` more (after `already` placed by this task) may live on `device`; the CPU: no
    (nothing to move). GENDER_GPU_RESIDENT=0 forces the pinned-memory path."""
    if device.type != "cuda" or get_flag(RESIDENT_VAR, error=PermanentError) is False:
        return False
    free, total = torch.cuda.mem_get_info(device)
    return already + nbytes <= resident_budget(free + already, total, tasks_per_gpu())


def compile_backend() -> str | None:
    """The torch.compile backend asked for by GENDER_TORCH_COMPILE, or None (eager, the default:
    compiling costs tens of seconds per model and whether 10 epochs earn that back is measured by
    bench/gpu_check.sh)."""
    value = (get_text(COMPILE_VAR) or "").lower()
    if value in {"", "0", "false", "no", "off"}:
        return None
    return "inductor" if value in {"1", "true", "yes", "on"} else value


def maybe_compile(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's compiled forward when GENDER_TORCH_COMPILE asks for one, else None. A wrapper
    sharing the model's parameters: state_dict keys, freezing and the TorchScript export still see the
    plain module. Static shapes: the loop uses it for full training batches only (one graph per mode)."""
    backend = compile_backend()
    if backend is None:
        return None
    log.info("torch.compile (backend %s): the first full batches of each mode compile", backend)
    return torch.compile(model, backend=backend, dynamic=False)


def peak_memory_mb(device: torch.device) -> float | None:
    """The most GPU memory this process's tensors took so far (MB); None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
