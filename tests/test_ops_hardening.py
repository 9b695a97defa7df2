"""Operations hardening: bounded task run time, GENDER_PARALLEL_TRAINING, `run --conf`, CSV formula
injection, and where an installed package keeps its files."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, write_dataset

from gender_tasks import tables, timeouts
from gender_tasks.errors import PermanentError
from gender_tasks.scheduling import parallel_training
from gender_tasks.settings import resolve_settings

DAG_TASKS = {"prepare", "ingest", "split", "validate", "preprocess", "plan_training", "train", "ensemble",
             "label_audit", "evaluate_external", "report"}  # fmt: skip


# --- GENDER_PARALLEL_TRAINING --------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [(None, 1), ("", 1), ("1", 1), (" 3 ", 3)])
def test_parallel_training_reads_a_whole_number(monkeypatch, raw, expected):
    monkeypatch.delenv("GENDER_PARALLEL_TRAINING", raising=False)
    if raw is not None:
        monkeypatch.setenv("GENDER_PARALLEL_TRAINING", raw)
    assert parallel_training() == expected


@pytest.mark.parametrize("raw", ["0", "-2", "1.5", "two", "nan"])
def test_parallel_training_refuses_what_once_divided_by_zero(monkeypatch, raw):
    monkeypatch.setenv("GENDER_PARALLEL_TRAINING", raw)
    with pytest.raises(PermanentError) as err:
        parallel_training()
    assert str(err.value).startswith(f"GENDER_PARALLEL_TRAINING={raw!r} is not a positive whole number; "
                                     "set e.g. GENDER_PARALLEL_TRAINING=2")  # fmt: skip


def test_the_dag_reads_the_variable_only_through_the_one_function():
    source = (REPO / "dags" / "gender_classification.py").read_text()
    assert "GENDER_PARALLEL_TRAINING" not in source
    assert source.count("parallel_tasks=parallel_training()") == 2


# --- python -m gender_tasks run --conf ------------------------------------------------------------------


@pytest.mark.parametrize("conf, says", [
    ("{bad json", "error: --conf is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                  "column 2 (char 1)): give a JSON object, e.g. --conf '{\"epochs\": 3}'"),
    ("[1, 2]", "error: --conf is a JSON list, not an object: give a JSON object, e.g. --conf '{\"epochs\": 3}'"),
    ('"epochs=3"', "error: --conf is a JSON str, not an object"),
])  # fmt: skip
def test_run_refuses_a_conf_that_is_not_a_json_object_in_words(capsys, conf, says):
    from gender_tasks.cli import main

    assert main(["run", "--conf", conf]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.slow  # the real command, in a process
def test_run_conf_error_from_the_command_line_exits_2_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "gender_tasks", "run", "--conf", "{bad json"], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: --conf is not valid JSON" in out.stderr and "Traceback" not in out.stderr


# --- CSV formula injection ------------------------------------------------------------------------------

HOSTILE = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\r=1", "'=already quoted",
           "''@twice", "plain", "", "a=b", "-", "=", "'", "it's"]  # fmt: skip


@pytest.mark.parametrize("value", HOSTILE)
def test_text_that_a_spreadsheet_would_run_gets_a_quote_and_comes_back(value):
    written = tables.neutralise(value)
    starts_formula = value.lstrip("'")[:1] in ("=", "+", "-", "@", "\t", "\r")
    assert written == ("'" + value if starts_formula else value)
    assert written[:1] not in ("=", "+", "-", "@", "\t", "\r")
    assert tables.restore(written) == value


def test_tables_neutralise_text_cells_only_and_round_trip():
    frame = pd.DataFrame({"file": ["=cmd|' /C calc'!A0", "ok.jpg", "-x.jpg"], "score": [-0.5, 1.0, -2.0],
                          "count": [-1, 2, 3], "=HYPERLINK(1)": ["@a", "b", None]})  # fmt: skip
    text = tables.to_csv(frame, index=False)
    rows = text.splitlines()
    assert rows[0] == "file,score,count,'=HYPERLINK(1)"
    assert rows[1] == "'=cmd|' /C calc'!A0,-0.5,-1,'@a"  # numbers stay numbers, text gets the quote
    assert rows[3] == "'-x.jpg,-2.0,3,"
    assert frame.loc[0, "file"] == "=cmd|' /C calc'!A0"  # the caller's frame is not changed
    back = tables.read_csv(io.StringIO(text))
    pd.testing.assert_frame_equal(back, pd.read_csv(io.StringIO(frame.to_csv(index=False))))


def test_a_manifest_with_hostile_file_names_round_trips(local_storage):
    from gender_tasks.data.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest

    row = {c: "x" for c in MANIFEST_COLUMNS} | {"bytes": 10, "width": 48, "height": 48, "decodable": True}
    names = ['=HYPERLINK("http://evil")/a.jpg', "-b.jpg", "@c.jpg", "+d.jpg", "ok/e.jpg"]
    manifest = pd.DataFrame([row | {"key": f"images/{i:064x}.jpg", "source_path": n, "error": n} for i, n in
                             enumerate(names)], columns=MANIFEST_COLUMNS)  # fmt: skip
    write_manifest(local_storage, "m.csv", manifest)
    stored = local_storage.get_bytes("m.csv").decode()
    assert "\n=" not in stored and ",=" not in stored and ",-b.jpg" not in stored and ",'-b.jpg" in stored
    back = read_manifest(local_storage, "m.csv")
    assert back["source_path"].tolist() == names and back["error"].tolist() == names
    assert back["bytes"].tolist() == [10] * 5  # numbers read back as numbers


def test_attributes_from_a_hostile_labels_csv_are_stored_quoted_and_read_back_as_given(tmp_path, local_storage):
    from gender_tasks.data.attributes import load_labels, read_attributes, store_attributes
    from gender_tasks.data.ingest import Limits, ingest_folder
    from gender_tasks.data.manifest import read_manifest
    from gender_tasks.layout import attributes_key, manifest_key

    root = write_dataset(tmp_path / "faces", 6)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    groups = ['=HYPERLINK("http://evil","click")', "@SUM(1+1)*cmd", "-1", "plain"]
    pd.DataFrame({"file": files, "group": [groups[i % 4] for i in range(len(files))]}).to_csv(
        root / "labels.csv", index=False)  # fmt: skip
    summary = ingest_folder(root, local_storage, Limits.of(resolve_settings({"profile": "tiny"})))
    manifest = read_manifest(local_storage, manifest_key(summary["dataset_id"]))
    assert store_attributes(load_labels(root), root, local_storage, summary["dataset_id"], manifest) == 1
    stored = local_storage.get_bytes(attributes_key(summary["dataset_id"])).decode()
    cells = {row[1] for row in list(csv.reader(io.StringIO(stored)))[1:]}  # as a spreadsheet reads the cells
    assert cells == {'\'=HYPERLINK("http://evil","click")', "'@SUM(1+1)*cmd", "'-1", "plain"}
    assert sorted(set(read_attributes(local_storage, summary["dataset_id"])["group"])) == sorted(groups)


# --- where an installed package keeps its files -----------------------------------------------------------


def test_a_source_checkout_is_recognised_by_its_pyproject_and_dags(tmp_path):
    from gender_tasks.environment import source_checkout

    assert source_checkout() == REPO
    installed = tmp_path / "site-packages" / "gender_tasks"
    installed.mkdir(parents=True)
    assert source_checkout(installed) is None
    (tmp_path / "site-packages" / "pyproject.toml").write_text("")  # a pyproject alone is not a checkout
    assert source_checkout(installed) is None
    (tmp_path / "site-packages" / "dags").mkdir()
    assert source_checkout(installed) == tmp_path / "site-packages"


def test_installed_defaults_go_to_the_user_data_folder(monkeypatch, tmp_path):
    from gender_tasks import environment
    from gender_tasks.cli import airflow_env_defaults
    from gender_tasks.storage import default_storage_uri

    monkeypatch.setattr(environment, "source_checkout", lambda package_dir=None: None)
    for var in ("GENDER_DATA_DIR", "GENDER_STORAGE", "XDG_DATA_HOME", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER",
                "AIRFLOW__CORE__PLUGINS_FOLDER"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_storage_uri() == (tmp_path / "home/.local/share/gender-tasks/store").as_uri()
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_storage_uri() == (tmp_path / "home/.local/share/gender-tasks/store").as_uri()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_storage_uri() == (tmp_path / "xdg/gender-tasks/store").as_uri()
    monkeypatch.setenv("GENDER_DATA_DIR", str(tmp_path / "mine"))
    assert default_storage_uri() == (tmp_path / "mine/store").as_uri()
    monkeypatch.setenv("GENDER_STORAGE", "s3://bucket/prefix")
    assert default_storage_uri() == "s3://bucket/prefix"

    airflow_env_defaults()
    assert os.environ["AIRFLOW_HOME"] == str(tmp_path / "xdg/gender-tasks/airflow")
    assert "AIRFLOW__CORE__DAGS_FOLDER" not in os.environ  # not invented: the package ships no DAG file
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "af"))
    airflow_env_defaults()
    assert os.environ["AIRFLOW_HOME"] == str(tmp_path / "af")


def test_checkout_defaults_stay_in_the_checkout(monkeypatch):
    from gender_tasks.cli import airflow_env_defaults
    from gender_tasks.environment import default_data_dir

    for var in ("GENDER_DATA_DIR", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER"):
        monkeypatch.delenv(var, raising=False)
    assert default_data_dir() == REPO / ".data"
    airflow_env_defaults()
    assert os.environ["AIRFLOW_HOME"] == str(REPO / ".airflow")
    assert os.environ["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO / "dags")


@pytest.mark.slow  # a fresh interpreter on the copied package
def test_a_copy_installed_outside_a_checkout_keeps_nothing_beside_itself(tmp_path):
    """The package copied the way a wheel installs it (no pyproject.toml or dags/ beside it)."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "gender_tasks", site / "gender_tasks", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("GENDER_DATA_DIR", "GENDER_STORAGE", "XDG_DATA_HOME")}
    code = "from gender_tasks.storage import default_storage_uri; print(default_storage_uri())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env | {"PYTHONPATH": str(site), "HOME": str(tmp_path / "home")})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == (tmp_path / "home/.local/share/gender-tasks/store").as_uri()


