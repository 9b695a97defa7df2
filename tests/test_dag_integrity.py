"""DAG integrity: imports cleanly, has tags and retries, and parsing is cheap and side-effect free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAG_FILES = sorted((REPO / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "gender_classification" in dagbag.dag_ids


@pytest.mark.parametrize("dag_id", ["gender_classification"])
def test_tags_retries_and_docs(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags, f"{dag_id} has no tags"
    assert dag.catchup is False
    assert dag.doc_md and "Table 1" in dag.doc_md
    assert dag.description and "Table 1" in dag.description
    for task in dag.tasks:
        assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_every_task_has_an_execution_timeout_sized_from_the_profiles(dagbag):
    """A hung task (a FIFO read, a stalled mount) fails instead of holding its worker forever: each task's
    limit is gender_tasks.timeouts' bound for the largest run, and survives serialization (what the
    scheduler and workers see)."""
    from airflow.serialization.serialized_objects import DagSerialization

    from gender_tasks.timeouts import static_limits

    dag = dagbag.dags["gender_classification"]
    limits = static_limits()
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    for task in dag.tasks:
        assert task.execution_timeout is not None, f"{task.task_id} has no execution_timeout"
        assert task.execution_timeout == limits[task.task_id], task.task_id
        assert serialized.get_task(task.task_id).execution_timeout == limits[task.task_id], task.task_id
    assert set(limits) == set(dag.task_ids)


def test_one_run_record_travels_down_the_chain(dagbag):
    """Fewer, clearer edges: each data step has one upstream task, the one before it."""
    dag = dagbag.dags["gender_classification"]
    chain = ["prepare", "ingest", "split", "validate", "preprocess"]
    for before, task_id in zip(chain, chain[1:], strict=False):
        assert dag.get_task(task_id).upstream_task_ids == {before}, task_id
    assert dag.get_task("label_audit").upstream_task_ids == {"preprocess"}
    assert dag.get_task("report").trigger_rule == "none_failed"  # runs after a switched-off (skipped) step


def test_the_dag_calls_each_step_by_its_function_whose_name_picks_its_limits(tmp_path):
    """The tasks call gender_tasks.pipeline's functions, not names; `_call` sizes each one's deadline by
    `step.__name__`, so every step keeps its own name through its decorators and names a task's limit."""
    import ast

    from gender_tasks import pipeline
    from gender_tasks.timeouts import run_budget, static_limits

    tree = ast.parse((REPO / "dags" / "gender_classification.py").read_text())
    steps = [node.args[0] for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("_call", "_skip_if_off")]  # fmt: skip
    assert all(isinstance(s, ast.Attribute) and getattr(s.value, "id", None) == "pipeline" for s in steps)
    called = {s.attr for s in steps}
    assert called == {"prepare", "ingest", "split", "validate", "preprocess", "train", "ensemble", "label_audit",
                      "evaluate_external", "report"}  # fmt: skip
    limits = static_limits()
    run = pipeline.prepare({"profile": "tiny", "source": str(tmp_path / "faces"), "storage": str(tmp_path / "store"),
                            "models": ["cnn", "mobilenetv2"]})  # fmt: skip
    run["dataset"] = {"images": 1000}
    for name in called:
        step = getattr(pipeline, name)
        assert step.__name__ == name and name in limits, name
        run_budget(name, run, model_name="cnn")  # a name it did not know would raise ValueError


def test_training_is_mapped_over_the_models(dagbag):
    dag = dagbag.dags["gender_classification"]
    train = dag.get_task("train")
    # The expanded argument, which Airflow can render when the task starts (not only when it ends).
    assert train.map_index_template == "{{ task.op_kwargs['label'] }}"
    assert set(dag.task_ids) >= {"prepare", "ingest", "split", "validate", "preprocess", "train", "report"}
    assert dag.get_task("validate").task_id in {t.task_id for t in train.upstream_list} | {
        u.task_id for t in train.upstream_list for u in t.upstream_list
    }


