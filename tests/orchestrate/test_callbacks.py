"""Trainer callbacks: the console progress line, the data trace, callbacks named in the environment."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from orchestrate import callbacks
from orchestrate.callbacks import DataTrace, ProgressLine, from_env, progress_line, read_trace
from orchestrate.run_errors import RunSetupError
from orchestrate.run_layout import StageLayout
from orchestrate.train_checkpoints import TrainState
from tests.support.faults import HoldAtStep, KillWorker


def fake_trainer(tmp_path, *, rank=0, step=0, attempt=0, total=10):
    """What the callbacks read from a Trainer: plan (layout, total steps), cfg, state, rank, step keys."""
    cfg = SimpleNamespace(stage=3, batch=SimpleNamespace(global_batch=8))
    plan = SimpleNamespace(layout=StageLayout(str(tmp_path), 3), total_steps=total)
    return SimpleNamespace(
        plan=plan,
        cfg=cfg,
        rank=rank,
        is_main=rank == 0,
        state=TrainState(step=step, attempt=attempt),
        step_keys=[],
    )


def test_progress_line_text():
    line = progress_line(
        stage=2, step=7, total=120, loss=3.14159, samples_per_s=12.34, eta_s=3723, restarts=1
    )
    assert line == "stage 2  step   7/120  loss 3.142  12.3 samples/s  ETA 1:02:03  restarts 1"


def test_progress_is_throttled_and_only_on_rank_0(tmp_path, monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="orchestrate.callbacks")
    main, other = fake_trainer(tmp_path, step=2, attempt=1), fake_trainer(tmp_path, rank=1, step=2)
    shown = []
    for trainer in (main, other):
        cb = ProgressLine(every_s=30.0)
        cb.on_train_start(trainer)  # a resumed attempt: counting starts at step 2
        for step in range(3, 11):
            clock[0] += 10.0  # 10 s per step
            caplog.clear()
            cb.on_step_end(trainer, step, {"loss": 1.0})
            shown += [(trainer.rank, step, r.getMessage()) for r in caplog.records]
    assert [(r, s) for r, s, _ in shown] == [(0, 3), (0, 6), (0, 9), (0, 10)]  # first, every 30 s, last
    assert shown[1][2] == "stage 3  step  6/10  loss 1  0.8 samples/s  ETA 0:00:40  restarts 1"


def test_data_trace_rows_and_read_back(tmp_path):
    rows = {}
    for rank in (0, 1):
        trainer = fake_trainer(tmp_path, rank=rank)
        trace = DataTrace()
        trace.on_train_start(trainer)
        for step, attempt in ((1, 0), (2, 0), (2, 1)):  # step 2 redone after a restart
            trainer.state.attempt, trainer.step_keys = attempt, [f"k{rank}-{step}-{attempt}"]
            trace.on_step_end(trainer, step, {"source": "refcoco/train"})
        trace.on_train_end(trainer)
        rows[rank] = (tmp_path / "stage3" / "trace" / f"rank{rank}.jsonl").read_text().count("\n")
    assert rows == {0: 3, 1: 3}
    back = read_trace(tmp_path / "stage3")
    assert sorted(back) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # 0-based step indices, as the loader counts
    assert back[(1, 1)] == {"step": 1, "rank": 1, "source": "refcoco/train", "keys": ["k1-2-1"], "attempt": 1}


def test_callbacks_named_in_the_environment():
    env = {"XSAM_TRAIN_CALLBACKS": "tests.support.faults:from_env"}
    assert from_env(env) == []  # the factory returns none without a fault
    with pytest.MonkeyPatch.context() as m:
        m.setenv("XSAM_TEST_FAULT", "hold:2")
        (hold,) = from_env(env)
        m.setenv("XSAM_TEST_FAULT", "kill:3:1")
        (kill,) = from_env(env)
    assert isinstance(hold, HoldAtStep) and hold.step == 2
    assert isinstance(kill, KillWorker) and (kill.step, kill.rank) == (3, 1)
    assert from_env({}) == []
    with pytest.raises(RunSetupError, match=r"XSAM_TRAIN_CALLBACKS: cannot load 'tests.support.faults:nope'"):
        from_env({"XSAM_TRAIN_CALLBACKS": "tests.support.faults:nope"})
    with pytest.raises(RunSetupError, match="is not module:factory"):
        from_env({"XSAM_TRAIN_CALLBACKS": "tests.support.faults"})
