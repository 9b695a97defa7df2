"""What the package reads from its environment: every variable in one typed table, read through one
accessor per kind, and where its files go.

`VARIABLES` lists every environment variable the package, its DAGs and its plugins read: its kind,
default, limits and meaning. Modules read them only through the accessors below (`get_number`,
`get_whole`, `get_text`, `get_path`, `get_flag`, `get_cron`, `get_list`), never through `os.environ`
(tests/test_environment.py checks both), and the README's table is generated from this one
(`python -m gender_tasks env-table --write README.md`).

Workers are configured through the environment (timeouts, memory budgets, GPU sharing); a typo
there must fail fast, naming the variable, its value and a value that works, never fall back.

Where the embedded default keeps its files (the local storage, AIRFLOW_HOME): inside the checkout when
the package runs from one (`make run`, an editable install), else in a per-user data folder, never
next to the installed package (site-packages after a wheel install: shared, often read-only, and
wiped by the next upgrade). GENDER_DATA_DIR and AIRFLOW_HOME override either.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR_VAR = "GENDER_DATA_DIR"
APP_NAME = "gender-tasks"

KINDS = ("number", "whole", "text", "path", "flag", "cron", "list")
# When a variable is read: while Airflow parses the DAG files (set it for the DAG processor; a change
# applies at the next parse), when a step or command uses it (set it for the workers / the shell), or both.
PARSE, USE, BOTH = "DAG parse", "at use", "DAG parse and at use"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Variable:
    """One environment variable: what it holds and what it means."""

    name: str
    kind: str  # one of KINDS
    default: Any  # what the accessor returns when it is unset or blank; None: the reader works it out
    description: str  # one line, for the README
    read: str = USE  # PARSE, USE or BOTH
    default_text: str = ""  # the README's default where `default` alone does not say it
    minimum: float | None = None  # numbers: the lowest value allowed (inclusive) or the bound (exclusive)
    inclusive: bool = False
    says: str = ""  # numbers and flags: what a good value is, as the refusal puts it
    example: str = ""  # numbers and flags: a value that works, as the refusal puts it


def _seconds(name: str, default: float, description: str, read: str = USE) -> Variable:
    return Variable(name, "number", default, description, read=read, minimum=0.0,
                    says="a positive number of seconds", example=f"{default:g}")  # fmt: skip


VARIABLES: dict[str, Variable] = {v.name: v for v in (
    # --- the DAG -------------------------------------------------------------------------------------
    Variable("GENDER_SCHEDULE", "cron", None, "cron expression (or Airflow preset) for scheduled runs of "
             "gender_classification", read=PARSE, default_text="unset (manual)"),
    Variable("GENDER_SOURCE", "text", "kaggle:bwandowando/all-these-people-dont-exist",
             "default `source` of the trigger form and the CLI", read=BOTH, default_text="the Kaggle dataset"),
    Variable("GENDER_STORAGE", "text", None, "default object storage: `s3://bucket/prefix` or a folder", read=BOTH,
             default_text="`store/` in `GENDER_DATA_DIR`"),
    Variable("GENDER_TRAIN_QUEUE", "text", "default", "the Celery queue of the training tasks (train, label_audit); "
             "`gpu` in the full stack", read=PARSE),
    Variable("GENDER_TRAIN_POOL", "text", "default_pool", "the pool of the training tasks; `gpu` in the full stack",
             read=PARSE),
    Variable("GENDER_MAX_ACTIVE_RUNS", "whole", 16, "runs of the DAG active at once (more wait `queued`); training "
             "is rationed by the training pool, not by this", read=PARSE, minimum=1, inclusive=True,
             says="a positive whole number", example="16"),
    Variable("GENDER_K8S_GPUS", "whole", 0, "KubernetesExecutor only: the `nvidia.com/gpu` limit of the training "
             "pods (see Deployment); 0: none", read=PARSE, default_text="unset (none)", minimum=0, inclusive=True,
             says="a whole number of GPUs >= 0", example="1"),
    Variable("GENDER_TASK_TIMEOUT_SCALE", "number", 1.0, "multiplies every task's time limit "
             "(`gender_tasks/timeouts.py`): the DAG's `execution_timeout`s, sized for the largest run the settings "
             "accept, and the deadline each task sets itself for this run's images, input sizes, epochs and device "
             "(a generous 3x over the slowest measured machine). Set it alike for the DAG processor and the "
             "workers; a task past its limit fails as a timeout (retried), naming what the limit was sized for",
             read=BOTH, minimum=0.0, says="a positive number",
             example="2 (twice the time), or 0.5 to fail hung tasks sooner"),
    # --- the embedded default's files ----------------------------------------------------------------
    Variable(DATA_DIR_VAR, "path", None, "the embedded default's local folder (`make` sets it to `.data/`)",
             default_text="the checkout's `.data/`; installed from a wheel: `$XDG_DATA_HOME/gender-tasks` "
             "(`~/.local/share/gender-tasks`)"),
    Variable("XDG_DATA_HOME", "path", None, "the per-user data folder of an installed package (a relative path is "
             "ignored, as the XDG specification says)", default_text="`~/.local/share`"),
    Variable("AIRFLOW_HOME", "path", None, "Airflow's folder; `python -m gender_tasks` defaults it to the "
             "checkout's `.airflow/`, or `airflow/` in the per-user data folder",
             default_text="set by `python -m gender_tasks`"),
    # --- S3 ------------------------------------------------------------------------------------------
    Variable("AWS_ENDPOINT_URL", "text", None, "the S3 endpoint (MinIO, another S3-compatible store)",
             default_text="AWS"),
    Variable("GENDER_S3_CONN_ID", "text", None, "take S3 access from this Airflow connection instead (type `aws`: "
             "login = access key id, password = secret, extra `endpoint_url` for MinIO, optional `region_name`)",
             default_text="unset"),
    Variable("AWS_MAX_ATTEMPTS", "whole", 5, "S3 attempts per request (all of them, the first included)",
             minimum=1, inclusive=True, says="a whole number of attempts >= 1", example="5"),
    _seconds("GENDER_S3_CONNECT_TIMEOUT", 10.0, "S3 connect timeout"),
    _seconds("GENDER_S3_READ_TIMEOUT", 20.0, "how long S3 requests wait for an answer"),
    # --- training ------------------------------------------------------------------------------------
    Variable("GENDER_PARALLEL_TRAINING", "whole", 1, "training tasks sharing this machine's cores (sets torch "
             "threads)", minimum=1, inclusive=True, says="a positive whole number",
             example="2 (two trainings side by side on this worker's CPU, each with half of its cores)"),
    Variable("GENDER_TORCH_THREADS", "whole", 0, "explicit torch thread count of a training task, and of each of "
             "the label audit's fold processes; 0: cores / parallel tasks (a fold process: 1)",
             default_text="cores / parallel tasks; a label audit fold's process: 1", minimum=0, inclusive=True,
             says="a whole number of threads >= 0", example="4 (or 0 for the cores / parallel tasks)"),
    Variable("GENDER_GPU_LOCK_DIR", "path", None, "where training tasks lock the GPU slot each one uses (one folder "
             "per machine)", default_text="`gender-gpu-locks` in the temp folder"),
    Variable("GENDER_TASKS_PER_GPU", "whole", 1, "trainings sharing one GPU at once (see *On a GPU*); the compose "
             "file multiplies the `gpu` pool and the GPU worker's concurrency by it", minimum=1, inclusive=True,
             says="a positive whole number",
             example="1 (one training per GPU), or how many trainings one GPU should run at once"),
    Variable("CUDA_VISIBLE_DEVICES", "list", None, "the GPUs training may use (CUDA's own variable); a claimed "
             "training task sets it to its GPU. Empty or -1: none", default_text="all (`nvidia-smi`)"),
    Variable("GENDER_TORCH_COMPILE", "text", None, "`1`: `torch.compile` the training forward (inductor), or a "
             "backend name; `0`: eager", default_text="unset (eager)"),
    Variable("GENDER_GPU_RESIDENT", "flag", None, "`0`: keep a split's images in pinned host memory even where "
             "they would fit in GPU memory", default_text="auto", says="a flag (1/true/yes/on, 0/false/no/off "
             "or auto)", example="0"),
    Variable("GENDER_MEMORY_BUDGET_MB", "number", 2048.0, "decoded images one training or audit task may hold in "
             "memory. Below it the splits are copied into memory once (the fast path; the study's 6,873 images at "
             "224 px take about 1 GB); above it batches stream from the memory-mapped shards and the task's memory "
             "stays flat whatever the dataset's size. `0` always streams. The same seed trains the same model "
             "either way", minimum=0.0, inclusive=True, says="a number of megabytes >= 0",
             example="2048 (or 0 to always stream from the shards)"),
    Variable("GENDER_CHECKPOINT_EVERY_S", "number", 60.0, "how often a training writes its checkpoint: after the "
             "first epoch that ends this many seconds after the last checkpoint (or the start), and after the last "
             "epoch. A killed training resumes from it, so this bounds the training lost; `0` writes one after "
             "every epoch. A checkpoint of ResNet50 or InceptionV3 takes about 1.6 s on a laptop CPU: after every "
             "epoch of a small dataset's many short epochs it slowed their training by 40-50 %", minimum=0.0,
             inclusive=True, says="a number of seconds >= 0", example="60 (or 0 after every epoch)"),
    Variable("GENDER_CACHE_DIR", "path", None, "where a worker keeps its local copies of the cache's shards "
             "(fetched once per machine, checked against the index's sha256 each time a task opens them, a damaged "
             "copy replaced; the folder must be the user's own and not writable by others, and is made 0700; put "
             "it on a local disk with room for the dataset at each input size)",
             default_text="`<temp>/gender-shard-cache-<uid>`"),
    Variable("GENDER_OFFLINE", "flag", False, "`1`: never try to reach Kaggle (a `kaggle:` source fails at once, "
             "saying how to use a folder)", says="a flag (1/true/yes/on or 0/false/no/off)", example="1"),
    # --- scoring, tracking, housekeeping -------------------------------------------------------------
    Variable("GENDER_SCORING_SOURCE", "text", None, "the images the `gender_scoring` DAG scores on its scheduled "
             "runs (and the form's default)", read=PARSE, default_text="unset"),
    Variable("GENDER_SCORING_SCHEDULE", "cron", None, "a cron expression on which `gender_scoring` also runs",
             read=PARSE, default_text="unset (on the model asset only)"),
    Variable("MLFLOW_TRACKING_URI", "text", None, "log every run to this MLflow tracking server or store (see "
             "*Experiment tracking*)", default_text="unset (no tracking)"),
    Variable("GENDER_MLFLOW_EXPERIMENT", "text", "gender_classification", "the MLflow experiment"),
    Variable("GENDER_MLFLOW_MODEL_PREFIX", "text", "gender-classification-",
             "the prefix of the registered models' names in MLflow"),
    Variable("GENDER_KEEP_DAYS", "number", 30.0, "how long `python -m gender_tasks gc` keeps runs", minimum=0.0,
             inclusive=True, says="a number of days >= 0", example="30"),
    Variable("GENDER_GC_UNFINISHED_HOURS", "number", 24.0, "how long `gc` keeps a run that has not finished (no "
             "`results.json`) after its last write, whatever `GENDER_KEEP_DAYS` says", minimum=0.0,
             says="a positive number of hours", example="24"),
    _seconds("GENDER_LEASE_HEARTBEAT_S", 60.0, "how often a step or an ingest in progress renews its lease"),
    _seconds("GENDER_LEASE_EXPIRY_S", 900.0, "after how long without renewal `gc` takes a lease for abandoned "
             "(at least 3 heartbeats)"),
)}  # fmt: skip

ErrorType = Callable[[str], BaseException]


def variable(name: str, kind: str | None = None) -> Variable:
    """The table's entry for `name` (of `kind`, if given); a name not in the table is a bug here."""
    try:
        var = VARIABLES[name]
    except KeyError:
        raise LookupError(f"{name} is not in gender_tasks.environment.VARIABLES: add it there") from None
    if kind is not None and var.kind != kind:
        raise LookupError(f"{name} is a {var.kind} variable, not a {kind} one (gender_tasks.environment.VARIABLES)")
    return var


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip()


