"""The report: its statistics, each section on a stored fixture run (nothing trains; report_fixtures writes
the outputs a run leaves), the whole report on the same fixture, and once end to end after real training (slow).
"""

import base64
import io
import json
import re
from html import escape

import numpy as np
import pytest
import report_fixtures as fx
from helpers import write_dataset
from PIL import Image

from gender_tasks import layout, pipeline
from gender_tasks.evaluation.stats import bootstrap_ci, mcnemar
from gender_tasks.reporting import report, sections
from gender_tasks.settings import resolve_settings
from gender_tasks.storage import LocalStorage, open_storage


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    pred = np.where(rng.random(1000) < 0.9, y, 1 - y)
    ci = bootstrap_ci(y, pred)
    acc = (y == pred).mean()
    assert ci["accuracy"][0] < acc < ci["accuracy"][1]
    assert ci["accuracy"][1] - ci["accuracy"][0] < 0.05
    small = bootstrap_ci(y[:100], pred[:100])
    assert small["accuracy"][1] - small["accuracy"][0] > ci["accuracy"][1] - ci["accuracy"][0]


def test_mcnemar_separates_noise_from_real_differences():
    y = np.zeros(1000, dtype=int)
    a = y.copy()
    b = y.copy()
    b[:10] = 1  # b wrong on 10 images a gets right
    a[10:15] = 1  # a wrong on 5 images b gets right
    assert mcnemar(y, a, b)["p_value"] > 0.05
    b[:60] = 1
    res = mcnemar(y, a, b)
    assert (res["only_a_right"], res["only_b_right"]) == (55, 0)
    assert res["p_value"] < 0.001


def test_models_right_and_wrong_on_the_same_images_read_as_no_difference_not_as_noise():
    # An ensemble of one model sits beside that model in the paired comparisons: "could be noise" would misread it.
    keys, y = [f"k{i}" for i in range(20)], np.array([0, 1] * 10)
    right, wrong_two, wrong_eight = y.copy(), y.copy(), y.copy()
    wrong_two[:2] = 1 - y[:2]
    wrong_eight[:8] = 1 - y[:8]
    pairs = {(c["a"], c["b"]): c for c in sections.mcnemar_pairs(
        {"cnn": (keys, y, right), "ensemble": (keys, y, right.copy()), "resnet50": (keys, y, wrong_two),
         "inceptionv3": (keys, y, wrong_eight)})}  # fmt: skip
    same = pairs[(sections.label("cnn"), sections.label("ensemble"))]
    assert (same["only_a_right"], same["only_b_right"], same["significant"]) == (0, 0, False)
    assert same["verdict"] == "no difference: right and wrong on the same images"
    assert pairs[(sections.label("cnn"), sections.label("resnet50"))]["verdict"] == "not significant (could be noise)"
    eight = pairs[(sections.label("cnn"), sections.label("inceptionv3"))]
    assert eight["p_value"] < 0.05 and eight["verdict"] == "significant"


def _with_labels_csv(root, rng_seed=0):
    """Give a generated dataset a labels.csv with an attribute, as ../shared/data's folders have."""
    import pandas as pd

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    ages = [20 + (i * 7) % 50 for i in range(len(files))]
    pd.DataFrame({"file": files, "label": [f.split("/")[0] for f in files], "age": ages,
                  "ethnicity": ["<i>a</i>" if i % 2 else "b" for i in range(len(files))]}).to_csv(
        root / "labels.csv", index=False)  # fmt: skip
    return root


