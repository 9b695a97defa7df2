"""Recipe ablation for the `cpu` profile (issue 11): which training changes raise test accuracy.

Owns: decoding the shared faces once per input size (cached under --cache), a seeded stratified
70/15/15 split per seed that keeps near-identical images (phash within 2 bits) together, a
self-contained training loop (gender_tasks.models + gender_tasks.augment, nothing from train.py),
per-run records in a JSONL file (runs already there are skipped, so a rerun only adds what is
missing), and the table: mean +- std test accuracy per configuration and model, the ensemble (mean
probability of the models), and training seconds.

Every run evaluates val and test after each epoch, with and without flip test-time augmentation,
so "best-validation epoch" and "flip TTA" are read off the same training runs (configurations with
`base` reuse another configuration's runs and change only how they are read).

    .venv/bin/python bench/recipe_ablation.py --seeds 0,1,2 --models cnn,mobilenetv2 --configs baseline,flip
    .venv/bin/python bench/recipe_ablation.py --audit --configs baseline,final --seeds 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gender_tasks.augment import augment_batch, augment_params  # noqa: E402
from gender_tasks.evaluation.repeats import corrected_resampled_ttest  # noqa: E402
from gender_tasks.models import IMAGENET_MEAN, IMAGENET_STD, build_model, uses_imagenet_normalisation  # noqa: E402
from gender_tasks.near_duplicates import phash_of_bytes  # noqa: E402
from gender_tasks.preprocess import decode_resize  # noqa: E402
from gender_tasks.split import assign_splits  # noqa: E402

MODELS = ("cnn", "resnet50", "inceptionv3", "mobilenetv2")
MIN_SIZE = {"cnn": 16, "resnet50": 32, "inceptionv3": 75, "mobilenetv2": 32}
CURRENT_EPOCHS = {"cnn": 12, "resnet50": 5, "inceptionv3": 5, "mobilenetv2": 5}
CURRENT_SIZE = {"cnn": 64, "resnet50": 64, "inceptionv3": 75, "mobilenetv2": 64}

# The current cpu recipe; every configuration below changes some of these.
BASE = {
    "size": None,  # None: CURRENT_SIZE per model; an int applies to every model (at least its minimum)
    "epochs": None,  # None: CURRENT_EPOCHS; an int applies to every model; a dict per model
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "schedule": "constant",  # or "warmup_cosine": linear warm-up for `warmup` of the steps, then cosine to 0
    "warmup": 0.15,
    "label_smoothing": 0.0,
    "augment": "full",  # flip + rotation +-10 deg + zoom +-10 %; "flip": flips only
    "batch": 32,
    "best_epoch": False,  # read the epoch with the best validation accuracy instead of the last
    "tta": False,  # mean probability of the image and its mirror image
}
EVAL_ONLY = ("best_epoch", "tta")

COMBO = {"augment": "flip", "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "schedule": "warmup_cosine",
         "label_smoothing": 0.1}  # fmt: skip
CONFIGS: dict[str, dict] = {
    "baseline": {},
    "best": {"base": "baseline", "best_epoch": True},
    "tta": {"base": "baseline", "tta": True},
    "flip": {"augment": "flip"},
    "adamw": {"optimizer": "adamw", "weight_decay": 0.05},
    "cosine": {"schedule": "warmup_cosine", "lr": 2e-3},
    "smooth": {"label_smoothing": 0.1},
    "batch64": {"batch": 64},
    "size80": {"size": 80},
    "size96": {"size": 96},
    "ep2x": {"epochs": {"cnn": 24, "resnet50": 10, "inceptionv3": 10, "mobilenetv2": 10}},
    "combo": COMBO,
    "combo_tta": {"base": "combo", "tta": True},
    "combo_best_tta": {"base": "combo", "best_epoch": True, "tta": True},
    "combo_ep2x": {**COMBO, "epochs": {"cnn": 24, "resnet50": 10, "inceptionv3": 10, "mobilenetv2": 10}},
    "combo_ep2x_tta": {"base": "combo_ep2x", "tta": True},
    "combo_ep2x_full": {
        **COMBO,
        "augment": "full",
        "epochs": {"cnn": 24, "resnet50": 10, "inceptionv3": 10, "mobilenetv2": 10},
    },  # fmt: skip
    "combo_ep2x_full_tta": {"base": "combo_ep2x_full", "tta": True},
}


def recipe(name: str) -> tuple[str, dict]:
    """(the configuration whose runs are read, the full recipe) for configuration `name`."""
    spec = dict(CONFIGS[name])
    base = spec.pop("base", None)
    if base is None:
        return name, {**BASE, **spec}
    train_name, trained = recipe(base)
    return train_name, {**trained, **spec}


def model_size(r: dict, model: str) -> int:
    size = CURRENT_SIZE[model] if r["size"] is None else int(r["size"])
    return max(size, MIN_SIZE[model])


def model_epochs(r: dict, model: str) -> int:
    e = r["epochs"]
    return CURRENT_EPOCHS[model] if e is None else int(e[model] if isinstance(e, dict) else e)


# ---------------------------------------------------------------- data


def load_faces(source: Path, cache: Path, sizes: set[int]) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """The manifest (key, label, sha256, phash) and uint8 NHWC arrays per size, decoded once and cached."""
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
    return manifest, arrays


def split_indices(manifest: pd.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """Row indices of train/val/test: stratified 70/15/15, near-identical images (2 bits) together."""
    split = assign_splits(manifest, seed, [0.70, 0.15, 0.15], group_distance=2)["split"].to_numpy()
    return {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}


# ---------------------------------------------------------------- training


def to_input(xb: torch.Tensor, model: str, aug: dict | None, mode: str) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] (ImageNet-normalised for the torchvision models), augmented."""
    x = xb.permute(0, 3, 1, 2).float().div_(255.0)
    if aug is not None:
        if mode == "flip":
            x = torch.where(aug["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        else:
            x = augment_batch(x, aug)
    if uses_imagenet_normalisation(model):
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x


def logits_of(out) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple) else out).squeeze(1).float()


