"""Command line: `python -m gender_tasks run|predict|score|gc|verify|env-table`.

`run` executes the Airflow DAG once, end to end, in this process (Airflow's `dag.test()`, on the
embedded default: SQLite metadata database, local-folder storage), then prints where the report is.
`predict` classifies a folder of images with a trained model of a run and writes a CSV.
`score` scores a folder, zip or s3:// prefix of new images into the storage, as the gender_scoring DAG does.
`gc` removes old runs and whatever no manifest or kept run references from the storage.
`verify` checks every stored object against its checksum, and with --repair removes the corrupt ones.
`env-table` prints the README's table of environment variables (from environment.VARIABLES), or writes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .environment import get_number, get_text, variable

DAG_ID = "gender_classification"
KEEP_DAYS_VAR = "GENDER_KEEP_DAYS"
DEFAULT_KEEP_DAYS = variable(KEEP_DAYS_VAR).default  # 30
STORAGE_HELP = ("s3://bucket/prefix or a local folder (default: $GENDER_STORAGE, else store/ in $GENDER_DATA_DIR, "
                "else in the checkout's .data/ or, installed, ~/.local/share/gender-tasks)")  # fmt: skip


def airflow_env_defaults() -> None:
    """The embedded default's Airflow: AIRFLOW_HOME in the checkout (.airflow) with its dags and plugins,
    or, for an installed package, in the user's data folder (environment.user_data_home()/airflow), where
    the DAG folder must be given (AIRFLOW__CORE__DAGS_FOLDER: the package does not ship the DAG file)."""
    from .environment import source_checkout, user_data_home

    checkout = source_checkout()
    os.environ.setdefault("AIRFLOW_HOME", str(checkout / ".airflow" if checkout else user_data_home() / "airflow"))
    if checkout:
        os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(checkout / "dags"))
        os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(checkout / "plugins"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


def _preflight(conf: dict) -> dict:
    """Check settings, the source, the storage and the external sets before starting Airflow, so mistakes
    (and a dead storage endpoint) fail in seconds."""
    from .data.sources import check_source
    from .errors import PermanentError
    from .settings import resolve_settings
    from .storage import CONN_ID_VAR, StorageConfigError, StorageError, open_storage

    settings = resolve_settings(conf)
    check_source(settings.source)
    if get_text(CONN_ID_VAR):
        airflow_env_defaults()  # the connection is looked up in the AIRFLOW_HOME the run will use
    try:
        open_storage(settings.storage).check()  # reachable, bucket there, writable: bounded, see storage/s3.py
    except StorageError as exc:
        if isinstance(exc, PermanentError):
            raise
        # Unreachable is retryable inside the DAG, but nothing retries a pre-flight: starting Airflow
        # only to have every task fail on it helps no one, so it ends the command like bad settings.
        raise StorageConfigError(str(exc)) from exc
    if settings.external_eval:
        from .evaluation.external import parse_spec  # imports torch: only when there are sets to check

        for spec in settings.external_eval:
            parse_spec(spec)
    return settings


def run_dag(conf: dict) -> int:
    from .errors import PermanentError

    try:
        _preflight(conf)
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    airflow_env_defaults()
    from airflow.configuration import conf as airflow_conf  # noqa: PLC0415  (Airflow only for this command)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.dagrun import DagRun
    from airflow.utils import timezone
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType

    from . import stopping
    from .layout import report_key, run_key_for
    from .local_airflow import claim_run, prepare_airflow
    from .storage import open_storage

    dags_folder = airflow_conf.get("core", "dags_folder")
    bag = DagBag(dag_folder=dags_folder)
    if bag.import_errors:
        print(f"error: the DAG files do not import: {bag.import_errors}", file=sys.stderr)
        return 1
    if DAG_ID not in bag.dags:
        print(f"error: no DAG {DAG_ID!r} in {dags_folder}: set AIRFLOW__CORE__DAGS_FOLDER to the folder holding "
              "gender_classification.py (dags/ in the source checkout)", file=sys.stderr)  # fmt: skip
        return 2
    dag = bag.dags[DAG_ID]
    prepare_airflow(DAG_ID)  # ends runs whose process died; registers the DAG one process at a time
    # The run id dag.test() will give the run, known beforehand so that this process can claim it first.
    now = timezone.utcnow()
    run_id = DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=now, run_after=now)
    stopping.arm()  # SIGTERM stops the run within seconds (dag.test has no supervisor to do it)
    try:
        with claim_run(run_id):
            run = dag.test(run_conf=conf, logical_date=now, run_after=now)
    except stopping.RunStopped:  # between two tasks: dag.test itself was interrupted
        run = None
    finally:
        stopped_by = stopping.stop_requested()
        stopping.disarm()
    if stopped_by:
        print(f"\nerror: run {run_id} stopped by {stopped_by}. What it finished is kept: a new run with the same "
              "settings reuses its trained models and cache, and the label audit resumes after its stored folds.",
              file=sys.stderr)  # fmt: skip
        return 128 + signal.Signals[stopped_by].value
    storage = open_storage(conf.get("storage") or "")
    key = report_key(run_key_for(run.run_id))
    if run.state != DagRunState.SUCCESS or not storage.exists(key):
        failed = [ti.task_id for ti in run.get_task_instances() if ti.state == "failed"]
        print(f"\nerror: run {run.run_id} ended {run.state}; failed task(s): {failed}. "
              "The task log above says why.", file=sys.stderr)  # fmt: skip
        return 1
    where = storage.local_path(key) or storage.url(key)
    print(f"\nRun {run.run_id} succeeded.\nReport: {where}")
    return 0


def _keep_days_default() -> float:
    """GENDER_KEEP_DAYS (30 unset); a bad value ends the command with the error, naming the variable."""
    return get_number(KEEP_DAYS_VAR, error=lambda message: SystemExit(f"error: {message}"))


def collect_garbage(storage_uri: str | None, keep_days: float, dry_run: bool) -> int:
    from .errors import PermanentError
    from .housekeeping import collect_garbage as collect
    from .housekeeping import total_bytes
    from .storage import open_storage

    if keep_days < 0:
        print(f"error: --keep-days must be 0 or more, got {keep_days:g}", file=sys.stderr)
        return 2
    try:
        storage = open_storage(storage_uri or "")
        removals = collect(storage, keep_days=keep_days, dry_run=dry_run)
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verb = "would remove" if dry_run else "removed"
    for r in removals:
        print(f"{verb} {r.key} ({r.size:,} bytes): {r.reason}")
    print(f"{verb} {len(removals)} object(s), {total_bytes(removals):,} bytes, from {storage.uri}")
    return 0


def verify(storage_uri: str | None, dataset: str | None, run: str | None, repair: bool) -> int:
    """Check stored objects against their checksums; 0 if all are intact, 1 if any is corrupt, 2 on bad input."""
    from .errors import PermanentError
    from .storage import StorageError, open_storage
    from .verify import lines, verify_storage

    try:
        storage = open_storage(storage_uri or "")
        storage.check(writable=repair)
        report = verify_storage(storage, dataset=dataset, run=run, repair=repair)
    except (PermanentError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in lines(storage, report, repair=repair):
        print(line)
    return 1 if report.corrupt else 0


def score(args) -> int:
    """`score`: one line and exit 2 for bad input, as `predict`; prints where the predictions and summary are."""
    from .errors import PermanentError
    from .scoring import score_images
    from .storage import StorageError

    try:
        out = score_images(args.images, args.storage or "", run=args.run, model=args.model, batch_size=args.batch_size)
    except (PermanentError, StorageError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2 if isinstance(exc, PermanentError) else 1
    verb = "already scored (unchanged images, same model)" if out["unchanged"] else f"scored {out['images']} images"
    print(f"{verb} with {out['model']} of run {out['run_key']}\npredictions: {out['predictions_uri']}\n"
          f"summary: {out['summary_uri']}")  # fmt: skip
    return 0


def _parse_conf(text: str) -> dict | None:
    """--conf as a JSON object; anything else is reported (None) in words, not a traceback."""
    example = """give a JSON object, e.g. --conf '{"epochs": 3}'"""
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        print(f"error: --conf is not valid JSON ({exc}): {example}", file=sys.stderr)
        return None
    if not isinstance(conf, dict):
        print(f"error: --conf is a JSON {type(conf).__name__}, not an object: {example}", file=sys.stderr)
        return None
    return conf


def env_table(readme: Path | None) -> int:
    """Print the table of environment variables, or write it into `readme` between its markers."""
    from .environment import env_table as table
    from .environment import with_env_table

    if readme is None:
        print(table())
        return 0
    text = readme.read_text(encoding="utf-8")
    updated = with_env_table(text)
    if updated != text:
        readme.write_text(updated, encoding="utf-8")
    print(f"{readme}: the environment table is {'updated' if updated != text else 'up to date'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gender_tasks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the DAG once, end to end, in this process")
    run.add_argument("--source", help="folder, .zip, s3://bucket/prefix or kaggle:owner/slug")
    run.add_argument("--profile", help="paper | cpu | tiny")
    run.add_argument("--storage", help=STORAGE_HELP)
    run.add_argument("--models", help="comma-separated subset of cnn,resnet50,inceptionv3,mobilenetv2")
    run.add_argument("--epochs", type=int)
    run.add_argument("--weights", help="none | imagenet | folder or s3:// prefix of <model>.pth")
    run.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="FOLDER[?QUERY]",
        help="an external evaluation set (repeatable), e.g. '/data/utkface?age >= 16'",
    )
    run.add_argument("--repeats", type=int, help="rerun the split and every model with seeds seed..seed+N-1")
    run.add_argument("--no-label-audit", action="store_true", help="skip the out-of-fold label audit")
    run.add_argument("--conf", default="{}", help="more DAG params as JSON")

    pred = sub.add_parser("predict", help="classify a folder of images with a run's model")
    pred.add_argument(
        "--model", required=True, help="a model.pt2 file (or an earlier run's model.ts), or its storage URI"
    )
    pred.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    pred.add_argument("--out", required=True, type=Path, help="CSV to write")

    sc = sub.add_parser("score", help="score new images with a run's model into the storage (gender_scoring)")
    sc.add_argument("--images", required=True, help="a folder, a .zip or an s3://bucket/prefix of images")
    sc.add_argument("--storage", help=STORAGE_HELP)
    sc.add_argument("--run", default="latest", help="a training run id or run key (default: the latest finished)")
    sc.add_argument("--model", default="best", help="a model name, or best (on validation; the default)")
    sc.add_argument("--batch-size", type=int, default=256)

    gc = sub.add_parser("gc", help="remove old runs and objects no manifest or kept run references")
    gc.add_argument("--storage", help=STORAGE_HELP)
    gc.add_argument("--keep-days", type=float, default=None,
                    help=f"keep runs this many days (default: ${KEEP_DAYS_VAR} or {DEFAULT_KEEP_DAYS:g})")  # fmt: skip
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    ver = sub.add_parser("verify", help="check every stored object against its checksum (like fsck)")
    ver.add_argument("--storage", help="s3://bucket/prefix or a local folder (default: ./.data/store)")
    ver.add_argument("--dataset", help="only this dataset id (ds-...)")
    ver.add_argument("--run", help="only this run's folder (its run key, as under runs/)")
    ver.add_argument("--repair", action="store_true",
                     help="remove corrupt objects and what marks them reusable, so the next run rebuilds them")  # fmt: skip
    env = sub.add_parser("env-table", help="print the README's table of environment variables (environment.py)")
    env.add_argument("--write", type=Path, metavar="README", help="replace the table in this file instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "run":
        conf = _parse_conf(args.conf)
        if conf is None:
            return 2
        for key in ("source", "profile", "storage", "epochs", "weights", "repeats"):
            if getattr(args, key) not in (None, ""):
                conf[key] = getattr(args, key)
        if args.models:
            conf["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.external:
            conf["external_eval"] = args.external
        if args.no_label_audit:
            conf["label_audit"] = False
        return run_dag(conf)
    if args.command == "env-table":
        return env_table(args.write)
    if args.command == "verify":
        return verify(args.storage, args.dataset, args.run, args.repair)
    if args.command == "gc":
        keep = args.keep_days if args.keep_days is not None else _keep_days_default()
        return collect_garbage(args.storage, keep, args.dry_run)

    from .errors import PermanentError
    from .evaluation.predict import predict_folder
    from .storage import StorageError

    if args.command == "score":
        return score(args)
    try:
        n = predict_folder(args.model, args.images, args.out)
    except (PermanentError, StorageError) as exc:  # a missing or bad model or folder: one line, no traceback
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2 if isinstance(exc, PermanentError) else 1
    print(f"wrote {n} predictions to {args.out}")
    return 0