@pytest.mark.slow
def test_report_shows_every_section_and_escapes_data(tmp_path):
    # End to end after real training, label audit and external evaluation: what the fixture tests below
    # cannot show is that the pipeline's tasks hand the report what it reads, in the form it reads it.
    # A source folder name and an attribute value that try to inject markup.
    src = _with_labels_csv(write_dataset(tmp_path / "<script>alert(1)</script>", 16))
    external = _with_labels_csv(write_dataset(tmp_path / "real", 10, seed=5))
    run = pipeline.prepare({"source": str(src), "storage": str(tmp_path / "store"), "profile": "tiny",
                            "models": ["cnn", "mobilenetv2"], "min_rows": 10, "epochs": 1,
                            "label_audit_folds": 3, "external_eval": [str(external) + "?age >= 30"]},
                           run_id="manual__<b>x</b>")  # fmt: skip
    run = {**pipeline.ingest(run), "run_key": "run1"}
    assert run["dataset"]["attributes"] == 2
    run = pipeline.preprocess(pipeline.validate(pipeline.split(run)))
    trained = [pipeline.train(run, m) for m in run["settings"]["models"]]
    audit = pipeline.label_audit(run)
    assert audit["images"] == 32 and audit["folds"] == 3
    ext = pipeline.evaluate_external(run)
    assert ext["sets"] == ["real_age_30"]
    out = pipeline.report(run, trained, label_audit=audit, external=ext)
    storage = open_storage(run["storage"])
    html = storage.get_bytes("runs/run1/report.html").decode()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert "<b>x</b>" not in html and "<i>a</i>" not in html and "&lt;i&gt;a&lt;/i&gt;" in html
    assert 'data-model="cnn"' in html and 'data-model="mobilenetv2"' in html
    for section in ("Table 1", "Uncertainty", "Class-balance audit", "Accuracy per group", "Label-quality audit",
                    "External evaluation sets", "Data validation", "Run metadata"):  # fmt: skip
        assert section in html
    assert html.count("<svg") >= 6  # curves, confusion matrix and ROC per model
    assert html.count('<img src="data:image/jpeg;base64,') == 24  # the most suspicious labels, as thumbnails
    results = json.loads(storage.get_bytes("runs/run1/results.json"))
    assert {r["model"] for r in results["table"]} == {"cnn", "mobilenetv2"}
    assert len(results["comparisons"]) == 1
    assert {g["attribute"] for g in results["group_accuracy"]["cnn"]} == {"age", "ethnicity"}
    (ext_set,) = results["external"]
    assert ext_set["filter"] == "age >= 30" and 0 < ext_set["images"] < 20
    assert set(ext_set["models"]) == {"cnn", "mobilenetv2"}
    assert 0 <= ext_set["models"]["cnn"]["accuracy"] <= 1
    audit_rows = results["label_audit"]["top"]
    quality = [r["label_quality"] for r in audit_rows]  # ranked by label quality (training.label_audit)
    assert None not in quality and quality == sorted(quality)
    assert set(out["test_accuracy"]) == {"cnn", "mobilenetv2"}


# --- the sections, on a fixture run: three models (mobilenetv2 flagged), their ensemble, two repeats ------


