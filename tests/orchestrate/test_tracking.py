"""wandb tracking (offline, files kept under the run root) and prediction previews on a fixed batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrate.evaluation.wandb_helpers import resolve_mode, run_id, wandb_env
from orchestrate.previews import fixed_batch, render
from orchestrate.tracking import Tracker
from pipelines import mixture_file
from xsam_model import build_xsam

WANDB_KEYS = (
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_DATA_DIR",
    "WANDB_CONFIG_DIR",
    "WANDB_SILENT",
    "WANDB_SERVICE",
    "WANDB_API_KEY",
)


@pytest.fixture
def clean_wandb_env():
    saved = {k: os.environ.get(k) for k in WANDB_KEYS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_xsam("debug")


def test_mode_and_folders(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"  # never a login prompt, never a hang
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"
    env = wandb_env(tmp_path, "offline")
    assert {env[k] for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")} <= {
        str(tmp_path),
        str(tmp_path / ".cache"),
        str(tmp_path / ".data"),
        str(tmp_path / ".config"),
    }
    assert run_id("my run/x", 3, "/a/my run/x").startswith("my-run-x-stage3-")
    assert run_id("run", 1, "/a/run") == run_id("run", 1, "/a/run") != run_id("run", 1, "/b/run")


@pytest.mark.parametrize("stage", [1, 3])
def test_previews_of_a_fixed_batch(train_shards, model, stage):
    stage_mix = mixture_file.load(str(train_shards)).stage(stage)
    batch, samples = fixed_batch(str(train_shards), stage_mix, model.processor, 2)
    again, _ = fixed_batch(str(train_shards), stage_mix, model.processor, 2)
    assert batch["keys"] == again["keys"] and len(samples) == 2  # the same samples every time
    p = model.config.processor
    previews = render(model, batch, samples, stage=stage, mean=p.sam_mean, std=p.sam_std, score_threshold=0.0)
    assert len(previews) == 2
    for pv, s in zip(previews, samples, strict=True):
        h, w = pv["image"].shape[:2]
        assert pv["image"].dtype == np.uint8 and pv["pred"].shape == pv["truth"].shape == (h, w)
        assert max(h, w) == p.sam_size  # the image inside the SAM frame, padding cropped
        assert pv["truth"].max() > 0 and pv["pred"].max() > 0
        assert set(np.unique(pv["truth"])) - {0} <= set(pv["labels"])
        truth_names = {pv["labels"][i] for i in set(np.unique(pv["truth"])) - {0}}
        assert truth_names <= set(s.phrases)  # true masks are named by their phrases (stage 1 too)
    assert model.training  # render restores train mode


def test_offline_run_keeps_its_files_under_the_run_root(
    train_shards, model, tmp_path, clean_wandb_env, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wdir = tmp_path / "run" / "stage3" / "wandb"
    t = Tracker(
        project="xsam-test",
        run_name="run",
        stage=3,
        config={"lr": 1.0},
        mode="auto",
        wandb_dir=wdir,
        metrics_file=tmp_path / "metrics.jsonl",
    )
    for step in (1, 2):
        t.log(step, {"loss": 3.0 - step, "loss/lm": 1.0, "lr/llm": 1e-5, "source": "refcoco/train"})
    t.log_mixture(2, {"refcoco/train": 2}, {"refcoco/train": 0.75, "coco_panoptic/train": 0.25})
    stage_mix = mixture_file.load(str(train_shards)).stage(3)
    batch, samples = fixed_batch(str(train_shards), stage_mix, model.processor, 2)
    p = model.config.processor
    t.log_predictions(2, render(model, batch, samples, stage=3, mean=p.sam_mean, std=p.sam_std))
    run_dir = Path(t.finish())
    assert run_dir.parent == wdir / "wandb" and run_dir.name.startswith("offline-run-")
    assert list(run_dir.glob("*.wandb")) and list(run_dir.glob("files/media/images/predictions_*.png"))
    assert not (tmp_path / "wandb").exists()  # nothing in the working directory
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[1]["loss"] == 1.0 and rows[2]["mixture/seen/refcoco/train"] == 1.0
    out = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = json.loads(out.stdout)["summary"]
    assert summary["loss"] == 1.0 and summary["mixture/planned/refcoco/train"] == 0.75
    assert summary["mixture/max_abs_gap"] == pytest.approx(0.25)
    assert summary["predictions"]["count"] == 2


def test_other_ranks_get_a_null_tracker_with_the_same_methods(tmp_path):
    import inspect

    from orchestrate.plan import RunPlan
    from orchestrate.stages import debug, stage3
    from orchestrate.tracking import NullTracker, make_tracker

    public = lambda cls: {n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))}  # noqa: E731
    assert public(NullTracker) == public(Tracker) - {"__init__"}
    for name in public(NullTracker):
        assert inspect.signature(getattr(NullTracker, name)) == inspect.signature(getattr(Tracker, name)), (
            name
        )
    plan = RunPlan(
        cfg=debug(stage3()),
        run_root=str(tmp_path),
        run_name="r",
        shards="s",
        mixture="m",
        total_steps=2,
        steps_per_epoch=1,
    )
    null = make_tracker(plan, 1, {})
    assert isinstance(null, NullTracker) and not null.active
    null.log(1, {"loss": 1.0})
    null.log_mixture(1, {"a": 1}, {"a": 1.0})
    null.log_predictions(1, [{"image": None}])
    null.summary({"x": 1})
    assert null.finish() is None and not list(tmp_path.iterdir())  # nothing written anywhere


def test_previews_are_padded_to_one_size_for_one_wandb_panel():
    import numpy as np

    from orchestrate.tracking import _same_size

    small = {
        "image": np.ones((2, 3, 3), np.uint8),
        "pred": np.ones((2, 3), int),
        "truth": np.ones((2, 3), int),
    }
    tall = {
        "image": np.ones((4, 1, 3), np.uint8),
        "pred": np.ones((4, 1), int),
        "truth": np.ones((4, 1), int),
    }
    out = _same_size([small, tall])
    assert [p["image"].shape for p in out] == [(4, 3, 3), (4, 3, 3)]
    assert [p["pred"].shape for p in out] == [(4, 3), (4, 3)]
    assert out[0]["image"][:2, :3].all() and not out[0]["image"][2:].any()  # the original, then black
    assert out[1]["truth"][:, :1].all() and not out[1]["truth"][:, 1:].any()  # label 0 = none


def test_evaluation_overlays_are_padded_to_one_size_too():
    import numpy as np

    from orchestrate.evaluation.wandb_helpers import same_size

    out = same_size([np.ones((2, 5, 3), np.uint8), np.ones((6, 1, 3), np.uint8)])
    assert [a.shape for a in out] == [(6, 5, 3), (6, 5, 3)]
    assert out[0][:2].all() and not out[0][2:].any() and out[1][:, :1].all() and not out[1][:, 1:].any()
