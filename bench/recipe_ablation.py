"""Recipe ablation for the `cpu` profile (issue 11): which training changes raise test accuracy.

Owns: decoding the shared faces once per input size (cached under --cache), a seeded split per seed
(the pipeline's: stratified 70/15/15, near-identical images, phash within 2 bits, together, the
manifest in the pipeline's order), per-run records in a JSONL file (runs already there are skipped,
so a rerun only adds what is missing), and the table: mean +- std test accuracy per configuration and
model, the ensemble (mean probability of the models), and training seconds.

Training is the pipeline's own (issue 22): each configuration is a `Recipe` with a learning rate,
batch size and the pipeline's per-model plans of a profile (`Config`), resolved into the pipeline's
`Settings`, and every run calls training.loop.train_epochs, the epoch loop the pipeline's trainer
runs (the same optimizer, schedule, freeze phases, augmentation, per-epoch generators and BatchNorm
recalibration). For a given seed the ablation's line of a configuration is the pipeline's training
with that configuration's settings on the same images.

Every run evaluates val and test after each epoch (the last epoch: the recalibrated model, as the
pipeline exports it), with and without flip test-time augmentation, so "best-validation epoch" and
"flip TTA" are read off the same training runs (configurations with `base` reuse another
configuration's runs and change only how they are read).

    .venv/bin/python bench/recipe_ablation.py --seeds 0,1,2 --models cnn,mobilenetv2 --configs baseline,flip
    .venv/bin/python bench/recipe_ablation.py --audit --configs baseline,combo_tta --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gender_tasks.data.images import decode_resize, phash_of_bytes  # noqa: E402
from gender_tasks.data.split import SPLITS, assign_splits  # noqa: E402
from gender_tasks.evaluation.metrics import encode_labels  # noqa: E402
from gender_tasks.evaluation.repeats import corrected_resampled_ttest  # noqa: E402
from gender_tasks.settings import PROFILES, STUDY_RECIPE, Recipe, RunConfig, Settings, resolve_settings  # noqa: E402
from gender_tasks.training.batches import SplitData, split_rows  # noqa: E402
from gender_tasks.training.devices import make_autocast, pick_device  # noqa: E402
from gender_tasks.training.loop import EpochDone, fit_predict, predict_proba, setup_model, train_epochs  # noqa: E402

MODELS = ("cnn", "resnet50", "inceptionv3", "mobilenetv2")
# Records of runs trained by training.loop.train_epochs carry this; earlier records (the script's own,
# self-contained loop before issue 22) are not read: their training differed from the pipeline's.
LOOP = "training.loop.train_epochs"
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}
SPLIT_FRACTIONS = list(_DEFAULTS["split"])  # the pipeline's default split, 70/15/15
GROUP_DISTANCE = int(_DEFAULTS["split_group_distance"])  # near-identical images (phash bits) kept together


@dataclass(frozen=True)
class Config:
    """One configuration: the Recipe, learning rate and batch size its runs train with, on the pipeline's
    per-model plans (size, epochs, freeze epochs, weights) of `profile`, and how its runs are read."""

    recipe: Recipe = STUDY_RECIPE  # recipe.tta only changes how the runs are read
    learning_rate: float = 1e-3  # the peak rate under a schedule
    batch_size: int = 32
    # None: the profile's size (epochs) per model; an int applies to every model (sizes: at least its minimum);
    # epochs may also be a dict per model.
    image_size: int | None = None
    epochs: int | dict[str, int] | None = None
    profile: str = "cpu"
    best_epoch: bool = False  # read the epoch with the best validation accuracy instead of the last
    base: str | None = None  # train nothing: read this configuration's runs (it differs only in reading)


def read_as(base: str, *, tta: bool | None = None, best_epoch: bool | None = None) -> Config:
    """Configuration `base`, read differently (flip TTA, best-validation epoch): the same runs."""
    cfg = CONFIGS[base]
    return dataclasses.replace(
        cfg, base=base, best_epoch=cfg.best_epoch if best_epoch is None else best_epoch,
        recipe=cfg.recipe if tta is None else dataclasses.replace(cfg.recipe, tta=tta),
    )  # fmt: skip


def profile_config(profile: str, **changes) -> Config:
    """The pipeline's own training under `profile`: its Recipe, learning rate and batch size."""
    p = PROFILES[profile]
    return Config(recipe=p.recipe, learning_rate=p.learning_rate, batch_size=p.batch_size, profile=profile, **changes)


