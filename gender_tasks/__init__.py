"""Logic of the synthetic-face gender classification pipeline, usable without Airflow.

Modules: config (settings, profiles), storage (local / S3), sources (folder, zip, S3, Kaggle),
ingest, split, validate (Great Expectations), preprocess, models, augment, train, metrics,
stats, report, pipeline (the steps the DAG calls), cli (`python -m gender_tasks`).
"""
