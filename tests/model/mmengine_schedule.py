"""A port of mmengine's parameter-scheduler arithmetic, to test :mod:`xsam_model.schedule` against.

Ported from ``mmengine/optim/scheduler/param_scheduler.py`` (open-mmlab/mmengine):
``_ParamScheduler.__init__`` and ``_ParamScheduler.step`` (the ``begin``/``end`` window and the scheduler's
own ``last_step``), ``LinearParamScheduler._get_value``, ``MultiStepParamScheduler._get_value``,
``CosineAnnealingParamScheduler._get_value`` (chained forms, as mmengine computes them) and each class's
``build_iter_from_epoch`` (``convert_to_iter_based=True``). The loop is
``mmengine/hooks/param_scheduler_hook.py`` ``ParamSchedulerHook.after_train_iter`` (every iteration steps
every iter-based scheduler) with ``epoch_length = len(train_dataloader)`` (``mmengine/runner/runner.py``,
``Runner._build_param_scheduler``), and the optimizer updating on every ``accumulative_counts``-th iteration
(``OptimWrapper.should_update``). The schedules are X-SAM's ``param_scheduler`` lists (``AAAI26_Archive``,
s1/s2/s3 configs).
"""

from __future__ import annotations

import math
from collections import Counter

INF = int(1e9)


class _Scheduler:
    """``_ParamScheduler``: one shared list of param groups (dicts with ``lr``), chained schedulers."""

    def __init__(self, groups: list[dict], begin: int, end: int):
        if end <= begin:
            raise ValueError(f"end should be larger than begin, but got begin={begin}, end={end}")
        self.groups, self.begin, self.end = groups, begin, end
        for g in groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_values = [g["initial_lr"] for g in groups]
        self.last_step = -1
        self._global_step = -1
        self.step()

    def step(self) -> None:
        self._global_step += 1
        if self.begin <= self._global_step < self.end:
            self.last_step += 1
            for g, v in zip(self.groups, self._get_value(), strict=True):
                g["lr"] = v


class Linear(_Scheduler):
    def __init__(self, groups, *, start_factor: float, end_factor: float = 1.0, begin: int, end: int):
        self.start_factor, self.end_factor = start_factor, end_factor
        self.total_iters = end - begin - 1
        super().__init__(groups, begin, end)

    def _get_value(self):
        if self.last_step == 0:
            return [g["lr"] * self.start_factor for g in self.groups]
        d = self.end_factor - self.start_factor
        return [
            g["lr"] * (1.0 + d / (self.total_iters * self.start_factor + (self.last_step - 1) * d))
            for g in self.groups
        ]


class MultiStep(_Scheduler):
    def __init__(self, groups, *, milestones, gamma: float, begin: int, end: int):
        self.milestones, self.gamma = Counter(milestones), gamma
        super().__init__(groups, begin, end)

    def _get_value(self):
        if self.last_step not in self.milestones:
            return [g["lr"] for g in self.groups]
        return [g["lr"] * self.gamma ** self.milestones[self.last_step] for g in self.groups]


class Cosine(_Scheduler):
    def __init__(self, groups, *, eta_min: float, begin: int, end: int, T_max: int | None = None):
        self.T_max, self.eta_min = T_max or (end - begin), eta_min
        super().__init__(groups, begin, end)

    def _get_value(self):
        t, n = self.last_step, self.T_max
        if t == 0:
            return [g["lr"] for g in self.groups]
        if (t - 1 - n) % (2 * n) == 0:
            return [
                g["lr"] + (b - self.eta_min) * (1 - math.cos(math.pi / n)) / 2
                for b, g in zip(self.base_values, self.groups, strict=True)
            ]
        return [
            (1 + math.cos(math.pi * t / n)) / (1 + math.cos(math.pi * (t - 1) / n)) * (g["lr"] - self.eta_min)
            + self.eta_min
            for g in self.groups
        ]


def from_epochs(cls, groups, *, begin, end, epoch_length: int, milestones=None, **kw):
    """``build_iter_from_epoch``: begin/end truncated to iterations, milestones × epoch length."""
    if milestones is not None:
        kw["milestones"] = [m * epoch_length for m in milestones]
    end = int(end * epoch_length) if end != INF else end
    return cls(groups, begin=int(begin * epoch_length), end=end, **kw)


def xsam_lrs(
    kind: str,
    *,
    max_epochs: int,
    epoch_length: int,
    warmup_ratio: float = 0.03,
    milestones=(24, 30),
    accumulative_counts: int = 1,
) -> list[float]:
    """X-SAM's ``param_scheduler`` (LinearLR 1e-5 warm-up, then MultiStepLR γ 0.1 or CosineAnnealingLR to 0)
    on a base lr of 1, stepped as mmengine's TrainLoop does: the multiplier of every optimizer update
    (iterations ``a - 1, 2a - 1, …``) of ``max_epochs × epoch_length`` iterations."""
    groups = [{"lr": 1.0}]
    begin = warmup_ratio * max_epochs  # the config's float product, as X-SAM's configs compute it
    scheds = [from_epochs(Linear, groups, start_factor=1e-5, begin=0, end=begin, epoch_length=epoch_length)]
    if kind == "multistep":
        decay = dict(milestones=list(milestones), gamma=0.1)
        scheds.append(
            from_epochs(MultiStep, groups, begin=begin, end=max_epochs, epoch_length=epoch_length, **decay)
        )
    else:
        scheds.append(
            from_epochs(Cosine, groups, eta_min=0.0, begin=begin, end=max_epochs, epoch_length=epoch_length)
        )
    updates = []
    for i in range(max_epochs * epoch_length):
        if (i + 1) % accumulative_counts == 0:
            updates.append(groups[0]["lr"])  # the lr this iteration's optimizer update runs at
        for s in scheds:  # ParamSchedulerHook.after_train_iter
            s.step()
    return updates