# --- time limits ------------------------------------------------------------------------------------------


def test_every_dag_task_has_a_static_limit_that_the_scale_multiplies(monkeypatch):
    monkeypatch.delenv(timeouts.SCALE_VAR, raising=False)
    limits = timeouts.static_limits()
    assert set(limits) == DAG_TASKS
    assert all(timedelta(minutes=5) <= v for v in limits.values()), limits
    monkeypatch.setenv(timeouts.SCALE_VAR, "2")
    doubled = timeouts.static_limits()
    assert all(abs(doubled[k].total_seconds() - 2 * limits[k].total_seconds()) <= 1 for k in limits)
    # Fewer images, shorter limits: the data steps scale with the dataset.
    assert timeouts.static_limits(images=1000)["ingest"] < doubled["ingest"]


@pytest.mark.parametrize("raw", ["0", "-1", "fast", "inf"])
def test_a_bad_scale_is_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(timeouts.SCALE_VAR, raw)
    with pytest.raises(PermanentError, match=rf"^GENDER_TASK_TIMEOUT_SCALE={raw!r} is not a positive number; set e"):
        timeouts.static_limits()


def test_training_budget_grows_with_the_work_and_is_shorter_on_a_gpu():
    base = timeouts.train_budget("resnet50", 64, 5, 1000, gpu=False, scale=1)
    assert base.step == "train resnet50" and base.sized_for == "1,000 images at 64 px x 5 epochs on the CPU"
    for bigger in (timeouts.train_budget("resnet50", 64, 5, 4000, gpu=False, scale=1),
                   timeouts.train_budget("resnet50", 128, 5, 1000, gpu=False, scale=1),
                   timeouts.train_budget("resnet50", 64, 10, 1000, gpu=False, scale=1),
                   timeouts.train_budget("resnet50", 64, 5, 1000, gpu=False, scale=2)):  # fmt: skip
        assert bigger.seconds > base.seconds
    gpu = timeouts.train_budget("resnet50", 64, 5, 1000, gpu=True, scale=1)
    assert gpu.seconds < base.seconds and gpu.sized_for.endswith("on a GPU")
    assert timeouts.train_budget("resnet50", 64, 5, 1000, gpu=True, sharing=4, scale=1).seconds > gpu.seconds
    # The costlier model gets longer at the same size (registry relative_cost).
    assert timeouts.train_budget("cnn", 64, 5, 1000, gpu=False, scale=1).seconds < base.seconds