_PARSE_PROBE = r"""
import importlib.util, json, socket, sys
def refuse(*a, **k):
    raise AssertionError("DAG parsing touched the network: %r" % (a,))
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
heavy = [m for m in ("torch", "torchvision", "great_expectations", "boto3", "sklearn", "kagglehub", "matplotlib",
                    "PIL", "pandas") if m in sys.modules]
print(json.dumps({"heavy": heavy, "pipeline": "gender_tasks.pipeline" in sys.modules}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_parsing_imports_nothing_heavy_and_touches_no_network(dag_file, tmp_path):
    # A fresh interpreter, no database, no services: only what parsing itself needs.
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/absent.db"}
    out = subprocess.run([sys.executable, "-c", _PARSE_PROBE, str(dag_file)], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"parsing {dag_file.name} imported {result['heavy']}"
    # The training DAG imports its steps (gender_tasks.pipeline) at parse time, and still nothing heavy.
    assert result["pipeline"] is (dag_file.name == "gender_classification.py")
    assert not (tmp_path / "absent.db").exists(), "parsing created or opened a metadata database"


@pytest.mark.slow
def test_schedule_comes_from_configuration(tmp_path):
    probe = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('d', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(repr(m.gender_classification().schedule))"
    )
    env = {**os.environ, "GENDER_SCHEDULE": "0 3 * * 1"}
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "dags" / "gender_classification.py")],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 3 * * 1" in out.stdout
    env.pop("GENDER_SCHEDULE")
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "dags" / "gender_classification.py")],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "None" in out.stdout or "Never" in out.stdout, out.stdout


def test_ingest_emits_the_dataset_asset(dagbag):
    """Data-aware scheduling: ingest declares the dataset asset as its outlet, so other DAGs can schedule on it."""
    from airflow.sdk import Asset

    dag = dagbag.dags["gender_classification"]
    outlets = dag.get_task("ingest").outlets
    assert outlets == [Asset(name="gender_classification_dataset", uri="x-gender-classification://dataset",
                             group="dataset")]  # fmt: skip
    assert {t.task_id for t in dag.tasks if t.outlets} == {"ingest", "report"}  # report: the model asset


def test_training_goes_to_the_train_queue_and_pool_slowest_model_first(monkeypatch):
    """Training and the label audit: GENDER_TRAIN_QUEUE / _POOL, priority by map index; the rest: default."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.serialization.serialized_objects import DagSerialization

    from gender_tasks.scheduling import order_slowest_first

    monkeypatch.setenv("GENDER_TRAIN_QUEUE", "gpu")
    monkeypatch.setenv("GENDER_TRAIN_POOL", "gpu")
    monkeypatch.delenv("GENDER_K8S_GPUS", raising=False)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    # What the scheduler sees: the DAG after serialization, the plugin's strategy resolved.
    dag = DagSerialization.from_dict(DagSerialization.to_dict(bag.dags["gender_classification"]))
    for task in dag.tasks:
        gpu = task.task_id in ("train", "label_audit")
        assert (task.queue, task.pool) == (("gpu", "gpu") if gpu else ("default", "default_pool")), task.task_id
        assert task.executor_config == {}, task.task_id  # no Kubernetes pod override unless asked for
    train, audit = dag.get_task("train"), dag.get_task("label_audit")
    weights = [train.weight_rule.get_weight(TaskInstance(task=train, run_id="r", map_index=i, dag_version_id=None))
               for i in range(4)]  # fmt: skip
    audit_weight = audit.weight_rule.get_weight(TaskInstance(task=audit, run_id="r", dag_version_id=None))
    assert weights == sorted(weights, reverse=True) and len(set(weights)) == 4, weights
    assert weights[1] > audit_weight > weights[2], (weights, audit_weight)  # the audit: after the two big models
    assert order_slowest_first(["cnn", "mobilenetv2", "resnet50", "inceptionv3"]) == [
        "inceptionv3", "resnet50", "mobilenetv2", "cnn"]  # fmt: skip
    assert order_slowest_first(["cnn", "resnet50"]) == ["resnet50", "cnn"]