# The `cpu` recipe before the ablation (Adam 1e-3 constant, batch 32, flip + rotation + zoom, plain
# BCE, last epoch, no TTA) on the cpu profile's sizes and epochs; every configuration changes some of it.
BASELINE = Config()
EP2X = {"cnn": 24, "resnet50": 10, "inceptionv3": 10, "mobilenetv2": 10}
WARMUP_COSINE = {"schedule": "warmup_cosine", "warmup_fraction": 0.15}
COMBO = Config(recipe=Recipe(optimizer="adamw", weight_decay=0.05, label_smoothing=0.1, augmentation="flip",
                             **WARMUP_COSINE), learning_rate=2e-3)  # fmt: skip
CONFIGS: dict[str, Config] = {
    "baseline": BASELINE,
    "flip": dataclasses.replace(BASELINE, recipe=Recipe(augmentation="flip")),
    "adamw": dataclasses.replace(BASELINE, recipe=Recipe(optimizer="adamw", weight_decay=0.05)),
    "cosine": dataclasses.replace(BASELINE, recipe=Recipe(**WARMUP_COSINE), learning_rate=2e-3),
    "smooth": dataclasses.replace(BASELINE, recipe=Recipe(label_smoothing=0.1)),
    "batch64": dataclasses.replace(BASELINE, batch_size=64),
    "size80": dataclasses.replace(BASELINE, image_size=80),
    "size96": dataclasses.replace(BASELINE, image_size=96),
    "ep2x": dataclasses.replace(BASELINE, epochs=EP2X),
    "combo": COMBO,
    "combo_ep2x": dataclasses.replace(COMBO, epochs=EP2X),
    "combo_ep2x_full": dataclasses.replace(
        COMBO, epochs=EP2X, recipe=dataclasses.replace(COMBO.recipe, augmentation="full")
    ),
    "cpu": profile_config("cpu"),  # the cpu profile as the pipeline ships it (the recipe chosen here)
}
CONFIGS |= {
    "best": read_as("baseline", best_epoch=True),
    "tta": read_as("baseline", tta=True),
    "combo_tta": read_as("combo", tta=True),
    "combo_best_tta": read_as("combo", best_epoch=True, tta=True),
    "combo_ep2x_tta": read_as("combo_ep2x", tta=True),
    "combo_ep2x_full_tta": read_as("combo_ep2x_full", tta=True),
}


def config_of(name: str) -> tuple[str, Config]:
    """(the configuration whose runs are read, the configuration) for configuration `name`."""
    cfg = CONFIGS[name]
    return (name if cfg.base is None else config_of(cfg.base)[0]), cfg


def run_settings(cfg: Config, model: str, seed: int) -> Settings:
    """The pipeline's settings of one run: `cfg.profile`'s plan for `model` as resolve_settings makes it
    (with the configuration's size and epochs), the configuration's recipe, learning rate and batch size."""
    epochs = cfg.epochs.get(model) if isinstance(cfg.epochs, dict) else cfg.epochs
    settings = resolve_settings({"profile": cfg.profile, "models": [model], "seed": seed, "epochs": epochs,
                                 "image_size": cfg.image_size})  # fmt: skip
    return settings.replace(recipe=cfg.recipe, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size)


def model_size(cfg: Config, model: str) -> int:
    return run_settings(cfg, model, 0).per_model[model].image_size


# ---------------------------------------------------------------- data


def load_faces(source: Path, cache: Path, sizes: set[int]) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """The manifest (key, label, sha256, phash) and uint8 NHWC arrays per size, decoded once and cached;
    rows in the pipeline's manifest order (label, sha256, path: data.ingest), which its split depends on."""
    cache.mkdir(parents=True, exist_ok=True)
    man_path = cache / "manifest.csv"
    if man_path.exists():
        manifest = pd.read_csv(man_path, dtype=str)
    else:
        labels = pd.read_csv(source / "labels.csv", dtype=str)[["file", "label"]]
        blobs = [(source / f).read_bytes() for f in labels["file"]]
        manifest = labels.rename(columns={"file": "key"}).assign(
            sha256=[hashlib.sha256(b).hexdigest() for b in blobs], phash=[phash_of_bytes(b) for b in blobs]
        )
        manifest.to_csv(man_path, index=False)
    arrays = {}
    for size in sorted(sizes):
        path = cache / f"{size}px.npy"
        if not path.exists():
            np.save(path, np.stack([decode_resize((source / k).read_bytes(), size) for k in manifest["key"]]))
        arrays[size] = np.load(path)
    order = manifest.sort_values(["label", "sha256", "key"], kind="stable").index.to_numpy()
    return manifest.iloc[order].reset_index(drop=True), {size: a[order] for size, a in arrays.items()}


