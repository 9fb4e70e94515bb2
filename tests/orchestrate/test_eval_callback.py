"""Evaluation while training and per-source losses, on a stand-in trainer (one worker, the debug model).

The Ray Train path (several ranks, a restart from a checkpoint) is in tests/evaluation/test_inference_eval.py.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from orchestrate.eval_callback import SourceLosses, StageEval, check_evaluation
from orchestrate.evaluation import EvaluationError
from orchestrate.run_layout import StageLayout
from orchestrate.stages import EvalConfig, StageConfigError, get_stage
from orchestrate.train_checkpoints import TrainState

SETS = ("refcoco/val", "coco_panoptic/val", "grandf_gcg/val")


@pytest.fixture(scope="module")
def val_shards(demo_root, tmp_path_factory):
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions

    out = tmp_path_factory.mktemp("eval_cb") / "shards"
    sources = sorted({s.split("/")[0] for s in SETS})
    build(
        str(demo_root), str(out), sources=sources, splits=["val"], options=BuildOptions(samples_per_shard=2)
    )
    return out


@pytest.fixture(scope="module")
def debug_model():
    from xsam_model import build_xsam

    torch.manual_seed(0)
    return build_xsam("debug")


class RecordingTracker:
    """The tracker's methods, recorded; ``run.log`` receives the wandb tables."""

    active = True

    def __init__(self):
        self.rows, self.summaries, self.tables = [], {}, []
        self.run = SimpleNamespace(log=self.tables.append)

    def log(self, step, metrics):
        self.rows.append({"step": step, **metrics})

    def summary(self, values):
        self.summaries.update(values)


def stand_in(model, shards, run_dir, *, step=0):
    cfg = get_stage(3, flavor="debug")
    plan = SimpleNamespace(shards=str(shards), layout=StageLayout(str(run_dir), 3), total_steps=6)
    return SimpleNamespace(
        cfg=cfg,
        plan=plan,
        engine=SimpleNamespace(module=model),
        rank=0,
        world=1,
        is_main=True,
        tracker=RecordingTracker(),
        state=TrainState(step=step),
    )


def _run(cb, trainer, steps):
    cb.on_train_start(trainer)
    for step in steps:
        cb.on_step_end(trainer, step, {"loss": 1.0 + step, "loss/lm": 0.5, "source": "refcoco/train"})