def env_number(name: str, default: float, *, says: str, example: str, minimum: float = 0.0,
               inclusive: bool = False, whole: bool = False, error: ErrorType = ValueError) -> float:  # fmt: skip
    """The finite number in the environment variable `name`, at least `minimum` (above it unless
    `inclusive`), and a whole number if `whole`; unset or blank: `default`. The parser under
    `get_number` and `get_whole`, which take these from the table.

    Anything else raises `error`: "<name>='<value>' is not <says>; set e.g. <name>=<example>".
    """
    raw = _raw(name)
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
        raise error(f"{name}={raw!r} is not {says}; set e.g. {name}={example}")
    return value


def _number(name: str, kind: str, error: ErrorType) -> float:
    var = variable(name, kind)
    return env_number(name, var.default, says=var.says, example=var.example, minimum=var.minimum,
                      inclusive=var.inclusive, whole=kind == "whole", error=error)  # fmt: skip


def get_number(name: str, *, error: ErrorType = ValueError) -> float:
    """A number variable: its value, within the table's limits, or its default; else `error`, naming it."""
    return float(_number(name, "number", error))


def get_whole(name: str, *, error: ErrorType = ValueError) -> int:
    """A whole-number variable: its value, within the table's limits, or its default; else `error`."""
    return int(_number(name, "whole", error))


