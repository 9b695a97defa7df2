"""bench/gpu_check.sh --smoke on the CPU: the GPU verification script runs end to end and writes its
figures, so it cannot rot between the GPU sessions that run it for real. Plus the pieces of the GPU
training path that a CPU can check: the up-front draws of an epoch, the batch gathering, the
memory budget of GPU-resident images and the compile switch."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
from helpers import REPO, write_dataset

from gender_tasks.training.augment import augment_params
from gender_tasks.training.batches import SplitData
from gender_tasks.training.devices import MIN_HEADROOM_BYTES, compile_backend, maybe_compile, resident_budget
from gender_tasks.training.loop import epoch_plan


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_and_writes_numbers(tmp_path, airflow_db):
    faces = write_dataset(tmp_path / "faces", 12, size=64)
    results = tmp_path / "results"
    env = {**os.environ, "GPU_CHECK_FACES": str(faces), "AIRFLOW_HOME": str(airflow_db), "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)  # the script puts this checkout first itself
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(results), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((results / "results.json").read_text())
    assert {p: t["exit_code"] for p, t in summary["parts"].items()} == dict.fromkeys(
        ("faces", "weights", "paper", "train_bench", "concurrency", "compile"), 0
    )
    cnn = summary["paper"]["models"]["cnn"]
    assert cnn["train_seconds"] > 0 and cnn["mean_images_per_s"] > 0 and cnn["device"] == "cpu"
    assert summary["paper"]["task_durations"]["label audit"] > 0  # the whole run, label audit included
    (bench,) = summary["train_bench"]["models"]
    assert bench["model"] == "cnn" and bench["ratio"] > 0 and math.isfinite(bench["ratio"])
    levels = summary["concurrency"]["levels"]
    assert set(levels) == {"1", "2"} and all(r["wall_seconds"] > 0 for r in levels.values())
    assert summary["compile"]["steady_epoch_compiled_s"] > 0 and summary["compile"]["backend"] == "eager"
    text = (results / "summary.md").read_text()
    assert "| cnn |" in text and "lowest ratio" in text and "speed-up" in text
    # A GPU check without a GPU stops at once and says why, instead of measuring the CPU.
    nogpu = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "r2")],
                           env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert nogpu.returncode == 3 and "no CUDA GPU" in nogpu.stderr and "--smoke" in nogpu.stderr


def test_an_epochs_draws_are_those_of_the_per_batch_loop():
    """Drawn up front, the order and augmentation are exactly what drawing per batch gave (same seed,
    same results); a trailing batch of one is skipped and draws nothing."""
    n, batch = 33, 8
    order, trained, params = epoch_plan(n, batch, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    expected_order = torch.randperm(n, generator=gen)
    expected = [augment_params(batch, gen) for _ in range(4)]  # 4 full batches; the 33rd image is left out
    assert torch.equal(order, expected_order) and trained == 32
    for key in ("flip", "angle", "zoom"):
        assert torch.equal(params[key], torch.cat([e[key] for e in expected]))
    _, trained, params = epoch_plan(37, batch, torch.Generator().manual_seed(5))
    assert trained == 37 and len(params["zoom"]) == 37  # a last batch of five trains


def test_cpu_batches_follow_the_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3).contiguous()
    data = SplitData(images, torch.arange(10).float(), [str(i) for i in range(10)])
    order = torch.tensor([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
    got = list(data.batches(order, 4))
    assert [b[0][:, 0, 0, 0].tolist() for b in got] == [[3, 1, 4, 0], [9, 2, 6, 5], [8, 7]]
    assert [b[1].tolist() for b in got] == [[3.0, 1.0, 4.0, 0.0], [9.0, 2.0, 6.0, 5.0], [8.0, 7.0]]


def test_gpu_resident_images_keep_a_headroom_and_a_share_per_task():
    gib = 1 << 30
    assert resident_budget(free=78 * gib, total=80 * gib, sharing=1) == 58 * gib  # 80 less a quarter
    assert resident_budget(free=78 * gib, total=80 * gib, sharing=4) == 15 * gib  # a quarter of the card, less 5
    assert resident_budget(free=2 * gib, total=80 * gib, sharing=1) == 0  # what others took is not ours
    assert resident_budget(free=16 * gib, total=16 * gib, sharing=1) == 16 * gib - MIN_HEADROOM_BYTES


@pytest.mark.slow
@pytest.mark.parametrize(("value", "backend"), [("", None), ("0", None), ("1", "inductor"), ("eager", "eager")])
def test_torch_compile_is_opt_in(monkeypatch, value, backend):
    monkeypatch.setenv("GENDER_TORCH_COMPILE", value)
    assert compile_backend() == backend
    model = torch.nn.Linear(3, 1)
    compiled = maybe_compile(model)
    assert (compiled is None) == (backend is None)
    if compiled is not None:  # a wrapper sharing the parameters; the module itself stays plain
        assert list(model.state_dict()) == ["weight", "bias"] and compiled.weight is model.weight
