"""Label-audit benchmark (issue 19, item 6): which audit ranks true mislabels highest.

Each candidate audit model gives out-of-fold P(male) for every image of the shared faces, trained as the
pipeline's audit trains it (bench/recipe_ablation.run_audit: training.loop.fit_predict per fold, stratified
folds, seed + fold, that model's `cpu` audit plan: ModelSpec.audit_epochs and audit_image_size where
it has them, as the label audit trains its folds, else its `cpu` plan). Rankings are then read off the stored
probabilities without training again:

* one model: the pipeline's label quality (training.label_audit.label_quality) of its probabilities;
* agreement: the mean of several audits' probabilities (other models, or the same model cross-fitted
  again with another seed: other folds, other initialisations), ranked the same way.

Two keys score a ranking:

* **injected**: `--flip N` labels (seeded, half from each class) are flipped before the audit trains;
  precision@K is the share of the top K that are flipped images (the images' own labels are kept for
  the rest, so natural mislabels still compete for the top);
* **hand**: `--key FILE`, a CSV (key, mislabeled 0/1) made by looking at the images (for example at
  `--sheet`'s contact sheet of the candidates); precision@K counts the keyed mislabels (with --flip, the
  flipped images as well). Images not in the key are counted as correctly labeled.

    .venv/bin/python bench/audit_bench.py --audits cnn@42,mobilenetv2@42,cnn@7 --flip 30
    .venv/bin/python bench/audit_bench.py --audits cnn@42,mobilenetv2@42 --flip 30 --table-only --key k.csv
    .venv/bin/python bench/audit_bench.py --audits cnn@42,mobilenetv2@42 --flip 0 --sheet /tmp/top.png --top 60
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import recipe_ablation as ra  # noqa: E402

from gender_tasks.evaluation.metrics import encode_labels  # noqa: E402
from gender_tasks.models.registry import get_model_spec  # noqa: E402
from gender_tasks.training.label_audit import label_quality  # noqa: E402


def flipped_positions(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` row positions to flip, half (rounded down) from the male class, the rest from the female."""
    rng = np.random.default_rng(seed)
    males = rng.choice(np.flatnonzero(y == 1), n // 2, replace=False)
    females = rng.choice(np.flatnonzero(y == 0), n - n // 2, replace=False)
    return np.sort(np.concatenate([males, females]))


def ranking(y: np.ndarray, prob: np.ndarray, rule: str) -> np.ndarray:
    """Row positions, least plausible given label first: by the pipeline's label quality (P(given label)
    adjusted per class), or by P(given label) alone."""
    p_label = np.where(y == 1, prob, 1 - prob)
    if rule == "p_given_label":
        return np.argsort(p_label, kind="stable")
    return np.lexsort((p_label, label_quality(y, prob)))


RULES = ("label_quality", "p_given_label")


def precision_at(order: np.ndarray, bad: np.ndarray, k: int) -> float:
    return float(bad[order[:k]].mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=Path("/work/shared/data/generated_photos"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/recipe_ablation_cache"))
    ap.add_argument("--records", type=Path, default=REPO / "bench" / "audit_bench.jsonl")
    ap.add_argument(
        "--audits",
        default="cnn@42,mobilenetv2@42",
        help="audits to run and compare, model@seed (the seed picks the folds and initialisations)",
    )
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, help="the audit model's epochs, exactly (default: its cpu audit plan)")
    ap.add_argument("--image-size", type=int, help="the audit model's input size in px (default: its cpu audit plan's)")
    ap.add_argument("--flip", type=int, default=30, help="labels flipped before the audit (0: none)")
    ap.add_argument("--flip-seed", type=int, default=42, help="picks the flipped labels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--key", type=Path, help="hand-made key: CSV with columns key, mislabeled (0/1)")
    ap.add_argument("--top", type=int, default=50)
    ap.add_argument("--sheet", type=Path, help="write a contact sheet of every ranking's top --top images")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument(
        "--class-weighting",
        choices=("none", "balanced"),
        help="the audit model's class weighting (default: the cpu profile's)",
    )
    a = ap.parse_args(argv)
    weighting = a.class_weighting or ra.CONFIGS["cpu"].recipe.class_weighting
    torch.set_num_threads(a.threads)
    audits = [(m, int(s)) for m, _, s in (x.partition("@") for x in a.audits.split(",") if x)]

    def audit_plan(model: str) -> tuple[int | None, int | None]:
        """(epochs, input size) of `model`'s audit: the flags', else its cpu audit plan (ModelSpec.audit_epochs
        and audit_image_size, as the pipeline's label audit trains its folds); None: the model's own cpu plan."""
        spec = get_model_spec(model)
        return a.epochs or spec.audit_epochs.get("cpu"), a.image_size or spec.audit_image_size.get("cpu")

    def audit_config(epochs: int | None, size: int | None) -> str:
        """The recipe_ablation configuration an audit of these epochs and input size trains under, registered:
        the cpu profile's training (with these epochs, exactly: no minimum of steps), this class weighting and
        input size."""
        config = (f"cpu_epochs{epochs}_{weighting}" if epochs else f"cpu_{weighting}") + (f"_{size}px" if size else "")
        base = ra.profile_config("cpu", epochs=epochs) if epochs else ra.CONFIGS["cpu"]
        ra.CONFIGS[config] = dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, class_weighting=weighting),
                                                 image_size=size)  # fmt: skip
        return config

    plans = {m: audit_plan(m) for m, _ in audits}  # model -> (epochs, input size)
    configs = {m: audit_config(*plan) for m, plan in plans.items()}
    sizes = {ra.model_size(ra.CONFIGS[configs[m]], m) for m in plans}
    manifest, arrays = ra.load_faces(a.source, a.cache, sizes)
    y_true = encode_labels(manifest["label"])
    flips = flipped_positions(y_true, a.flip, a.flip_seed) if a.flip else np.array([], dtype=np.int64)
    y = y_true.copy()
    y[flips] = 1 - y[flips]
    audited = manifest.assign(label=np.where(y == 1, "male", "female"))

    done = {}
    if a.records.exists():
        for line in a.records.read_text().splitlines():
            r = json.loads(line)
            # records that do not say trained unweighted: class weighting came later
            done[(r["model"], r["seed"], r["flip"], r["flip_seed"], r["folds"], r.get("epochs"),
                  r.get("class_weighting", "none"), r.get("image_size"))] = r  # fmt: skip

    def record_key(model: str, seed: int) -> tuple:
        """An audit's record: its model and seed under this run's flips, folds and class weighting, and its
        epochs and input size (None: the model's own cpu plan)."""
        epochs, size = plans[model]
        return (model, seed, a.flip, a.flip_seed, a.folds, epochs, weighting, size)

    for model, seed in audits:
        if record_key(model, seed) in done or a.table_only:
            continue
        rec = ra.run_audit(configs[model], seed, audited, arrays, y, folds=a.folds, model=model)
        epochs, size = plans[model]
        rec |= {"model": model, "flip": a.flip, "flip_seed": a.flip_seed, "folds": a.folds, "epochs": epochs,
                "class_weighting": weighting, "image_size": size}  # fmt: skip
        done[record_key(model, seed)] = rec
        with a.records.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"# {model}@{seed}: {rec['train_seconds']} s, out-of-fold accuracy {rec['oof_accuracy']}", flush=True)

    bad = np.zeros(len(y), dtype=bool)
    bad[flips] = True
    keyed = np.zeros(len(y), dtype=bool)  # judged: flipped, or in the hand key either way
    keyed[flips] = True
    if a.key:
        key = pd.read_csv(a.key)
        marked = set(key.loc[key["mislabeled"].astype(int) == 1, "key"])
        bad |= manifest["key"].isin(marked).to_numpy()
        keyed |= manifest["key"].isin(set(key["key"])).to_numpy()
    probs = {f"{m}@{s}": np.asarray(done[record_key(m, s)]["prob_male"]) for m, s in audits if record_key(m, s) in done}
    candidates = dict(probs)
    for r in range(2, len(probs) + 1):
        for combo in itertools.combinations(probs, r):
            candidates[" + ".join(combo)] = np.mean([probs[m] for m in combo], axis=0)
    print(
        f"\n{a.flip} labels flipped (seed {a.flip_seed}), {len(y)} images, {int(bad.sum())} counted as mislabeled"
        f"{' (flipped + hand key)' if a.key else ''}\n"
    )
    # Unjudged images in the top 50 count as correctly labeled: a ranking that reaches past the key reads low.
    print("| audit | ranked by | OOF accuracy (given labels) | precision@25 | precision@50 | precision@100 | "
          "flipped in top 50 | unjudged in top 50 |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    orders = {}
    for name, prob in candidates.items():
        acc = float(((prob >= 0.5) == (y == 1)).mean())
        for rule in RULES:
            order = orders[name, rule] = ranking(y, prob, rule)
            flipped_top = int(np.isin(order[:50], flips).sum())
            print(f"| {name} | {rule} | {acc:.3f} | {precision_at(order, bad, 25):.2f} | "
                  f"{precision_at(order, bad, 50):.2f} | {precision_at(order, bad, 100):.2f} | "
                  f"{flipped_top} of {len(flips)} | {int((~keyed[order[:50]]).sum()) if a.key else 'no key'} |")  # fmt: skip
    if a.sheet:
        union = list(dict.fromkeys(i for order in orders.values() for i in order[: a.top] if i not in set(flips)))
        contact_sheet(a.source, manifest, y, union, a.sheet)
        print(
            f"\ncontact sheet of {len(union)} candidates (flipped images left out): {a.sheet} "
            f"(+ {a.sheet.with_suffix('.csv')})"
        )


def contact_sheet(source: Path, manifest: pd.DataFrame, y: np.ndarray, rows: list[int], out: Path) -> None:
    """Thumbnails of `rows` with their index and given label, 10 a row; the index -> key list beside it."""
    from PIL import Image, ImageDraw

    cell, cols = 128, 10
    sheet = Image.new("RGB", (cols * cell, ((len(rows) + cols - 1) // cols) * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, i in enumerate(rows):
        with Image.open(source / manifest["key"].iloc[i]) as im:
            thumb = im.convert("RGB").resize((cell, cell))
        x, yy = (n % cols) * cell, (n // cols) * (cell + 14)
        sheet.paste(thumb, (x, yy))
        draw.text((x + 2, yy + cell), f"{n} {'M' if y[i] else 'F'}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    pd.DataFrame({"n": range(len(rows)), "key": manifest["key"].iloc[rows].to_numpy(),
                  "given": np.where(y[rows] == 1, "male", "female")}).to_csv(out.with_suffix(".csv"), index=False)  # fmt: skip


if __name__ == "__main__":
    main()
