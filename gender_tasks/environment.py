"""What the package reads from its environment: numbers from variables, and where its files go.

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
from pathlib import Path

DATA_DIR_VAR = "GENDER_DATA_DIR"
APP_NAME = "gender-tasks"


def env_number(name: str, default: float, *, says: str, example: str, minimum: float = 0.0,
               inclusive: bool = False, whole: bool = False, error: type[Exception] = ValueError) -> float:  # fmt: skip
    """The finite number in the environment variable `name`, at least `minimum` (above it unless
    `inclusive`), and a whole number if `whole`; unset or blank: `default`.

    Anything else raises `error`: "<name>='<value>' is not <says>; set e.g. <name>=<example>".
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
        raise error(f"{name}={raw!r} is not {says}; set e.g. {name}={example}")
    return value


def source_checkout(package_dir: Path | None = None) -> Path | None:
    """The source checkout this package runs from (the folder above it holds pyproject.toml and dags/),
    or None for an installed package."""
    root = (package_dir or Path(__file__).resolve().parent).parent
    return root if (root / "pyproject.toml").is_file() and (root / "dags").is_dir() else None


def user_data_home() -> Path:
    """This user's folder for the package's data: $XDG_DATA_HOME/gender-tasks, or ~/.local/share/gender-tasks
    (the XDG base directory default; a relative XDG_DATA_HOME is ignored, as the specification says)."""
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / APP_NAME


def default_data_dir() -> Path:
    """Where the embedded default's local storage lives: GENDER_DATA_DIR, else the checkout's .data/,
    else user_data_home()."""
    if os.environ.get(DATA_DIR_VAR, "").strip():
        return Path(os.environ[DATA_DIR_VAR].strip()).expanduser().absolute()
    checkout = source_checkout()
    return checkout / ".data" if checkout else user_data_home()
