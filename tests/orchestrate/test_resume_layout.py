"""Which checkpoint layouts the driver accepts before any Ray worker starts. An ``xsam-loader/1`` state fits
only the (world size, loader workers) that wrote it: another layout is refused in one line naming both. A
world-size-free ``xsam-loader/2`` state resumes on any layout with the same global batch; the
resume key no longer holds the world size, but still refuses another global batch. An elastic worker range
is accepted only when every count in it keeps the global batch."""

from __future__ import annotations

import json

import pytest

from orchestrate.run_errors import RunSetupError
from orchestrate.runner import RunArgs, elastic_workers, prepare
from orchestrate.stages import debug, stage1, with_world_size
from orchestrate.train_checkpoints import (
    TRAIN_STATE,
    TrainState,
    _checkpoint_url,
    loader_file,
    loader_state_for_rank,
    marker_file,
    marker_record,
)


def _v1_state(rank: int, world: int, loader_workers: int) -> dict:
    """The identity fields an ``xsam-loader/1`` state carried (what the driver reads of it)."""
    return {"format": "xsam-loader/1", "rank": rank, "world_size": world, "lanes": max(1, loader_workers)}


def _v2_state(rank: int) -> dict:
    """A world-size-free state: step and global cursors, this rank's counters (no rank, no sizes)."""
    return {"format": "xsam-loader/2", "step": 2, "cursors": {"coco_panoptic/train": 8}, "stats": {"r": rank}}


