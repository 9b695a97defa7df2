"""How long each task may run: a bound Airflow enforces, and a tighter deadline sized for the run's data.

A hung task (a read from a FIFO, a stalled mount, a dead collective) would otherwise hold a worker, and
with training a GPU, forever. Two limits, because Airflow fixes a task's `execution_timeout` when it
parses the DAG, while the dataset's size is known only after `ingest`:

1. `static_limits()`: each task's `execution_timeout` in the DAG, sized for the largest run the settings
   accept (every profile and model, `RunConfig.max_rows` images). Airflow's task runner enforces it
   (a SIGALRM timer around the task's `execute`, raising AirflowTaskTimeout); it is the only limit of
   the steps that run before the dataset's size is known (`prepare`, `ingest`, and `evaluate_external`,
   whose sets are read inside it).
2. `deadline(step, run, ...)`: inside the task, the same estimate for this run's images, input sizes,
   epochs, models and device. Airflow has no way to tighten a running task's `execution_timeout` (it is
   read once, before `execute`), so this sets the same kind of timer for the step, with a message that
   says what the limit was sized for, and hands Airflow's timer back, less the time spent, when the step
   ends. Where Airflow's limit is the nearer one it keeps Airflow's time and gives this message.

The estimate is the work (training GFLOP per image, from the model registry, scaled by the input area)
over a floor of the throughput, plus a start-up allowance, times a margin of MARGIN. The floors are the
slowest figures measured in bench/RESULTS.md (a 2-core VM shared with 3-4 heavy jobs, one thread), so
a run exceeds its limit only when something is stuck or the machine is several times slower than that.
GENDER_TASK_TIMEOUT_SCALE multiplies every limit, both kinds: set it in the scheduler's environment
(for the DAG's limits) and the workers' (for the deadlines) alike.

A step past its deadline raises TaskTimeLimitExceeded (a TimeoutError, not a PermanentError): Airflow
retries it as it retries its own timeouts, since a hang can be transient (a stalled mount).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from .environment import get_number
from .errors import PermanentError
from .models.registry import get_model_spec, model_names
from .scheduling import tasks_per_gpu
from .settings import PROFILES, RunConfig, as_settings

log = logging.getLogger(__name__)

SCALE_VAR = "GENDER_TASK_TIMEOUT_SCALE"
# Slowest measured training throughput, GFLOP/s (forward + backward, as the registry counts them):
#   CPU: ResNet50 at 64 px, 66 s an epoch over ~700 images on one thread of a loaded 2-core VM, about
#   21 GFLOP/s (CNN 38); quiet, two threads reach 70-100 (bench/RESULTS.md, "Time").
#   GPU: 1,000 GFLOP/s is about 40 ResNet50 images a second at 224 px, a fraction of what any CUDA GPU
#   of the last decade trains at (a T4 does some 250); shared by GENDER_TASKS_PER_GPU trainings.
CPU_GFLOPS = 20.0
GPU_GFLOPS = 1000.0
# Per image and pass, beside the arithmetic: reading the shard cache, augmenting, batching.
CPU_SECONDS_PER_IMAGE_PASS = 0.002
GPU_SECONDS_PER_IMAGE_PASS = 0.001
# Importing torch, building a model, downloading ImageNet weights, reading the manifest: per task.
STARTUP_SECONDS = 300.0
# The data steps, seconds per image on the 2-core VM, rounded up from bench/RESULTS.md's 1,000,000-face
# projection (ingest 0.78 ms, split 0.02, validate + near-duplicates 0.19, preprocess 0.21 a size) and its
# 10,000-face figures (ingest 1.3 ms, preprocess 0.86). `preprocess` is per input size; `ensemble` and
# `report` per trained model (predictions tables, bootstraps).
DATA_SECONDS_PER_IMAGE = {"ingest": 0.002, "split": 0.0002, "validate": 0.0005, "preprocess": 0.002,
                          "ensemble": 0.0005, "report": 0.001}  # fmt: skip
# Every estimate times this: the floors above are already the slowest seen, this covers what they missed.
MARGIN = 3.0
# Profiles meant for a GPU, sized on one by the DAG's limits (the others on the CPU floor).
GPU_PROFILES = frozenset({"paper"})
PREPARE_SECONDS = 120.0  # resolving settings and opening the storage: no data yet


class TaskTimeLimitExceeded(TimeoutError):
    """A step ran past the time limit sized for it; the message says what it was sized for."""


@dataclass(frozen=True)
class Budget:
    """One step's time limit and what it was sized for, in words for the message."""

    step: str  # as the message names it: "train resnet50", "preprocess"
    seconds: float  # the limit: estimate x MARGIN x GENDER_TASK_TIMEOUT_SCALE
    sized_for: str  # "700 images at 64 px x 5 epochs on the CPU"


