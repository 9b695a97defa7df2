"""gender_tasks.evaluation.repeats: the corrected resampled t-test, summaries, first-rank counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gender_tasks.evaluation.repeats import (
    corrected_resampled_ttest,
    pairwise_corrected_tests,
    rank_first_counts,
    summarise_repeats,
    t_interval,
)

DIFFS = [0.02, 0.03, 0.01, 0.04, 0.02]


def test_worked_example_by_hand():
    # mean = 0.12 / 5 = 0.024; deviations -0.004, 0.006, -0.014, 0.016, -0.004;
    # squares sum to 520e-6, so var(ddof=1) = 520e-6 / 4 = 1.3e-4.
    # Correction factor 1/J + n_test/n_train = 1/5 + 150/700 = 0.2 + 0.2142857... = 0.4142857...
    # t = 0.024 / sqrt(0.4142857 * 1.3e-4) = 0.024 / sqrt(5.3857143e-5) = 0.024 / 0.0073388 = 3.27032
    expected_t = 0.024 / math.sqrt((1 / 5 + 150 / 700) * 1.3e-4)
    assert expected_t == pytest.approx(3.2703150, abs=1e-6)
    # Student t with 4 df has a closed-form CDF: F(t) = 1/2 + (3/4) s (1 - s^2/3), s = t / sqrt(t^2 + 4),
    # so p = 2 (1 - F(t)) = 1 - (3/2) s (1 - s^2/3) = 0.030780...
    s = expected_t / math.sqrt(expected_t**2 + 4)
    expected_p = 1 - 1.5 * s * (1 - s**2 / 3)
    assert expected_p == pytest.approx(0.0307800, abs=1e-6)

    res = corrected_resampled_ttest(DIFFS, n_train=700, n_test=150)
    assert res["t"] == pytest.approx(3.2703150, abs=1e-6)
    assert res["p"] == pytest.approx(0.0307800, abs=1e-6)
    assert res["p"] == pytest.approx(2 * stats.t.sf(expected_t, 4), rel=1e-12)
    assert res["df"] == 4 and res["n"] == 5
    assert res["mean"] == pytest.approx(0.024)
    assert res["std"] == pytest.approx(math.sqrt(1.3e-4))


def test_correction_is_more_conservative_than_the_plain_paired_t_test():
    plain = stats.ttest_1samp(DIFFS, 0.0)
    corrected = corrected_resampled_ttest(DIFFS, 700, 150)
    assert plain.statistic == pytest.approx(0.024 / math.sqrt(1.3e-4 / 5))  # the uncorrected t, 4.7068
    assert corrected["t"] < plain.statistic and corrected["p"] > plain.pvalue


def test_sign_and_symmetry():
    pos = corrected_resampled_ttest(DIFFS, 700, 150)
    neg = corrected_resampled_ttest([-d for d in DIFFS], 700, 150)
    assert neg["t"] == pytest.approx(-pos["t"]) and neg["p"] == pytest.approx(pos["p"])


def test_zero_variance():
    same = corrected_resampled_ttest([0.03, 0.03, 0.03], 700, 150)
    assert same["t"] == math.inf and same["p"] == 0.0 and same["std"] == 0.0
    assert corrected_resampled_ttest([-0.01] * 4, 700, 150)["t"] == -math.inf
    none = corrected_resampled_ttest([0.0, 0.0, 0.0], 700, 150)
    assert none["t"] == 0.0 and none["p"] == 1.0


def test_single_repeat_cannot_be_tested():
    res = corrected_resampled_ttest([0.05], 700, 150)
    assert math.isnan(res["t"]) and math.isnan(res["p"]) and res["df"] == 0 and res["mean"] == 0.05


def test_invalid_input():
    with pytest.raises(ValueError):
        corrected_resampled_ttest([], 700, 150)
    with pytest.raises(ValueError):
        corrected_resampled_ttest([0.1, 0.2], 0, 150)


REPEATS = [
    {"cnn": {"test_accuracy": 0.80, "f1": 0.79, "test": {"nested": 1}}, "resnet50": {"test_accuracy": 0.78}},
    {"cnn": {"test_accuracy": 0.84, "f1": 0.83}, "resnet50": {"test_accuracy": 0.84}},
    {"cnn": {"test_accuracy": 0.82, "f1": None}, "resnet50": {"test_accuracy": 0.80}},
]


def test_summarise_repeats():
    s = summarise_repeats(REPEATS)
    acc = s["cnn"]["test_accuracy"]
    assert acc["mean"] == pytest.approx(0.82) and acc["std"] == pytest.approx(0.02)
    assert (acc["min"], acc["max"], acc["n"]) == (0.80, 0.84, 3)
    # The interval is the t-interval of the logits, transformed back: logit(0.80, 0.84, 0.82) = 1.38629,
    # 1.65823, 1.51635; mean 1.52029, sd 0.13601, half-width 4.3027 * 0.13601 / sqrt(3) = 0.33787.
    logits = np.log(np.array([0.80, 0.84, 0.82]) / (1 - np.array([0.80, 0.84, 0.82])))
    half = stats.t.ppf(0.975, 2) * logits.std(ddof=1) / math.sqrt(3)
    assert (logits.mean(), half) == (pytest.approx(1.52029, abs=1e-5), pytest.approx(0.33787, abs=1e-5))
    expit = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert acc["ci_low"] == pytest.approx(expit(1.52029 - 0.33787), abs=1e-5)  # 0.7654
    assert acc["ci_high"] == pytest.approx(expit(1.52029 + 0.33787), abs=1e-5)  # 0.8651
    assert 0 < acc["ci_low"] < 0.82 < acc["ci_high"] < 1
    assert s["cnn"]["f1"]["n"] == 2  # None and nested dicts are skipped
    assert "test" not in s["cnn"]


def test_summary_of_one_repeat_has_no_spread():
    one = summarise_repeats([{"cnn": {"test_accuracy": 0.9}}])["cnn"]["test_accuracy"]
    assert one["mean"] == 0.9 and one["n"] == 1 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_rank_first_counts_are_whole_with_ties_as_ties():
    # Repeat 1 is a tie (0.84 each): it counts for no one alone.
    counts = rank_first_counts(REPEATS)
    assert counts == {"alone": {"cnn": 2, "resnet50": 0}, "tied": {"cnn": 1, "resnet50": 1},
                      "ties": [{"repeat": 1, "models": ["cnn", "resnet50"]}]}  # fmt: skip
    assert sum(counts["alone"].values()) + len(counts["ties"]) == len(REPEATS)


def test_rank_first_counts_lists_models_that_never_win():
    counts = rank_first_counts([{"a": {"test_accuracy": 0.9}, "b": {"test_accuracy": 0.8}}, {"b": {}}])
    assert counts == {"alone": {"a": 1, "b": 0}, "tied": {"a": 0, "b": 0}, "ties": []}


def test_pairwise_corrected_tests():
    rows = pairwise_corrected_tests(REPEATS, n_train=700, n_test=150)
    assert len(rows) == 1
    row = rows[0]
    assert (row["a"], row["b"], row["n"]) == ("cnn", "resnet50", 3)
    diffs = np.array([0.02, 0.0, 0.02])
    assert row["mean"] == pytest.approx(diffs.mean())
    assert row["t"] == pytest.approx(diffs.mean() / math.sqrt((1 / 3 + 150 / 700) * diffs.var(ddof=1)))


def test_pairwise_uses_only_common_repeats():
    reps = [{"a": {"test_accuracy": 0.9}, "b": {"test_accuracy": 0.8}, "c": {"test_accuracy": 0.7}},
            {"a": {"test_accuracy": 0.8}, "b": {"test_accuracy": 0.7}}]  # fmt: skip
    rows = {(r["a"], r["b"]): r for r in pairwise_corrected_tests(reps, 700, 150)}
    assert set(rows) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert rows[("a", "b")]["t"] == math.inf  # two identical differences of 0.1
    assert rows[("a", "c")]["n"] == 1 and math.isnan(rows[("a", "c")]["p"])


def test_an_interval_of_values_at_the_bound_holds_their_mean():
    """Three perfect repeats and one image wrong (of 50): the correction moves 1.0 half an image inside, the
    interval with it; it still holds the mean the report prints beside it, and stays inside [0, 1]."""
    from gender_tasks.evaluation.repeats import logit_t_interval

    values = [1.0, 1.0, 1.0, 0.98]
    low, high = logit_t_interval(values, n_images=50)
    assert 0.0 <= low <= sum(values) / 4 <= high <= 1.0
    assert high == sum(values) / 4  # widened to the mean exactly: the corrected values' interval ends below it
