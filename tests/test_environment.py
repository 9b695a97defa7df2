import re
from pathlib import Path

import pytest

from gender_tasks import environment
from gender_tasks.data.shards import DEFAULT_MEMORY_BUDGET, memory_budget
from gender_tasks.environment import (
    KINDS,
    VARIABLES,
    env_number,
    get_flag,
    get_list,
    get_number,
    get_path,
    get_text,
    get_whole,
)
from gender_tasks.errors import PermanentError
from gender_tasks.scheduling import tasks_per_gpu

VAR = "GENDER_TEST_NUMBER"


@pytest.mark.parametrize("raw, expected", [(None, 7.0), ("", 7.0), ("  ", 7.0), ("2.5", 2.5), (" 30 ", 30.0)])
def test_a_number_or_the_default(monkeypatch, raw, expected):
    if raw is not None:
        monkeypatch.setenv(VAR, raw)
    assert env_number(VAR, 7.0, says="a positive number", example="7") == expected


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "-inf", "ten", "1e400"])
def test_what_is_not_a_finite_positive_number_is_refused_in_words(monkeypatch, raw):
    monkeypatch.setenv(VAR, raw)
    with pytest.raises(PermanentError) as err:
        env_number(VAR, 7.0, says="a positive number of seconds", example="7", error=PermanentError)
    assert str(err.value) == f"{VAR}={raw!r} is not a positive number of seconds; set e.g. {VAR}=7"


def test_inclusive_minimum_and_whole_numbers(monkeypatch):
    monkeypatch.setenv(VAR, "0")
    assert env_number(VAR, 5, says="x", example="5", inclusive=True) == 0
    monkeypatch.setenv(VAR, "2.5")
    with pytest.raises(ValueError, match="not a whole"):
        env_number(VAR, 1, says="a whole number", example="1", whole=True, minimum=1, inclusive=True)
    monkeypatch.setenv(VAR, "3")
    assert env_number(VAR, 1, says="a whole number", example="1", whole=True) == 3


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "lots"])
def test_memory_budget_refuses_what_once_crashed_or_meant_nothing(monkeypatch, raw):
    # nan and inf used to pass the check and then crash converting to bytes.
    monkeypatch.setenv("GENDER_MEMORY_BUDGET_MB", raw)
    with pytest.raises(PermanentError, match=r"GENDER_MEMORY_BUDGET_MB=.* megabytes >= 0; set e.g."):
        memory_budget()


def test_memory_budget_and_tasks_per_gpu_read_their_variables(monkeypatch):
    monkeypatch.delenv("GENDER_MEMORY_BUDGET_MB", raising=False)
    monkeypatch.delenv("GENDER_TASKS_PER_GPU", raising=False)
    assert memory_budget() == DEFAULT_MEMORY_BUDGET and tasks_per_gpu() == 1
    monkeypatch.setenv("GENDER_MEMORY_BUDGET_MB", "0")
    monkeypatch.setenv("GENDER_TASKS_PER_GPU", "4")
    assert memory_budget() == 0 and tasks_per_gpu() == 4
    monkeypatch.setenv("GENDER_TASKS_PER_GPU", "1.5")
    with pytest.raises(PermanentError, match="GENDER_TASKS_PER_GPU='1.5' is not a positive whole number"):
        tasks_per_gpu()


# --- the table: every variable, typed, and the README generated from it ---------------------------------

REPO = Path(__file__).resolve().parent.parent
# What the package, its DAGs, its plugins and its benchmarks are made of (tests set their own variables).
SOURCES = sorted(p for folder in ("gender_tasks", "dags", "plugins", "bench") for p in (REPO / folder).rglob("*.py"))
# Reading a variable: os.environ.get / os.getenv / `in os.environ` / os.environ[...] not followed by an assignment.
DIRECT_READ = re.compile(r"environ\.get\(|os\.getenv\(|\bin\s+os\.environ\b|os\.environ\[[^\]]+\](?!\s*=[^=])")


def test_the_readme_table_is_the_one_generated_from_the_code():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert environment.with_env_table(readme) == readme, (
        "README.md's table of environment variables differs from gender_tasks/environment.py's VARIABLES: "
        "run `python -m gender_tasks env-table --write README.md` and commit the result"
    )


def test_no_module_reads_the_environment_but_through_the_table():
    """Every variable is read through an accessor of environment.py, so VARIABLES (and the README) list them all."""
    offenders = []
    for path in SOURCES:
        if path == REPO / "gender_tasks" / "environment.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if DIRECT_READ.search(line) or re.search(r"\benv_number\(", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "read these through gender_tasks.environment (get_number, get_text, ...):\n" + "\n".join(
        offenders
    )


