"""Per-part gradient norms (:mod:`orchestrate.grad_norms`): the grouping covers every trainable parameter
once, the norms equal a direct computation, and under DeepSpeed (two gloo ranks, accumulation 2, ZeRO 0 and 2)
they are the norms of the step's reduced gradient, which add up to DeepSpeed's own global norm."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrate.grad_norms import GradNormProbe, parameter_parts, part_grad_norms
from orchestrate.plan import model_config
from orchestrate.stages import StageConfigError, TrackingConfig, get_stage
from tests.support.model import image_bytes, make_samples
from xsam_model import build_xsam, stage_view
from xsam_model.trainable import STAGE_GROUPS


@pytest.fixture(scope="module")
def debug_model():
    cfg = get_stage(1, flavor="debug")
    torch.manual_seed(cfg.data.seed)
    return build_xsam(model_config(cfg))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_trainable_parameter_is_in_exactly_one_part(debug_model, stage):
    groups = stage_view(debug_model, stage)  # sets requires_grad as the trainer does
    parts = parameter_parts(debug_model.named_parameters(), stage)
    names = [n for ps in parts.values() for n, _ in ps]
    trainable = [n for n, p in debug_model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(set(names)) == len(names)
    assert list(parts) == [p for p, _ in STAGE_GROUPS[stage]]  # every group of the stage has parameters
    by_group = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert {k: {id(p) for _, p in ps} for k, ps in parts.items()} == by_group  # the optimizer's groups


def test_a_trainable_parameter_outside_the_groups_is_named():
    m = nn.Module()
    m.visual_projector, m.extra = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"outside every stage-2 group: \['extra.weight', 'extra.bias'\]"):
        parameter_parts(m.named_parameters(), 2)


def test_norms_equal_a_direct_computation(debug_model):
    stage_view(debug_model, 1)
    debug_model.zero_grad(set_to_none=True)
    proc = debug_model.processor
    batch = proc.collate([proc(make_samples()["genseg"], image_bytes(i)) for i in range(2)])
    torch.manual_seed(1)
    debug_model(batch, stage=1).loss.backward()
    parts = parameter_parts(debug_model.named_parameters(), 1)
    norms = part_grad_norms(parts, lambda p: p.grad)
    for part, ps in parts.items():
        flat = torch.cat([p.grad.double().flatten() for _, p in ps if p.grad is not None])
        assert norms[part] == pytest.approx(float(flat.norm()), rel=1e-9), part
    total = torch.cat([p.grad.double().flatten() for p in debug_model.parameters() if p.grad is not None])
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(float(total.norm()), rel=1e-9)
    debug_model.zero_grad(set_to_none=True)


def test_probe_schedule_and_config():
    class Boundary:
        def is_gradient_accumulation_boundary(self) -> bool:
            return True

    m = nn.Module()
    m.visual_projector, m.seg_projector = nn.Linear(2, 2), nn.Linear(2, 2)
    probe = GradNormProbe(m, 2, every=3)
    m.visual_projector(torch.ones(2)).sum().backward()
    probe.after_backward(Boundary(), 2)
    assert probe.metrics() == {}  # not due
    probe.after_backward(Boundary(), 3)
    got = probe.metrics()
    assert (
        got["grad_norm/visual_projector"] == pytest.approx(math.sqrt(4 + 2))
        and got["grad_norm/seg_projector"] == 0
    )
    assert probe.metrics() == {}  # once
    assert GradNormProbe(m, 2, every=0).parts == {}
    assert (
        TrackingConfig().grad_norm_every == 50 and get_stage(1, flavor="debug").tracking.grad_norm_every == 2
    )
    with pytest.raises(StageConfigError, match="grad_norm_every"):
        TrackingConfig(grad_norm_every=-1)


# ------------------------------------------------------------------ two gloo ranks under DeepSpeed
class Tiny(nn.Module):
    """Stage 2's two groups (``visual_projector``, ``seg_projector``) on a toy regression."""

    def __init__(self):
        super().__init__()
        self.visual_projector = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8))
        self.seg_projector = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.seg_projector(self.visual_projector(x)) - y).pow(2).mean()


def _data(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randn(2, 6, generator=g) * (1 + rank), torch.randn(2, 3, generator=g)


def _reference(world: int, accum: int) -> dict[str, float]:
    """The step's gradient computed directly: the mean of every rank's and micro-batch's loss."""
    torch.manual_seed(0)
    model = Tiny()
    loss = sum(model(*_data(r, m)) for r in range(world) for m in range(accum)) / (world * accum)
    loss.backward()
    return part_grad_norms(parameter_parts(model.named_parameters(), 2), lambda p: p.grad)


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (see test_dist_loss)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    from orchestrate.deepspeed_compat import patch_deepspeed

    patch_deepspeed()  # no shared-memory comm op build on CPU
    # a forked child inherits DeepSpeed's cached groups of an earlier test's (destroyed) one-rank group
    ds_comm.cdb, groups._WORLD_GROUP, groups._DATA_PARALLEL_GROUP = None, None, None
    try:
        result = {}
        for zero in (0, 2):
            torch.manual_seed(0)
            model = Tiny()
            config = {
                "train_batch_size": 2 * 2 * world,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 2,
                "gradient_clipping": 1e-3,  # the norms are taken before clipping
                "zero_optimization": {"stage": zero},
                "zero_allow_untested_optimizer": True,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            }
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            probe = GradNormProbe(model, 2, every=1)
            for m in range(2):
                engine.backward(engine(*_data(rank, m)))
                probe.after_backward(engine, 1)
                engine.step()
            norm = engine.get_global_grad_norm()  # None without ZeRO in fp32 (DeepSpeed clips in place)
            result[str(zero)] = {**probe.metrics(), "global": None if norm is None else float(norm)}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.ray
@pytest.mark.slow
def test_deepspeed_two_ranks_zero0_and_zero2(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected = _reference(2, 2)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        for zero in ("0", "2"):
            norms = got[zero]
            for part, v in expected.items():
                assert norms[f"grad_norm/{part}"] == pytest.approx(v, rel=1e-5), (r, zero, part)
        parts_total = math.sqrt(sum(got["2"][f"grad_norm/{p}"] ** 2 for p in expected))
        assert parts_total == pytest.approx(got["2"]["global"], rel=1e-5), r  # ZeRO's own norm
