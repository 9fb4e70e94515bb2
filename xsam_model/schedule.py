"""Learning-rate schedules of the three stages as pure multipliers of the base learning rate: mmengine's.

X-SAM (mmengine) runs two chained schedulers, both ``by_epoch=True`` with ``convert_to_iter_based=True``:
``LinearLR(start_factor=1e-5, begin=0, end=warmup_ratio·max_epochs)`` then, from
``begin=warmup_ratio·max_epochs`` to ``end=max_epochs``, either ``CosineAnnealingLR(eta_min=0)`` (stages 2 and
3; stage 1 on ``main``) or, in the paper's stage 1 (``AAAI26_Archive``), ``MultiStepLR(milestones=[24, 30],
gamma=0.1)``. :func:`lr_lambda` gives the multiplier at every optimizer step, so one dataclass drives a client
``torch.optim.lr_scheduler.LambdaLR`` (which keeps per-group lr multipliers) handed to
``deepspeed.initialize``::

    config = ScheduleConfig(kind="multistep", milestones=(24, 30), gamma=0.1)
    scheduler = build_lr_scheduler(config, total_steps, steps_per_epoch, epochs=36)  # optimizer -> LambdaLR
    engine, _, _, sched = deepspeed.initialize(model=..., model_parameters=groups, lr_scheduler=scheduler,
    ...)

mmengine's arithmetic, ported (``mmengine/optim/scheduler/param_scheduler.py``):

- **Iterations.** mmengine steps its schedulers after every data iteration (``ParamSchedulerHook.
  after_train_iter``), with ``epoch_length = len(train_dataloader)``; an optimizer step with
  ``accumulative_counts = a`` runs at iteration ``i = a·t + a - 1`` (0-based), so optimizer step ``t`` gets
  the value of iteration ``i``. ``a = iters_per_step`` (X-SAM stage 2: 4), ``L = a · steps_per_epoch``.
- **Epochs to iterations** (``build_iter_from_epoch``): ``begin`` and ``end`` become ``int(x · L)``
  (truncated, the config's float product ``warmup_ratio · max_epochs`` first), milestones ``m · L``, and
  ``T_max`` defaults to ``end - begin``. The warm-up ends, and the decay begins, at ``W = int((warmup_ratio ·
  epochs) · L)``; the decay ends at ``E = int(epochs · L)``.
- **Warm-up** (``LinearParamScheduler``, ``total_iters = end - begin - 1``): ``s + (1 - s) · i / (W - 1)`` for
  ``i < W``, reaching exactly 1 at ``i = W - 1``.
- **Counting from ``begin``** (``_ParamScheduler.step``): a scheduler counts its own ``last_step`` only from
  ``begin`` on, ``j = i - W``, and stops updating at ``end`` (the value holds: ``j = min(i, E - 1) - W``).
- **Multistep** (``MultiStepParamScheduler``): ``gamma ** #{m : m · L <= j}``; a milestone therefore falls at
  iteration ``W + m · L`` (stage 1: ≈ 25.08 and 31.08 epochs, not 24 and 30). A milestone whose ``m · L`` is
  not an integer would never fire in mmengine; :func:`lr_lambda` refuses it.
- **Cosine** (``CosineAnnealingParamScheduler``, chained form; equal to the closed form up to rounding):
  ``min + (1 - min) · (1 + cos(π · j / (E - W))) / 2``.

Without ``epochs`` (a run cut by ``max_steps``) the horizon is the run itself: ``E = a · total_steps`` and
``W = int(warmup_ratio · E)``, so the cosine spans the steps actually run. Deliberate deviations, both for
runs under 67 iterations only: ``W = 0`` (mmengine refuses a zero-length ``LinearLR``) means no warm-up; ``W =
1`` (mmengine's ``total_iters = 0`` never reaches ``end_factor``, leaving every later value × 1e-5) means one
step at ``s``, then 1.
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
    """Explicit warm-up length in optimizer steps; overrides ``warmup_ratio`` when set."""
    warmup_start: float = 1e-5
    """Multiplier at step 0 (mmengine ``LinearLR(start_factor=1e-5)``)."""
    milestones: tuple[float, ...] = (24.0, 30.0)
    """``multistep``: epochs, counted from the end of the warm-up (mmengine's ``begin``), after which the
    learning rate is multiplied by ``gamma`` (paper: 24 and 30 of 36, i.e. at ≈ 25.08 and 31.08 epochs)."""
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    """``cosine``: final multiplier (X-SAM: eta_min 0)."""
    iters_per_step: int = 1
    """mmengine scheduler iterations per optimizer step: X-SAM's ``accumulative_counts`` (stage 2: 4), since
    its schedulers step every data iteration. A property of the recipe, not of this run's batch split."""

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
        if not isinstance(self.iters_per_step, int) or self.iters_per_step < 1:
            raise ValueError(f"iters_per_step must be a positive int, got {self.iters_per_step!r}")
        if not 0 < self.gamma <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"need 0 < gamma <= 1 and 0 <= min_lr_ratio <= 1, got {self.gamma}, {self.min_lr_ratio}"
            )

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warm-up length ``W`` in scheduler iterations for a run of ``total_steps`` optimizer steps without
        an epoch horizon (with ``iters_per_step = 1``: optimizer steps); see the module docstring."""
        return _warmup_end(self, self.iters_per_step * total_steps, None, 1)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "warmup_ratio": self.warmup_ratio,
            "warmup_steps": self.warmup_steps,
            "warmup_start": self.warmup_start,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "min_lr_ratio": self.min_lr_ratio,
            "iters_per_step": self.iters_per_step,
        }


def _warmup_end(config: ScheduleConfig, horizon: int, epochs: float | None, epoch_length: int) -> int:
    """``W``: where the ``LinearLR`` ends and the decay begins, in iterations (``build_iter_from_epoch``'s
    ``int(begin · epoch_length)`` with X-SAM's ``begin = warmup_ratio · max_epochs``)."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps * config.iters_per_step, horizon)
    if epochs is not None:
        return int((config.warmup_ratio * epochs) * epoch_length)
    return int(config.warmup_ratio * horizon)


@dataclass(frozen=True)
class LRMultiplier:
    """The multiplier of :func:`lr_lambda` as a picklable callable (a ``LambdaLR`` lambda that Ray and
    DeepSpeed checkpoints can carry). Every length is in mmengine iterations (see the module docstring)."""

    config: ScheduleConfig
    total_steps: int
    warmup: int
    """``W``: end of the warm-up, ``begin`` of the decay."""
    end: int
    """``E``: the decay's ``end``; the value holds after it."""
    milestone_iters: tuple[int, ...]
    """``m · L``, counted from ``W`` (the decay scheduler's own ``last_step``)."""

    def at_iteration(self, i: int) -> float:
        """The multiplier mmengine sets for data iteration ``i`` (0-based)."""
        c, w = self.config, self.warmup
        if i < w:
            if w == 1:  # mmengine's total_iters = 0 (see the module docstring): one step at the start factor
                return c.warmup_start
            return c.warmup_start + (1.0 - c.warmup_start) * i / (w - 1)
        j = min(i, self.end - 1) - w  # the decay scheduler's last_step; it stops updating at ``end``
        if c.kind == "multistep":
            return c.gamma ** sum(1 for m in self.milestone_iters if m <= j)
        span = max(1, self.end - w)
        return c.min_lr_ratio + (1.0 - c.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * max(j, 0) / span))

    def __call__(self, step: int) -> float:
        """The multiplier of optimizer step ``step`` (0-based): that of its last iteration."""
        a = self.config.iters_per_step
        return self.at_iteration(a * step + a - 1)