def test_the_run_budget_is_sized_from_the_run_record(monkeypatch):
    monkeypatch.delenv(timeouts.SCALE_VAR, raising=False)
    settings = resolve_settings({"profile": "cpu", "models": ["cnn", "resnet50"], "repeats": 2})
    run = {"settings": settings.to_dict(), "dataset": {"images": 800}}
    budget = timeouts.run_budget("train", run, model_name="resnet50")
    assert budget.sized_for == "800 images at 64 px x 5 epochs on the CPU"
    assert budget == timeouts.train_budget("resnet50", 64, 5, 800, gpu=False)
    # the models' 64 px and the label audit's 32 px (the cpu profile's audit folds)
    assert timeouts.run_budget("preprocess", run).sized_for == "800 images at sizes [32, 64] px"
    assert timeouts.run_budget("split", run).sized_for == "800 images x 2 repeats"
    assert timeouts.run_budget("report", run).sized_for == "800 images x 6 trained models"
    assert "10 folds of cnn" in timeouts.run_budget("label_audit", run).sized_for  # the cpu profile's folds
    # Before the dataset's size is known there is only the DAG's limit.
    assert timeouts.run_budget("ingest", run) is None and timeouts.run_budget("prepare", {"profile": "x"}) is None
    # A run's deadline is far inside the DAG's limit, which is sized for the largest run.
    assert budget.seconds < timeouts.static_limits()["train"].total_seconds() / 100


