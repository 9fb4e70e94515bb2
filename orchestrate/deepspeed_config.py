"""The DeepSpeed JSON, generated from a :class:`~orchestrate.stages.StageConfig` (never edited by hand).

It mirrors X-SAM's ``deepspeed_zero2.json`` (large buckets, overlapped communication, contiguous gradients,
``zero_allow_untested_optimizer``) with the ``auto`` fields filled from the stage config, plus the optimizer
and the warm-up + cosine schedule so DeepSpeed saves and restores both with its checkpoints.

The schedule is DeepSpeed's ``WarmupCosineLR`` (linear warm-up from ``warmup_start`` × lr, cosine to
``min_lr_ratio`` × lr, per-group multipliers kept). Unlike mmengine it runs the very first optimizer step at
lr 0 and then follows X-SAM's curve one step late: irrelevant at the recipe's thousands of steps.

On CPU (gloo) it runs fp32, no overlapped communication, and ``torch_adam`` so DeepSpeed does not compile
its fused Adam op (about 45 s on a 2-core box). On GPUs: bf16 and torch's fused AdamW kernel.
"""

from __future__ import annotations

from typing import Any

from orchestrate.stages import StageConfig


def deepspeed_config(cfg: StageConfig, *, total_steps: int, use_gpu: bool) -> dict[str, Any]:
    """``cfg`` as a DeepSpeed config dict. ``total_steps`` = optimizer steps of the whole run."""
    b, o, s = cfg.batch, cfg.optim, cfg.schedule
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
    return {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": adam},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": s.warmup_steps(total_steps),
                "warmup_min_ratio": s.warmup_start,
                "warmup_type": "linear",
                "cos_min_ratio": s.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
