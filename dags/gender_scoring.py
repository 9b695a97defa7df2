"""
### Gender scoring: a trained model on new images

Scores a folder, a `.zip` or an `s3://` prefix of new, unlabeled face images with a model of the
`gender_classification` DAG: the run and model you name, or (the default) **the best model of the latest
successful run**, judged on validation accuracy. Writes `scoring/<key>/predictions.csv` (P(male), the
predicted class and the model's identity per image) and a summary (class shares, confidence histogram, the
images the model is least sure of, how the images differ from the training set), shown under Browse →
"Gender scoring summaries" and on each run's "Scoring summary" tab.

Runs when the training DAG publishes models (the `gender_classification_models` asset), on the cron in
`GENDER_SCORING_SCHEDULE` if set, or by hand. Scheduled runs score `GENDER_SCORING_SOURCE`. Scoring the same
images with the same model again does nothing; a killed run resumes after its last finished batch.
All logic lives in `gender_tasks.scoring`; this file only wires it.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

from gender_tasks.environment import get_cron, get_text  # every variable: environment.VARIABLES

# Emitted by gender_classification's report task when a run's models are published (its extra: run_key, storage).
MODEL_ASSET = Asset(name="gender_classification_models", uri="x-gender-classification://models", group="model")
SCHEDULE_CRON = get_cron("GENDER_SCORING_SCHEDULE") or ""


def _schedule():
    if not SCHEDULE_CRON:
        return [MODEL_ASSET]
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(SCHEDULE_CRON, timezone="UTC"), assets=[MODEL_ASSET])


@dag(
    dag_id="gender_scoring",
    description="Scores new, unlabeled face images with a trained gender classifier (Scoring summary tab on each run).",
    schedule=_schedule(),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "gender-classification", "scoring"],
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": pendulum.duration(minutes=1)},
    doc_md=__doc__,
    params={
        "source": Param(
            get_text("GENDER_SCORING_SOURCE") or "",
            type="string",
            title="Images to score",
            description="A folder, a .zip or an s3://bucket/prefix of images (no class folders).",
        ),
        "storage": Param(
            None,
            type=["null", "string"],
            title="Storage",
            description="Where the models are and the predictions go (empty: the default storage).",
        ),
        "run": Param(
            "latest",
            type="string",
            title="Training run",
            description="A gender_classification run id, or latest (the newest finished run).",
        ),
        "model": Param(
            "best",
            type="string",
            title="Model",
            description="cnn, resnet50, inceptionv3, mobilenetv2, ensemble, or best (on validation).",
        ),
        "batch_size": Param(256, type="integer", minimum=1, maximum=4096, title="Batch size"),
    },  # fmt: skip
)
def gender_scoring():
    @task(execution_timeout=pendulum.duration(hours=12))
    def score() -> dict:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from gender_tasks.errors import PermanentError
        from gender_tasks.scoring import request_from

        context = get_current_context()
        events = [e.extra for evs in (context.get("triggering_asset_events") or {}).values() for e in evs]
        request = request_from(dict(context["params"]), events, manual=context["dag_run"].run_type == "manual")
        if "skipped" in request:
            context["ti"].xcom_push(key="return_value", value=request)
            raise AirflowSkipException(request["skipped"])
        from gender_tasks.scoring import score_images

        try:
            return score_images(**request)
        except PermanentError as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    score()


gender_scoring()
