"""Experiment tracking in MLflow, opt-in: only when MLFLOW_TRACKING_URI is set does a run log to it, and only
then is mlflow imported (mlflow-skinny: the tracking client; a sqlite:/// or postgresql:// store also uses
SQLAlchemy and Alembic, which Airflow already installs).

When the report is written (pipeline.report), each run becomes one MLflow run named by its run key, with:

- its settings, as parameters (lists and dicts as JSON);
- one nested run per trained model and repeat, with the per-epoch metrics of history.json (step = epoch:
  loss, accuracy, val_loss, val_accuracy, learning_rate, ...), its test metrics (test_accuracy,
  test_weighted_f1, ...), final_train_accuracy and final_val_accuracy (as its metrics.json), and its files (model.pt2, model_card.json, metrics.json, history.json,
  predictions.csv) as artifacts under model/;
- a registered model per trained model, `<GENDER_MLFLOW_MODEL_PREFIX><model>` (default gender-classification-cnn,
  ...), whose new version points at that model/ folder;
- on the parent run: each model's test metrics (<model>_test_accuracy, ...), and report.html and
  results.json as artifacts.

Every model file is read verified against its model card. The experiment is GENDER_MLFLOW_EXPERIMENT
(default gender_classification). A report step that runs again (a retry) finds the finished MLflow run
tagged with its run key and logs nothing twice. A tracking server that cannot be reached fails the step
(Airflow retries it), rather than leaving the run silently unlogged.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from . import layout
from .environment import get_text, variable
from .settings import ENSEMBLE, Settings
from .storage import Storage, read_verified

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "GENDER_MLFLOW_EXPERIMENT"
MODEL_PREFIX_ENV = "GENDER_MLFLOW_MODEL_PREFIX"
DEFAULT_EXPERIMENT = variable(EXPERIMENT_ENV).default  # gender_classification
DEFAULT_MODEL_PREFIX = variable(MODEL_PREFIX_ENV).default  # gender-classification-
RUN_KEY_TAG = "gender.run_key"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def enabled() -> bool:
    """Whether runs log to MLflow: MLFLOW_TRACKING_URI is set (and not blank)."""
    return get_text(URI_ENV) is not None


def flat_metrics(values: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict as {"a_b_c": value} (lists and non-numbers left out)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, dict):
            out |= flat_metrics(value, f"{name}_")
    return out


def _params(settings: Settings) -> dict[str, str]:
    params = {}
    for key, value in settings.to_dict().items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        params[key] = text[:MAX_PARAM_CHARS]
    return params


def _model_files(storage: Storage, prefix: str) -> dict[str, bytes]:
    """The model's files (those its card records, and the card), each verified against the card."""
    card = storage.get_bytes(f"{prefix}/{layout.MODEL_OUTPUTS[-1]}")
    files = json.loads(card).get("files") or {}
    out = {name: read_verified(storage, f"{prefix}/{name}", sha) for name, sha in sorted(files.items())}
    out[layout.MODEL_OUTPUTS[-1]] = card
    return out


def log_run(storage: Storage, *, run_key: str, settings: Settings) -> dict | None:
    """Log the finished run `run_key` to MLflow (see the module docstring); None when tracking is off."""
    if not enabled():
        return None
    import mlflow
    from mlflow import MlflowClient

    experiment = get_text(EXPERIMENT_ENV)
    model_prefix = get_text(MODEL_PREFIX_ENV)
    mlflow.set_tracking_uri(get_text(URI_ENV))
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    done = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}' and "
                              "attributes.status = 'FINISHED'", max_results=1)  # fmt: skip
    if done:
        log.info("run %s is already logged to MLflow (run %s)", run_key, done[0].info.run_id)
        return {"mlflow_run_id": done[0].info.run_id, "experiment_id": experiment_id, "already_logged": True}
    models = [*settings.models, *([ENSEMBLE] if len(settings.models) > 1 else [])]
    versions = {}
    with tempfile.TemporaryDirectory(prefix="gender-mlflow-") as tmp, \
            mlflow.start_run(run_name=run_key, tags={RUN_KEY_TAG: run_key}) as parent:  # fmt: skip
        mlflow.log_params(_params(settings))
        for repeat in range(settings.repeats):
            repeat_key = layout.repeat_run_key(run_key, repeat)
            for name in models:
                prefix = layout.model_prefix(repeat_key, name)
                if not storage.exists(f"{prefix}/{layout.MODEL_OUTPUTS[-1]}"):
                    continue  # an ensemble that was skipped, a model that failed
                files = _model_files(storage, prefix)
                label = name if repeat == 0 else f"{name}_repeat{repeat}"
                with mlflow.start_run(run_name=f"{run_key} {label}", nested=True,
                                      tags={"gender.of_run": run_key, "gender.model": name,
                                            "gender.repeat": str(repeat)}) as child:  # fmt: skip
                    for record in json.loads(files.get("history.json", b"[]")):
                        step = int(record.get("epoch", 0))
                        mlflow.log_metrics({k: v for k, v in flat_metrics(record).items() if k != "epoch"}, step=step)
                    metrics = json.loads(files["metrics.json"])
                    test = flat_metrics(metrics.get("test") or {}, "test_")
                    final = {f"final_{k}": float(metrics[k]) for k in ("train_accuracy", "val_accuracy")
                             if isinstance(metrics.get(k), int | float)}  # fmt: skip
                    mlflow.log_metrics({**test, **final})
                    if repeat == 0:
                        mlflow.log_metrics({f"{name}_{k}": v for k, v in test.items()}, run_id=parent.info.run_id)
                    folder = Path(tmp, label)
                    folder.mkdir()
                    for file, data in files.items():
                        (folder / file).write_bytes(data)
                    mlflow.log_artifacts(str(folder), artifact_path="model")
                    versions[label] = _register(client, f"{model_prefix}{name}", child.info, run_key)
        for key in (layout.report_key(run_key), layout.results_key(run_key)):
            if storage.exists(key):
                path = Path(tmp, key.rpartition("/")[2])
                path.write_bytes(storage.get_bytes(key))
                mlflow.log_artifact(str(path), artifact_path="report")
        parent_id = parent.info.run_id
    log.info("logged run %s to MLflow (experiment %s, run %s; %d model versions)", run_key, experiment, parent_id,
             len(versions))  # fmt: skip
    return {"mlflow_run_id": parent_id, "experiment_id": experiment_id, "model_versions": versions}


def _register(client, name: str, run_info, run_key: str) -> str:
    """A new version of the registered model `name` (created if new) pointing at the run's model/ artifacts."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Gender classifier trained by the gender_classification "
                                       "DAG (torch.export model.pt2 with its model card).")  # fmt: skip
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"{run_info.artifact_uri}/model", run_id=run_info.run_id,
                                          tags={RUN_KEY_TAG: run_key})  # fmt: skip
    return str(version.version)
