"""What the Trainer hands DeepSpeed, run in one process (a gloo group of one, no Ray).

The stage's learning-rate schedule is what DeepSpeed runs: the engine built by
:func:`orchestrate.deepspeed_config.initialize` (the Trainer's call) applies, step by step, the closed form of
the stage's :class:`xsam_model.schedule.ScheduleConfig` to each parameter group's own lr, and a resumed engine
continues the schedule. And the debug model built with a stage's config (its activation checkpointing and
attention kernel, :func:`orchestrate.plan.model_config`) takes one engine step on CPU as the Trainer runs
it."""

from __future__ import annotations

import dataclasses
import math
import os
import socket

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from orchestrate.deepspeed_config import initialize  # noqa: E402
from orchestrate.plan import model_config  # noqa: E402
from orchestrate.stages import get_stage, stage1, stage3, with_world_size  # noqa: E402
from orchestrate.trainer import optimizer_groups, to_device  # noqa: E402
from tests.support.model import image_bytes, make_samples  # noqa: E402


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group (what Ray Train gives each worker), torn down after the module."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**env, "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}.items():
            mp.setenv(k, v)
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


class TwoGroups(torch.nn.Module):
    """Two parameter vectors with a constant gradient: Adam then moves each by exactly its lr per step
    (m̂/√v̂ = 1), so the parameters record the lr every step ran at."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(4))
        self.b = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x).sum() + (self.b * x).sum()


def _engine(cfg, total: int, per_epoch: float):
    """The engine as the Trainer builds it, with two groups at lr × two of the stage's multipliers: its first
    group's and the first different one."""
    model = TwoGroups()
    na, ma = cfg.lr_mults[0]
    nb, mb = next((n, m) for n, m in cfg.lr_mults if m != ma)
    groups = [
        {"params": [model.a], "name": na, "lr": cfg.optim.lr * ma, "weight_decay": 0.0},
        {"params": [model.b], "name": nb, "lr": cfg.optim.lr * mb, "weight_decay": 0.0},
    ]
    engine, sched, _ = initialize(
        model, groups, cfg, total_steps=total, steps_per_epoch=per_epoch, use_gpu=False
    )
    return engine, sched, (ma, mb)


def _run(engine, steps: int) -> list[list[float]]:
    """Each optimizer step's group lrs (read before the step, i.e. the lr the step runs at)."""
    lrs = []
    x = torch.ones(4)
    for _ in range(steps):
        lrs.append(list(engine.get_lr()))
        engine.backward(engine(x))
        engine.step()
    return lrs


def _one_worker(cfg):
    """The stage's optimisation and schedule with one worker's batch (what the one-process group can run)."""
    return with_world_size(cfg, 1, global_batch=cfg.batch.micro_batch)


def _multistep(t: int, total: int, per_epoch: int) -> float:
    """Stage 1 (paper), mmengine's way: linear warm-up from 1e-5 to 1 at W - 1, W = int(0.03 · 36 ·
    per_epoch), then × 0.1 at W + 24 and W + 30 epochs (milestones count from the warm-up's end)."""
    warm = int(0.03 * 36 * per_epoch)
    if t < warm:
        return 1e-5 if warm == 1 else 1e-5 + (1 - 1e-5) * t / (warm - 1)
    return 0.1 ** sum(t >= warm + m * per_epoch for m in (24, 30))


def _cosine(t: int, total: int) -> float:
    """Stages 2, 3 over a horizon of ``total`` steps: the same warm-up, then a cosine to 0 from W to
    ``total``."""
    warm = int(0.03 * total)
    if t < warm:
        return 1e-5 + (1 - 1e-5) * t / (warm - 1)
    return 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))


def test_stage1_multistep_runs_in_deepspeed_with_group_multipliers(one_rank):
    cfg = _one_worker(stage1())
    assert cfg.schedule.lr.kind == "multistep" and cfg.schedule.lr.milestones == (24.0, 30.0)
    total, per_epoch = 108, 3  # 36 epochs of 3 steps: warm-up 3 steps, × 0.1 at steps 3 + 72 and 3 + 90
    engine, sched, (ma, mb) = _engine(cfg, total, per_epoch)
    assert (ma, mb) == (0.1, 1.0)  # SAM encoder × 0.1, connector × 1
    lrs = _run(engine, total)
    for t in (0, 1, 2, 3, 50, 74, 75, 92, 93, 107):
        f = _multistep(t, total, per_epoch)
        assert lrs[t] == pytest.approx([cfg.optim.lr * ma * f, cfg.optim.lr * mb * f], rel=1e-9), t
    assert lrs[75][1] == pytest.approx(0.1 * lrs[74][1]) and lrs[93][1] == pytest.approx(0.01 * lrs[74][1])
    # Adam moved each parameter by the lr of every step it ran: the schedule reached the optimizer
    moved = [-float(p.detach().mean()) for p in (engine.module.a, engine.module.b)]
    assert moved == pytest.approx([sum(r[0] for r in lrs), sum(r[1] for r in lrs)], rel=1e-4)
    assert sched.get_last_lr() == pytest.approx([cfg.optim.lr * m * 0.01 for m in (ma, mb)])