def _checkpoint(stage_dir, *, world: int, loader_workers: int, ranks=None, v2=False, zero=2) -> None:
    """A checkpoint folder as ``train_checkpoints.save`` leaves it: train state + a loader state per rank."""
    ck = stage_dir / "checkpoint_2026-01-01_00-00-00.000000"
    ck.mkdir(parents=True)
    key = {**debug(stage1()).resume_key(), "zero_stage": zero}
    layout = {"world_size": world, "micro_batch": 2, "grad_accum": 4 // (2 * world), "loader_workers": 0}
    (ck / TRAIN_STATE).write_text(json.dumps(TrainState(step=2, resume_key=key, layout=layout).__dict__))
    for rank in range(world) if ranks is None else ranks:
        state = _v2_state(rank) if v2 else _v1_state(rank, world, loader_workers)
        (ck / loader_file(rank)).write_text(json.dumps(state))
    _mark_complete(ck, world)


def _mark_complete(ck, world: int) -> None:
    """Every rank's completion marker, as each writes it after its upload."""
    for rank in range(world):
        (ck / marker_file(rank)).write_text(json.dumps(marker_record(ck, rank, world)))


def _prepare(train_shards, run_root, **kw):
    args = {"num_workers": 2, **kw}
    return prepare(RunArgs(stage=1, flavor="debug", shards=str(train_shards), run_root=str(run_root), **args))


def test_same_layout_resumes(train_shards, tmp_path):
    _checkpoint(tmp_path / "run" / "stage1", world=2, loader_workers=0)
    assert _prepare(train_shards, tmp_path / "run").resume == "auto"
    assert _prepare(train_shards, tmp_path / "run", loader_workers=1).resume == "auto"  # 0 and 1: one lane


@pytest.mark.parametrize(
    "saved, now, message",
    [
        ((2, 0), {"num_workers": 1}, "written by 2 workers × 1 loader lanes, this run has 1 × 1"),
        ((2, 0), {"loader_workers": 2}, "written by 2 workers × 1 loader lanes, this run has 2 × 2"),
        ((2, 2), {}, r"2 workers × 2 loader lanes, this run has 2 × 1: .*--num-workers 2 --loader-workers 2"),
    ],
)
def test_v1_state_on_other_world_size_or_loader_workers_is_refused(
    train_shards, tmp_path, saved, now, message
):
    _checkpoint(tmp_path / "run" / "stage1", world=saved[0], loader_workers=saved[1])
    with pytest.raises(RunSetupError, match=message):
        _prepare(train_shards, tmp_path / "run", **now)


def test_v1_checkpoint_missing_a_rank_is_refused(train_shards, tmp_path):
    _checkpoint(tmp_path / "run" / "stage1", world=2, loader_workers=0, ranks=[0])
    with pytest.raises(
        RunSetupError, match=r"holds loader states of ranks \[0\], but they were written by 2"
    ):
        _prepare(train_shards, tmp_path / "run")


@pytest.mark.parametrize(
    "now", [{"num_workers": 1}, {"loader_workers": 2}, {"num_workers": 4, "micro_batch": 1}]
)
def test_v2_state_resumes_on_any_layout(train_shards, tmp_path, now):
    # ZeRO-0 here: nothing to convert (the universal conversion of ZeRO-1/2 is test_elastic_deepspeed's)
    _checkpoint(tmp_path / "run" / "stage1", world=2, loader_workers=0, v2=True, zero=0)
    plan = _prepare(train_shards, tmp_path / "run", zero_stage=0, **now)
    assert plan.cfg.batch.global_batch == 4 and plan.resume == "auto"


def test_v2_state_with_another_global_batch_is_refused(train_shards, tmp_path):
    _checkpoint(tmp_path / "run" / "stage1", world=2, loader_workers=0, v2=True, zero=0)
    with pytest.raises(RunSetupError, match=r"other settings .*global_batch: 4 vs 8"):
        _prepare(train_shards, tmp_path / "run", zero_stage=0, num_workers=1, global_batch=8)


def test_global_batch_that_cannot_be_kept_names_the_numbers(train_shards, tmp_path):
    _checkpoint(tmp_path / "run" / "stage1", world=2, loader_workers=0, v2=True, zero=0)
    with pytest.raises(
        RunSetupError, match=r"global batch 4 is not divisible by micro batch 2 × world size 3"
    ):
        _prepare(train_shards, tmp_path / "run", zero_stage=0, num_workers=3)


def test_v2_state_of_a_rank_the_writer_did_not_have(tmp_path):
    """Rank 0's order everywhere; each rank's own counters when its file exists, else fresh ones."""
    _checkpoint(tmp_path, world=2, loader_workers=0, v2=True)
    (ck,) = tmp_path.glob("checkpoint_*")
    assert loader_state_for_rank(ck, 0, "ck") == (_v2_state(0), True)
    assert loader_state_for_rank(ck, 1, "ck") == ({**_v2_state(0), "stats": {"r": 1}}, True)
    assert loader_state_for_rank(ck, 2, "ck") == (_v2_state(0), False)


def test_old_resume_key_with_the_whole_batch_still_resumes(train_shards, tmp_path):
    """Checkpoints written before elastic resume hold ``batch`` (the whole split) in their key: their global
    batch is compared, and their world size read from it."""
    _checkpoint(tmp_path / "run" / "stage1", world=2, loader_workers=0)
    (ck,) = (tmp_path / "run" / "stage1").glob("checkpoint_*")
    state = json.loads((ck / TRAIN_STATE).read_text())
    key = {k: v for k, v in state["resume_key"].items() if k != "global_batch"}
    key["batch"] = {"global_batch": 4, "micro_batch": 2, "grad_accum": 1, "world_size": 2}
    (ck / TRAIN_STATE).write_text(json.dumps({**state, "resume_key": key, "layout": {}}))
    _mark_complete(ck, 2)  # as that run wrote it
    assert TrainState.from_dict(json.loads((ck / TRAIN_STATE).read_text())).saved_world_size() == 2
    assert _prepare(train_shards, tmp_path / "run").resume == "auto"
    with pytest.raises(RunSetupError, match=r"global_batch: 4 vs 8"):
        _prepare(train_shards, tmp_path / "run", global_batch=8)


def test_elastic_range_keeps_the_global_batch_on_every_count():
    cfg = debug(stage1())  # global batch 4 = micro 2 × accumulation 1 × 2 workers
    assert elastic_workers(cfg, None) == 2 and elastic_workers(cfg, 2) == 2
    assert elastic_workers(cfg, 1) == (1, 2)
    wide = with_world_size(cfg, 4, global_batch=8)  # micro 2 × 1 × 4
    with pytest.raises(
        RunSetupError, match=r"on 3 workers the global batch 8 is not divisible by micro batch 2"
    ):
        elastic_workers(wide, 2)
    with pytest.raises(RunSetupError, match=r"expected 1 ≤ min_workers ≤ --num-workers 2"):
        elastic_workers(cfg, 3)


def test_ray_checkpoint_path_gets_the_run_root_scheme_back():
    assert _checkpoint_url("bucket/run/stage1/ck", "s3://bucket/run") == "s3://bucket/run/stage1/ck"
    assert _checkpoint_url("/tmp/run/stage1/ck", "/tmp/run") == "/tmp/run/stage1/ck"