def _fifo(tmp_path) -> Path:
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    return fifo


def test_a_hung_read_ends_at_the_deadline_with_a_named_error(monkeypatch, tmp_path):
    monkeypatch.delenv(timeouts.SCALE_VAR, raising=False)
    budget = timeouts.Budget("train resnet50", 0.5, "800 images at 64 px x 5 epochs on the CPU")
    # pytest-timeout's own SIGALRM timer runs around the test, as Airflow's runs around a task.
    outer_left, handler = signal.getitimer(signal.ITIMER_REAL)[0], signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    with pytest.raises(timeouts.TaskTimeLimitExceeded) as err, timeouts.deadline(budget):
        _fifo(tmp_path).read_bytes()  # blocks in open(): no writer ever comes
    assert time.monotonic() - started < 5
    assert str(err.value) == (
        "train resnet50 exceeded its time limit of 0.5 s, sized for 800 images at 64 px x 5 epochs on the CPU; "
        "raise GENDER_TASK_TIMEOUT_SCALE (now 1) if this machine is that much slower, or see in the traceback "
        "where it hung")  # fmt: skip
    # The outer timer is set again, less the time spent, with its own handler.
    assert signal.getsignal(signal.SIGALRM) == handler
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (outer_left - (time.monotonic() - started) - 1 < left <= outer_left) if outer_left else left == 0.0