def split_indices(manifest: pd.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """Row indices of train/val/test as the pipeline splits with `seed` (data.split.assign_splits with the
    default fractions and grouping) and trains on them (training.batches.split_rows: one row per image)."""
    split = assign_splits(manifest, seed, SPLIT_FRACTIONS, group_distance=GROUP_DISTANCE)
    return {s: split_rows(split, s).index.to_numpy() for s in SPLITS}


def split_data(manifest: pd.DataFrame, images: np.ndarray, positions: np.ndarray) -> SplitData:
    """Rows `positions` as the pipeline's in-memory split (uint8 NHWC images, float 0/1 labels, keys)."""
    labels = encode_labels(manifest["label"].iloc[positions]).astype(np.float32)
    return SplitData(torch.from_numpy(images[positions]), torch.from_numpy(labels),
                     manifest["key"].iloc[positions].tolist())  # fmt: skip


# ---------------------------------------------------------------- training


def fit(model_name: str, settings: Settings, train: SplitData, evals: dict[str, SplitData]) -> dict:
    """Train one model as the pipeline does with `settings` (training.loop.train_epochs); per epoch, P(male)
    of every image of `evals`, plain and flip-TTA (training.loop.predict_proba, at the pipeline's batch
    size), and the epoch's training loss; the last epoch's predictions are the recalibrated model's, as
    the pipeline's predictions.csv. Training seconds count the training passes only."""
    plan = settings.per_model[model_name]
    device = pick_device()
    autocast = make_autocast(device)
    model, inputs = setup_model(model_name, plan.image_size, settings.weights, settings.seed, device)

    def evaluate() -> dict:
        return {name: tuple(predict_proba(model, data, inputs, settings.batch_size * 2, autocast, tta=tta)[0]
                            for tta in (False, True)) for name, data in evals.items()}  # fmt: skip

    history, losses, seconds = [], [], []

    def after_epoch(done: EpochDone) -> None:
        losses.append(done.loss_sum / len(train))
        seconds.append(done.train_seconds)
        if done.epoch + 1 < plan.epochs:
            history.append(evaluate())

    train_epochs(model, model_name, train, inputs, autocast, plan=plan, settings=settings, seed=settings.seed,
                 on_epoch=after_epoch)  # fmt: skip
    history.append(evaluate())
    return {"history": history, "train_loss": losses, "train_seconds": sum(seconds), "epochs": plan.epochs}


# ---------------------------------------------------------------- runs and records


def run_key(config: str, model: str, seed: int) -> str:
    return f"{config}|{model}|{seed}"


def read_jsonl(path: Path) -> list[dict]:
    """The records in `path` trained with the pipeline's loop (LOOP); says how many earlier ones it leaves out."""
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in recs if r.get("loop") == LOOP]
    if len(kept) < len(recs):
        print(f"# {path.name}: {len(recs) - len(kept)} record(s) of the earlier self-contained training loop left "
              "out (not the pipeline's training); their configurations train again", file=sys.stderr)  # fmt: skip
    return kept


def load_records(path: Path) -> dict[str, dict]:
    return {run_key(r["config"], r["model"], r["seed"]): r for r in read_jsonl(path)}


def accuracy(prob: np.ndarray, y: np.ndarray) -> float:
    return float(((np.asarray(prob) >= 0.5) == (y == 1)).mean())