def test_every_gender_variable_the_code_names_is_in_the_table():
    named = {m for p in SOURCES for m in re.findall(r"\bGENDER_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(encoding="utf-8"))}
    assert named - set(VARIABLES) == set(), "add these to gender_tasks.environment.VARIABLES"
    # ... and nothing in the table is left over from code that no longer reads it.
    code = "\n".join(p.read_text(encoding="utf-8") for p in SOURCES if p.name != "environment.py")
    unused = [name for name in VARIABLES if name not in code and name != "XDG_DATA_HOME"]
    assert unused == [], unused


def test_every_entry_is_typed_and_its_default_within_its_limits():
    for var in VARIABLES.values():
        assert var.kind in KINDS and var.description, var.name
        assert var.read in (environment.PARSE, environment.USE, environment.BOTH), var.name
        if var.kind in ("number", "whole", "flag"):
            assert var.says and var.example, var.name
        if var.kind in ("number", "whole"):
            low = var.default >= var.minimum if var.inclusive else var.default > var.minimum
            assert low and isinstance(var.default, int if var.kind == "whole" else float), var.name


def test_each_accessor_reads_its_kind_only_and_names_a_missing_entry():
    with pytest.raises(LookupError, match="GENDER_NOT_A_VARIABLE is not in gender_tasks.environment.VARIABLES"):
        get_text("GENDER_NOT_A_VARIABLE")
    with pytest.raises(LookupError, match="GENDER_TASKS_PER_GPU is a whole variable, not a number one"):
        get_number("GENDER_TASKS_PER_GPU")


def test_text_and_paths_are_stripped_and_blank_means_the_default(monkeypatch):
    monkeypatch.setenv("GENDER_TRAIN_QUEUE", "  gpu ")
    monkeypatch.setenv("GENDER_TRAIN_POOL", "   ")
    assert get_text("GENDER_TRAIN_QUEUE") == "gpu" and get_text("GENDER_TRAIN_POOL") == "default_pool"
    monkeypatch.delenv("GENDER_STORAGE", raising=False)
    assert get_text("GENDER_STORAGE") is None
    monkeypatch.setenv("GENDER_CACHE_DIR", " /tmp/cache ")
    assert get_path("GENDER_CACHE_DIR") == Path("/tmp/cache")
    monkeypatch.setenv("GENDER_CACHE_DIR", "")
    assert get_path("GENDER_CACHE_DIR") is None


@pytest.mark.parametrize(("raw", "value"), [(None, None), ("", None), ("auto", None), ("0", False), ("No", False),
                                            ("off", False), ("1", True), ("TRUE", True), (" yes ", True)])  # fmt: skip
def test_flags(monkeypatch, raw, value):
    if raw is None:
        monkeypatch.delenv("GENDER_GPU_RESIDENT", raising=False)
    else:
        monkeypatch.setenv("GENDER_GPU_RESIDENT", raw)
    assert get_flag("GENDER_GPU_RESIDENT") is value


def test_a_flag_that_is_not_one_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("GENDER_OFFLINE", "sure")
    with pytest.raises(PermanentError, match=r"^GENDER_OFFLINE='sure' is not a flag .*; set e.g. GENDER_OFFLINE=1$"):
        get_flag("GENDER_OFFLINE", error=PermanentError)
    monkeypatch.delenv("GENDER_OFFLINE")
    assert get_flag("GENDER_OFFLINE") is False


def test_a_list_tells_unset_from_empty(monkeypatch):
    """CUDA_VISIBLE_DEVICES unset: every GPU; set but empty: none."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert get_list("CUDA_VISIBLE_DEVICES") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert get_list("CUDA_VISIBLE_DEVICES") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 0, 1 ,,")
    assert get_list("CUDA_VISIBLE_DEVICES") == ["0", "1"]


def test_a_bad_whole_number_read_at_parse_time_names_the_variable(monkeypatch):
    monkeypatch.setenv("GENDER_MAX_ACTIVE_RUNS", "lots")
    with pytest.raises(ValueError, match=r"GENDER_MAX_ACTIVE_RUNS='lots' is not a positive whole number; set e.g."):
        get_whole("GENDER_MAX_ACTIVE_RUNS")
    monkeypatch.setenv("GENDER_MAX_ACTIVE_RUNS", " 4 ")
    assert get_whole("GENDER_MAX_ACTIVE_RUNS") == 4


def test_the_env_table_command_writes_the_block(tmp_path, capsys):
    from gender_tasks.cli import main

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{environment.TABLE_START}\nstale\n{environment.TABLE_END}\n\nrest\n")
    assert main(["env-table", "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nrest\n") and "stale" not in text
    assert all(f"| `{name}` |" in text for name in VARIABLES)
    assert main(["env-table", "--write", str(readme)]) == 0 and readme.read_text() == text
    assert "up to date" in capsys.readouterr().out
