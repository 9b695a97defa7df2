"""The label audit's ranking (training.label_audit.label_quality): cleanlab's adjusted self-confidence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gender_tasks.training.label_audit import audit_table, label_quality


def test_label_quality_by_hand():
    # Thresholds: female mean P(female) over the female-labeled = (0.9 + 0.4) / 2 = 0.65; male (0.7 + 0.3) / 2
    # = 0.5. Each row less the thresholds, plus the larger one (0.65): row 0 = [0.9, 0.25], sum 1.15; its
    # given label (female) scores 0.9 / 1.15.
    y = np.array([0, 0, 1, 1])
    prob_male = np.array([0.1, 0.6, 0.7, 0.3])
    expected = [0.9 / 1.15, 0.4 / 1.15, 0.85 / 1.15, 0.45 / 1.15]
    assert label_quality(y, prob_male) == pytest.approx(expected)


def test_an_image_that_stands_out_in_its_own_class_ranks_before_a_class_the_model_is_unsure_of():
    # The model is sure of females (P(female) 0.9) and unsure of males (P(male) about 0.5). Ranked by
    # P(given label) alone, an ordinary male at 0.30 comes before the female-labeled image at 0.35 that
    # the model, sure of every other female, doubts; the adjusted ranking puts that one first.
    y = np.array([0] * 20 + [1] * 20)
    prob_male = np.concatenate([[0.65], np.full(19, 0.1), [0.3], np.full(19, 0.52)])
    given = np.where(y == 1, prob_male, 1 - prob_male)
    assert np.argmin(given) == 20  # the unsure class's image, by P(given label)
    assert np.argmin(label_quality(y, prob_male)) == 0


def test_the_ranking_is_invariant_to_which_class_is_called_positive():
    rng = np.random.default_rng(0)
    y, prob = rng.integers(0, 2, 200), rng.random(200)
    np.testing.assert_allclose(label_quality(y, prob), label_quality(1 - y, 1 - prob), atol=1e-12)


def test_one_class_only_still_ranks_by_p_given_label():
    y, prob = np.zeros(5, dtype=int), np.array([0.1, 0.9, 0.5, 0.2, 0.7])
    assert np.argsort(-label_quality(y, prob)).tolist() == np.argsort(prob).tolist()


def test_audit_table_puts_the_least_plausible_label_first():
    rows = pd.DataFrame({"key": list("abcd"), "source_path": [f"{c}.png" for c in "abcd"],
                         "label": ["female", "female", "male", "male"], "split": ["train"] * 4})  # fmt: skip
    table = audit_table(rows, np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.3], dtype=np.float32),
                        np.array([0, 1, 0, 1]))  # fmt: skip
    assert table["key"].tolist() == ["b", "d", "c", "a"]
    assert table.columns.tolist() == ["key", "source_path", "label", "split", "fold", "prob_male", "p_given_label",
                                      "label_quality"]  # fmt: skip
    assert table["p_given_label"].tolist() == pytest.approx([0.4, 0.3, 0.7, 0.9])


def _in_memory(n: int, side: int = 2):
    import torch

    from gender_tasks.training.batches import SplitData

    return SplitData(torch.zeros((n, side, side, 3), dtype=torch.uint8), torch.zeros(n), [str(i) for i in range(n)])


@pytest.fixture
def four_cpu_cores(monkeypatch):
    import torch

    from gender_tasks.training import label_audit as audit_mod

    monkeypatch.delenv("GENDER_TORCH_THREADS", raising=False)
    monkeypatch.delenv("GENDER_MEMORY_BUDGET_MB", raising=False)
    monkeypatch.setattr(audit_mod, "usable_cores", lambda: 4)
    monkeypatch.setattr(audit_mod, "pick_device", lambda: torch.device("cpu"))
    return audit_mod


def test_fold_workers_share_out_the_task_cores_one_thread_each(four_cpu_cores):
    workers = four_cpu_cores.fold_workers
    assert workers(10, _in_memory(994), 1) == 4  # four cores, one thread a fold
    assert workers(3, _in_memory(994), 1) == 3  # no more than the folds left
    assert workers(10, _in_memory(994), 2) == 2  # two tasks share the cores
    assert workers(10, _in_memory(994), 4) == 1  # this task's share is one core: in-process
    assert workers(1, _in_memory(994), 1) == 1  # one fold left (a resumed audit)


def test_fold_workers_honour_the_thread_setting_and_the_memory_budget(four_cpu_cores, monkeypatch):
    workers = four_cpu_cores.fold_workers
    monkeypatch.setenv("GENDER_TORCH_THREADS", "2")
    assert workers(10, _in_memory(994), 1) == 2  # two threads a fold on four cores
    monkeypatch.delenv("GENDER_TORCH_THREADS")
    monkeypatch.setenv("GENDER_MEMORY_BUDGET_MB", "100")
    # the task's copy plus, per worker, the mapped images and its fold's copy: 1 + 2w copies of 18 MB <= 100 MB
    assert workers(10, _in_memory(994, side=80), 1) == 2


def test_folds_train_in_the_task_on_a_gpu_a_stream_or_a_small_set(four_cpu_cores, monkeypatch):
    import torch

    from gender_tasks.training.batches import StreamedSplit

    workers = four_cpu_cores.fold_workers
    assert workers(10, _in_memory(four_cpu_cores.PARALLEL_MIN_IMAGES - 1), 1) == 1
    streamed = StreamedSplit.__new__(StreamedSplit)  # only its type matters here
    assert workers(10, streamed, 1) == 1
    monkeypatch.setattr(four_cpu_cores, "pick_device", lambda: torch.device("cuda"))
    assert workers(10, _in_memory(994), 1) == 1


def test_folds_train_in_the_task_where_it_may_not_start_processes(four_cpu_cores, monkeypatch, caplog):
    """A Celery worker's pool process is daemonic, and multiprocessing refuses a daemon children ("daemonic
    processes are not allowed to have children", found by running the audit under Celery): the folds then
    train in the task, saying why."""
    import multiprocessing

    class Daemonic:
        daemon = True

    caplog.set_level("INFO")
    monkeypatch.setattr(multiprocessing, "current_process", lambda: Daemonic())
    assert four_cpu_cores.fold_workers(10, _in_memory(994), 1) == 1
    assert "daemonic process (a Celery worker's pool)" in caplog.text