@pytest.mark.slow
def test_the_deadline_works_inside_airflows_execution_timeout_and_hands_it_back(tmp_path):
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import timeout as airflow_timeout

    # The step ends in time: Airflow's timer and handler are back, less the time spent.
    with airflow_timeout(30) as outer:
        with timeouts.deadline(timeouts.Budget("split", 10, "8 images")):
            time.sleep(0.2)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < left < 29.9
        assert signal.getsignal(signal.SIGALRM) == outer.handle_timeout
    # Ours is nearer: our error, and Airflow's limit still runs afterwards.
    with pytest.raises(AirflowTaskTimeout), airflow_timeout(1.5):
        with pytest.raises(timeouts.TaskTimeLimitExceeded, match="its time limit of 0.3 s"):
            with timeouts.deadline(timeouts.Budget("split", 0.3, "8 images")):
                _fifo(tmp_path).read_bytes()
        time.sleep(5)  # Airflow's own timer, set again, ends this
    # Airflow's is nearer: it decides when, the message says why.
    with airflow_timeout(0.4), pytest.raises(timeouts.TaskTimeLimitExceeded) as err:
        with timeouts.deadline(timeouts.Budget("train cnn", 3600, "8 images at 32 px x 2 epochs on the CPU")):
            time.sleep(5)
    assert str(err.value).startswith("train cnn exceeded the task's execution_timeout (0.4 s left of it when the "
                                     "step started; the step's own limit: 60 min), sized for 8 images")  # fmt: skip


def test_no_deadline_off_the_main_thread_is_said_not_hidden(caplog):
    result = []

    def work():
        with timeouts.deadline(timeouts.Budget("split", 0.1, "8 images")):
            time.sleep(0.3)
        result.append("done")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert result == ["done"]
    assert "not on the main thread, so no deadline of 0.1 s is set" in caplog.text


def test_the_dag_fails_bad_settings_without_retries_and_a_deadline_as_airflows_timeout():
    import importlib.util

    from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTimeout

    spec = importlib.util.spec_from_file_location("dag_under_test", REPO / "dags" / "gender_classification.py")
    dag_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dag_module)
    with pytest.raises(AirflowFailException, match="PermanentError: GENDER_PARALLEL_TRAINING='0'"):
        with dag_module._failures_for_airflow():
            raise PermanentError("GENDER_PARALLEL_TRAINING='0' is not a positive whole number")
    with pytest.raises(AirflowTaskTimeout, match="train cnn exceeded"):
        with dag_module._failures_for_airflow():
            raise timeouts.TaskTimeLimitExceeded("train cnn exceeded its time limit of 1 s")


# --- worker processes under Celery ---------------------------------------------------------------------


def _daemon_child(queue) -> None:
    import multiprocessing

    from gender_tasks.data.parallel import allow_worker_processes

    allow_worker_processes()
    current = multiprocessing.current_process()
    queue.put((type(current).__module__, current.daemon))


def test_a_standard_library_daemon_keeps_the_rule_against_children():
    """Only a process forked from a Celery (billiard) pool worker takes a main-process identity."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    child = context.Process(target=_daemon_child, args=(queue,), daemon=True)
    child.start()
    child.join(60)
    assert queue.get() == ("multiprocessing.context", True)


@pytest.mark.slow
def test_a_step_past_its_deadline_fails_in_airflow_with_the_named_error(airflow_db, tmp_path, monkeypatch, capfd):
    """In a real Airflow task: the DAG's limits parsed as usual, then every run-time deadline made tiny, so
    split (the first step that knows the dataset's size) runs past its own and fails as Airflow's timeout."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState, TaskInstanceState

    source = write_dataset(tmp_path / "faces", 6)
    monkeypatch.delenv(timeouts.SCALE_VAR, raising=False)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gender_classification"]
    for task in dag.tasks:
        task.retries = 0  # a timeout is retried in a deployment; here one try shows the failure
    monkeypatch.setenv(timeouts.SCALE_VAR, "1e-9")  # read again by each task at run time
    run = dag.test(run_conf={"source": str(source), "storage": str(tmp_path / "store"), "profile": "tiny",
                             "models": ["cnn"], "label_audit": False})  # fmt: skip
    assert run.state == DagRunState.FAILED
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    assert tis["ingest"].state == TaskInstanceState.SUCCESS  # no run-time deadline before the size is known
    assert tis["split"].state == TaskInstanceState.FAILED
    out = capfd.readouterr()
    assert "split exceeded its time limit of " in out.out + out.err
    assert "sized for 12 images; raise GENDER_TASK_TIMEOUT_SCALE (now 1e-09)" in out.out + out.err
