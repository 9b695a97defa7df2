"""SIGTERM in a run whose tasks execute in this process (`python -m gender_tasks run`, which is `dag.test()`).

Airflow's task runner answers SIGTERM by calling the operator's `on_kill()` and leaves ending the process to
its supervisor. `dag.test()` has no supervisor, so a SIGTERM (`kill`, `timeout`, a container being stopped)
did nothing until the whole run had finished. Armed by the command, every task answers it instead:

- the running task stops at once with `RunStopped`; its `finally` blocks run (leases released, partial
  files removed), and the DAG fails it without retries;
- every later task fails as it starts, so the run ends within seconds;
- a second SIGTERM kills the process outright.

What the run finished is kept: a new run with the same settings reuses its trained models and cache, and
the label audit resumes after its stored folds.

Unarmed (a scheduler's worker, whose supervisor ends the process) nothing here does anything.
"""

from __future__ import annotations

import signal

_state: dict = {"armed": False, "stopped_by": None}


class RunStopped(BaseException):
    """A signal stopped the run. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    takes it for a broken image or a storage fault."""


def arm() -> None:
    """Answer SIGTERM with a stop in this process from now on (call from the main thread)."""
    _state.update(armed=True, stopped_by=None)
    signal.signal(signal.SIGTERM, _on_signal)


def disarm() -> None:
    _state.update(armed=False, stopped_by=None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_requested() -> str | None:
    """The name of the signal that stopped the run (None: nothing did)."""
    return _state["stopped_by"]


def check_in() -> None:
    """At the start of every task: armed, raise RunStopped if a signal has already stopped the run, else
    take SIGTERM back from Airflow's task runner (which installs its own as each task starts)."""
    if not _state["armed"]:
        return
    if _state["stopped_by"]:
        raise RunStopped(f"the run was stopped by {_state['stopped_by']} before this task started")
    signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    _state["stopped_by"] = name
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise RunStopped(f"stopped by {name}")
