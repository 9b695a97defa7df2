"""The benchmark scripts' own logic, on made-up data (no training, no shared faces): bench/heldout.py sets
faces aside by near-duplicate group and compares ways of choosing an ensemble; bench/robustness.py keeps
runs of other options apart and lays a subset's columns over the full runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
from helpers import REPO
from PIL import Image


def _bench(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _noise_faces(root, n_per_class: int):
    rng = np.random.default_rng(0)
    for label in ("female", "male"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((64, 64)).save(root / label / f"{label}_{i:02d}.png")


def test_heldout_sets_faces_aside_by_near_duplicate_group(tmp_path):
    heldout = _bench("heldout")
    source = tmp_path / "faces"
    _noise_faces(source, 10)
    for i in range(3):  # three copies of one face: one group, never split between the two sides
        shutil.copyfile(source / "female" / "female_00.png", source / "female" / f"copy_{i}.png")
    # A copy under the other label joins the same group: it goes to the same side, under its own label.
    shutil.copyfile(source / "female" / "female_00.png", source / "male" / "mislabelled.png")
    counts = heldout.set_aside(0, 0.3, tmp_path / "run", tmp_path / "held", source=source)
    for label, total in (("female", 13), ("male", 11)):
        run = {p.name for p in (tmp_path / "run" / label).glob("*.png")}
        held = {p.name for p in (tmp_path / "held" / label).glob("*.png")}
        assert not run & held and len(run | held) == total
        assert counts[label] == {"heldout": len(held), "run": len(run)}
        assert len(held) >= round(0.3 * total)  # whole groups: at least the share, a group's size over at most
    group = {"female_00.png", "copy_0.png", "copy_1.png", "copy_2.png"}
    sides = [{p.name for p in (tmp_path / side).glob("*/*.png")} for side in ("run", "held")]
    assert (group | {"mislabelled.png"}) <= sides[0] or (group | {"mislabelled.png"}) <= sides[1]
    assert heldout.set_aside(0, 0.3, tmp_path / "run2", tmp_path / "held2", source=source) == counts  # seeded


def test_heldout_folds_hold_out_every_face_once_with_groups_whole(tmp_path):
    heldout = _bench("heldout")
    source = tmp_path / "faces"
    _noise_faces(source, 10)
    for i in range(3):
        shutil.copyfile(source / "female" / "female_00.png", source / "female" / f"copy_{i}.png")
    shutil.copyfile(source / "female" / "female_00.png", source / "male" / "mislabelled.png")
    held_by_fold = []
    for fold in range(3):
        # --fraction is not read with folds: every seed deals the same folds and holds out its own.
        counts = heldout.set_aside(fold, 0.9 if fold else 0.1, tmp_path / f"run{fold}", tmp_path / f"held{fold}",
                                   source=source, folds=3)  # fmt: skip
        held = {f"{p.parent.name}/{p.name}" for p in (tmp_path / f"held{fold}").glob("*/*.png")}
        run = {f"{p.parent.name}/{p.name}" for p in (tmp_path / f"run{fold}").glob("*/*.png")}
        assert not held & run and len(held | run) == 24
        assert counts["female"]["heldout"] + counts["male"]["heldout"] == len(held)
        group = {"female/female_00.png", "female/copy_0.png", "female/copy_1.png", "female/copy_2.png",
                 "male/mislabelled.png"}  # fmt: skip
        assert group <= held or group <= run  # a near-duplicate group is never split
        held_by_fold.append(held)
    # Every face held out by exactly one of the three runs.
    assert sum(len(h) for h in held_by_fold) == 24 and len(set().union(*held_by_fold)) == 24
    # Each class spread evenly: per fold, a class's count within one group (5 faces, the copies) of a third.
    for label, total in (("female", 13), ("male", 11)):
        per_fold = [sum(1 for f in held if f.startswith(label + "/")) for held in held_by_fold]
        assert max(abs(n - total / 3) for n in per_fold) <= 5, per_fold
    with pytest.raises(ValueError, match="with 3 folds the seeds are 0 to 2"):
        heldout.set_aside(3, 0.2, tmp_path / "r", tmp_path / "h", source=source, folds=3)


def test_heldout_pools_the_folds_and_sets_them_beside_the_learning_curve():
    heldout = _bench("heldout")

    def row(seed, cnn_held, train, keep=None, folds=None):
        # As in the learning-curve test: today's rule takes the CNN alone; the other models say 0.5 (male).
        val = {"label": [0, 1, 0, 1], "cnn": [0.1, 0.9, 0.1, 0.9], **dict.fromkeys(heldout.MODELS[1:], [0.5] * 4)}
        held_p = [0.1 if ok == (y == 0) else 0.9 for ok, y in zip(cnn_held, [0, 1, 0, 1], strict=True)]
        held = {"label": [0, 1, 0, 1], "cnn": held_p, **dict.fromkeys(heldout.MODELS[1:], [0.5] * 4)}
        accuracy = {"cnn": sum(cnn_held) / 4, "resnet50": 0.5, "inceptionv3": 0.5, "mobilenetv2": 0.5}
        return {"seed": seed, "fraction": 1 / folds if folds else 0.2, "flagged": [],
                "heldout_accuracy": {**accuracy, "ensemble": 0.0},
                "counts": {"train": {"female": train, "male": train}},
                "probabilities": {"val": val, "heldout": held}, **({"keep": keep} if keep else {}),
                **({"folds": folds} if folds else {})}  # fmt: skip

    folded = [row(0, [1, 1, 1, 0], 30, folds=2), row(1, [1, 1, 0, 0], 40, folds=2)]
    text = heldout.pooled_table(folded)
    assert "2 of 2 folds, 8 held-out faces, each run trained on 0.50 of the faces (70 training images" in text
    # 5 of 8 faces right, pooled over the folds; the Wilson interval by hand: (5 + 1.92) / 11.84 ± 0.279.
    assert "| cnn | 5 of 8 | 0.625 | 0.306 to 0.863 |" in text
    assert "| ensemble | 5 of 8 | 0.625 |" in text and "| resnet50 | 4 of 8 | 0.500 |" in text
    # Against a model that calls every face male: the ensemble alone is right on three females, it alone on two males.
    assert "| resnet50 | 3 | 2 | 1.000 |" in text and "| cnn | 0 | 0 | 1.000 |" in text
    assert "Folds not yet run: 1" in heldout.pooled_table(folded[:1])
    assert heldout.pooled_table([row(0, [1, 1, 1, 1], 30)]).startswith("No rows of one K-fold deal")

    half = {"female": 0.5, "male": 0.5}
    curve = [row(0, [1, 1, 1, 1], 100), row(1, [1, 1, 1, 0], 100),
             row(0, [1, 1, 0, 0], 50, keep=half), row(1, [1, 1, 1, 0], 50, keep=half), *folded]  # fmt: skip
    text = heldout.curve_table(curve)
    assert "| 0.50 |" not in text  # the folds' runs hold out other faces: not a share paired seed by seed
    assert "Measured at 0.50 of the faces with 2 folds" in text and "| cnn | 5 of 8 | 0.625 |" in text
    # Seed 0's line: 0.5 at 0.4, 1.0 at 0.8, so 0.661 at 0.5; seed 1's: 0.75 throughout.
    assert "| cnn | 0.705 ± 0.045 |" in text


def test_heldout_compares_ensemble_rules_on_validation_alone():
    heldout = _bench("heldout")
    y = [0, 0, 0, 1, 1, 1]
    val = {
        "a": [0.1, 0.2, 0.3, 0.7, 0.8, 0.9],
        "b": [0.6, 0.2, 0.3, 0.7, 0.8, 0.4],
        "c": [0.4, 0.4, 0.6, 0.6, 0.4, 0.6],
    }
    rules = heldout._rules(y, val)
    assert rules["best single on validation"] == {"a": 1.0}
    assert rules["all, equal weights"] == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert rules[heldout.SHIPPED_RULE] == {"a": 1.0}  # every weighting with b or c has a higher log-loss
    assert rules["greedy equal-weight members (the rule before)"] == {"a": 1.0}  # nothing added improves on a
    assert rules["lowest log-loss subset"] == {"a": 1.0}
    # As much of the plain mean as keeps validation accuracy at a's: here all of it (the mean is perfect too).
    assert rules["best shrunk toward the mean"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    val["c"] = [0.9, 0.9, 0.9, 0.1, 0.1, 0.1]  # every image wrong: the mean of all loses, a share of it does not
    shrunk = heldout._rules(y, val)["best shrunk toward the mean"]
    assert shrunk["a"] > shrunk["b"] == shrunk["c"] > 0 and sum(shrunk.values()) == pytest.approx(1)
    # MobileNetV2 is flagged, so no candidate: "all" is the other three.
    row = {"seed": 3, "flagged": ["mobilenetv2"], "probabilities": {
        "val": {"label": y, "cnn": val["a"], "resnet50": val["b"], "inceptionv3": val["b"], "mobilenetv2": val["c"]},
        "heldout": {"label": [0, 1], "cnn": [0.2, 0.9], "resnet50": [0.9, 0.1], "inceptionv3": [0.9, 0.1],
                    "mobilenetv2": [0.1, 0.9]}}}  # fmt: skip
    text = heldout.rules_table([row])
    assert "| best single on validation | 1.000 (cnn) | 1.000 |" in text
    assert "| all, equal weights | 0.000 (cnn, resnet50, inceptionv3) | 0.000 |" in text
    # The bounds read the held-out faces (and leave the flagged MobileNetV2 out, as the rules do): CNN alone gets
    # both right; on the second face ResNet50 and InceptionV3 are wrong, the CNN right.
    assert f"| {heldout.BEST_SUBSET} | 1.000 (cnn) | 1.000 |" in text
    assert f"| {heldout.ANY_RIGHT} | 1.000 | 1.000 |" in text
    # A face every candidate gets wrong caps any mix of them; the best subset here is the pair, not either alone.
    bounds = heldout._bounds([0, 1, 1, 0], {"a": [0.9, 0.8, 0.3, 0.2], "b": [0.6, 0.4, 0.9, 0.45],
                                            "c": [0.7, 0.3, 0.2, 0.8]})  # fmt: skip
    assert bounds[heldout.ANY_RIGHT] == (0.75, "")
    assert bounds[heldout.BEST_SUBSET] == (0.75, "a, b")


def test_heldout_table_checks_the_acceptance_targets():
    heldout = _bench("heldout")
    held = {"cnn": 0.92, "resnet50": 0.90, "inceptionv3": 0.88, "mobilenetv2": 0.91, "ensemble": 0.915}
    row = {"seed": 0, "heldout_images": 200, "heldout_accuracy": held, "test_accuracy": held,
           "ensemble_members": ["resnet50", "mobilenetv2"], "flagged": []}  # fmt: skip
    text = heldout.table([row])
    assert "| +0.005 | -0.005 |" in text  # above its best member (0.91), below the best single model (0.92)
    assert "best single >= 0.9: 1 of 1 seeds; ensemble >= 0.91: 1 of 1 seeds" in text
    assert "ensemble >= its best member: 1 of 1 seeds; ensemble >= the best single model: 0 of 1 seeds" in text


def test_heldout_learning_curve_pairs_shares_of_the_faces_seed_by_seed():
    heldout = _bench("heldout")

    def row(seed, keep, cnn_held, train):
        # The CNN is right on every validation image and the others know nothing, so today's rule takes the CNN
        # alone; on the held-out faces it is right where cnn_held says.
        val = {"label": [0, 1, 0, 1], "cnn": [0.1, 0.9, 0.1, 0.9], **dict.fromkeys(heldout.MODELS[1:], [0.5] * 4)}
        held_p = [0.1 if ok == (y == 0) else 0.9 for ok, y in zip(cnn_held, [0, 1, 0, 1], strict=True)]
        held = {"label": [0, 1, 0, 1], "cnn": held_p, **dict.fromkeys(heldout.MODELS[1:], [0.5] * 4)}
        accuracy = {"cnn": sum(cnn_held) / 4, "resnet50": 0.5, "inceptionv3": 0.6, "mobilenetv2": 0.5}
        return {"seed": seed, "fraction": 0.2, "flagged": [], "heldout_accuracy": {**accuracy, "ensemble": 0.0},
                "counts": {"train": {"female": train, "male": train}}, "probabilities": {"val": val, "heldout": held},
                **({"keep": keep} if keep else {})}  # fmt: skip

    half = {"female": 0.5, "male": 0.5}
    imbalanced = row(0, {"male": 0.5}, [0, 0, 0, 0], 75)  # one class thinned: an imbalance, not a size
    rows = [row(0, None, [1, 1, 1, 1], 100), row(1, None, [1, 1, 1, 0], 100),
            row(0, half, [1, 1, 0, 0], 50), row(1, half, [1, 1, 1, 0], 50), imbalanced]  # fmt: skip
    text = heldout.curve_table(rows)
    # 0.8 of the faces, halved: 0.4; the rule's ensemble is the CNN alone, replayed from the probabilities
    # (the rows' recorded "ensemble" of 0.0 is not read); the best single model per seed is the CNN or 0.6.
    assert "| 0.40 | 2 | 100 | 0.625 | 0.500 | 0.600 | 0.500 | 0.675 | 0.625 |" in text
    assert "| 0.80 | 2 | 200 | 0.875 | 0.500 | 0.600 | 0.500 | 0.875 | 0.875 |" in text
    assert "From 0.40 to 0.80 of the faces (1.00 doublings), paired over seeds 0, 1:" in text
    assert "| cnn | +0.250 | 1.0 | +0.250 |" in text
    assert "| resnet50 | +0.000 | identical in every seed | +0.000 |" in text
    assert "| ensemble (today's rule) | +0.250 | 1.0 | +0.250 |" in text
    # The line through each seed's shares, read at all of the faces: seed 0 gains 0.5 a doubling (0.5 at 0.4,
    # 1.0 at 0.8: 1.161 at 1.0, past any accuracy: an extrapolation), seed 1 none (0.75).
    assert "| cnn | +0.250 ± 0.250 | 0.955 ± 0.205 |" in text
    assert "| resnet50 | +0.000 ± 0.000 | 0.500 ± 0.000 |" in text
    assert "| 0.60 |" not in text  # the imbalanced row is no share of the faces
    assert heldout.curve_table([imbalanced]) == "No rows with probabilities and one share for both classes."


def _row(seed, accuracy, **options):
    return {"size": 100, "kind": "sample", "seed": seed, "min_steps_scale": 1.0, "test_accuracy": accuracy,
            "flagged": [], "counts": {"train": {"female": 70, "male": 70}}, **options}  # fmt: skip


def test_robustness_keeps_other_options_apart_and_overlays_a_subset(tmp_path):
    robustness = _bench("robustness")
    full = {"cnn": 0.9, "resnet50": 0.8, "inceptionv3": 0.6, "mobilenetv2": 0.8, "ensemble": 0.85}
    out = tmp_path / "rows.jsonl"
    rows = [_row(1, full, flagged=["inceptionv3"]),
            _row(1, {"inceptionv3": 0.7}, models=["inceptionv3"], min_steps={"inceptionv3": 220}),
            _row(1, {"inceptionv3": 0.6}, models=["inceptionv3"]),
            _row(1, {"inceptionv3": 0.8}, models=["inceptionv3"], image_size={"inceptionv3": 96})]  # fmt: skip
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert robustness._done(out, 1.0)[(100, "sample", 1)]["test_accuracy"] == full
    alone = robustness._done(out, 1.0, ("inceptionv3",), {"inceptionv3": 220})
    assert list(alone.values()) == [rows[1]]
    assert list(robustness._done(out, 1.0, ("inceptionv3",), None, {"inceptionv3": 96}).values()) == [rows[3]]
    assert list(robustness._done(out, 1.0, ("inceptionv3",)).values()) == [rows[2]]  # no override: the shipped plan
    assert "Target not checked" in robustness.table(list(alone.values()))
    (merged,) = robustness.overlay(robustness._done(out, 1.0), alone)
    assert merged["test_accuracy"] == {**full, "inceptionv3": 0.7} and merged["flagged"] == []
    assert "MISSED: 100 sample seed 1: inceptionv3 0.600" in robustness.table([rows[0]])
    assert "met (1 of 1 runs" in robustness.table([merged])


@pytest.mark.parametrize("argv", [["--models", "cnn,vgg"], ["--min-steps", "inceptionv3"],
                                  ["--image-size", "inceptionv3=big"], ["--fraction", "1.5"],
                                  ["--epochs", "vgg=3"], ["--epochs", "cnn=0"], ["--recipe", "class_weights=x"],
                                  ["--recipe", "tta=maybe"], ["--keep", "male=1.5"], ["--keep", "other=0.5"],
                                  ["--folds", "1"]])  # fmt: skip
def test_bench_options_are_checked(argv, monkeypatch, capsys):
    script = "heldout" if argv[0] in ("--fraction", "--epochs", "--recipe", "--keep", "--folds") else "robustness"
    module = _bench(script)
    monkeypatch.setattr(sys, "argv", [script, *argv, "--table", "missing.jsonl"])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_robustness_scores_the_faces_a_sample_left_out_less_its_near_duplicates(tmp_path):
    robustness = _bench("robustness")
    source = tmp_path / "faces"
    _noise_faces(source, 6)
    shutil.copyfile(source / "male" / "male_05.png", source / "female" / "copy_of_male_05.png")
    sample = tmp_path / "sample"
    for label, names in (("female", ["female_00.png", "female_01.png"]), ("male", ["male_05.png"])):
        (sample / label).mkdir(parents=True)
        for name in names:
            shutil.copyfile(source / label / name, sample / label / name)
    assert robustness.rest_faces(sample, tmp_path / "rest", source=source) == 13 - 3 - 1
    rest = {f"{p.parent.name}/{p.name}" for p in (tmp_path / "rest").glob("*/*.png")}
    assert "female/copy_of_male_05.png" not in rest  # a near-copy of a drawn face, under the other label
    assert not rest & {"female/female_00.png", "female/female_01.png", "male/male_05.png"} and len(rest) == 9
    counts = {
        "train": {"female": 70, "male": 70},
        "val": {"female": 15, "male": 15},
        "test": {"female": 15, "male": 15},
    }
    rows = [_row(0, {"cnn": 0.9, "inceptionv3": 0.6}, counts=counts, rest_images=700,
                 rest_accuracy={"cnn": 0.85, "inceptionv3": 0.8}),
            _row(1, {"cnn": 0.8, "inceptionv3": 0.7}, counts=counts)]  # fmt: skip
    shown = robustness.rest_table(rows)
    assert "| 100 | 0 | 30 | 700 | 0.900 / 0.850 | 0.600 / 0.800 |" in shown and "| 100 | 1 |" not in shown
    assert "0.600 / 0.800 (rest min 0.800)" in shown and robustness.rest_table(rows[1:]) == ""
    assert "on it): met (1 of 1 runs count; their lowest model: 0.800)" in shown
    rows[0]["rest_accuracy"]["inceptionv3"] = 0.6
    assert "MISSED: seed 0: inceptionv3 0.600" in robustness.rest_table(rows)
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert set(robustness._done(out, 1.0, ("cnn", "inceptionv3"))) == set()  # other models: not these rows


def test_robustness_replays_ensemble_rules_on_rows_with_probabilities(capsys):
    robustness = _bench("robustness")
    y = [0, 0, 0, 1, 1, 1]
    val = {"cnn": [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], "resnet50": [0.6, 0.2, 0.3, 0.7, 0.8, 0.4],
           "inceptionv3": [0.4, 0.4, 0.6, 0.6, 0.4, 0.6], "mobilenetv2": [0.9, 0.9, 0.9, 0.1, 0.1, 0.1]}  # fmt: skip
    rest = {"label": [0, 1], "cnn": [0.2, 0.9], "resnet50": [0.9, 0.1], "inceptionv3": [0.6, 0.4],
            "mobilenetv2": [0.9, 0.1]}  # fmt: skip
    with_probs = _row(0, {"cnn": 1.0, "resnet50": 0.5}, probabilities={"val": {"label": y, **val}, "heldout": rest})
    robustness._print_tables([with_probs, _row(1, {"cnn": 0.9, "resnet50": 0.5})])
    shown = capsys.readouterr().out
    assert "Ways of choosing the ensemble, scored on the rest: 100 sample, 1 runs" in shown
    # Only the CNN is right on every validation image, and no weighting with the others lowers its log-loss:
    # the shipped rule takes it alone, right on both faces of the rest; the plain mean of all four is wrong on both.
    heldout = _bench("heldout")
    assert f"| {heldout.SHIPPED_RULE} | 1.000 (cnn) | 1.000 |" in shown
    assert "| all, equal weights | 0.000 (cnn, resnet50, inceptionv3, mobilenetv2) | 0.000 |" in shown


def test_heldout_keeps_other_plans_apart_and_pairs_them_with_the_plans_in_force(tmp_path):
    heldout = _bench("heldout")

    def row(seed, cnn, epochs=None, recorded=True):
        accuracy = {"cnn": cnn, "resnet50": 0.8, "inceptionv3": 0.8, "mobilenetv2": 0.8, "ensemble": cnn}
        return {"seed": seed, "fraction": 0.2, "draw": 2, "heldout_accuracy": accuracy,
                **({"epochs": epochs} if epochs else {}),
                **({"plan_epochs": heldout.plan_epochs(epochs), "recipe": heldout.cpu_recipe()} if recorded else {})}  # fmt: skip

    out = tmp_path / "rows.jsonl"
    longer = {"cnn": 31}  # no plan's
    earlier = row(3, 0.7, recorded=False)  # written before rows recorded their plan: EARLIER_PLAN's
    rows = [row(0, 0.80), row(1, 0.90), row(2, 0.85), row(0, 0.82, longer), row(1, 0.93, longer), earlier]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    in_force = {0, 1, 2} | ({3} if heldout.plan_epochs() == heldout.EARLIER_PLAN else set())
    assert set(heldout._done(out, 0.2)) == in_force and heldout._done(out, 0.2)[0] == rows[0]
    assert heldout._done(out, 0.2, epochs=longer) == {0: rows[3], 1: rows[4]}
    # written before rows recorded their recipe: unweighted
    assert heldout._done(out, 0.2, epochs=heldout.EARLIER_PLAN, recipe=heldout.RECIPE_ADDED_SINCE)[3] == earlier
    shown = heldout.paired(heldout._done(out, 0.2), heldout._done(out, 0.2, epochs=longer))
    assert "seeds 0, 1 " in shown and "| cnn | 0.875 | 0.850 | +0.025 | 5.0 | +0.020 to +0.030 |" in shown
    assert "| resnet50 | 0.800 | 0.800 | +0.000 | identical in every seed |" in shown  # a control: no t to show
    assert "Not all from one recorded kind of machine" in shown  # rows that do not say
    same = {"cpu": "X", "capability": "AVX2", "torch": "2"}
    for r in rows:
        r["machine"] = same
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "machine" not in heldout.paired(heldout._done(out, 0.2), heldout._done(out, 0.2, epochs=longer))


def test_heldout_keeps_other_recipes_and_balances_apart_and_reads_recall_per_class(tmp_path, capsys):
    heldout = _bench("heldout")
    held = {"label": [0, 0, 0, 1], "cnn": [0.1, 0.2, 0.7, 0.9], "resnet50": [0.1, 0.1, 0.1, 0.4],
            "inceptionv3": [0.1, 0.1, 0.1, 0.9], "mobilenetv2": [0.6, 0.1, 0.1, 0.9]}  # fmt: skip

    def row(seed, **options):
        accuracy = {c: 0.8 for c in heldout.COLUMNS}
        return {"seed": seed, "fraction": 0.2, "draw": 2, "heldout_accuracy": accuracy, "test_accuracy": accuracy,
                "heldout_images": 4, "plan_epochs": heldout.plan_epochs(), "ensemble_members": ["cnn", "resnet50"],
                "ensemble_weights": [0.5, 0.5], "probabilities": {"heldout": held}, **options}  # fmt: skip

    balanced = {"class_weighting": "balanced"}
    rows = [row(0), row(1, recipe=heldout.cpu_recipe(balanced)), row(2, keep={"male": 0.3}),
            row(3, recipe=heldout.cpu_recipe(balanced), keep={"male": 0.3})]  # fmt: skip
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shipped = heldout.cpu_recipe()["class_weighting"]
    # rows that do not record their recipe trained before class weighting existed: unweighted
    assert set(heldout._done(out, 0.2, recipe={"class_weighting": "none"})) == {0}
    assert set(heldout._done(out, 0.2, recipe=balanced)) == {1}
    assert set(heldout._done(out, 0.2)) == ({1} if shipped == "balanced" else {0})
    assert set(heldout._done(out, 0.2, recipe=balanced, keep={"male": 0.3})) == {3}
    shown = heldout.per_class_table([rows[0]])
    # cnn: 2 of 3 females right, the male right; the ensemble averages cnn and resnet50: 0.1 0.15 0.4 0.65
    assert "| cnn | 0.667 | 1.000 | 0.833 |" in shown and "| resnet50 | 1.000 | 0.000 | 0.500 |" in shown
    assert "| ensemble | 1.000 | 1.000 | 1.000 |" in shown
    # weights as stored (rounded) need not sum to 1: the ensemble is their weighted mean all the same
    assert heldout.per_class_table([{**rows[0], "ensemble_weights": [0.3, 0.3]}]) == shown
    faces = tmp_path / "faces"
    _noise_faces(faces, 10)
    counts = {"female": {"run": 10}, "male": {"run": 10}}
    heldout.thin_out(faces, {"male": 0.3}, 0, counts)
    kept = sorted(p.name for p in (faces / "male").iterdir())
    assert len(kept) == 3 and counts["male"]["run"] == 3 and len(list((faces / "female").iterdir())) == 10
    again = tmp_path / "again"
    _noise_faces(again, 10)
    heldout.thin_out(again, {"male": 0.3}, 0, counts)
    assert sorted(p.name for p in (again / "male").iterdir()) == kept  # seeded


def test_robustness_counts_only_rows_that_trained_as_todays_plans_would(tmp_path):
    robustness = _bench("robustness")
    # 140 training images: 5 steps an epoch, so every model's minimum decides (the CNN 264 steps: 53 epochs).
    small = robustness.planned_epochs(140)
    assert small["cnn"] == 53 and small["resnet50"] == 22
    assert robustness.planned_epochs(140, 0.0)["cnn"] < small["cnn"]  # without the minimum: the epochs as given
    assert robustness.planned_epochs(140, 1.0, {"inceptionv3": 220})["inceptionv3"] == 44
    counts = {"train": {"female": 70, "male": 70}}
    rows = [
        _row(0, {"cnn": 0.9}, counts=counts, epochs=small),
        _row(1, {"cnn": 0.9}, counts=counts, epochs={**small, "cnn": small["cnn"] - 1}),  # an earlier plan
        _row(2, {"cnn": 0.9}, counts=counts),
    ]  # fmt: skip  (no epochs recorded: taken as it is)
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sorted(seed for _, _, seed in robustness._done(out, 1.0)) == [0, 2]


def test_robustness_counts_unweighted_rows_under_balanced_weighting_only_where_the_classes_were_equal(
        tmp_path, monkeypatch):  # fmt: skip
    robustness = _bench("robustness")
    equal, unequal = {"train": {"female": 70, "male": 70}}, {"train": {"female": 69, "male": 71}}
    rows = [_row(0, {"cnn": 0.9}, counts=equal), _row(1, {"cnn": 0.9}, counts=unequal),
            _row(2, {"cnn": 0.9}, counts=unequal, class_weighting="balanced")]  # fmt: skip
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(robustness, "cpu_class_weighting", lambda: "balanced")
    assert sorted(seed for _, _, seed in robustness._done(out, 1.0)) == [0, 2]  # equal classes: weights of 1
    monkeypatch.setattr(robustness, "cpu_class_weighting", lambda: "none")
    assert sorted(seed for _, _, seed in robustness._done(out, 1.0)) == [0, 1]


def test_robustness_rows_of_another_plan_count_where_the_minimum_decides_alike(monkeypatch, capsys):
    from gender_tasks.models.registry import get_model_spec, register

    robustness = _bench("robustness")
    originals = [get_model_spec(m) for m in ("cnn", "mobilenetv2")]
    try:  # the recipe ablation's plan (CNN 12, MobileNetV2 5), then twice its epochs
        robustness.set_cpu_epochs({"cnn": 12, "mobilenetv2": 5})
        before = {m: robustness.planned_epochs(n) for m, n in (("small", 140), ("large", 420))}
        robustness.set_cpu_epochs({"cnn": 24, "mobilenetv2": 10})
        after = {m: robustness.planned_epochs(n) for m, n in (("small", 140), ("large", 420))}
    finally:
        for spec in originals:
            register(spec)
    assert after["small"] == before["small"]  # 100 a class: the minimum decides under both plans
    assert (before["large"]["cnn"], after["large"]["cnn"]) == (19, 24)  # 300 a class: 14 steps an epoch
    assert (before["large"]["mobilenetv2"], after["large"]["mobilenetv2"]) == (8, 10)
    assert after["large"]["resnet50"] == before["large"]["resnet50"] == 8
    monkeypatch.setattr(sys, "argv", ["robustness", "--epochs", "cnn=0", "--table", "missing.jsonl"])
    with pytest.raises(SystemExit) as exc:
        robustness.main()
    assert exc.value.code == 2 and "--epochs" in capsys.readouterr().err


def _size_row(seed, size, held, test=0.85, model="cnn"):
    return {"seed": seed, "model": model, "image_size": size, "heldout_accuracy": held, "test_accuracy": test,
            "seconds": 10.0 * size / 32}  # fmt: skip


def test_input_size_pairs_each_size_with_the_registered_one_seed_by_seed(tmp_path):
    input_size = _bench("input_size")
    rows = [_size_row(0, 64, 0.88), _size_row(1, 64, 0.90), _size_row(2, 64, 0.86),
            _size_row(0, 96, 0.90), _size_row(1, 96, 0.90), _size_row(2, 96, 0.87), _size_row(3, 96, 0.99)]  # fmt: skip
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"seed": 4, "model": "cnn", "image_size": 96,
                                                                       "error": "exit 1"}]))  # fmt: skip
    assert input_size._rows(out) == rows and {input_size._key(r) for r in rows} >= {(3, "cnn", 96)}
    lines = input_size.table(rows, base_size={"cnn": 64}).splitlines()
    assert lines[2] == "| cnn | 64 | 3 | 0.880 | 0.850 | 1 of 3 | 20 | base | | |"
    # 96 px: four seeds; paired over the three the base has: +0.02, 0, +0.01 -> mean +0.01, t = 0.01 / (0.01 / 3**0.5)
    assert lines[3] == "| cnn | 96 | 4 | 0.915 | 0.850 | 3 of 4 | 30 | +0.0100 (3 seeds) | 1.7 | 2 / 0 / 1 |"
    assert input_size.registered_size("cnn") in (64, 96)  # the registry's cpu plan is the default base


@pytest.mark.parametrize("argv", [["--sizes", "64,big"], ["--sizes", "8"], ["--seeds", "0,x"], ["--model", "vgg"]])
def test_input_size_options_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench("input_size").main([*argv, "--out", "never-written.jsonl", "--one", "0"])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_member_variants_erases_rectangles_of_the_stated_size_and_leaves_the_rest():
    import torch

    variants = _bench("member_variants")
    x = torch.randn(400, 3, 16, 20)
    erased = variants.erase(x, torch.Generator().manual_seed(0))
    changed = (erased != x).any(dim=1)  # N x H x W: the erased pixels of each image
    counts = changed.flatten(1).sum(1)
    touched = counts > 0
    assert 0.4 < touched.float().mean() < 0.6  # probability 0.5 an image
    low, high = variants.ERASE_AREA
    share = counts[touched].float() / (16 * 20)
    assert share.min() >= 1 / (16 * 20) and share.max() <= high + 1e-6 and share.mean() > low
    for i in torch.nonzero(touched).flatten()[:50]:  # one filled rectangle each, set to 0 (the channel mean)
        rows, cols = torch.nonzero(changed[i], as_tuple=True)
        box = erased[i][:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert int(counts[i]) == box.shape[1] * box.shape[2] and not box.any()
    assert torch.equal(erased[~touched], x[~touched])


def _member_row(seed, model, variant, held, val):
    return {"seed": seed, "model": model, "variant": variant, "heldout_accuracy": float(np.mean(
        [(p >= 0.5) == y for p, y in zip(held, [0, 0, 1, 1], strict=True)])), "probabilities": {
        "heldout": {"label": [0, 0, 1, 1], model: held}, "val": {"label": [0, 1], model: val},
        "test": {"label": [1], model: [0.9]}}}  # fmt: skip


def _stored_rows(variants) -> dict[int, dict]:
    stored = {}
    for seed in (0, 1):
        probs = {split: {"label": labels} for split, labels in
                 (("heldout", [0, 0, 1, 1]), ("val", [0, 1]), ("test", [1]))}  # fmt: skip
        for m in variants.MODELS:  # the CNN wrong on one held-out face, the others on two
            probs["heldout"][m] = [0.2, 0.6, 0.8, 0.9] if m == "cnn" else [0.6, 0.7, 0.8, 0.9]
            probs["val"][m] = [0.2, 0.8] if m == "cnn" else [0.3, 0.6]
            probs["test"][m] = [0.9]
        held = {m: 0.75 if m == "cnn" else 0.5 for m in variants.MODELS}
        stored[seed] = {"seed": seed, "flagged": [], "heldout_accuracy": held, "probabilities": probs}
    return stored


def test_member_variants_pairs_the_member_and_the_ensemble_with_the_stored_rows():
    variants = _bench("member_variants")
    stored = _stored_rows(variants)
    control = [_member_row(s, "cnn", "base", [0.2, 0.6, 0.8, 0.9], [0.2, 0.8]) for s in (0, 1)]
    better = [_member_row(s, "cnn", "erase", [0.2, 0.4, 0.8, 0.9], [0.1, 0.9]) for s in (0, 1)]
    lines = variants.table([*control, *better], stored).splitlines()
    # The control equals the stored rows; the ensemble the shipped rule picks (the CNN alone: perfect on
    # validation) gains what the CNN gains; all four averaged stay wrong on the first two faces (0.5, 0.625).
    assert lines[2] == ("| cnn | base | 2 | 0.750 | +0.000 | identical in every seed | 0 / 0 | 2 of 2 | 0.750 "
                        "| +0.000 (t identical in every seed) | 0.500 | +0.000 (t identical in every seed) |")  # fmt: skip
    assert lines[3].startswith("| cnn | erase | 2 | 1.000 | +0.250 | the same in every seed | 2 / 0 | 0 of 2 | 1.000 "
                               "| +0.250 (t the same in every seed) | 0.500 |")  # fmt: skip
    views = [_member_row(s, "cnn", "views", [0.2, 0.6, 0.8, 0.9], [0.2, 0.8]) for s in (0, 1)]
    for row in views:  # the shifts put the second face right, the crop and zoom-out leave it wrong
        row["views"] = {v: [0.2, 0.2 if v in ("up", "down", "left", "right") else 0.6, 0.8, 0.9]
                        for v in ("id", "up", "down", "left", "right", "crop", "zoomout")}  # fmt: skip
    text = variants.table(views, stored)
    assert "| as shipped (image + mirror) | 0.750 | +0.000 | identical in every seed | 0 / 0 | 0.750 |" in text
    # mean of the five on the second face: (0.6 + 4 * 0.2) / 5 = 0.28, right; with MobileNetV2's 0.7: 0.49, right
    assert "| + four 2 px shifts | 1.000 | +0.250 | the same in every seed | 2 / 0 | 1.000 |" in text
    assert "| + centre crop + zoom-out | 0.750 | +0.000 | identical in every seed | 0 / 0 | 0.750 |" in text
    moved = _member_row(0, "cnn", "erase", [0.2, 0.4, 0.8, 0.9], [0.1, 0.9])
    moved["probabilities"]["val"]["label"] = [1, 0]  # another draw's images: refused, not paired
    with pytest.raises(SystemExit, match="seed 0: the val labels differ"):
        variants.table([moved], stored)


def test_member_variants_pairs_a_variant_with_the_base_run_on_the_same_kind_of_machine():
    variants = _bench("member_variants")
    stored = _stored_rows(variants)  # the CNN wrong on one held-out face of four
    avx2, avx512 = {"cpu": "AMD EPYC", "capability": "AVX2"}, {"cpu": "AMD EPYC", "capability": "AVX512"}
    # On this kind of machine the control is a face worse than the stored rows (another CPU's numerics) ...
    base = [{**_member_row(s, "cnn", "base", [0.2, 0.6, 0.4, 0.9], [0.2, 0.8]), "machine": avx2} for s in (0, 1)]
    # ... and the variant equals the stored rows: against them it gains nothing, against its own base a face.
    sam = [{**_member_row(s, "cnn", "recipe sam_rho=0.05", [0.2, 0.6, 0.8, 0.9], [0.2, 0.8]), "machine": avx2}
           for s in (0, 1)]  # fmt: skip
    other = {**_member_row(0, "cnn", "erase", [0.2, 0.4, 0.8, 0.9], [0.2, 0.8]), "machine": avx512}  # no base there
    text = variants.table([*base, *sam, other], stored)
    assert "| cnn | recipe sam_rho=0.05 | 2 | 0.750 | +0.000 | identical in every seed |" in text
    paired = text.split("Paired with the `base` run of the same seed on the same kind of machine:")[1]
    # The shipped rule picks the CNN alone (perfect and confident on validation), so the ensemble moves with it.
    assert paired.strip().splitlines()[2:] == [
        "| cnn | recipe sam_rho=0.05 | 2 | 0.750 | 0.500 | +0.250 | the same in every seed | 2 / 0 | 0.750 | 0.500 "
        "| +0.250 (the same in every seed) |"]  # fmt: skip
    assert "Paired with the `base` run" not in variants.table([other], stored)


@pytest.mark.parametrize("argv", [["--variant", "recipe"], ["--recipe", "label_smoothing=0.2"],
                                  ["--variant", "recipe", "--recipe", "dropout=0.2"], ["--model", "vgg"],
                                  ["--variant", "size"], ["--image-size", "96"],
                                  ["--variant", "size", "--image-size", "10"], ["--variant", "epochs"],
                                  ["--epochs", "96"], ["--variant", "epochs", "--epochs", "0"],
                                  ["--variant", "rate"], ["--learning-rate", "0.001"],
                                  ["--variant", "rate", "--learning-rate", "2"], ["--variant", "batch"],
                                  ["--batch-size", "16"], ["--variant", "batch", "--batch-size", "1"]])  # fmt: skip
def test_member_variants_options_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench("member_variants").main([*argv, "--out", "never-written.jsonl", "--one", "0"])
    assert exc.value.code == 2 and argv[-2].lstrip("-") in capsys.readouterr().err


def test_member_variants_names_a_recipe_variant_by_its_changes():
    variants = _bench("member_variants")
    assert variants.variant_name("erase", {}) == "erase"
    changes = {"weight_decay": 0.2, "label_smoothing": 0.2, "tta": False}
    assert variants.variant_name("recipe", changes) == "recipe label_smoothing=0.2,tta=false,weight_decay=0.2"
    assert variants.variant_name("size", {}, 96) == "size 96"
    assert variants.variant_name("epochs", {}, epochs=96) == "epochs 96"
    assert variants.variant_name("rate", {}, profile={"learning_rate": 0.001}) == "rate 0.001"
    assert variants.variant_name("batch", {}, profile={"batch_size": 16}) == "batch 16"


def test_member_variants_rate_and_batch_reach_the_resolved_settings(monkeypatch):
    from gender_tasks.settings import resolve_settings
    from gender_tasks.settings.profiles import PROFILES

    monkeypatch.setitem(PROFILES, "cpu", PROFILES["cpu"])  # restored after the test
    shipped = resolve_settings({"profile": "cpu"})
    _bench("member_variants").set_cpu_profile({"learning_rate": 0.004, "batch_size": 16})
    changed = resolve_settings({"profile": "cpu"})
    assert (changed.learning_rate, changed.batch_size) == (0.004, 16)
    assert (shipped.learning_rate, shipped.batch_size) == (0.002, 32)
    assert changed.recipe == shipped.recipe and changed.per_model == shipped.per_model
