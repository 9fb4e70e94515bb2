"""The learning-rate schedules against their closed forms (mmengine LinearLR + MultiStepLR / CosineAnnealingLR)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from xsam_model.schedule import ScheduleConfig, build_lr_scheduler, lr_lambda

# 36 epochs of 10 steps: warm-up round(0.03 · 360) = 11 steps; milestones 24, 30 epochs = steps 240, 300
STEP_LR = {0: 1e-5, 5: 1e-5 + (1 - 1e-5) * 5 / 11, 10: 1e-5 + (1 - 1e-5) * 10 / 11, 11: 1.0, 239: 1.0}
STEP_LR |= {240: 0.1, 299: 0.1, 300: 0.01, 359: 0.01}


def test_multistep_closed_form():
    f = lr_lambda(ScheduleConfig(kind="multistep", milestones=(24, 30), gamma=0.1), 360, 10)
    for step, expected in STEP_LR.items():
        assert f(step) == pytest.approx(expected, rel=1e-12), step
    assert pickle.loads(pickle.dumps(f))(300) == pytest.approx(0.01)  # travels to Ray workers


def test_cosine_closed_form():
    f = lr_lambda(ScheduleConfig(kind="cosine", min_lr_ratio=0.1), 100, 10)  # warm-up 3 steps
    assert f(0) == pytest.approx(1e-5) and f(2) == pytest.approx(1e-5 + (1 - 1e-5) * 2 / 3)
    assert f(3) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 97)))
    assert f(100) == pytest.approx(0.1)


def test_milestone_inside_warmup_never_fires_and_explicit_warmup():
    f = lr_lambda(ScheduleConfig(kind="multistep", milestones=(0.5, 2), warmup_steps=8), 40, 10)
    assert f(8) == 1.0 and f(19) == 1.0 and f(20) == pytest.approx(0.1)  # step 5 lies inside the warm-up


def test_lambda_lr_keeps_group_multipliers():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 1e-4}, {"params": params[1:], "lr": 1e-5}])
    sched = build_lr_scheduler(ScheduleConfig(kind="multistep"), 360, 10)(opt)
    for _ in range(300):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-6, 1e-7])


def test_bad_schedules():
    with pytest.raises(ValueError, match="kind"):
        ScheduleConfig(kind="step")
    with pytest.raises(ValueError, match="increasing"):
        ScheduleConfig(milestones=(30, 24))
    with pytest.raises(ValueError, match="total_steps"):
        lr_lambda(ScheduleConfig(), 0, 10)
