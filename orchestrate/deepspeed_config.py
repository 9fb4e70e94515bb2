"""What ``deepspeed.initialize`` gets, generated from a :class:`~orchestrate.stages.StageConfig` (never edited
by hand): the DeepSpeed JSON and the client learning-rate scheduler; :func:`initialize` is the one call.

The JSON mirrors X-SAM's ``deepspeed_zero2.json`` (large buckets, overlapped communication, contiguous
gradients, ``zero_allow_untested_optimizer``) with the ``auto`` fields filled from the stage config, plus the
optimizer. It has no ``scheduler`` section: the schedule is the stage's one
:class:`xsam_model.schedule.ScheduleConfig` (``cfg.schedule.lr``: warm-up then ``multistep`` in stage 1, as
the paper, or ``cosine``), run as a ``LambdaLR`` (:class:`StageLR`) that DeepSpeed builds on its optimizer,
steps after every optimizer step and saves/restores with its checkpoints. A ``LambdaLR`` multiplies every
parameter group's own base lr, so the stage's per-group lr multipliers hold throughout. Optimizer step ``t``
(0-based) runs at ``lr_group × lr_lambda(t)``, X-SAM's (mmengine's) curve (:mod:`xsam_model.schedule`), epochs
converted with the mixture's steps per epoch.

On CPU (gloo) it runs fp32, no overlapped communication, and ``torch_adam`` so DeepSpeed does not compile
its fused Adam op (about 45 s on a 2-core box). On GPUs: bf16 and torch's fused AdamW kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from orchestrate.deepspeed_compat import patch_deepspeed
from orchestrate.stages import StageConfig
from xsam_model.schedule import lr_lambda

# Heavy imports (deepspeed) are deferred into initialize: the config is planned on the driver without it.


def deepspeed_config(cfg: StageConfig, *, use_gpu: bool, load_universal: bool = False) -> dict[str, Any]:
    """``cfg`` as a DeepSpeed config dict (the schedule is :func:`lr_scheduler`'s, not in the JSON).
    ``load_universal``: the engine will load a universal checkpoint (:mod:`orchestrate.universal`), written
    by another world size; DeepSpeed reads the flag at ``load_checkpoint`` time, saving is unchanged."""
    b, o = cfg.batch, cfg.optim
    precision = cfg.model.resolved_precision(use_gpu)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        bucket = int(1e9) if use_gpu else int(5e7)  # X-SAM's 1e9 on GPUs; CPU buckets stay small in memory
        zero.update(
            allgather_partitions=True,
            allgather_bucket_size=bucket,
            reduce_scatter=True,
            reduce_bucket_size=bucket,
            overlap_comm=use_gpu,  # needs CUDA streams
            contiguous_gradients=True,
        )
        if cfg.zero_stage == 2 and use_gpu:
            zero["round_robin_gradients"] = True
    adam: dict[str, Any] = {
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "torch_adam": True,
    }
    if use_gpu:
        adam["fused"] = True  # torch.optim.AdamW(fused=True): one kernel, no DeepSpeed op build
    out = {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": adam},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if load_universal:
        out["checkpoint"] = {"load_universal": True}
    return out


class StageLR(torch.optim.lr_scheduler.LambdaLR):
    """The stage's ``LambdaLR``. Its checkpoint holds the step count (and base lrs), not the multiplier: a
    resumed run recomputes the multiplier from its own plan, so a resume with a longer ``--max-steps``
    stretches the cosine (and the checkpoint holds no pickled config classes)."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state

    def apply(self) -> None:
        """Set every group's lr to ``base_lr × multiplier(last_epoch)`` (after a resume: DeepSpeed restores
        the optimizer's saved lrs after the scheduler state)."""
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


def lr_scheduler(
    cfg: StageConfig, *, total_steps: int, steps_per_epoch: int
) -> Callable[[torch.optim.Optimizer], StageLR]:
    """``optimizer -> StageLR`` of ``cfg.schedule.lr`` over ``total_steps`` optimizer steps, epochs converted
    at ``steps_per_epoch`` steps each; the form ``deepspeed.initialize(lr_scheduler=...)`` takes. The horizon
    is the stage's epochs (mmengine's ``end = max_epochs``), or the run itself when ``max_steps`` cuts it."""
    epochs = cfg.schedule.epochs if cfg.schedule.max_steps is None else None
    fn = lr_lambda(cfg.schedule.lr, total_steps, steps_per_epoch, epochs=epochs)

    def make(optimizer: torch.optim.Optimizer) -> StageLR:
        return StageLR(optimizer, fn)

    return make


def initialize(
    model: torch.nn.Module,
    groups: list[dict],
    cfg: StageConfig,
    *,
    total_steps: int,
    steps_per_epoch: int,
    use_gpu: bool,
    load_universal: bool = False,
) -> tuple[Any, StageLR, dict[str, Any]]:
    """``deepspeed.initialize`` of ``model`` with parameter ``groups`` (each at its own lr), the generated
    JSON and the stage's scheduler: ``(engine, scheduler, ds_config)``. Needs ``torch.distributed`` set up
    (Ray Train's workers; a test's one-process gloo group). ``load_universal``: see
    :func:`deepspeed_config`."""
    import deepspeed

    ds_config = deepspeed_config(cfg, use_gpu=use_gpu, load_universal=load_universal)
    patch_deepspeed()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lr_scheduler(cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch),
    )
    return engine, scheduler, ds_config
