"""The learning-rate schedules against a port of mmengine's scheduler arithmetic
(tests/model/mmengine_schedule.py: ``_ParamScheduler.step``, ``LinearParamScheduler``,
``MultiStepParamScheduler``, ``CosineAnnealingParamScheduler`` and their ``build_iter_from_epoch``), on
X-SAM's three ``param_scheduler`` lists."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from orchestrate.stages import stage1, stage2, stage3
from tests.model.mmengine_schedule import xsam_lrs
from xsam_model.schedule import ScheduleConfig, build_lr_scheduler, lr_lambda


def _every_step(config: ScheduleConfig, expected: list[float], steps_per_epoch: int, epochs: int) -> None:
    f = lr_lambda(config, len(expected), steps_per_epoch, epochs=epochs)
    ours = [f(t) for t in range(len(expected))]
    bad = [
        (t, o, e)
        for t, (o, e) in enumerate(zip(ours, expected, strict=True))
        if o != pytest.approx(e, rel=1e-9, abs=1e-15)
    ]
    assert bad == [], bad[:5]


def test_stage1_multistep_every_step_matches_mmengine():
    """36 epochs of 100 iterations: the warm-up ends at int(0.03 · 36 · 100) = 108 and the decays count from
    there: iterations 108 + 2400 and 108 + 3000, not 2400 and 3000."""
    expected = xsam_lrs("multistep", max_epochs=36, epoch_length=100)
    config = stage1().schedule.lr
    _every_step(config, expected, 100, 36)
    f = lr_lambda(config, 3600, 100, epochs=36)
    assert f(106) < 1.0 and f(107) == 1.0  # LinearLR reaches end_factor at end - 1
    assert [f(t) for t in (2507, 2508, 3107, 3108)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert (
        expected[2507] == 1.0
        and expected[2508] == pytest.approx(0.1)
        and expected[3108] == pytest.approx(0.01)
    )


@pytest.mark.parametrize("epoch_length", [37, 1849])
def test_stage1_milestones_fall_after_begin_plus_m_epochs(epoch_length):
    """Other epoch lengths (37: int(1.08 · 37) = 39 where rounding would give 40; 1849: COCO panoptic's
    118 287 images / 64): the lr around the warm-up's end and both decays."""
    expected = xsam_lrs("multistep", max_epochs=36, epoch_length=epoch_length)
    f = lr_lambda(stage1().schedule.lr, len(expected), epoch_length, epochs=36)
    warm = int(0.03 * 36 * epoch_length)
    for m in (24, 30):
        for t in range(warm + m * epoch_length - 3, warm + m * epoch_length + 3):
            assert f(t) == pytest.approx(expected[t], rel=1e-12), t
    for t in range(warm - 3, warm + 3):
        assert f(t) == pytest.approx(expected[t], rel=1e-12), t


def test_stage3_cosine_every_step_matches_mmengine():
    expected = xsam_lrs("cosine", max_epochs=1, epoch_length=1000)
    _every_step(stage3().schedule.lr, expected, 1000, 1)
    f = lr_lambda(stage3().schedule.lr, 1000, 1000, epochs=1)
    assert f(29) == 1.0 and f(30) == 1.0 and f(31) < 1.0  # warm-up to 29, cosine begins at 30 (its step 0)


def test_stage2_cosine_steps_every_iteration_of_the_accumulation():
    """Stage 2 accumulates 4 iterations per update in X-SAM and mmengine steps the schedule every iteration:
    optimizer step t runs at the value of iteration 4t + 3 of a 4 × steps_per_epoch iteration epoch."""
    config = stage2().schedule.lr
    assert config.iters_per_step == 4
    expected = xsam_lrs("cosine", max_epochs=1, epoch_length=4 * 250, accumulative_counts=4)
    assert len(expected) == 250
    _every_step(config, expected, 250, 1)


def test_run_cut_by_max_steps_spans_the_run_and_tiny_warmups():
    """Without an epoch horizon the run is the horizon. W = 0 (mmengine refuses it): no warm-up; W = 1
    (mmengine's LinearLR never reaches 1): one step at the start factor, then 1."""
    cos = ScheduleConfig(kind="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cos, 100, 10)  # W = int(0.03 · 100) = 3: 1e-5, 0.5, 1 then the cosine over 97
    assert [f(0), f(1), f(2), f(3)] == pytest.approx([1e-5, 1e-5 + (1 - 1e-5) / 2, 1.0, 1.0])
    assert f(50) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 97)))
    assert f(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 96 / 97)))
    assert f(200) == f(99)  # past ``end`` the value holds
    assert lr_lambda(cos, 6, 10)(0) == 1.0  # W = 0
    g = lr_lambda(cos, 40, 10)  # W = 1
    assert (g(0), g(1)) == (1e-5, 1.0)
    assert pickle.loads(pickle.dumps(f))(50) == f(50)  # travels to Ray workers


def test_explicit_warmup_and_milestones_count_from_it():
    f = lr_lambda(ScheduleConfig(kind="multistep", milestones=(0.5, 2), warmup_steps=8), 40, 10)
    assert f(7) == 1.0 and f(12) == 1.0 and f(13) == pytest.approx(0.1)  # 8 + 5
    assert f(27) == pytest.approx(0.1) and f(28) == pytest.approx(0.01)  # 8 + 20


def test_lambda_lr_keeps_group_multipliers():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 1e-4}, {"params": params[1:], "lr": 1e-5}])
    sched = build_lr_scheduler(ScheduleConfig(kind="multistep"), 360, 10, epochs=36)(opt)
    for _ in range(311):  # W = int(1.08 · 10) = 10; decays at 10 + 240 and 10 + 300
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-6, 1e-7])


def test_bad_schedules():
    with pytest.raises(ValueError, match="kind"):
        ScheduleConfig(kind="step")
    with pytest.raises(ValueError, match="increasing"):
        ScheduleConfig(milestones=(30, 24))
    with pytest.raises(ValueError, match="iters_per_step"):
        ScheduleConfig(iters_per_step=0)
    with pytest.raises(ValueError, match="total_steps"):
        lr_lambda(ScheduleConfig(), 0, 10)
    with pytest.raises(ValueError, match="whole iteration"):
        lr_lambda(ScheduleConfig(kind="multistep", milestones=(0.5, 2)), 40, 3)