def test_evaluates_at_the_configured_steps_and_again_after_a_resume(
    debug_model, demo_root, val_shards, tmp_path, monkeypatch
):
    # METEOR/CIDEr start Java (seconds per evaluation): hidden here, scored in the evaluation tests
    monkeypatch.setattr("orchestrate.evaluation.captions.shutil.which", lambda name: None)
    spec = EvalConfig(every_steps=2, sets=SETS, max_samples=2, data_root=str(demo_root), max_new_tokens=6)
    model = debug_model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    first = stand_in(model, val_shards, tmp_path)
    _run(StageEval(spec), first, range(1, 6))
    evals = [r for r in first.tracker.rows if "eval/seconds" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # GCG: 6 generated tokens of random weights hold no <SEG>, so under the paper protocol (X-SAM drops such
    # samples) its mask metrics are undefined and not logged; the set's no_seg count is
    assert {"eval/refcoco/val/cIoU", "eval/coco_panoptic/val/PQ", "eval/grandf_gcg/val/no_seg"} <= set(
        evals[0]
    )
    assert (tmp_path / "stage3" / "eval" / "step_0000004" / "predictions.jsonl").is_file()
    lines = (tmp_path / "stage3" / "eval" / "step_0000002" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 2 + 2  # the first 2 samples of each set
    assert first.tracker.summaries["eval/latest/refcoco/val/cIoU"] == evals[-1]["eval/refcoco/val/cIoU"]
    # each set's metrics next to its source's mean training loss since the previous evaluation (steps 1, 2)
    table = first.tracker.tables[0]["eval/by_source"]
    rows = [dict(zip(table.columns, r, strict=True)) for r in table.data]
    assert {
        (r["source"], r["source_train_loss"], r["source_steps"]) for r in rows if r["set"] == "refcoco/val"
    } == {("refcoco", 2.5, 2)}
    assert all(r["source_train_loss"] is None for r in rows if r["source"] != "refcoco")
    # training state untouched: weights, the global RNG, train mode
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    # a worker group restarted from the step-2 checkpoint: a new callback, steps 3.. again
    resumed = stand_in(model, val_shards, tmp_path, step=2)
    _run(StageEval(spec), resumed, range(3, 5))
    again = [r for r in resumed.tracker.rows if "eval/seconds" in r]
    assert [r["step"] for r in again] == [4]
    drop = lambda r: {k: v for k, v in r.items() if k != "eval/seconds"}  # noqa: E731
    assert drop(again[0]) == drop(evals[1])  # same weights, same subset: the same numbers
    assert json.loads((tmp_path / "stage3" / "eval" / "step_0000004" / "results.json").read_text())


def test_source_losses_are_logged_under_the_step_source(debug_model, val_shards, tmp_path):
    trainer = stand_in(debug_model, val_shards, tmp_path)
    SourceLosses().on_step_end(
        trainer, 7, {"loss": 2.5, "loss/lm": 1.5, "loss/dice": 1.0, "source": "refcoco"}
    )
    assert trainer.tracker.rows == [
        {
            "step": 7,
            "loss_by_source/refcoco/total": 2.5,
            "loss_by_source/refcoco/lm": 1.5,
            "loss_by_source/refcoco/dice": 1.0,
        }
    ]
    trainer.is_main = False
    SourceLosses().on_step_end(trainer, 8, {"loss": 2.0, "source": "refcoco"})
    assert len(trainer.tracker.rows) == 1


def test_bad_evaluation_configs_fail_before_training(val_shards, demo_root):
    with pytest.raises(StageConfigError, match="stage 2"):
        dataclasses.replace(get_stage(2, flavor="debug"), evaluation=EvalConfig(every_steps=2, sets=SETS))
    with pytest.raises(StageConfigError, match="every_steps"):
        EvalConfig(every_steps=0, sets=SETS)
    cfg3 = get_stage(3, flavor="debug")
    missing = dataclasses.replace(cfg3, evaluation=EvalConfig(every_steps=2, sets=("refcoco/testA",)))
    with pytest.raises(EvaluationError, match="refcoco/testA was not built"):
        check_evaluation(missing, str(val_shards))
    stage1 = dataclasses.replace(
        get_stage(1, flavor="debug"), evaluation=EvalConfig(every_steps=2, sets=SETS)
    )
    with pytest.raises(EvaluationError, match="stage-1"):
        check_evaluation(stage1, str(val_shards))


# ---------------------------------------------------------------------------------------------- Ray Train
@pytest.fixture(scope="module")
def ray_module():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_train_stage3_evaluates_at_the_same_steps_after_a_restart(ray_module, demo_root, tmp_path):
    """Stage 3 on two Ray Train workers, evaluating every 2 steps: rank 1 SIGKILLed after step 3 restarts the
    group from the step-2 checkpoint, and the run logs its evaluations at steps 2 and 4 with the numbers of
    an uninterrupted run."""
    from orchestrate.runner import RunArgs, default_callbacks, fit, prepare
    from pipelines.build import mixture_weights
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions
    from tests.orchestrate.conftest import TEST_STAGES
    from tests.support.exports import write_debug_export
    from tests.support.faults import KillWorker

    shards = tmp_path / "shards"
    sources = sorted({s for v in TEST_STAGES.values() for s in v})
    build(
        str(demo_root),
        str(shards),
        sources=sources,
        splits=["train", "val"],
        options=BuildOptions(samples_per_shard=4),
    )
    mixture_weights.write(str(shards), mixture_weights.compute(str(shards), stages=TEST_STAGES))
    parents = {}
    for stage in (1, 2):
        parents[stage] = write_debug_export(tmp_path / "parents" / f"stage{stage}" / "export", stage)

    def run(root, extra=()):
        plan = prepare(
            RunArgs(
                stage=3,
                flavor="debug",
                shards=str(shards),
                run_root=str(root),
                init_from=parents,
                num_workers=2,
                max_steps=4,
                checkpoint_every=2,
                eval_every=2,
                eval_sets="refcoco/val,coco_panoptic/val",
                eval_max_samples=3,
                eval_data_root=str(demo_root),
            )
        )
        fit(plan, callbacks=[*default_callbacks(plan), *extra])
        rows = [json.loads(x) for x in (root / "stage3" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "eval/seconds" in r]

    straight = run(tmp_path / "a")
    restarted = run(tmp_path / "b", [KillWorker(3, 1)])
    assert (tmp_path / "b" / "stage3" / ".fault-kill-done").exists()
    assert [r["step"] for r in straight] == [2, 4] and [r["step"] for r in restarted] == [2, 4]
    for a, b in zip(straight, restarted, strict=True):
        keys = [k for k in a if k.startswith("eval/") and k != "eval/seconds"]
        assert keys and {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-3, abs=1e-3)
    lines = (
        (tmp_path / "b" / "stage3" / "eval" / "step_0000004" / "predictions.jsonl").read_text().splitlines()
    )
    assert len(lines) == 3 + 3  # both ranks' parts gathered