def timeout_scale() -> float:
    """GENDER_TASK_TIMEOUT_SCALE: every limit is multiplied by it (default 1)."""
    return get_number(SCALE_VAR, error=PermanentError)


def duration_words(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h': how the messages give a limit."""
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def image_epoch_gflop(model_name: str, image_size: int) -> float:
    """Training GFLOP for one image in one epoch (forward + backward) at `image_size` px.

    The registry's relative_cost is that at the paper profile's size, times the paper profile's epochs;
    convolution cost grows with the input's area."""
    spec = get_model_spec(model_name)
    paper = spec.profiles["paper"]
    return spec.relative_cost / paper.epochs * (image_size / paper.image_size) ** 2


def _passes_seconds(model_name: str, image_size: int, images: int, passes: float, gpu: bool, sharing: int) -> float:
    """Seconds for `passes` training passes of `images` images (the floors, no margin)."""
    gflops = GPU_GFLOPS / max(sharing, 1) if gpu else CPU_GFLOPS
    per_pass = GPU_SECONDS_PER_IMAGE_PASS if gpu else CPU_SECONDS_PER_IMAGE_PASS
    return images * passes * (image_epoch_gflop(model_name, image_size) / gflops + per_pass)


def _limit(estimate: float, scale: float) -> float:
    return estimate * MARGIN * scale


def _where(gpu: bool) -> str:
    return "on a GPU" if gpu else "on the CPU"


def train_budget(model_name: str, image_size: int, epochs: int, images: int, *, gpu: bool, sharing: int = 1,
                 scale: float | None = None, step: str | None = None) -> Budget:  # fmt: skip
    """One model's training: every image `epochs + 1` times (the epochs, validation and the predictions of
    every split, test-time augmentation included, bound by one more pass), plus the start-up."""
    scale = timeout_scale() if scale is None else scale
    seconds = STARTUP_SECONDS + _passes_seconds(model_name, image_size, images, epochs + 1, gpu, sharing)
    return Budget(step or f"train {model_name}", _limit(seconds, scale),
                  f"{images:,} images at {image_size} px x {epochs} epochs {_where(gpu)}")  # fmt: skip


def audit_budget(model_name: str, image_size: int, epochs: int, folds: int, images: int, *, gpu: bool,
                 sharing: int = 1, scale: float | None = None) -> Budget:  # fmt: skip
    """The label audit: `folds` trainings of `model_name`, each on (folds-1)/folds of the images and
    predicting the rest, bound by `folds` trainings on all of them."""
    scale = timeout_scale() if scale is None else scale
    seconds = STARTUP_SECONDS + folds * _passes_seconds(model_name, image_size, images, epochs + 1, gpu, sharing)
    return Budget("label_audit", _limit(seconds, scale), f"{images:,} images at {image_size} px x {epochs} "
                  f"epochs x {folds} folds of {model_name} {_where(gpu)}")  # fmt: skip


def data_budget(step: str, images: int, *, times: int = 1, what: str = "", scale: float | None = None) -> Budget:
    """A data step (DATA_SECONDS_PER_IMAGE[step] per image, `times` over: input sizes, trained models)."""
    scale = timeout_scale() if scale is None else scale
    seconds = STARTUP_SECONDS + images * max(times, 1) * DATA_SECONDS_PER_IMAGE[step]
    return Budget(step, _limit(seconds, scale), f"{images:,} images" + (f" {what}" if what else ""))


def static_limits(images: int | None = None, scale: float | None = None) -> dict[str, timedelta]:
    """Each DAG task's `execution_timeout`: the largest of its budgets over every profile and registered
    model, for `images` images (default: RunConfig.max_rows, the most a run accepts unless it says more).

    A profile in GPU_PROFILES is sized on a GPU, the others on the CPU floor."""
    images = RunConfig().max_rows if images is None else int(images)
    scale = timeout_scale() if scale is None else scale
    config = RunConfig()
    models = model_names()
    train, audit, preprocess, external = 0.0, 0.0, 0.0, 0.0
    for profile in PROFILES:
        gpu = profile in GPU_PROFILES
        plans = {m: get_model_spec(m).profiles[profile] for m in models if profile in get_model_spec(m).profiles}
        for m, plan in plans.items():
            train = max(train, train_budget(m, plan.image_size, plan.epochs, images, gpu=gpu, scale=scale).seconds)
        audit_plan = get_model_spec(config.label_audit_model).profiles.get(profile)
        if audit_plan is not None:
            # The default config leaves the folds to the profile (settings.resolution resolves a run's).
            audit = max(audit, audit_budget(config.label_audit_model, audit_plan.image_size, audit_plan.epochs,
                                            PROFILES[profile].label_audit_folds, images, gpu=gpu, scale=scale).seconds)  # fmt: skip
        sizes = len({p.image_size for p in plans.values()})
        # External sets: every model (and the ensemble, its members again) predicts each image once, bound
        # by one training pass (three forward passes: test-time augmentation's two, and the margin).
        external = max(external, _limit(STARTUP_SECONDS + 2 * sum(
            _passes_seconds(m, plan.image_size, images, 1, gpu, 1) for m, plan in plans.items()), scale))  # fmt: skip
        preprocess = max(preprocess, data_budget("preprocess", images, times=sizes, scale=scale).seconds)
    repeats_max = 20  # RunConfig's form limit on repeats
    seconds = {
        "prepare": _limit(PREPARE_SECONDS, scale),
        "ingest": data_budget("ingest", images, scale=scale).seconds,
        "split": data_budget("split", images, times=repeats_max, scale=scale).seconds,
        "validate": data_budget("validate", images, times=repeats_max, scale=scale).seconds,
        "preprocess": preprocess,
        "plan_training": _limit(PREPARE_SECONDS, scale),
        "train": train,
        "label_audit": audit,
        "ensemble": data_budget("ensemble", images, times=len(models) * repeats_max, scale=scale).seconds,
        "evaluate_external": external,
        "report": data_budget("report", images, times=(len(models) + 1) * repeats_max, scale=scale).seconds,
    }
    return {step: timedelta(seconds=math.ceil(s)) for step, s in seconds.items()}


def _epochs_over(plan, images: int, batch_size: int) -> int:
    """Epochs over `images` images (the whole dataset, more than the split trained on) that make at least
    the image passes training takes: its epochs, or, raised to the plan's min_steps on a small split
    (ProfilePlan.scaled_to), min_steps full batches."""
    return max(plan.epochs, math.ceil(plan.min_steps * batch_size / max(images, 1)))


def run_budget(step: str, run: dict, *, model_name: str | None = None, gpu: bool = False) -> Budget | None:
    """The budget of `step` for this run (its record, as the DAG passes it; `gpu`: the task holds one,
    shared by GENDER_TASKS_PER_GPU trainings), or None for a step that runs before the dataset's size is
    known (prepare, ingest) or reads sets of unknown size (evaluate_external): those have only the DAG's
    limit."""
    if step in ("prepare", "ingest", "evaluate_external", "plan_training") or "dataset" not in run:
        return None
    settings = as_settings(run["settings"])
    images = int(run["dataset"]["images"])
    scale = timeout_scale()
    sharing = tasks_per_gpu() if gpu else 1
    if step == "train":
        plan = settings.per_model[model_name]
        epochs = _epochs_over(plan, images, settings.batch_size)
        return train_budget(model_name, plan.image_size, epochs, images, gpu=gpu, sharing=sharing, scale=scale)
    if step == "label_audit":
        plan = settings.label_audit_spec
        epochs = _epochs_over(plan, images, settings.batch_size)
        return audit_budget(settings.label_audit_model, plan.image_size, epochs, settings.label_audit_folds,
                            images, gpu=gpu, sharing=sharing, scale=scale)  # fmt: skip
    repeats = settings.repeats
    if step == "preprocess":
        sizes = sorted({p.image_size for p in settings.per_model.values()}
                       | ({settings.label_audit_spec.image_size} if settings.label_audit else set()))  # fmt: skip
        return data_budget(step, images, times=len(sizes), what=f"at sizes {sizes} px", scale=scale)
    if step in ("split", "validate"):
        return data_budget(step, images, times=repeats, what=f"x {repeats} repeats" if repeats > 1 else "",
                           scale=scale)  # fmt: skip
    if step in ("ensemble", "report"):
        trained = len(settings.models) * repeats + (repeats if step == "report" else 0)
        return data_budget(step, images, times=trained, what=f"x {trained} trained models", scale=scale)
    raise ValueError(f"no time budget for step {step!r}")


@contextmanager
def deadline(budget: Budget | None) -> Iterator[Budget | None]:
    """Run the block within `budget` (None: no deadline of ours), raising TaskTimeLimitExceeded past it.

    A SIGALRM interval timer, as Airflow's own execution_timeout uses: it interrupts a blocking system
    call (a FIFO's open or read) as well as Python code. Where a timer is already running (Airflow's, for
    the task's execution_timeout), the nearer of the two applies, this message is given either way, and
    the outer timer is set again on the way out, less the time spent, with its own handler. Signals reach
    only the main thread: elsewhere (never the case in an Airflow task) the block runs without one, and
    says so."""
    if budget is None:
        yield None
        return
    if threading.current_thread() is not threading.main_thread():
        log.warning("%s: not on the main thread, so no deadline of %s is set", budget.step,
                    duration_words(budget.seconds))  # fmt: skip
        yield budget
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    outer_first = 0 < outer_left < budget.seconds
    seconds = outer_left if outer_first else budget.seconds
    scale = timeout_scale()

    fired = []

    def expired(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 0)
        fired.append(True)
        limit = (f"the task's execution_timeout ({duration_words(seconds)} left of it when the step started; "
                 f"the step's own limit: {duration_words(budget.seconds)})" if outer_first
                 else f"its time limit of {duration_words(seconds)}")  # fmt: skip
        raise TaskTimeLimitExceeded(
            f"{budget.step} exceeded {limit}, sized for {budget.sized_for}; raise {SCALE_VAR} (now {scale:g}) "
            "if this machine is that much slower, or see in the traceback where it hung")  # fmt: skip

    previous = signal.signal(signal.SIGALRM, expired)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    log.info("%s: time limit %s, sized for %s", budget.step, duration_words(seconds), budget.sized_for)
    try:
        yield budget
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer_left and not (fired and outer_first):
            # Airflow's timer again, with what is left of it (at least a moment: if it is spent, it fires).
            # Not when it was the outer limit that ran out here: this error already says so.
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001))


def run_deadline(step: str, run: dict, **kwargs):
    """`deadline(run_budget(step, run, ...))`: the DAG's one call per task."""
    return deadline(run_budget(step, run, **kwargs))
