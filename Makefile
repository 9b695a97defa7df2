# Two commands do all the set-up: `make run` and `make test` (each creates or reuses .venv).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SOURCE ?=
PROFILE ?= cpu
STORAGE ?=
EXTERNAL ?=
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export GENDER_DATA_DIR ?= $(CURDIR)/.data
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# VENV may be relative (to this folder) or absolute: `make ui VENV=/opt/venvs/gender`.
export PATH := $(abspath $(BIN)):$(PATH)
# The UI's port (`make ui PORT=8081`). Tasks reach the API server through the execution API URL, which
# must name the same port: `ui` sets both (and the base URL), unless they are set already.
PORT ?= 8080

.PHONY: run test test-fast ui lint bench venv clean

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(BIN)/.installed

$(AIRFLOW_HOME)/airflow.db: $(BIN)/.installed
	$(BIN)/airflow db migrate > /dev/null

# The DAG once, end to end, on the embedded default; prints where the report is.
run: $(BIN)/.installed $(AIRFLOW_HOME)/airflow.db
	$(BIN)/python -m gender_tasks run --profile "$(PROFILE)" $(if $(SOURCE),--source "$(SOURCE)") $(if $(STORAGE),--storage "$(STORAGE)") $(if $(EXTERNAL),--external "$(EXTERNAL)")

# The fast tier: unit tests, no training, no processes or servers started, no timeouts waited out (under a
# minute); the `slow` and `services` markers (pyproject.toml) set the rest apart. On TEST_WORKERS
# pytest-xdist workers too (721 tests: 24-43 s on two on a fast 2-core VM, 52-69 s on a slow one; bench/RESULTS.md).
TEST_WORKERS ?= 2
SLOW_TEST_WORKERS ?= 3
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow and not services" $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

# The full suite: the fast tier first (a broken unit fails within a minute), then the rest on
# SLOW_TEST_WORKERS pytest-xdist workers (three on two cores: about a quarter of the tier waits on processes,
# servers and timeouts; 486 s against 560 s on two on a fast VM, bench/RESULTS.md). `--dist loadfile` keeps a module on one
# worker: its module-scoped fixtures (a prepared run, an API server) are built once. Modules go out in
# collection order, the longest first (tests/conftest.py), not xdist's default of the most tests first.
# SLOW_TEST_WORKERS=0 runs it in this process; GENDER_TEST_CPU_LOG=file appends each module's CPU seconds.
test: test-fast
	$(BIN)/python -m pytest -m "slow or services" --durations=15 $(if $(filter-out 0,$(SLOW_TEST_WORKERS)),-n $(SLOW_TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The Airflow UI (and scheduler) on the embedded default: http://localhost:$(PORT)
ui: $(BIN)/.installed $(AIRFLOW_HOME)/airflow.db
	AIRFLOW__API__PORT=$(PORT) \
	AIRFLOW__API__BASE_URL="$${AIRFLOW__API__BASE_URL:-http://localhost:$(PORT)}" \
	AIRFLOW__CORE__EXECUTION_API_SERVER_URL="$${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://localhost:$(PORT)/execution/}" \
	$(BIN)/airflow standalone

# Benchmarks (not tests): ratios measured side by side in one run; figures go to bench/RESULTS.md.
bench: $(BIN)/.installed
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/ingest_bench.py

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:
	rm -rf .airflow .data
