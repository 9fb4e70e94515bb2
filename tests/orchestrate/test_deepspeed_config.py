"""The DeepSpeed JSON is generated from the stage config and accepted by DeepSpeed's own parser."""

from __future__ import annotations

import pytest

from orchestrate.deepspeed_config import deepspeed_config
from orchestrate.stages import STAGES, with_world_size


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_generated_json_matches_the_config_and_parses(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = STAGES[stage]()
    ds = deepspeed_config(cfg, use_gpu=True)
    b = cfg.batch
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (b.global_batch, b.micro_batch, b.grad_accum)
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert ds["optimizer"]["params"]["weight_decay"] == cfg.optim.weight_decay
    # the schedule is the stage's client LambdaLR (tests/orchestrate/test_schedule_wiring.py), not a JSON one
    assert "scheduler" not in ds
    # DeepSpeed's own parser (it assumes one process here, so the one-worker variant of the same config)
    one = deepspeed_config(with_world_size(cfg, 1), use_gpu=True)
    parsed = DeepSpeedConfig(one)
    assert parsed.train_batch_size == b.global_batch
    assert parsed.gradient_accumulation_steps == b.global_batch // b.micro_batch
    assert parsed.zero_optimization_stage == 2 and parsed.gradient_clipping == cfg.optim.grad_clip


def test_cpu_runs_fp32_without_fused_ops():
    ds = deepspeed_config(STAGES[3](), use_gpu=False)
    assert not ds["bf16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is True and "fused" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["overlap_comm"] is False


def test_compat_patch_skips_the_shm_op_build():
    """Only tensor-parallel inference uses it; building it costs ~30 s and a killed builder leaves a lock that
    hangs every later worker (orchestrate/deepspeed_compat.py)."""
    import importlib

    from orchestrate.deepspeed_compat import patch_deepspeed

    patch_deepspeed()
    patch_deepspeed()  # idempotent
    backend = importlib.import_module("deepspeed.comm.torch")
    assert backend.__file__.endswith("deepspeed/comm/torch.py")
    assert (
        backend.build_shm_op() is None and backend.TorchBackend.__init__.__globals__["build_shm_op"]() is None
    )
