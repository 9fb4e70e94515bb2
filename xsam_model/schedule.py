"""Learning-rate schedules of the three stages as pure multipliers of the base learning rate.

X-SAM (mmengine) runs a linear warm-up from ``warmup_start`` × lr over the first ``warmup_ratio`` of training,
then either a cosine to ``min_lr_ratio`` × lr (stages 2 and 3 on both branches; stage 1 on ``main``) or, in the
paper's stage 1 (``AAAI26_Archive``), a step decay: ``MultiStepLR(milestones=[24, 30] epochs, gamma=0.1)``.
:func:`lr_lambda` gives the multiplier at every optimizer step, so one dataclass drives a client
``torch.optim.lr_scheduler.LambdaLR`` (which keeps per-group lr multipliers) handed to ``deepspeed.initialize``::

    config = ScheduleConfig(kind="multistep", milestones=(24, 30), gamma=0.1)
    scheduler = build_lr_scheduler(config, total_steps, steps_per_epoch)  # optimizer -> LambdaLR
    engine, _, _, sched = deepspeed.initialize(model=..., model_parameters=groups, lr_scheduler=scheduler, ...)

Closed form, with ``W`` warm-up steps, ``T`` total steps, milestone steps ``M_i = round(m_i · steps_per_epoch)``:

- ``t < W``: ``warmup_start + (1 - warmup_start) · t / W``;
- cosine, ``t ≥ W``: ``min + (1 - min) · (1 + cos(π · (t - W) / (T - W))) / 2``;
- multistep, ``t ≥ W``: ``gamma ** #{i : W ≤ M_i ≤ t}`` (mmengine's step scheduler starts at the end of the
  warm-up, so a milestone inside the warm-up never fires).

mmengine holds the last warm-up value (1 - 1/W) until the first decay; here the multiplier is 1 from step W:
a difference of 1/W (W ≈ 1.08 epochs of steps in stage 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHEDULE_KINDS = ("cosine", "multistep")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Warm-up then cosine or step decay; see the module docstring for the closed form."""

    kind: str = "cosine"
    """``cosine`` (stages 2 and 3; stage 1 on ``main``) or ``multistep`` (the paper's stage 1)."""
    warmup_ratio: float = 0.03
    """Warm-up length as a fraction of the total steps (X-SAM: 0.03)."""
    warmup_steps: int | None = None
    """Explicit warm-up length in steps; overrides ``warmup_ratio`` when set."""
    warmup_start: float = 1e-5
    """Multiplier at step 0 (mmengine ``LinearLR(start_factor=1e-5)``)."""
    milestones: tuple[float, ...] = (24.0, 30.0)
    """``multistep``: epochs at which the learning rate is multiplied by ``gamma`` (paper: 24 and 30 of 36)."""
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    """``cosine``: final multiplier (X-SAM: eta_min 0)."""

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"ScheduleConfig.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if not 0 <= self.warmup_ratio < 1 or not 0 < self.warmup_start <= 1:
            raise ValueError(
                f"need 0 <= warmup_ratio < 1 and 0 < warmup_start <= 1, got {self.warmup_ratio}, {self.warmup_start}"
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be positive and increasing, got {self.milestones}")
        if not 0 < self.gamma <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"need 0 < gamma <= 1 and 0 <= min_lr_ratio <= 1, got {self.gamma}, {self.min_lr_ratio}"
            )

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warm-up steps for a run of ``total_steps`` (at least 1 when ``warmup_ratio`` > 0)."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return max(1, round(self.warmup_ratio * total_steps)) if self.warmup_ratio > 0 else 0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "warmup_ratio": self.warmup_ratio,
            "warmup_steps": self.warmup_steps,
            "warmup_start": self.warmup_start,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "min_lr_ratio": self.min_lr_ratio,
        }


@dataclass(frozen=True)
class LRMultiplier:
    """The multiplier of :func:`lr_lambda` as a picklable callable (a ``LambdaLR`` lambda that Ray and
    DeepSpeed checkpoints can carry)."""

    config: ScheduleConfig
    total_steps: int
    warmup: int
    milestone_steps: tuple[int, ...]

    def __call__(self, step: int) -> float:
        c, w = self.config, self.warmup
        if step < w:
            return c.warmup_start + (1.0 - c.warmup_start) * step / w
        if c.kind == "multistep":
            return c.gamma ** sum(1 for m in self.milestone_steps if w <= m <= step)
        span = max(1, self.total_steps - w)
        progress = min(1.0, (step - w) / span)
        return c.min_lr_ratio + (1.0 - c.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(config: ScheduleConfig, total_steps: int, steps_per_epoch: float) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step ``t`` (0-based) of a run of ``total_steps``.

    ``steps_per_epoch`` converts ``milestones`` (epochs) to steps, as mmengine's ``convert_to_iter_based``.
    """
    if total_steps <= 0 or not steps_per_epoch > 0:
        raise ValueError(
            f"need total_steps > 0 and steps_per_epoch > 0, got {total_steps}, {steps_per_epoch}"
        )
    milestones = tuple(int(round(m * steps_per_epoch)) for m in config.milestones)
    return LRMultiplier(config, total_steps, config.num_warmup_steps(total_steps), milestones)


def build_lr_scheduler(
    config: ScheduleConfig, total_steps: int, steps_per_epoch: float
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """``optimizer -> LambdaLR`` with :func:`lr_lambda`, the form ``deepspeed.initialize(lr_scheduler=...)``
    accepts; every parameter group keeps its own base lr (its stage lr multiplier)."""
    fn = lr_lambda(config, total_steps, steps_per_epoch)

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

    return make