def get_text(name: str) -> str | None:
    """A text variable, stripped; unset or blank: its default (None where the reader works it out)."""
    return _raw(name) or variable(name, "text").default


def get_cron(name: str) -> str | None:
    """A cron variable (a cron expression, or an Airflow preset where the reader takes one), stripped; unset
    or blank: None. Airflow checks the expression where it is used and names it when it is bad."""
    return _raw(name) or variable(name, "cron").default


def get_path(name: str) -> Path | None:
    """A path variable, stripped (not resolved: the reader decides); unset or blank: None."""
    variable(name, "path")
    raw = _raw(name)
    return Path(raw) if raw else None


def get_flag(name: str, *, error: ErrorType = ValueError) -> bool | None:
    """A flag variable: True for 1/true/yes/on, False for 0/false/no/off (any case); unset, blank or
    `auto`: its default (None: the reader decides). Anything else raises `error`, naming it."""
    var = variable(name, "flag")
    raw = _raw(name).lower()
    if raw in ("", "auto"):
        return var.default
    if raw in TRUE_WORDS or raw in FALSE_WORDS:
        return raw in TRUE_WORDS
    raise error(f"{name}={os.environ[name].strip()!r} is not {var.says}; set e.g. {name}={var.example}")


def get_list(name: str) -> list[str] | None:
    """A comma-separated list variable: its items, stripped, blanks left out; set but empty: []; unset: None
    (the reader decides: for CUDA_VISIBLE_DEVICES, unset means every GPU and empty none)."""
    variable(name, "list")
    raw = os.environ.get(name)
    return None if raw is None else [item.strip() for item in raw.split(",") if item.strip()]