def test_stage3_cosine_runs_in_deepspeed_with_group_multipliers(one_rank):
    cfg = _one_worker(stage3())
    assert cfg.schedule.lr.kind == "cosine"
    total = 100  # warm-up 3 steps (1e-5, 0.5, 1), cosine over 97
    engine, _, (ma, mb) = _engine(cfg, total, 100)
    assert (ma, mb) == (0.1, 1.0)  # SigLIP × 0.1, the LLM × 1
    lrs = _run(engine, total)
    for t in (0, 2, 3, 27, 50, 99):
        f = _cosine(t, total)
        assert lrs[t] == pytest.approx([cfg.optim.lr * ma * f, cfg.optim.lr * mb * f], rel=1e-9), t
    assert max(r[1] for r in lrs) == pytest.approx(cfg.optim.lr * mb)


def test_a_resumed_engine_continues_the_schedule(one_rank, tmp_path):
    """DeepSpeed saves and restores the client scheduler with its checkpoint; the Trainer then re-applies
    the plan's lr (``StageLR.apply``), so a resume with a longer run follows the longer schedule."""
    cfg = _one_worker(stage1())
    total, per_epoch = 36, 1  # warm-up 1 step, × 0.1 at steps 1 + 24 and 1 + 30
    first, _, _ = _engine(cfg, total, per_epoch)
    before = _run(first, 22)
    first.save_checkpoint(str(tmp_path), tag="ckpt")
    straight = before + _run(first, 6)  # steps 22..27 without interruption: across the milestone at 25

    resumed, sched, (ma, mb) = _engine(cfg, total, per_epoch)
    resumed.load_checkpoint(str(tmp_path), tag="ckpt")
    sched.apply()
    assert sched.last_epoch == 22
    after = _run(resumed, 6)
    assert after == straight[22:]
    for t, lr in enumerate(after, start=22):
        f = _multistep(t, total, per_epoch)
        assert lr == pytest.approx([cfg.optim.lr * ma * f, cfg.optim.lr * mb * f], rel=1e-9), t
    assert [-float(p.detach().mean()) for p in (resumed.module.a, resumed.module.b)] == pytest.approx(
        [-float(p.detach().mean()) for p in (first.module.a, first.module.b)], rel=1e-6
    )

    # the checkpoint keeps the step, not the multiplier: a cosine of a longer run (--max-steps) continues at
    # its own value
    cos = dataclasses.replace(cfg, schedule=dataclasses.replace(stage3().schedule, max_steps=2 * total))
    longer, sched, (ma, mb) = _engine(cos, 2 * total, per_epoch)
    longer.load_checkpoint(str(tmp_path), tag="ckpt")
    sched.apply()
    f = _cosine(22, 2 * total)
    assert longer.get_lr() == pytest.approx([cos.optim.lr * ma * f, cos.optim.lr * mb * f], rel=1e-9)


# ------------------------------------------------------------------ a debug stage's model in the engine
@pytest.mark.parametrize("stage,task", [(1, "genseg"), (3, "refseg")])
def test_debug_stage_step_with_the_stage_checkpointing(one_rank, stage, task):
    """Stage 1 checkpoints the SAM encoder only, stage 3 every part; one engine step of each is finite."""
    from xsam_model import build_xsam

    cfg = _one_worker(get_stage(stage, flavor="debug"))
    torch.manual_seed(cfg.data.seed)
    model = build_xsam(model_config(cfg))
    everything = stage == 3
    assert model.sam_encoder.is_activation_checkpointing
    assert model.vision_encoder.is_activation_checkpointing == everything
    assert model.llm.is_activation_checkpointing == everything
    assert (
        model.seg_connector.gradient_checkpointing
        == model.visual_projector.gradient_checkpointing
        == everything
    )
    assert model.config.llm.attn_implementation == "sdpa"  # "auto" on CPU
    engine, _, _ = initialize(
        model, optimizer_groups(model, cfg), cfg, total_steps=10, steps_per_epoch=5, use_gpu=False
    )
    sample = make_samples()[task]
    batch = model.processor.collate([model.processor(sample, image_bytes(i)) for i in range(2)])
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    torch.manual_seed(1)
    out = engine(to_device(batch, torch.device("cpu"), torch.float32), stage=stage)
    engine.backward(out.loss)
    engine.step()
    norm = engine.get_global_grad_norm()
    assert torch.isfinite(out.loss) and out.loss > 0
    assert math.isfinite(float(norm)) and float(norm) > 0
    assert any(not torch.equal(p.detach(), b) for p, b in zip(trained, before, strict=True))
