import pytest

from gender_tasks.data.shards import DEFAULT_MEMORY_BUDGET, memory_budget
from gender_tasks.environment import env_number
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
