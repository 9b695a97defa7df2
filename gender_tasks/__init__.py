"""Logic of the synthetic-face gender classification pipeline, usable without Airflow.

Layers, lowest first (the import contract in pyproject.toml keeps them so):
errors, environment (every variable), stopping (SIGTERM in a local run); layout (every storage key),
integrity (checksums), tables (safe CSV), resources; storage (the backends and their schemes); leases;
models (the registry and networks); settings and scheduling; timeouts; data (sources, folders, ingest with
its worker processes, images, attributes, manifest, split, near-duplicates, validate, shards, preprocess,
filters); evaluation (metrics, stats, repeats, health, predict, external sets); training (loop, recipe,
trainer, checkpoints, export, ensemble, label audit);
reporting (the report, the UI's access, the plugins' lazy app) and tracking (MLflow, opt-in); pipeline (the steps the DAG calls) and
scoring (new images with a published model); housekeeping (`gc`), verify (`verify`) and local_airflow; cli
(`python -m gender_tasks`).
"""