def run_one(config, model_name, seed, manifest, arrays) -> dict:
    """Train one (configuration, model, seed) and return its record (per-epoch val/test probabilities and
    training loss)."""
    _, cfg = config_of(config)
    settings = run_settings(cfg, model_name, seed)
    size = settings.per_model[model_name].image_size
    data = {s: split_data(manifest, arrays[size], idx) for s, idx in split_indices(manifest, seed).items()}
    out = fit(model_name, settings, data["train"], {"val": data["val"], "test": data["test"]})
    epochs = [{f"{s}_{v}": p[i].round(5).tolist() for s, p in h.items() for i, v in enumerate(("plain", "tta"))}
              | {"train_loss": loss} for h, loss in zip(out["history"], out["train_loss"], strict=True)]  # fmt: skip
    return {"config": config, "model": model_name, "seed": seed, "size": size, "epochs": out["epochs"],
            "train_seconds": round(out["train_seconds"], 2), "n_train": len(data["train"]),
            "threads": torch.get_num_threads(), "loop": LOOP, "per_epoch": epochs}  # fmt: skip


def read_run(rec: dict, cfg: Config, y_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(val probabilities, test probabilities) as `cfg` reads a run: last or best-val epoch, TTA or not."""
    v = "tta" if cfg.recipe.tta else "plain"
    epochs = rec["per_epoch"]
    if cfg.best_epoch:
        # Best validation accuracy; ties go to the later epoch (more training, same evidence).
        scores = [accuracy(e[f"val_{v}"], y_val) for e in epochs]
        chosen = epochs[max(range(len(scores)), key=lambda i: (scores[i], i))]
    else:
        chosen = epochs[-1]
    return np.asarray(chosen[f"val_{v}"]), np.asarray(chosen[f"test_{v}"])


# ---------------------------------------------------------------- table


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def table_rows(configs, models, seeds, records, manifest, y_all) -> list[dict]:
    """One row per (configuration, model) plus one per configuration for the ensemble of the models."""
    splits = {s: split_indices(manifest, s) for s in seeds}
    rows = []
    for config in configs:
        train_name, cfg = config_of(config)
        test_probs: dict[int, list[np.ndarray]] = {s: [] for s in seeds}
        for model in models:
            val, test, secs, got = [], [], [], []
            for s in seeds:
                rec = records.get(run_key(train_name, model, s))
                if rec is None:
                    continue
                pv, pt = read_run(rec, cfg, y_all[splits[s]["val"]])
                val.append(accuracy(pv, y_all[splits[s]["val"]]))
                test.append(accuracy(pt, y_all[splits[s]["test"]]))
                secs.append(rec["train_seconds"])
                found = rec
                test_probs[s].append(pt)
                got.append(s)
            if got:
                rows.append({"config": config, "model": model, "seeds": len(got), "val": fmt(val), "test": fmt(test),
                             "seconds": f"{np.mean(secs):.1f}", "s_per_epoch": f"{np.mean(secs) / found['epochs']:.2f}",
                             "size": found["size"], "epochs": found["epochs"]})  # fmt: skip
        ens = [accuracy(np.mean(p, axis=0), y_all[splits[s]["test"]]) for s, p in test_probs.items()
               if len(p) == len(models) and len(models) > 1]  # fmt: skip
        if ens:
            rows.append({"config": config, "model": "ensemble(" + "+".join(models) + ")", "seeds": len(ens),
                         "val": "", "test": fmt(ens), "seconds": "", "s_per_epoch": "", "size": "", "epochs": ""})  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["config", "model", "size", "epochs", "seeds", "val", "test", "seconds", "s_per_epoch"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


def test_accuracies(config, model, seeds, records, splits, y_all) -> dict[int, float]:
    """{seed: test accuracy} of `model` under `config` for the seeds that have a run."""
    train_name, cfg = config_of(config)
    out = {}
    for s in seeds:
        rec = records.get(run_key(train_name, model, s))
        if rec is not None:
            _, pt = read_run(rec, cfg, y_all[splits[s]["val"]])
            out[s] = accuracy(pt, y_all[splits[s]["test"]])
    return out


def print_comparisons(reference, configs, models, seeds, records, manifest, y_all) -> None:
    """Each configuration against `reference`, per model: the corrected resampled t-test over seeds."""
    splits = {s: split_indices(manifest, s) for s in seeds}
    n_train, n_test = len(splits[seeds[0]]["train"]), len(splits[seeds[0]]["test"])
    print(
        f"\n| config vs {reference} | model | seeds | mean difference | t (corrected) | p |\n|---|---|---|---|---|---|"
    )
    for model in models:
        ref = test_accuracies(reference, model, seeds, records, splits, y_all)
        for config in configs:
            acc = test_accuracies(config, model, seeds, records, splits, y_all)
            diffs = [acc[s] - ref[s] for s in seeds if s in acc and s in ref]
            if config != reference and diffs:
                res = corrected_resampled_ttest(diffs, n_train, n_test)
                print(f"| {config} | {model} | {res['n']} | {res['mean']:+.3f} | {res['t']:.2f} | {res['p']:.3f} |")


# ---------------------------------------------------------------- label audit


def run_audit(config: str, seed: int, manifest, arrays, y_all, folds: int = 5, model: str = "cnn") -> dict:
    """Out-of-fold P(male) for every image with `config`'s recipe (the label audit's training.loop.fit_predict
    per fold, seed + fold, as the pipeline's audit); OOF accuracy, log loss, count under 0.1."""
    from sklearn.model_selection import StratifiedKFold

    _, cfg = config_of(config)
    settings = run_settings(cfg, model, seed)
    plan = settings.per_model[model]
    images = arrays[plan.image_size]
    prob = np.zeros(len(y_all))
    started = time.perf_counter()
    for k, (fit_idx, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y_all, y_all)):
        prob[held] = fit_predict(model, plan, settings, split_data(manifest, images, fit_idx),
                                 split_data(manifest, images, held), seed + k)  # fmt: skip
    seconds = time.perf_counter() - started
    p_label = np.clip(np.where(y_all == 1, prob, 1 - prob), 1e-6, 1)
    return {"config": config, "seed": seed, "oof_accuracy": round(accuracy(prob, y_all), 4),
            "oof_log_loss": round(float(-np.log(p_label).mean()), 4), "under_0.1": int((p_label < 0.1).sum()),
            "train_seconds": round(seconds, 1), "loop": LOOP, "prob_male": prob.round(4).tolist()}  # fmt: skip


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=Path("/work/shared/data/generated_photos"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/recipe_ablation_cache"))
    ap.add_argument("--records", type=Path, default=REPO / "bench" / "recipe_ablation_runs.jsonl")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default="cnn,mobilenetv2")
    ap.add_argument("--configs", default="baseline,flip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", default="", help="also test every configuration against this one (corrected t-test)")
    ap.add_argument("--table-only", action="store_true", help="print the table from the records, train nothing")
    ap.add_argument("--audit", action="store_true", help="5-fold out-of-fold label audit with the CNN instead")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    models = [m for m in a.models.split(",") if m]
    configs = [c for c in a.configs.split(",") if c]
    sizes = {model_size(config_of(c)[1], m) for c in configs for m in (["cnn"] if a.audit else models)}
    manifest, arrays = load_faces(a.source, a.cache, sizes)
    y_all = encode_labels(manifest["label"])
    if a.audit:
        return audit_main(a, configs, seeds, manifest, arrays, y_all)
    records = load_records(a.records)
    for config in configs:
        train_name = config_of(config)[0]
        for model in models:
            for seed in seeds:
                if a.table_only or run_key(train_name, model, seed) in records:
                    continue
                rec = run_one(train_name, model, seed, manifest, arrays)
                records[run_key(train_name, model, seed)] = rec
                with a.records.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"# {train_name} {model} seed {seed}: {rec['train_seconds']:.1f}s", flush=True)
    print_table(table_rows(configs, models, seeds, records, manifest, y_all))
    if a.compare:
        print_comparisons(a.compare, configs, models, seeds, records, manifest, y_all)


def audit_main(a, configs, seeds, manifest, arrays, y_all) -> None:
    path = a.records.with_name("recipe_ablation_audit.jsonl")
    done = {(r["config"], r["seed"]) for r in read_jsonl(path)}
    for config in configs:
        for seed in seeds:
            if (config, seed) not in done and not a.table_only:
                with path.open("a") as f:
                    f.write(json.dumps(run_audit(config, seed, manifest, arrays, y_all)) + "\n")
    recs = read_jsonl(path)
    print("| config | seed | OOF accuracy | OOF log loss | images under 0.1 | training s |\n|---|---|---|---|---|---|")
    for r in recs:
        if r["config"] in configs and r["seed"] in seeds:
            print(f"| {r['config']} | {r['seed']} | {r['oof_accuracy']:.3f} | {r['oof_log_loss']:.3f} | "
                  f"{r['under_0.1']} | {r['train_seconds']} |")  # fmt: skip


if __name__ == "__main__":
    main()
