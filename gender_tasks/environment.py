"""Numbers from environment variables, refused in words when they are not what they must be.

Workers are configured through the environment (timeouts, memory budgets, GPU sharing); a typo
there must fail fast, naming the variable, its value and a value that works, never fall back.
"""

from __future__ import annotations

import math
import os


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
