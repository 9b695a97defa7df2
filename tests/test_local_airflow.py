"""The embedded Airflow of `python -m gender_tasks run`: stale runs ended, concurrent first runs registered safely."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pendulum
import pytest

from gender_tasks.cli import DAG_ID
from gender_tasks.local_airflow import _run_is_alive, claim_run, end_stale_runs, prepare_airflow

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # starts a process and kills it
def test_a_killed_process_no_longer_holds_its_run(airflow_db):
    """The lock a `run` holds is dropped by the kernel when the process is SIGKILLed."""
    code = ("import sys, time\nfrom gender_tasks.local_airflow import claim_run\n"
            "with claim_run('manual__killed'):\n    print('claimed', flush=True)\n    time.sleep(600)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        assert _run_is_alive("manual__killed")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not _run_is_alive("manual__killed")


def _add_run(session, run_id: str, state: str, triggered_by, minutes: int):
    from airflow.models.dagrun import DagRun

    when = pendulum.datetime(2020, 1, 1, tz="UTC").add(minutes=minutes)
    run = DagRun(dag_id=DAG_ID, run_id=run_id, run_type="manual", state=state, triggered_by=triggered_by,
                 logical_date=when, run_after=when, start_date=when)  # fmt: skip
    session.add(run)


@pytest.mark.slow  # Airflow's metadata database (airflow_db migrates it in a process)
def test_stale_runs_of_dead_processes_are_ended_and_live_or_scheduler_runs_kept(airflow_db, capfd, caplog):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType as By
    from sqlalchemy import delete, select

    prepare_airflow(DAG_ID)  # registers the DAG (and ends nothing yet)
    runs = {"stale_dead_running": ("running", By.TEST), "stale_dead_queued": ("queued", By.TEST),
            "stale_live": ("running", By.TEST), "stale_ui": ("running", By.UI)}  # fmt: skip
    with create_session() as session:
        for i, (run_id, (state, by)) in enumerate(runs.items()):
            _add_run(session, run_id, state, by, i)
    try:
        with claim_run("stale_live"):  # a `run` in progress elsewhere: its process holds the lock
            ended = end_stale_runs(DAG_ID)
        # Runs that earlier tests left in this shared database may be ended too; these four must go as named.
        assert {"stale_dead_queued", "stale_dead_running"} <= set(ended)
        assert not {"stale_live", "stale_ui"} & set(ended)
        with create_session() as session:
            states = dict(session.execute(select(DagRun.run_id, DagRun.state).where(DagRun.run_id.in_(runs))).all())
        assert states == {"stale_dead_running": "failed", "stale_dead_queued": "failed", "stale_live": "running",
                          "stale_ui": "running"}  # fmt: skip
        # Airflow's structlog writes log lines to the console; once pytest's logging has been configured by
        # an earlier test they reach its log capture instead.
        logged = "".join(capfd.readouterr()) + caplog.text
        assert "ended stale run stale_dead_running" in logged and "stale_ui" not in logged
    finally:
        with create_session() as session:
            session.execute(delete(DagRun).where(DagRun.run_id.in_(runs)))


_SETUP = """
import sys
from gender_tasks.cli import DAG_ID, airflow_env_defaults
airflow_env_defaults()
from gender_tasks.local_airflow import prepare_airflow
import airflow.models  # everything imported before the start line, so that both register at the same moment
print("ready", flush=True)
sys.stdin.readline()
prepare_airflow(DAG_ID)
print("registered", flush=True)
"""


@pytest.mark.slow
def test_two_first_runs_at_once_on_a_fresh_airflow_home_both_register(tmp_path):
    """Without the setup lock this crashed one of them (UNIQUE constraint failed: dag_bundle.name / asset.name)."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=env,
                   timeout=600)  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", _SETUP], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    try:
        for proc in procs:  # both have imported Airflow and wait for the line
            assert proc.stdout.readline().strip() == "ready", (
                proc.stderr.read()[-3000:] if proc.poll() is not None else ""
            )
        for proc in procs:  # the start line, to both at once
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0 and "registered" in out, err[-3000:]
    code = ("from airflow.utils.session import create_session\nfrom airflow.models.asset import AssetModel\n"
            "from sqlalchemy import select, func\nwith create_session() as s:\n"
            "    print(s.scalar(select(func.count()).select_from(AssetModel)))\n")  # fmt: skip
    count = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300, check=True)  # fmt: skip
    # Each asset once: the dataset asset (ingest emits it) and the models asset (report emits, scoring consumes).
    assert count.stdout.strip().splitlines()[-1] == "2"


@pytest.mark.slow  # a whole local run, stopped while it trains
def test_sigterm_stops_a_local_run_within_seconds_and_keeps_nothing_leased(airflow_db, tmp_path):
    """`python -m gender_tasks run` is dag.test(), whose task runner only calls on_kill() on SIGTERM and
    leaves ending the process to a supervisor it does not have: a `kill` did nothing until the run ended."""
    import re
    import time

    from helpers import write_dataset

    source, store = write_dataset(tmp_path / "faces", 60, size=32), tmp_path / "store"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_db),
        "GENDER_TORCH_THREADS": "1",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }  # the trainer's start line
    # 500 epochs of the tiny CNN (the most a run takes): a minute or more, unless the signal stops it; a run
    # that ignored the signal would end with 0 and a report.
    cmd = [sys.executable, "-m", "gender_tasks", "run", "--source", str(source), "--storage", str(store),
           "--profile", "tiny", "--models", "cnn", "--epochs", "500", "--no-label-audit"]  # fmt: skip
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"cnn: \d+ train / \d+ val", (tmp_path / "run.log").read_text()):  # training starts
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "run.log").read_text()
    print(f"stopped {took:.1f} s after SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "stopped by SIGTERM" in text and "What it finished is kept" in text
    assert took < 60, f"{took:.0f} s from SIGTERM to exit"  # a bound, not a benchmark: this VM's disk stalls
    assert not [p for p in store.rglob("*") if p.is_file() and "leases" in p.parts], "a lease outlived the run"
    assert not list(store.rglob("report.html"))  # the run did not finish


def test_an_armed_process_answers_sigterm_with_a_stop_and_later_tasks_fail_as_they_start():
    from gender_tasks import stopping

    previous = signal.getsignal(signal.SIGTERM)
    stopping.check_in()  # unarmed (a worker's task process): nothing happens, Airflow's handler stays
    assert stopping.stop_requested() is None
    stopping.arm()
    try:
        stopping.check_in()  # a task starts: SIGTERM is this module's again
        with pytest.raises(stopping.RunStopped, match="stopped by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode; never gets here
                pass
        assert stopping.stop_requested() == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM ends the process
        with pytest.raises(stopping.RunStopped, match="before this task started"):
            stopping.check_in()  # the next task
        assert not issubclass(stopping.RunStopped, Exception)  # no `except Exception` swallows it
    finally:
        stopping.disarm()
        disarmed = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
    assert stopping.stop_requested() is None and disarmed == signal.SIG_DFL
