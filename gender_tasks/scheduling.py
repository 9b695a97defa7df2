"""Where and in which order the training tasks run: slowest model first, one GPU per task.

No Airflow here. The DAG maps `train` over `order_slowest_first(models)`, and the priority weight
strategy in plugins/gender_scheduling.py gives map index 0 the highest priority, so with fewer GPUs
than models the longest job starts first (longest-processing-time-first, the classic rule for
finishing a batch of parallel jobs soonest).

`claim_gpu` gives each training task a GPU slot of its own when a worker holds several: the `gpu`
pool bounds how many tasks run at once cluster-wide, a worker's Celery concurrency (GPUs x tasks per
GPU) bounds them per machine, and this picks which of the machine's GPUs a task gets. With
GENDER_TASKS_PER_GPU=k, k trainings share each GPU (a small model at batch 32 leaves a big GPU idle).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .environment import get_list, get_path, get_whole
from .errors import PermanentError
from .models.registry import get_model_spec

log = logging.getLogger(__name__)

# Slowest first, by the work one run does: the registry's relative_cost, training FLOPs per image
# (forward + backward, measured with torch.utils.flop_counter at each profile's input size) times the
# profile's epochs.
#   paper (224 px, InceptionV3 299 px): inceptionv3 ~342, resnet50 ~243, mobilenetv2 ~123, cnn ~55 GFLOP
#   cpu   (64 px, InceptionV3 75 px):   resnet50 ~9.9, inceptionv3 ~6.0, mobilenetv2 ~5.0, cnn ~2.1 GFLOP
# The paper profile (the one meant for GPUs, where the order matters) decides the fixed order; at the
# small profiles the two transfer models swap places, but both still go before the two small ones.

GPU_LOCK_DIR_VAR = "GENDER_GPU_LOCK_DIR"
TASKS_PER_GPU_VAR = "GENDER_TASKS_PER_GPU"
PARALLEL_TRAINING_VAR = "GENDER_PARALLEL_TRAINING"


def order_slowest_first(models: Iterable[str]) -> list[str]:
    """`models`, the costliest to train first (by the registry's relative_cost; ties keep their order)."""
    return sorted(dict.fromkeys(models), key=lambda m: -get_model_spec(m).relative_cost)


def training_plan(models: Iterable[str], repeats: int = 1) -> list[dict]:
    """The mapped training tasks: one per (model, repeat), every repeat of the costliest model first, with
    the label the UI shows ("resnet50", or "resnet50 #2" when a run has repeats)."""
    return [{"model_name": m, "repeat": r, "label": m if repeats == 1 else f"{m} #{r}"}
            for m in order_slowest_first(models) for r in range(int(repeats))]  # fmt: skip


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries, without initialising CUDA.

    CUDA reads CUDA_VISIBLE_DEVICES once, when a process first touches it, so the choice must be
    made before torch asks whether CUDA is available: hence nvidia-smi rather than torch here.
    """
    preset = get_list("CUDA_VISIBLE_DEVICES")
    if preset is not None:
        return [d for d in preset if d != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi is present but failed (%s); training on the CPU", exc)
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class GpuClaim:
    """One GPU held by this process (through an exclusive file lock) until `release()` or exit."""

    def __init__(self, gpu: str | None, handle=None):
        self.gpu = gpu
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None

    def __enter__(self) -> GpuClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def tasks_per_gpu() -> int:
    """How many training tasks share one GPU (GENDER_TASKS_PER_GPU, default 1): the `gpu` pool has
    that many slots per GPU and a GPU worker that many Celery processes per GPU."""
    return get_whole(TASKS_PER_GPU_VAR, error=PermanentError)


def parallel_training() -> int:
    """How many training tasks share this worker's CPU cores (GENDER_PARALLEL_TRAINING, default 1): each
    takes its share of the cores for its torch threads. The one place that reads the variable."""
    return get_whole(PARALLEL_TRAINING_VAR, error=PermanentError)


def claim_gpu(gpus: list[str] | None = None, lock_dir: str | Path | None = None,
              per_gpu: int | None = None) -> GpuClaim:  # fmt: skip
    """Pin this process to a free slot of one GPU of this machine; a no-op without GPUs.

    Each GPU has `per_gpu` slots (GENDER_TASKS_PER_GPU), one lock file each. Slots are taken slot by
    slot across GPUs (first slot of every GPU, then the second...), so tasks spread over the GPUs
    before they double up. Sets CUDA_VISIBLE_DEVICES to the claimed GPU, so the training code's plain
    `cuda` device is it. Where every slot is taken (more concurrent tasks than slots: a worker's
    concurrency set above GPUs x tasks per GPU), the task shares one rather than wait, and says so.
    """
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return GpuClaim(None)
    per_gpu = tasks_per_gpu() if per_gpu is None else per_gpu
    folder = Path(lock_dir or get_path(GPU_LOCK_DIR_VAR) or Path(tempfile.gettempdir()) / "gender-gpu-locks")
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(per_gpu):
        for gpu in gpus:
            # Slot 0 keeps the name of the one-task-per-GPU lock: both settings exclude each other there.
            name = f"gpu-{gpu.replace('/', '_')}" + (f"-slot{slot}" if slot else "") + ".lock"
            handle = open(folder / name, "a+")  # held open until release()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("training on GPU %s, slot %d of %d (GPUs %s)", gpu, slot + 1, per_gpu, ",".join(gpus))
            return GpuClaim(gpu, handle)
    shared = gpus[os.getpid() % len(gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = shared
    log.warning("all %d slots of the %d GPUs of this machine are taken by other tasks; sharing GPU %s. Set the "
                "worker's concurrency to its GPUs x %s and the gpu pool's slots to the GPUs of all workers x %s",
                per_gpu * len(gpus), len(gpus), shared, TASKS_PER_GPU_VAR, TASKS_PER_GPU_VAR)  # fmt: skip
    return GpuClaim(shared)
