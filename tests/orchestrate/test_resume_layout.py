"""A checkpoint's loader states fit only the (world size, loader workers) that wrote them: the driver refuses
another layout in one line naming both, before any Ray worker starts (until issue 21 item 1 makes the loader
state world-size-free)."""

from __future__ import annotations

import json

import pytest

from orchestrate.checkpointing import TRAIN_STATE, TrainState, loader_file
from orchestrate.errors import RunSetupError
from orchestrate.runner import RunArgs, prepare
from orchestrate.stages import debug, stage1
from pipelines.loader.stream import MixtureLoader


def _checkpoint(train_shards, stage_dir, *, world: int, loader_workers: int, ranks=None) -> None:
    """A checkpoint folder as ``checkpointing.save`` leaves it: train state + real loader states per rank."""
    ck = stage_dir / "checkpoint_2026-01-01_00-00-00.000000"
    ck.mkdir(parents=True)
    key = debug(stage1()).resume_key()
    key["batch"] = {**key["batch"], "world_size": world, "grad_accum": 4 // (2 * world)}
    (ck / TRAIN_STATE).write_text(json.dumps(TrainState(step=2, resume_key=key).__dict__))
    for rank in range(world) if ranks is None else ranks:
        loader = MixtureLoader(
            str(train_shards), stage=1, batch_size=2, rank=rank, world_size=world, num_workers=loader_workers
        )
        (ck / loader_file(rank)).write_text(json.dumps(loader.state_dict()))


def _prepare(train_shards, run_root, **kw):
    args = {"num_workers": 2, **kw}
    return prepare(RunArgs(stage=1, flavor="debug", shards=str(train_shards), run_root=str(run_root), **args))


def test_same_layout_resumes(train_shards, tmp_path):
    _checkpoint(train_shards, tmp_path / "run" / "stage1", world=2, loader_workers=0)
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
def test_other_world_size_or_loader_workers_is_refused(train_shards, tmp_path, saved, now, message):
    _checkpoint(train_shards, tmp_path / "run" / "stage1", world=saved[0], loader_workers=saved[1])
    with pytest.raises(RunSetupError, match=message):
        _prepare(train_shards, tmp_path / "run", **now)


def test_checkpoint_missing_a_rank_is_refused(train_shards, tmp_path):
    _checkpoint(train_shards, tmp_path / "run" / "stage1", world=2, loader_workers=0, ranks=[0])
    with pytest.raises(
        RunSetupError, match=r"holds loader states of ranks \[0\], but they were written by 2"
    ):
        _prepare(train_shards, tmp_path / "run")
