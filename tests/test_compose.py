"""docker-compose.yaml: valid against the Compose Specification, and consistent with the DAG and Airflow 3.3.

There is no Docker engine here, so this checks the file itself: the schema (tests/data/compose-spec.json,
from the docker-compose 1.29.2 package, see tests/data/README.md), after Compose's own variable
interpolation with the file's defaults; then what the schema cannot know: one image, environment and
mounts for every Airflow service, workers for every queue the DAG uses, a GPU for the gpu worker,
health checks behind every `service_healthy`, and the Airflow classes the file names exist.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yaml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        braced = _BRACED.match(m["braced"])
        assert braced, f"invalid interpolation ${{{m['braced']}}}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        is_set, non_empty = name in env, bool(env.get(name))
        if op in (None, ""):
            return env.get(name, "")
        if op in (":-", "-"):
            return env[name] if (non_empty if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            assert non_empty if op == ":?" else is_set, f"required variable {name}: {arg}"
            return env[name]
        return arg if (non_empty if op == ":+" else is_set) else ""

    return _VAR.sub(sub, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def validator():
    from jsonschema import validators

    schema = json.loads(SCHEMA.read_text())
    cls = validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _airflow_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("airflow-")}


_ARITHMETIC = re.compile(r"\$\(\((\d+)\*(\d+)\)\)")  # bash's $((a*b)), as the compose file writes products


def _command(svc: dict) -> list[str]:
    """The service's command; a `bash -c "exec airflow ..."` wrapper unwrapped to the Airflow command,
    its $((a*b)) products worked out as bash would."""
    cmd = svc.get("command", [])
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if cmd[:2] == ["bash", "-c"] and cmd[2].startswith("exec airflow "):
        cmd = shlex.split(cmd[2].removeprefix("exec airflow "))
    return [_ARITHMETIC.sub(lambda m: str(int(m[1]) * int(m[2])), arg) for arg in cmd]


def _workers(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in _airflow_services(compose).items() if _command(svc)[:2] == ["celery", "worker"]}


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _worker_queues(svc: dict) -> set[str]:
    from airflow.configuration import conf

    queues = _option(_command(svc), "--queues", "-q")
    return set(queues.split(",")) if queues else {conf.get("operators", "default_queue")}


def _gpu_devices(svc: dict) -> list[dict]:
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def _dag_queues_and_pools(monkeypatch, env: dict) -> dict[str, tuple[str, str]]:
    """Each task's (queue, pool) when the DAG is parsed with the compose file's environment."""
    from airflow.dag_processing.dagbag import DagBag

    for key in ("GENDER_TRAIN_QUEUE", "GENDER_TRAIN_POOL", "GENDER_SCHEDULE", "GENDER_SOURCE", "GENDER_STORAGE"):
        monkeypatch.setenv(key, env[key])
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return {t.task_id: (t.queue, t.pool) for t in bag.dags["gender_classification"].tasks}


# --- The Compose Specification -------------------------------------------------------------------


def test_schema_is_the_compose_specification(validator):
    assert validator.schema["title"] == "Compose Specification"


def test_compose_file_is_valid_against_the_compose_schema(compose, validator):
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["services"]["airflow-worker"].update(queues="default"),  # not a Compose key
        lambda c: c["services"]["airflow-worker"]["depends_on"]["redis"].update(condition="service_ready"),
        lambda c: c["services"]["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0].update(
            gpus=1
        ),
        lambda c: c["services"]["postgres"]["healthcheck"].update(retries="five"),
    ],
    ids=["unknown-service-key", "bad-depends-on-condition", "unknown-device-key", "retries-not-a-number"],
)
def test_the_schema_rejects_a_broken_file(compose, validator, break_it):
    """The validation is not vacuous: the same file, broken in one place, fails it."""
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert list(validator.iter_errors(broken))


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    cases = {"$$HOME": "$HOME", "${SET:-d}": "x", "${EMPTY:-d}": "d", "${EMPTY-d}": "", "${UNSET-d}": "d",
             "${UNSET}": "", "$SET/y": "x/y", "${SET:+alt}": "alt", "${EMPTY:+alt}": ""}  # fmt: skip
    assert {k: interpolate(k, env) for k in cases} == cases
    with pytest.raises(AssertionError):
        interpolate("${EMPTY:?needed}", env)


# --- One image, one environment, one set of mounts -----------------------------------------------


def test_every_airflow_service_shares_the_common_image_environment_and_mounts(compose):
    common = compose["x-airflow-common"]
    services = _airflow_services(compose)
    assert {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
            "airflow-worker-gpu", "airflow-init"} <= set(services)  # fmt: skip
    for name, svc in services.items():
        assert svc["image"] == common["image"] and svc["build"] == common["build"], name
        assert svc["volumes"] == common["volumes"], name
        env = svc["environment"]
        assert {k: env.get(k) for k in common["environment"]} == common["environment"], name
        if name != "airflow-init":  # the init runs as root to create and chown the mounted folders
            assert svc["user"] == common["user"], name
    # The image is built from the project's requirements, not installed at start-up.
    assert common["build"]["dockerfile"] == "Dockerfile"
    assert not any("_PIP_ADDITIONAL_REQUIREMENTS" in svc.get("environment", {}) for svc in services.values())
    for folder in ("dags", "plugins", "include", "gender_tasks"):
        assert f"./{folder}:/opt/airflow/{folder}" in common["volumes"], folder


def test_the_image_is_built_from_the_pinned_airflow_and_requirements():
    import airflow

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG AIRFLOW_VERSION={re.escape(airflow.__version__)}$", dockerfile, re.M), airflow.__version__
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}", dockerfile, re.M)
    assert "-r /opt/airflow/requirements.txt" in dockerfile
    assert f"apache-airflow[celery,postgres,redis]=={airflow.__version__}" in (REPO / "requirements.txt").read_text()


# --- Airflow 3.3 itself --------------------------------------------------------------------------


def test_the_airflow_classes_the_file_names_exist(compose):
    env = compose["x-airflow-common"]["environment"]
    module, _, name = env["AIRFLOW__CORE__AUTH_MANAGER"].rpartition(".")
    assert hasattr(importlib.import_module(module), name)
    apps = set()
    for svc in _airflow_services(compose).values():
        test = svc.get("healthcheck", {}).get("test", [])
        apps |= set(re.findall(r"--app\s+(\S+)", " ".join(test) if isinstance(test, list) else test))
    assert apps == {"airflow.providers.celery.executors.celery_executor.app"}
    for app in apps:
        module, _, name = app.rpartition(".")
        assert hasattr(importlib.import_module(module), name), app


def test_simple_auth_manager_login_is_provisioned(compose):
    """SimpleAuthManager reads users from config and passwords from a file; FAB's user creation does not apply."""
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    user, role = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(":")
    assert (user, role) == ("airflow", "admin")
    init = compose["services"]["airflow-init"]
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].rsplit("/", 1)[1] in " ".join(_command(init))
    assert init["environment"]["_AIRFLOW_WWW_USER_USERNAME"] == user
    for name, svc in compose["services"].items():
        assert "_AIRFLOW_WWW_USER_CREATE" not in svc.get("environment", {}), f"{name}: `airflow users create` is FAB's"


