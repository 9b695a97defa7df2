"""Logic of the synthetic-face gender classification pipeline, usable without Airflow.

Layers, lowest first (the import contract in pyproject.toml keeps them so):
errors, environment; layout (every storage key), integrity (checksums), tables (safe CSV), resources;
storage (local folder / S3) and leases; models (the registry and networks); settings and scheduling;
timeouts; data (sources, folders, ingest, images, manifest, split, validate, shards, preprocess, filters);
evaluation (metrics, stats, repeats, health, predict, external sets); training (loop, recipe, trainer,
checkpoints, export, ensemble, label audit); reporting (the report, the UI's access); pipeline (the steps
the DAG calls); housekeeping (`gc`), verify (`verify`) and local_airflow; cli (`python -m gender_tasks`).
"""