def _fixture_run(tmp_path_factory, name: str, **kw):
    root = tmp_path_factory.mktemp(name) / "store"
    storage = LocalStorage(root)
    args = fx.write_run(storage, str(root), **kw)
    return storage, args, report.gather_inputs(storage, **args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(storage, build_report's arguments, the gathered inputs) of the full fixture run."""
    return _fixture_run(tmp_path_factory, "full")


@pytest.fixture(scope="module")
def page(run):
    """The page's context for the full fixture run (without plots: the whole-report test draws them)."""
    _, _, inputs = run
    built = sections.build_sections(inputs, with_plots=False)
    return sections.page_context(built, inputs)


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """A run of one model, one repeat, no label audit or external sets: the context of its page."""
    _, _, inputs = _fixture_run(tmp_path_factory, "solo", models=("cnn",), repeats=1, ensemble=False, audit=False,
                                external=False)  # fmt: skip
    return sections.page_context(sections.build_sections(inputs, with_plots=False), inputs)


def test_the_inputs_are_every_models_outputs_in_every_repeat(run):
    _, _, inputs = run
    assert inputs.models == [*fx.MODELS, "ensemble"]
    assert len(inputs.outputs) == 2 and all(list(o) == inputs.models for o in inputs.outputs)
    assert [m["members"] for m in inputs.ensemble_metrics] == [["cnn", "resnet50"]] * 2
    assert inputs.repeat_split_counts["train"] == {"female": 8, "male": 8}
    assert len(inputs.audit_table) == 56 and len(inputs.audit_thumbnails) == sections.AUDIT_SHOWN
    assert all(t.startswith("data:image/jpeg;base64,") for t in inputs.audit_thumbnails)
    # at the size the page shows them, not the audit model's input size (32 px in the fixture's tiny profile)
    px = sections.AUDIT_THUMBNAIL_PX
    assert inputs.settings.label_audit_spec.image_size != px
    with Image.open(io.BytesIO(base64.b64decode(inputs.audit_thumbnails[0].partition(",")[2]))) as thumb:
        assert thumb.size == (px, px)
    assert [e["name"] for e in inputs.external] == [fx.EXTERNAL_SET]


def test_the_flagged_model_is_warned_about_at_the_top_and_its_row_marked(run, page):
    _, _, inputs = run
    warnings = sections.health_findings(inputs)
    assert {(w["model"], w["repeat"]) for w in warnings} == {(fx.FLAGGED, 0), (fx.FLAGGED, 1)}
    assert {w["check"] for w in warnings} == {"one_class", "not_above_majority"}
    flags = sections.flagged_models(warnings, sections.ensemble_members(inputs))
    assert list(flags) == [fx.FLAGGED]
    assert flags[fx.FLAGGED]["repeats"] == [0, 1] and flags[fx.FLAGGED]["left_out_of_ensemble"] == [0, 1]
    assert (
        flags[fx.FLAGGED]["kept_in_ensemble"] == [] and "BatchNorm running statistics" in flags[fx.FLAGGED]["causes"][0]
    )

    top = sections.render_section("warnings", page)
    assert 'id="warnings"' in top and f'data-flagged-model="{fx.FLAGGED}"' in top and "data-flagged-model" in top
    assert top.count("data-flagged-model") == 1 and "<b>MobileNet V2</b> (repeats\n0, 1 of 2)" in top
    assert "[repeat 0]" in top and "[repeat 1]" in top and "<b>Left out of the ensemble</b> (repeats 0, 1)." in top
    assert sections.PAGE.index("warnings") < sections.PAGE.index("table1")
    table1 = sections.render_section("table1", page)
    assert f'data-model="{fx.FLAGGED}" class="flagged" data-flagged="true"' in table1
    assert "⚠ flagged: one class, not above majority" in table1
    for healthy in ("cnn", "resnet50", "ensemble"):
        assert f'<tr data-model="{healthy}"><td' in table1


def test_the_warning_counts_models_and_the_ensemble_apart(page):
    # Flagged, the ensemble is named as the ensemble, never counted as one more model.
    one = {fx.FLAGGED: page["r"]["flagged"][fx.FLAGGED]}
    cases = [
        (one, "Warning: 1 model failed the\nreport's own checks; do not read its numbers"),
        ({**one, "cnn": one[fx.FLAGGED], "ensemble": one[fx.FLAGGED]}, "Warning: 2 models and the ensemble failed the"),
        (
            {"ensemble": one[fx.FLAGGED]},
            "Warning: the ensemble failed the\nreport's own checks; do not read its numbers",
        ),
    ]
    for flagged, expected in cases:
        html = sections.render_section("warnings", {**page, "r": {**page["r"], "flagged": flagged}})
        assert expected in html, html[:300]


def test_a_run_without_a_flag_has_no_warning(solo):
    assert solo["r"]["flagged"] == {} and solo["r"]["warnings"] == []
    assert not sections.render_section("warnings", solo).strip()
    assert 'class="flagged"' not in sections.render_section("table1", solo)


def test_small_validation_or_test_splits_are_said_to_weigh_little_at_the_top(page):
    # The fixture run: 20 validation and 20 test images.
    assert page["r"]["small_splits"] == {"validation_images": 20, "test_images": 20, "one_image": 0.05,
                                         "threshold": sections.SMALL_SPLIT}  # fmt: skip
    top = sections.render_section("small_splits", page)
    assert 'id="small-splits"' in top and "Few images to judge by" in top
    assert "validation split has 20\nimages and the test split 20" in top and "by up to\n0.050" in top
    assert sections.PAGE.index("warnings") < sections.PAGE.index("small_splits") < sections.PAGE.index("table1")


def test_the_small_split_notice_goes_by_the_smaller_split_and_stops_at_the_threshold():
    def balance(val: int, test: int) -> dict:
        return {"splits": {"train": {"female": 400, "male": 400}, "val": {"female": val - val // 2, "male": val // 2},
                           "test": {"female": test - test // 2, "male": test // 2}}}  # fmt: skip

    assert sections.small_splits(balance(150, 148)) is None  # the shared faces' splits
    assert sections.small_splits(balance(sections.SMALL_SPLIT, sections.SMALL_SPLIT)) is None
    small = sections.small_splits(balance(150, 30))
    assert small["validation_images"] == 150 and small["test_images"] == 30 and small["one_image"] == 1 / 30
    assert sections.small_splits(balance(99, 500))["one_image"] == 1 / 99
    page = {"r": {"small_splits": None}}
    assert not sections.render_section("small_splits", page).strip()


def test_intervals_over_repeats_stay_inside_0_1_and_two_repeats_are_said_to_mean_little(run, page):
    _, _, inputs = run
    rp = sections.repeats_section(inputs)
    assert rp["repeats"] == 2 and rp["seeds"] == [inputs.settings.seed, inputs.settings.seed + 1]
    assert (rp["n_train"], rp["n_test"]) == (16, 20) and rp["interval_means_little"] is True
    assert set(rp["summary"]) == set(inputs.models)
    for model, metrics in rp["summary"].items():
        for name, s in metrics.items():
            assert 0.0 <= s["ci_low"] <= s["ci_high"] <= 1.0, (model, name, s)
    for row in sections.table1_rows(inputs, {}, rp):
        assert row["ours"]["test_accuracy"] == rp["summary"][row["model"]]["test_accuracy"]["mean"]
        for k, (low, high) in row["repeat_ci"].items():
            assert 0.0 <= low <= high <= 1.0, (row["model"], k)
    counts = rp["rank_first"]
    assert all(isinstance(n, int) for part in ("alone", "tied") for n in counts[part].values())
    assert sum(counts["alone"].values()) + len(rp["ties"]) == 2
    assert len(rp["corrected_tests"]) == 6  # every pair of the four
    assert all(0 <= t["mcnemar_significant_repeats"] <= 2 for t in rp["corrected_tests"])
    assert "With only 2 repeats\nthese intervals mean little" in sections.render_section("table1", page)
    html = sections.render_section("repeats", page)
    assert "<b>With 2 repeats it means little</b>" in html
    cells = re.findall(r"<td>\[(-?[\d.]+), (-?[\d.]+)\]</td>", html)
    assert len(cells) == 4 * 6 and all(0 <= float(lo) <= float(hi) <= 1 for lo, hi in cells)


def test_a_one_model_run_has_no_ensemble_repeats_or_paired_tests(solo):
    r = solo["r"]
    assert r["ensemble"] is None and r["repeats"] is None and r["comparisons"] == []
    assert [row["model"] for row in r["table"]] == ["cnn"] and r["table"][0]["repeat_ci"] is None
    # The ensemble needs two models (training.ensemble skips it): the page has no ensemble paragraph or row.
    assert not sections.render_section("ensemble", solo).strip()
    assert 'data-model="ensemble"' not in sections.render_section("table1", solo)
    assert "Fewer than two models: nothing to compare." in sections.render_section("uncertainty", solo)
    assert not sections.render_section("repeats", solo).strip()
    assert 'href="#repeats"' not in sections.render_section("contents", solo)
    assert "The label audit was switched off for this run." in sections.render_section("label_audit", solo)
    assert "No external evaluation sets in this run" in sections.render_section("external", solo)


def test_a_one_member_ensemble_is_named_as_that_model_alone(page):
    one = {**page["r"]["ensemble"][0], "members": ["mobilenetv2"], "labels": ["MobileNet V2"], "weights": [1.0],
           "excluded": {}}  # fmt: skip
    html = sections.render_section("ensemble", {**page, "r": {**page["r"], "ensemble": [one], "repeats": None}})
    assert "The ensemble is MobileNet V2 alone\n(its row repeats that model's" in html
    assert "mean probability of" not in html and "chosen on the validation split only" in html
    assert "no weighting with the other models lowered the validation log-loss" in html


def test_the_ensemble_section_names_its_members_weights_and_what_it_left_out(page):
    html = sections.render_section("ensemble", page)
    assert "weighted mean probability of\nCNN (weight 0.50), ResNet50 (weight 0.50)\nin repeat 0" in html
    assert "lowest validation log-loss among those at least as accurate" in html
    weighted = [{**page["r"]["ensemble"][0], "weights": [0.65, 0.35]}, *page["r"]["ensemble"][1:]]
    html_weighted = sections.render_section("ensemble", {**page, "r": {**page["r"], "ensemble": weighted}})
    assert "CNN (weight 0.65), ResNet50 (weight 0.35)" in html_weighted
    assert "validation split only" in html
    assert "Left out in repeat 0, as flagged: MobileNet V2\n(one class, not above majority)." in html
    assert "Repeat 1: CNN, ResNet50." in html


def test_when_every_model_is_flagged_the_ensemble_section_says_so_and_what_it_still_left_out(page):
    r = {**page["r"], "ensemble": [{**e, "all_flagged": True} for e in page["r"]["ensemble"]]}
    html = sections.render_section("ensemble", {**page, "r": r})
    assert "<b>Every model was flagged in repeat 0, so\nnot all could be left out" in html
    assert "leaving out only\nthose that called (nearly) every validation image one class.</b>" in html
    assert "Left out in repeat 0, as flagged: MobileNet V2\n(one class, not above majority)." in html
    r["ensemble"] = [{**e, "excluded": {}} for e in r["ensemble"]]  # every model collapsed: none left out
    html = sections.render_section("ensemble", {**page, "r": r})
    assert "chosen among flagged models.</b>" in html and "Left out in" not in html


def test_table1_sits_beside_the_study_and_the_bootstrap_intervals_contain_the_estimate(run, page):
    _, _, inputs = run
    rows = page["r"]["table"]
    assert [r["model"] for r in rows] == inputs.models
    assert rows[0]["paper"]["test_accuracy"] == 0.92 and rows[-1]["paper"] is None  # the study had no ensemble
    for row in rows:
        (low, high), acc = row["ci"]["accuracy"], row["first"]["test_accuracy"]
        assert 0 <= low <= acc <= high <= 1
    html = sections.render_section("table1", page)
    cnn = html[html.index('<tr data-model="cnn">') : html.index('<tr data-model="resnet50">')]
    ours = page["r"]["table"][0]["ours"]["test_accuracy"]
    assert f'<td class="paper">0.92</td>\n<td class="{"pos" if ours >= 0.92 else "neg"}">{ours - 0.92:+.3f}</td>' in cnn


def test_the_macro_table_gives_each_models_balanced_accuracy_on_the_test_split(run, page):
    from sklearn.metrics import balanced_accuracy_score

    _, _, inputs = run
    html = sections.render_section("table1_notes", page)
    assert "<th>Recall (balanced accuracy)</th>" in html
    rows = re.findall(r'<tr><td class="l">(.*?)</td><td>[0-9.]+</td>\n<td>([0-9.]+)</td>', html)
    assert [label for label, _ in rows] == [r["label"] for r in page["r"]["table"]]
    for model, (_, shown) in zip(inputs.models, rows, strict=True):
        preds = inputs.outputs[0][model]["predictions"]
        test = preds[preds["split"] == "test"]
        assert shown == f"{balanced_accuracy_score(test['label'], test['predicted']):.3f}"


def test_class_balance_counts_every_split(run):
    _, _, inputs = run
    assert sections.class_balance(inputs.manifest) == {
        "splits": {"train": {"female": 8, "male": 8}, "val": {"female": 10, "male": 10},
                   "test": {"female": 10, "male": 10}},
        "totals": {"female": 28, "male": 28}, "imbalance_ratio": 1.0}  # fmt: skip


def test_model_cards_give_each_trained_model_its_recall_gap_groups_and_recalibration(run, page):
    _, _, inputs = run
    cards = sections.model_cards(inputs, with_plots=False)
    assert list(cards) == list(fx.MODELS)  # the ensemble has no card
    assert cards[fx.FLAGGED]["recall_gap"] == 1.0  # every image female: female recall 1, male 0
    assert cards["resnet50"]["recalibration"]["batchnorm_recalibrated_on"] == 16
    assert cards["cnn"]["recalibration"] is None
    groups = {g["attribute"]: g for g in cards["cnn"]["groups"]}
    assert set(groups) == {"age", "ethnicity"}
    assert sum(x["n"] for x in groups["age"]["groups"]) == 20  # the test images
    html = sections.render_section("model_cards", page)
    resnet = html[html.index('id="model-resnet50"') :]
    assert "BatchNorm statistics recomputed on\n16 training images" in resnet[: resnet.index("</p>")]
    assert (
        "BatchNorm statistics recomputed" not in html[html.index('id="model-cnn"') : html.index('id="model-resnet50"')]
    )


def test_text_from_the_data_is_escaped_in_every_section(page):
    html = sections.render_page(page)
    for raw in ("<script>", "<b>x</b>", "<i>a</i>", "<b>real</b>", "<b>dup</b>"):
        assert raw not in html, raw
    assert "manual__&lt;b&gt;x&lt;/b&gt;" in sections.render_section("page_start", page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;/female_000.png" in sections.render_section("label_audit", page)
    assert "<td>&lt;i&gt;a&lt;/i&gt;</td>" in sections.render_section("group_accuracy", page)
    assert "/data/&lt;b&gt;real&lt;/b&gt;" in sections.render_section("external", page)
    assert "&lt;b&gt;dup&lt;/b&gt;.png" in sections.render_section("validation", page)
    assert "/data/&lt;script&gt;alert(1)&lt;/script&gt;" in sections.render_section("metadata", page)


def test_formula_cells_are_stored_neutralised_and_shown_as_written(run, page):
    storage, _, inputs = run
    stored = storage.get_bytes(layout.label_audit_key("run1")).decode()
    assert "'=HYPERLINK(" in stored  # a spreadsheet opening the audit's CSV sees text, not a formula
    assert "'=1+1" in storage.get_bytes(layout.attributes_key(fx.DATASET_ID)).decode()
    audit = sections.label_audit_section(inputs)
    assert audit["top"][0]["source_path"] == fx.FORMULA_PATH  # read back as it was
    record = sections.label_audit_record(audit)
    assert record["top"][0]["source_path"] == fx.FORMULA_PATH and "thumbnail" not in record["top"][0]
    html = sections.render_section("label_audit", page)
    assert "=HYPERLINK(&#34;http://example.invalid&#34;,&#34;x&#34;)/male_000.png (train)" in html
    assert "'=HYPERLINK" not in html
    assert "<td>=1+1</td>" in sections.render_section("group_accuracy", page)


def test_the_label_audit_shows_the_most_suspicious_images_first(run, page):
    audit = page["audit"]
    assert audit["images"] == 56 and len(audit["top"]) == sections.AUDIT_SHOWN
    # Ranked by label quality (training.label_audit.label_quality): the two images labeled against their
    # model's prediction first.
    quality = run[2].audit_table["label_quality"].to_list()
    assert quality == sorted(quality)
    assert sorted(t["p_given_label"] for t in audit["top"][:2]) == pytest.approx([0.02, 0.03])
    assert audit["below_10"] == int((run[2].audit_table["p_given_label"] < 0.1).sum())
    html = sections.render_section("label_audit", page)
    assert html.count('<img src="data:image/jpeg;base64,') == sections.AUDIT_SHOWN
    # shown at the size they were decoded at (one constant: no scaling in the browser)
    px = sections.AUDIT_THUMBNAIL_PX
    assert html.count(f'width="{px}" height="{px}">') == sections.AUDIT_SHOWN
    assert "3-fold cross-fitting over all 56 images" in html


def test_the_setup_says_when_a_model_trained_other_epochs_than_its_plan(page):
    """The fixture's models trained 3 epochs where the tiny plan says 2 (as a plan's min_steps raises them on a
    small split): the setup row says both; the minimum of steps is its own row beside the study's."""
    setup = {row["setting"]: row for row in page["r"]["setup"]}
    epochs = setup["Epochs (frozen)"]["ours"]
    assert "CNN 2 (0), trained 3" in epochs and "MobileNet V2 2 (1), trained 3" in epochs
    assert setup["Fewest optimizer steps"]["ours"] == setup["Fewest optimizer steps"]["study"] == "no minimum"
    cpu = sections.describe_recipe(resolve_settings({"profile": "cpu"}), {"resnet50": 22, "cnn": 48})
    assert "ResNet50 5 (0), trained 22 (its minimum of 110 steps)" in cpu["Epochs (frozen)"]
    assert "CNN 48 (0)," in cpu["Epochs (frozen)"] + "," and "CNN 48 (0), trained" not in cpu["Epochs (frozen)"]
    assert cpu["Fewest optimizer steps"] == "CNN 264, ResNet50 110, Inception V3 110, MobileNet V2 110"


def test_an_audit_image_that_does_not_read_gets_a_placeholder_not_a_broken_image(run):
    import dataclasses

    _, _, inputs = run
    thumbnails = [None, *inputs.audit_thumbnails[1:]]  # report._audit_thumbnail gives None for an unreadable one
    spoilt = dataclasses.replace(inputs, audit_thumbnails=thumbnails)
    page = sections.page_context(sections.build_sections(spoilt, with_plots=False), spoilt)
    html = sections.render_section("label_audit", page)
    assert 'src="None"' not in html and '<img src=""' not in html
    assert html.count('<img src="data:image/jpeg;base64,') == sections.AUDIT_SHOWN - 1
    assert html.count("no preview: the stored image does not read") == 1
    px = sections.AUDIT_THUMBNAIL_PX
    assert f'<div class="nothumb" style="width: {px}px; height: {px}px">' in html


def test_external_sets_show_each_model_and_its_drop_against_the_synthetic_test_split(page):
    (ext,) = page["r"]["external"]
    html = sections.render_section("external", page)
    assert html.count('<tr><td class="l">') == 4 and "Ensemble (weighted mean probability)" in html
    drop = ext["models"]["cnn"]["accuracy"] - page["synthetic_accuracy"]["cnn"]
    assert f'<tr><td class="l">CNN</td><td>{ext["models"]["cnn"]["accuracy"]:.3f}</td>' in html
    assert f"<td>{drop:+.3f}</td>" in html


def test_run_metadata_names_the_git_version_and_the_devices(run, page):
    env = page["r"]["environment"]
    assert env["code_version"] == run[2].code_version and env["devices"] == ["cpu"]
    html = sections.render_section("metadata", page)
    assert f"<code>{run[2].code_version}</code>" in html and 'Task train_cnn</td><td class="l">2.5 s' in html


def test_the_reports_git_version_does_not_shadow_the_model_keys_code_version():
    from gender_tasks.training import keys

    assert not hasattr(report, "code_version")
    assert isinstance(report.git_version(), str) and report.git_version() != keys.code_version()


def test_plots_are_inline_svg_with_an_escaped_accessible_name():
    history = [{"epoch": e, "accuracy": 0.8, "val_accuracy": 0.7, "loss": 0.5, "val_loss": 0.6} for e in (1, 2)]
    y = np.array([0, 1] * 10)
    drawn = sections.plots(history, [[6, 4], [3, 7]], y, np.linspace(0.05, 0.95, 20), "<b>x</b>")
    assert list(drawn) == ["curves", "confusion", "roc"]
    for svg in drawn.values():
        assert svg.startswith("<svg") and "<?xml" not in svg and 'role="img" aria-label="&lt;b&gt;x&lt;/b&gt;: ' in svg
        assert "<b>x</b>" not in svg
    assert (
        "<title>&lt;b&gt;x&lt;/b&gt;: confusion matrix on the test images (true female predicted female: 6, "
        in (drawn["confusion"])
    )


def test_the_whole_report_joins_the_sections_and_writes_both_files(run, page, monkeypatch, caplog):
    storage, args, _ = run
    caplog.set_level("WARNING", logger="gender_tasks.reporting.report")

    def plots(history, cm, y_true, prob, title=""):  # matplotlib's drawing is the previous test's
        return {
            part: f'<svg data-plot="{part}" data-title="{escape(title)}"></svg>'
            for part in ("curves", "confusion", "roc")
        }

    monkeypatch.setattr(sections, "plots", plots)
    out = report.build_report(storage, **args)
    assert "few images to judge by: 20 validation and 20 test images" in caplog.text  # the task log says it too
    html = storage.get_bytes(layout.report_key("run1")).decode()
    results = json.loads(storage.get_bytes(layout.results_key("run1")))
    assert out["report_uri"] == storage.url(layout.report_key("run1"))
    assert out["test_accuracy"] == {r["model"]: r["ours"]["test_accuracy"] for r in results["table"]}
    # The sections in their order, the warning first.
    ids = ["warnings", "table1", "ensemble-members", "uncertainty", "repeats", "models", "balance", "labels",
           "external", "validation", "meta"]  # fmt: skip
    positions = [html.index(f'id="{i}"') for i in ids]
    assert positions == sorted(positions)
    assert html.startswith("<!DOCTYPE html>") and html.endswith("</html>")
    assert html.count("<svg") == 9  # curves, confusion matrix and ROC per trained model, as they are
    cards = html[html.index('id="models"') : html.index('id="balance"')]
    assert cards.count('<svg data-plot="roc" data-title="') == 3 and 'data-title="MobileNet V2"' in cards
    assert html.count('<img src="data:image/jpeg;base64,') == sections.AUDIT_SHOWN
    for raw in ("<script>", "<b>x</b>", "<i>a</i>"):
        assert raw not in html
    # results.json holds the sections' numbers (JSON-normalised: tuples become lists).
    expected = json.loads(json.dumps(page["r"], default=str))
    for key in ("warnings", "flagged", "ensemble", "table", "repeats", "comparisons", "class_balance", "external",
                "label_audit", "recall_gaps", "group_accuracy", "setup"):  # fmt: skip
        assert results[key] == expected[key], key
    assert set(results) == set(expected)