def lr_lambda(
    config: ScheduleConfig, total_steps: int, steps_per_epoch: int, *, epochs: float | None = None
) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step ``t`` (0-based) of a run of ``total_steps``.

    ``steps_per_epoch`` (optimizer steps; × ``iters_per_step`` = mmengine's ``epoch_length``) converts epochs
    to iterations as ``convert_to_iter_based``. ``epochs``: the schedule's horizon (the stage's
    ``max_epochs``); None = the run's ``total_steps`` (a run cut by ``max_steps``).
    """
    if total_steps <= 0 or steps_per_epoch <= 0 or int(steps_per_epoch) != steps_per_epoch:
        raise ValueError(
            f"need total_steps > 0 and a positive integer steps_per_epoch, got {total_steps}, {steps_per_epoch}"
        )
    length = config.iters_per_step * int(steps_per_epoch)
    horizon = config.iters_per_step * total_steps if epochs is None else int(epochs * length)
    milestones = []
    for m in config.milestones if config.kind == "multistep" else ():
        if m * length != int(m * length):
            raise ValueError(
                f"milestone {m} epochs × {length} iterations per epoch is not a whole iteration "
                "(mmengine would never reach it)"
            )
        milestones.append(int(m * length))
    warmup = _warmup_end(config, horizon, epochs, length)
    return LRMultiplier(config, total_steps, warmup, max(horizon, warmup + 1), tuple(milestones))


def build_lr_scheduler(
    config: ScheduleConfig, total_steps: int, steps_per_epoch: int, *, epochs: float | None = None
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """``optimizer -> LambdaLR`` with :func:`lr_lambda`, the form ``deepspeed.initialize(lr_scheduler=...)``
    accepts; every parameter group keeps its own base lr (its stage lr multiplier)."""
    fn = lr_lambda(config, total_steps, steps_per_epoch, epochs=epochs)

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

    return make