# --- the README's table -----------------------------------------------------------------------------

TABLE_START = "<!-- env-table:start (generated by `python -m gender_tasks env-table --write README.md`) -->"
TABLE_END = "<!-- env-table:end -->"


def _allowed(var: Variable) -> str:
    if var.says:  # numbers and flags
        return var.says.removeprefix("a ")
    return {"text": "text", "path": "a folder", "cron": "a cron expression", "list": "comma-separated"}[var.kind]


def _default(var: Variable) -> str:
    if var.default_text:
        return var.default_text
    if isinstance(var.default, bool):
        return "1" if var.default else "0"
    if isinstance(var.default, float):
        return f"{var.default:g}"
    return f"`{var.default}`" if isinstance(var.default, str) else str(var.default)


def env_table() -> str:
    """The README's table of VARIABLES (markdown, between its markers)."""
    rows = [TABLE_START, "| variable | value | default | read | meaning |", "|---|---|---|---|---|"]
    for var in VARIABLES.values():
        cells = [f"`{var.name}`", _allowed(var), _default(var), var.read, var.description]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join([*rows, TABLE_END])


def with_env_table(text: str) -> str:
    """`text` (the README) with the block between the markers replaced by env_table()."""
    pattern = re.compile(re.escape(TABLE_START.split(" (")[0]) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {TABLE_START.split(' (')[0]} ... {TABLE_END} block to replace")
    return pattern.sub(lambda _: env_table(), text, count=1)


# --- where files go ---------------------------------------------------------------------------------


def source_checkout(package_dir: Path | None = None) -> Path | None:
    """The source checkout this package runs from (the folder above it holds pyproject.toml and dags/),
    or None for an installed package."""
    root = (package_dir or Path(__file__).resolve().parent).parent
    return root if (root / "pyproject.toml").is_file() and (root / "dags").is_dir() else None


def user_data_home() -> Path:
    """This user's folder for the package's data: $XDG_DATA_HOME/gender-tasks, or ~/.local/share/gender-tasks
    (the XDG base directory default; a relative XDG_DATA_HOME is ignored, as the specification says)."""
    xdg = get_path("XDG_DATA_HOME")
    base = xdg if xdg is not None and xdg.is_absolute() else Path.home() / ".local" / "share"
    return base / APP_NAME


def default_data_dir() -> Path:
    """Where the embedded default's local storage lives: GENDER_DATA_DIR, else the checkout's .data/,
    else user_data_home()."""
    configured = get_path(DATA_DIR_VAR)
    if configured is not None:
        return configured.expanduser().absolute()
    checkout = source_checkout()
    return checkout / ".data" if checkout else user_data_home()