def make_optimizer(model: torch.nn.Module, r: dict):
    cls = torch.optim.AdamW if r["optimizer"] == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])


def lr_factor(step: int, total: int, r: dict) -> float:
    """Multiplier of the peak learning rate at `step` of `total` (constant, or warm-up then cosine)."""
    if r["schedule"] == "constant":
        return 1.0
    warm = max(1, round(r["warmup"] * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.inference_mode()
def predict(model, model_name: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """P(male) for every image: plain and flip-TTA (mean of the image and its mirror)."""
    model.eval()
    plain, tta = [], []
    for start in range(0, len(x), 128):
        xb = to_input(x[start : start + 128], model_name, None, "")
        p = torch.sigmoid(logits_of(model(xb)))
        pf = torch.sigmoid(logits_of(model(xb.flip(3))))
        plain.append(p)
        tta.append((p + pf) / 2)
    return torch.cat(plain).numpy(), torch.cat(tta).numpy()


def train_epoch(model, model_name, x, y, opt, sched_step, r, gen) -> int:
    """One shuffled, augmented pass; returns the updated global step count."""
    model.train()
    order = torch.randperm(len(y), generator=gen)
    eps = r["label_smoothing"]
    for start in range(0, len(y), r["batch"]):
        idx = order[start : start + r["batch"]]
        if len(idx) < 2:
            continue  # batch norm cannot train on one image
        xb = to_input(x[idx], model_name, augment_params(len(idx), gen), r["augment"])
        target = y[idx] * (1 - eps) + 0.5 * eps
        loss = F.binary_cross_entropy_with_logits(logits_of(model(xb)), target)
        for g in opt.param_groups:
            g["lr"] = r["lr"] * sched_step[1](sched_step[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched_step[0] += 1
    return sched_step[0]


def fit(model_name: str, r: dict, seed: int, train: tuple, evals: dict[str, torch.Tensor]) -> dict:
    """Train one model; per epoch: val/test probabilities (plain and TTA) and training seconds."""
    torch.manual_seed(seed)
    model = build_model(model_name, model_size(r, model_name), "none")
    opt = make_optimizer(model, r)
    epochs = model_epochs(r, model_name)
    x, y = train
    total = epochs * math.ceil(len(y) / r["batch"])
    step = [0, lambda s: lr_factor(s, total, r)]
    history, seconds = [], 0.0
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        t0 = time.perf_counter()
        train_epoch(model, model_name, x, y, opt, step, r, gen)
        seconds += time.perf_counter() - t0
        history.append({name: predict(model, model_name, xe) for name, xe in evals.items()})
    return {"history": history, "train_seconds": seconds, "epochs": epochs}


# ---------------------------------------------------------------- runs and records


def run_key(config: str, model: str, seed: int) -> str:
    return f"{config}|{model}|{seed}"


def load_records(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {run_key(r["config"], r["model"], r["seed"]): r for r in recs}


def accuracy(prob: np.ndarray, y: np.ndarray) -> float:
    return float(((np.asarray(prob) >= 0.5) == (y == 1)).mean())


def run_one(config, model_name, seed, manifest, arrays, y_all) -> dict:
    """Train one (configuration, model, seed) and return its record (per-epoch val/test probabilities)."""
    _, r = recipe(config)
    idx = split_indices(manifest, seed)
    images = torch.from_numpy(arrays[model_size(r, model_name)])
    y = torch.from_numpy(y_all.astype(np.float32))
    out = fit(model_name, r, seed, (images[idx["train"]], y[idx["train"]]),
              {"val": images[idx["val"]], "test": images[idx["test"]]})  # fmt: skip
    epochs = [{f"{s}_{v}": p[i].round(5).tolist() for s, p in h.items() for i, v in enumerate(("plain", "tta"))}
              for h in out["history"]]  # fmt: skip
    return {"config": config, "model": model_name, "seed": seed, "size": model_size(r, model_name),
            "epochs": out["epochs"], "train_seconds": round(out["train_seconds"], 2),
            "n_train": len(idx["train"]), "threads": torch.get_num_threads(), "per_epoch": epochs}  # fmt: skip


def read_run(rec: dict, r: dict, y_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(val probabilities, test probabilities) as recipe `r` reads a run: last or best-val epoch, TTA or not."""
    v = "tta" if r["tta"] else "plain"
    epochs = rec["per_epoch"]
    if r["best_epoch"]:
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
        train_name, r = recipe(config)
        test_probs: dict[int, list[np.ndarray]] = {s: [] for s in seeds}
        for model in models:
            val, test, secs, got = [], [], [], []
            for s in seeds:
                rec = records.get(run_key(train_name, model, s))
                if rec is None:
                    continue
                pv, pt = read_run(rec, r, y_all[splits[s]["val"]])
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
    train_name, r = recipe(config)
    out = {}
    for s in seeds:
        rec = records.get(run_key(train_name, model, s))
        if rec is not None:
            _, pt = read_run(rec, r, y_all[splits[s]["val"]])
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
    """Out-of-fold P(male) for every image with `config`'s recipe; OOF accuracy, log loss, count under 0.1."""
    from sklearn.model_selection import StratifiedKFold

    _, r = recipe(config)
    images = torch.from_numpy(arrays[model_size(r, model)])
    y = torch.from_numpy(y_all.astype(np.float32))
    prob = np.zeros(len(y_all))
    seconds = 0.0
    for k, (fit_idx, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y_all, y_all)):
        out = fit(model, r, seed + k, (images[fit_idx], y[fit_idx]), {"held": images[held]})
        pv, pt = out["history"][-1]["held"]
        prob[held] = pt if r["tta"] else pv
        seconds += out["train_seconds"]
    p_label = np.clip(np.where(y_all == 1, prob, 1 - prob), 1e-6, 1)
    return {"config": config, "seed": seed, "oof_accuracy": round(accuracy(prob, y_all), 4),
            "oof_log_loss": round(float(-np.log(p_label).mean()), 4), "under_0.1": int((p_label < 0.1).sum()),
            "train_seconds": round(seconds, 1), "prob_male": prob.round(4).tolist()}  # fmt: skip


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
    sizes = {model_size(recipe(c)[1], m) for c in configs for m in (["cnn"] if a.audit else models)}
    manifest, arrays = load_faces(a.source, a.cache, sizes)
    y_all = (manifest["label"] == "male").to_numpy().astype(np.int64)
    if a.audit:
        return audit_main(a, configs, seeds, manifest, arrays, y_all)
    records = load_records(a.records)
    for config in configs:
        train_name = recipe(config)[0]
        for model in models:
            for seed in seeds:
                if a.table_only or run_key(train_name, model, seed) in records:
                    continue
                rec = run_one(train_name, model, seed, manifest, arrays, y_all)
                records[run_key(train_name, model, seed)] = rec
                with a.records.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"# {train_name} {model} seed {seed}: {rec['train_seconds']:.1f}s", flush=True)
    print_table(table_rows(configs, models, seeds, records, manifest, y_all))
    if a.compare:
        print_comparisons(a.compare, configs, models, seeds, records, manifest, y_all)


def audit_main(a, configs, seeds, manifest, arrays, y_all) -> None:
    path = a.records.with_name("recipe_ablation_audit.jsonl")
    done = (
        {(r["config"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())} if path.exists() else set()
    )
    for config in configs:
        for seed in seeds:
            if (config, seed) not in done and not a.table_only:
                with path.open("a") as f:
                    f.write(json.dumps(run_audit(config, seed, manifest, arrays, y_all)) + "\n")
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    print("| config | seed | OOF accuracy | OOF log loss | images under 0.1 | training s |\n|---|---|---|---|---|---|")
    for r in recs:
        if r["config"] in configs and r["seed"] in seeds:
            print(f"| {r['config']} | {r['seed']} | {r['oof_accuracy']:.3f} | {r['oof_log_loss']:.3f} | "
                  f"{r['under_0.1']} | {r['train_seconds']} |")  # fmt: skip


if __name__ == "__main__":
    main()
