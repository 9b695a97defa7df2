"""
### Gender classification on AI-generated faces

Reproduces *Exploring Gender Classification Performance on AI-Generated Facial Datasets Using
Transfer Learning Models* end to end:

1. **ingest** the labeled faces (a folder, a zip, `s3://…` or `kaggle:owner/slug`) into object storage,
   content-addressed;
2. **split** 70/15/15, stratified and seeded;
3. **validate** counts, labels and images with Great Expectations (a failure stops the run and says why);
4. **preprocess** each image once per input size into a sharded uint8 cache;
5. **train** the study's four models as mapped tasks (custom CNN, ResNet50, InceptionV3, MobileNetV2);
6. **report**: one self-contained HTML file, the study's Table 1 beside ours, with uncertainty and audits.

Runs on demand (trigger with the form) or on the cron schedule in `GENDER_SCHEDULE`.
All logic lives in the `gender_tasks` package; this file only wires it.
"""

from __future__ import annotations

import logging
import os

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

from gender_tasks.settings import form_fields  # plain data: no heavy imports at parse time

# Training (and the label audit, which trains too) runs on this Celery queue and pool: in the full stack
# a `gpu` queue that the GPU workers consume and a `gpu` pool with one slot per GPU.
TRAIN_QUEUE = os.environ.get("GENDER_TRAIN_QUEUE", "default")
TRAIN_POOL = os.environ.get("GENDER_TRAIN_POOL", "default_pool")
# Slowest model first: `train` is mapped over the models slowest first, and this strategy (registered by
# plugins/gender_scheduling.py) weights map index i as TRAIN_PRIORITY - 10 * i.
TRAIN_WEIGHT_RULE = "gender_scheduling.SlowestModelFirst"
TRAIN_PRIORITY = 100
# The label audit (k folds of the CNN) costs about one transfer model at the paper profile: it starts
# after the two big models and before the two small ones.
LABEL_AUDIT_PRIORITY = 85

# The ingested dataset, as an Airflow asset: every ingest emits an event whose extra names the dataset
# (its content hash), so other DAGs can run when data lands (`schedule=[DATASET_ASSET]`).
DATASET_ASSET = Asset(name="gender_classification_dataset", uri="x-gender-classification://dataset",
                      group="dataset")  # fmt: skip


def gpu_executor_config() -> dict:
    """On KubernetesExecutor: ask for GENDER_K8S_GPUS GPUs for the training pods; elsewhere nothing.

    Unset (the default) this imports nothing, so parsing stays cheap where Kubernetes is not used.
    """
    gpus = os.environ.get("GENDER_K8S_GPUS", "").strip()
    if not gpus or gpus == "0":
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
    resources = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": gpus})
    # "base" is the task container's name in the pods KubernetesExecutor starts.
    return {
        "pod_override": k8s.V1Pod(spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", resources=resources)]))
    }


def pipeline_run_key() -> str:
    """The storage folder of the current run (its run id made path-safe)."""
    from gender_tasks.layout import run_key_for

    return run_key_for(get_current_context()["run_id"])


def _step(name: str, *args, **kwargs):
    """Call gender_tasks.pipeline.<name>; bad input or settings fail the task without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from gender_tasks import pipeline
    from gender_tasks.errors import PermanentError

    try:
        return getattr(pipeline, name)(*args, **kwargs)
    except PermanentError as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


@dag(
    dag_id="gender_classification",
    schedule=os.environ.get("GENDER_SCHEDULE") or None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "gender-classification", "paper-reproduction"],
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": pendulum.duration(minutes=1)},
    doc_md=__doc__,
    # The trigger form, built from gender_tasks.settings.RunConfig: one source of defaults and limits.
    params={name: Param(**spec) for name, spec in form_fields().items()},
)
def gender_classification():
    @task
    def prepare() -> dict:
        return _step("prepare", dict(get_current_context()["params"]))

    @task(outlets=[DATASET_ASSET])
    def ingest(settings: dict) -> dict:
        dataset = _step("ingest", settings)
        get_current_context()["outlet_events"][DATASET_ASSET].extra = {
            "dataset_id": dataset["dataset_id"], "manifest_uri": dataset["manifest_uri"], "images": dataset["images"],
            "storage": settings["storage"],
        }  # fmt: skip
        return dataset

    @task
    def split(settings: dict, dataset: dict) -> dict:
        return _step("split", settings, dataset)

    @task
    def validate(settings: dict, split_info: dict) -> dict:
        return _step("validate", settings, split_info)

    @task
    def preprocess(settings: dict, dataset: dict, split_info: dict) -> dict:
        return _step("preprocess", settings, dataset, split_info)

    @task
    def plan_training(settings: dict) -> list[str]:
        from gender_tasks.scheduling import order_slowest_first

        return order_slowest_first(settings["models"])

    @task(queue=TRAIN_QUEUE, pool=TRAIN_POOL, map_index_template="{{ model_name }}", priority_weight=TRAIN_PRIORITY,
          weight_rule=TRAIN_WEIGHT_RULE, executor_config=gpu_executor_config())  # fmt: skip
    def train(model_name: str, settings: dict, dataset: dict, split_info: dict) -> dict:
        from gender_tasks.scheduling import claim_gpu

        get_current_context()["model_name"] = model_name
        parallel = int(os.environ.get("GENDER_PARALLEL_TRAINING", "1"))
        with claim_gpu():  # one GPU of this worker's, before anything touches CUDA
            return _step("train", settings, dataset, split_info, model_name, pipeline_run_key(),
                         parallel_tasks=parallel)  # fmt: skip

    @task(queue=TRAIN_QUEUE, pool=TRAIN_POOL, priority_weight=LABEL_AUDIT_PRIORITY, weight_rule="absolute",
          executor_config=gpu_executor_config())  # fmt: skip
    def label_audit(settings: dict, dataset: dict, split_info: dict) -> dict:
        from gender_tasks.scheduling import claim_gpu

        run_key = pipeline_run_key()
        parallel = int(os.environ.get("GENDER_PARALLEL_TRAINING", "1"))
        with claim_gpu():
            return _step("label_audit", settings, dataset, split_info, run_key, parallel_tasks=parallel)

    @task
    def evaluate_external(settings: dict) -> dict:
        return _step("evaluate_external", settings, pipeline_run_key())

    @task
    def report(settings: dict, dataset: dict, split_info: dict, validation: dict, trained: list[dict],
               audit: dict, external: dict) -> dict:  # fmt: skip
        run_id = get_current_context()["run_id"]
        durations = {"ingest": dataset["seconds"], "split": split_info["seconds"], "validate": validation["seconds"]}
        # Index rather than iterate: iterating a mapped result probes one past its end (a logged 404).
        durations |= {f"train {t['model']}": t["seconds"] for t in (trained[i] for i in range(len(trained)))}
        durations |= {"label audit": audit["seconds"], "external evaluation": external["seconds"]}
        return _step("report", settings, dataset, split_info, validation, pipeline_run_key(),
                     run_id=run_id, task_durations=durations, label_audit=audit)  # fmt: skip

    settings = prepare()
    dataset = ingest(settings)
    split_info = split(settings, dataset)
    validation = validate(settings, split_info)
    caches = preprocess(settings, dataset, split_info)
    trained = train.partial(settings=settings, dataset=dataset, split_info=split_info).expand(
        model_name=plan_training(settings)
    )
    audit = label_audit(settings, dataset, split_info)
    external = evaluate_external(settings)
    validation >> caches >> [trained, audit]
    trained >> external
    report(settings, dataset, split_info, validation, trained, audit, external)


gender_classification()
