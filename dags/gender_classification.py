"""
### Gender classification on AI-generated faces

Reproduces *Exploring Gender Classification Performance on AI-Generated Facial Datasets Using
Transfer Learning Models* end to end:

1. **ingest** the labeled faces (a folder, a zip, `s3://…` or `kaggle:owner/slug`) into object storage,
   content-addressed;
2. **split** 70/15/15, stratified and seeded;
3. **validate** counts, labels and images with Great Expectations (a failure stops the run and says why);
4. **preprocess** each image once per input size into a sharded uint8 cache;
5. **train** the study's four models as mapped tasks (custom CNN, ResNet50, InceptionV3, MobileNetV2), once per
   repeat (`repeats`: new split and seeds each), then their **ensemble** (weighted mean probability);
6. **report**: one self-contained HTML file, the study's Table 1 beside ours, with uncertainty and audits.

Runs on demand (trigger with the form) or on the cron schedule in `GENDER_SCHEDULE`.
All logic lives in the `gender_tasks` package; this file only wires it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

from gender_tasks import pipeline  # the steps; each imports what it needs (torch, pandas...) when it runs
from gender_tasks.environment import get_cron, get_text, get_whole  # every variable: environment.VARIABLES
from gender_tasks.settings import form_fields  # plain data: no heavy imports at parse time
from gender_tasks.timeouts import static_limits  # plain arithmetic over the profiles and the registry

# Training (and the label audit, which trains too) runs on this Celery queue and pool: in the full stack
# a `gpu` queue that the GPU workers consume and a `gpu` pool with one slot per GPU.
TRAIN_QUEUE = get_text("GENDER_TRAIN_QUEUE")
TRAIN_POOL = get_text("GENDER_TRAIN_POOL")
# Slowest model first: `train` is mapped over the models slowest first, and this strategy (registered by
# plugins/gender_scheduling.py) weights map index i as TRAIN_PRIORITY - 10 * i.
TRAIN_WEIGHT_RULE = "gender_scheduling.SlowestModelFirst"
TRAIN_PRIORITY = 100
# The label audit (k folds of the CNN) costs about one transfer model at the paper profile: it starts
# after the two big models and before the two small ones.
LABEL_AUDIT_PRIORITY = 85

# Each task's execution_timeout: sized for the largest run the settings accept; inside the task a tighter
# deadline sized for the run's own data applies (gender_tasks/timeouts.py). GENDER_TASK_TIMEOUT_SCALE scales both.
LIMITS = static_limits()

# The ingested dataset, as an Airflow asset: every ingest emits an event whose extra names the dataset
# (its content hash), so other DAGs can run when data lands (`schedule=[DATASET_ASSET]`).
DATASET_ASSET = Asset(name="gender_classification_dataset", uri="x-gender-classification://dataset",
                      group="dataset")  # fmt: skip
# The run's published models: the report emits it when the run is finished (extra: run_key, storage), and the
# gender_scoring DAG is scheduled on it.
MODEL_ASSET = Asset(name="gender_classification_models", uri="x-gender-classification://models", group="model")


def gpu_executor_config() -> dict:
    """On KubernetesExecutor: ask for GENDER_K8S_GPUS GPUs for the training pods; elsewhere nothing.

    Unset (the default) this imports nothing, so parsing stays cheap where Kubernetes is not used.
    """
    gpus = get_whole("GENDER_K8S_GPUS")
    if not gpus:
        return {}
    try:
        from kubernetes.client import models as k8s
    except ImportError:
        logging.getLogger(__name__).warning(
            "GENDER_K8S_GPUS=%s but the kubernetes client is not installed "
            "(apache-airflow-providers-cncf-kubernetes); no GPU limit set",
            gpus,
        )
        return {}
    resources = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)})
    # "base" is the task container's name in the pods KubernetesExecutor starts.
    return {
        "pod_override": k8s.V1Pod(spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", resources=resources)]))
    }


def _skip_if_off(step: Callable[..., dict], run: dict) -> None:
    """End the task as skipped (not a green success) when the run's settings leave the step out
    (pipeline.skip_reason: switched off, or an ensemble of one model).

    The reason is left as the task's result first: the report reads it instead of a missing XCom
    (which Airflow's client logs as an error)."""
    from airflow.sdk.exceptions import AirflowSkipException

    reason = pipeline.skip_reason(run, step.__name__)
    if reason is not None:
        get_current_context()["ti"].xcom_push(key="return_value", value={"skipped": reason})
        raise AirflowSkipException(reason)


@contextmanager
def _failures_for_airflow():
    """Bad input or settings (PermanentError) and a stopped local run (stopping.RunStopped) fail the task
    without retries; a step past its deadline fails as Airflow's own timeout does (retried: a hang can be
    transient); any other error is retried as it is. Each records its message first (`_record_failure`),
    for the reports pages."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowTaskTimeout

    from gender_tasks.errors import PermanentError
    from gender_tasks.stopping import RunStopped, check_in
    from gender_tasks.timeouts import TaskTimeLimitExceeded

    try:
        check_in()  # `python -m gender_tasks run`: SIGTERM stops the task, and later ones fail as they start
        yield
    except RunStopped as exc:  # not retried: the user asked the run to stop
        _record_failure(str(exc), permanent=True)
        raise AirflowFailException(str(exc)) from exc
    except PermanentError as exc:
        _record_failure(f"{type(exc).__name__}: {exc}", permanent=True)
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
    except TaskTimeLimitExceeded as exc:
        _record_failure(str(exc), permanent=False)
        raise AirflowTaskTimeout(str(exc)) from exc
    except AirflowException:
        raise  # an inner step's, recorded there
    except Exception as exc:  # retried: if it is the last try, this is why the task failed
        _record_failure(f"{type(exc).__name__}: {exc}", permanent=False)
        raise


# The XCom key of a failing step's message: the reports plugin shows it where users look (the report tab and
# the reports list). XCom, not a file in the run's storage or the task log: it lives in Airflow's database,
# which the plugin reads anyway, so it is there when the storage itself is what failed (a bad `storage`
# setting, a full disk), when `prepare` refuses a run before it has a storage folder, and whatever the log
# backend; and a retry clears it with the attempt's other XComs.
FAILURE_XCOM = "failure"


def _record_failure(message: str, *, permanent: bool) -> None:
    try:
        get_current_context()["ti"].xcom_push(key=FAILURE_XCOM, value={"error": message[:4000], "permanent": permanent})
    except Exception:  # noqa: BLE001 - the step's own error must surface, not this one's
        logging.getLogger(__name__).warning("could not record the failure for the reports page", exc_info=True)


def _call(step: Callable[..., dict], run: dict, *args, gpu: bool = False, **kwargs):
    """Call a pipeline step (`pipeline.split`, ...) within its deadline, sized for this run
    (gender_tasks.timeouts; the step's name, `step.__name__`, picks its budget)."""
    from gender_tasks.timeouts import run_deadline

    with _failures_for_airflow(), run_deadline(step.__name__, run, model_name=kwargs.get("model_name"), gpu=gpu):
        return step(run, *args, **kwargs)


@dag(
    dag_id="gender_classification",
    description="Trains the study's four gender classifiers on a folder of labeled faces and compares them "
    "with the paper's Table 1 (Comparison report tab on each run).",
    schedule=get_cron("GENDER_SCHEDULE"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Runs do not wait for one another: a run with bad settings reaches `prepare`, which refuses it in
    # seconds, even while another run trains. What must be bounded is training, and it is: train and
    # label_audit take slots of TRAIN_POOL (one per GPU in the full stack) and of the executor.
    max_active_runs=get_whole("GENDER_MAX_ACTIVE_RUNS"),
    tags=["ml", "gender-classification", "paper-reproduction"],
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": pendulum.duration(minutes=1)},
    doc_md=__doc__,
    # The trigger form, built from gender_tasks.settings.RunConfig: one source of defaults and limits.
    params={name: Param(**spec) for name, spec in form_fields().items()},
)
def gender_classification():
    # One run record travels down the chain (gender_tasks.pipeline): each task has one data edge.
    @task(execution_timeout=LIMITS["prepare"])
    def prepare() -> dict:
        context = get_current_context()
        return _call(pipeline.prepare, dict(context["params"]), run_id=context["run_id"])

    @task(outlets=[DATASET_ASSET], execution_timeout=LIMITS["ingest"])
    def ingest(run: dict) -> dict:
        run = _call(pipeline.ingest, run)
        dataset = run["dataset"]
        get_current_context()["outlet_events"][DATASET_ASSET].extra = {
            "dataset_id": dataset["dataset_id"], "manifest_uri": dataset["manifest_uri"], "images": dataset["images"],
            "storage": run["storage"],
        }  # fmt: skip
        return run

    @task(execution_timeout=LIMITS["split"])
    def split(run: dict) -> dict:
        return _call(pipeline.split, run)

    @task(execution_timeout=LIMITS["validate"])
    def validate(run: dict) -> dict:
        return _call(pipeline.validate, run)

    @task(execution_timeout=LIMITS["preprocess"])
    def preprocess(run: dict) -> dict:
        return _call(pipeline.preprocess, run)

    @task(execution_timeout=LIMITS["plan_training"])
    def plan_training(run: dict) -> list[dict]:
        from gender_tasks.scheduling import training_plan

        return training_plan(run["settings"]["models"], run["settings"]["repeats"])

    # The model's label ("resnet50", or "resnet50 #2" in a run with repeats) names the mapped task from the
    # moment it starts: the expanded arguments are in `task.op_kwargs` before execution, which is when
    # Airflow first renders this template.
    @task(queue=TRAIN_QUEUE, pool=TRAIN_POOL, map_index_template="{{ task.op_kwargs['label'] }}",
          priority_weight=TRAIN_PRIORITY, weight_rule=TRAIN_WEIGHT_RULE, executor_config=gpu_executor_config(),
          execution_timeout=LIMITS["train"])  # fmt: skip
    def train(model_name: str, repeat: int, label: str, run: dict) -> dict:
        from gender_tasks.scheduling import claim_gpu, parallel_training

        # One GPU of this worker's, before anything touches CUDA.
        with _failures_for_airflow(), claim_gpu() as claim:
            return _call(pipeline.train, run, model_name=model_name, parallel_tasks=parallel_training(),
                         repeat=repeat, gpu=claim.gpu is not None)  # fmt: skip

    @task(execution_timeout=LIMITS["ensemble"])
    def ensemble(run: dict) -> dict:
        _skip_if_off(pipeline.ensemble, run)
        return _call(pipeline.ensemble, run)

    @task(queue=TRAIN_QUEUE, pool=TRAIN_POOL, priority_weight=LABEL_AUDIT_PRIORITY, weight_rule="absolute",
          executor_config=gpu_executor_config(), execution_timeout=LIMITS["label_audit"])  # fmt: skip
    def label_audit(run: dict) -> dict:
        from gender_tasks.scheduling import claim_gpu, parallel_training

        _skip_if_off(pipeline.label_audit, run)
        with _failures_for_airflow(), claim_gpu() as claim:
            return _call(pipeline.label_audit, run, parallel_tasks=parallel_training(), gpu=claim.gpu is not None)

    # After the ensemble (it evaluates it too); still runs where a one-model run skipped it (none_failed).
    @task(trigger_rule="none_failed", execution_timeout=LIMITS["evaluate_external"])
    def evaluate_external(run: dict) -> dict:
        _skip_if_off(pipeline.evaluate_external, run)
        return _call(pipeline.evaluate_external, run)

    # Runs when a switched-off step was skipped (none_failed), not when one failed.
    @task(trigger_rule="none_failed", outlets=[MODEL_ASSET], execution_timeout=LIMITS["report"])
    def report(run: dict, trained: list[dict], ensembled: dict, audit: dict | None, external: dict | None) -> dict:
        # Index rather than iterate: iterating a mapped result probes one past its end (a logged 404).
        trained = [trained[i] for i in range(len(trained))]
        out = _call(pipeline.report, run, trained, label_audit=audit, external=external, ensembled=ensembled)
        get_current_context()["outlet_events"][MODEL_ASSET].extra = {"run_key": run["run_key"],
                                                                     "storage": run["storage"]}  # fmt: skip
        return out

    prepared = prepare()
    run = preprocess(validate(split(ingest(prepared))))
    # The plan needs only the settings: made early, so that when preprocess ends every training task is
    # ready at once and the priority weights (slowest model first, the audit after them) decide the order.
    trained = train.partial(run=run).expand_kwargs(plan_training(prepared))
    ensembled = ensemble(run)
    audit = label_audit(run)
    external = evaluate_external(run)
    trained >> ensembled >> external
    report(run, trained, ensembled, audit, external)


gender_classification()