def test_components_reach_each_other(compose):
    env = compose["x-airflow-common"]["environment"]
    services = compose["services"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"], "components must share one JWT secret"
    api = re.match(r"http://([\w-]+):(\d+)/execution/$", env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert api and api[1] in services and f"{api[2]}:{api[2]}" in services[api[1]]["ports"]
    for key, service in (("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgres"), ("AIRFLOW__CELERY__RESULT_BACKEND",
                         "postgres"), ("AIRFLOW__CELERY__BROKER_URL", "redis"), ("AWS_ENDPOINT_URL", "minio")):  # fmt: skip
        assert re.search(rf"[@/]{service}[:/]", env[key]), (key, env[key])


def test_the_init_creates_the_train_pool_with_tasks_per_gpu_slots_per_gpu(compose):
    init = " ".join(_command(compose["services"]["airflow-init"]))
    pool = compose["x-airflow-common"]["environment"]["GENDER_TRAIN_POOL"]
    assert "airflow db migrate" in init
    assert re.search(rf'airflow pools set "{pool}" "1"', init), init
    custom = load_compose({"GPU_COUNT": "4", "GPUS_PER_WORKER": "4"})
    assert 'airflow pools set "gpu" "4"' in " ".join(_command(custom["services"]["airflow-init"]))
    shared = load_compose({"GPU_COUNT": "3", "GENDER_TASKS_PER_GPU": "2"})
    assert 'airflow pools set "gpu" "6"' in " ".join(_command(shared["services"]["airflow-init"]))


# --- Queues, GPUs and start-up order -------------------------------------------------------------


def test_workers_consume_every_queue_the_dag_uses(compose, monkeypatch):
    tasks = _dag_queues_and_pools(monkeypatch, compose["x-airflow-common"]["environment"])
    used = {queue for queue, _ in tasks.values()}
    assert used == {"default", "gpu"}, tasks
    consumed = set().union(*(_worker_queues(svc) for svc in _workers(compose).values()))
    assert used <= consumed, f"no worker consumes {used - consumed}"
    assert tasks["train"] == ("gpu", "gpu") and tasks["label_audit"] == ("gpu", "gpu")


def test_the_gpu_queue_is_consumed_by_a_worker_with_an_nvidia_gpu_per_task(compose):
    queue = compose["x-airflow-common"]["environment"]["GENDER_TRAIN_QUEUE"]
    (gpu_worker,) = [svc for svc in _workers(compose).values() if queue in _worker_queues(svc)]
    (device,) = _gpu_devices(gpu_worker)
    concurrency = _option(_command(gpu_worker), "--concurrency", "-c")
    assert concurrency is not None and int(device["count"]) == int(concurrency), (device, concurrency)
    # The CPU worker reserves no GPU and never takes training.
    for svc in _workers(compose).values():
        if svc is not gpu_worker:
            assert not _gpu_devices(svc) and queue not in _worker_queues(svc)
    # Scaled up, the GPU count, the worker's concurrency and the pool move together.
    big = load_compose({"GPUS_PER_WORKER": "2", "GPU_COUNT": "2"})["services"]["airflow-worker-gpu"]
    assert int(_gpu_devices(big)[0]["count"]) == int(_option(_command(big), "--concurrency", "-c")) == 2
    # Several tasks per GPU: the worker runs GPUs x tasks-per-GPU processes, and its tasks know the setting.
    packed = load_compose({"GPUS_PER_WORKER": "2", "GENDER_TASKS_PER_GPU": "4"})["services"]["airflow-worker-gpu"]
    assert int(_gpu_devices(packed)[0]["count"]) == 2 and _option(_command(packed), "--concurrency") == "8"
    assert packed["environment"]["GENDER_TASKS_PER_GPU"] == "4"


def test_without_gpus_training_falls_back_to_the_cpu_worker(monkeypatch):
    cpu = load_compose({"GENDER_TRAIN_QUEUE": "default", "GENDER_TRAIN_POOL": "default_pool"})
    tasks = _dag_queues_and_pools(monkeypatch, cpu["x-airflow-common"]["environment"])
    assert {q for q, _ in tasks.values()} == {"default"} and {p for _, p in tasks.values()} == {"default_pool"}
    assert "default" in _worker_queues(cpu["services"]["airflow-worker"])
    # The init leaves default_pool's size alone (the shell test below is false, so `pools set` is skipped).
    assert '[[ "default_pool" != default_pool ]]' in " ".join(_command(cpu["services"]["airflow-init"]))


def test_depends_on_conditions_are_satisfiable(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            target = services[dep]
            if spec["condition"] == "service_healthy":
                check = target.get("healthcheck")
                assert check and not check.get("disable") and check.get("test"), f"{name}: {dep} has no healthcheck"
            elif spec["condition"] == "service_completed_successfully":
                assert target.get("restart", "no") == "no", f"{name}: {dep} must exit, yet restarts"
    # Start-up order: nothing of Airflow starts before the database schema and the bucket exist.
    for name, svc in _airflow_services(compose).items():
        deps = svc["depends_on"]
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
        if name != "airflow-init":
            assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    for name, svc in _workers(compose).items():
        assert svc["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy", name
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(_command(services["minio-init"]))
