"""Stage configs: the recipe's values (reference/xsam_recipe.md §4), derived variants, batch arithmetic."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrate.stages import (
    STAGES,
    BatchConfig,
    StageConfigError,
    debug,
    get_stage,
    stage1,
    stage2,
    stage3,
    with_world_size,
)
from xsam_model.config import CHECKPOINT_PARTS
from xsam_model.trainable import STAGE_GROUPS


def test_recipe_values():
    s1, s2, s3 = stage1(), stage2(), stage3()
    assert (s1.optim.lr, s1.optim.weight_decay, s1.optim.grad_clip) == (1e-4, 0.05, 0.01)
    assert (s2.optim.lr, s2.optim.weight_decay, s2.optim.grad_clip) == (1e-3, 0.0, 1.0)
    assert (s3.optim.lr, s3.optim.weight_decay, s3.optim.grad_clip) == (4e-5, 0.05, 1.0)
    assert [
        (c.batch.micro_batch, c.batch.grad_accum, c.batch.world_size, c.batch.global_batch)
        for c in (s1, s2, s3)
    ] == [(4, 1, 16, 64), (16, 1, 16, 256), (4, 1, 16, 64)]
    assert [c.schedule.epochs for c in (s1, s2, s3)] == [36, 1, 1]
    for c in (s1, s2, s3):
        assert c.optim.betas == (0.9, 0.999)
        assert (c.schedule.lr.warmup_ratio, c.schedule.lr.warmup_start, c.schedule.lr.min_lr_ratio) == (
            0.03,
            1e-5,
            0.0,
        )
        assert c.zero_stage == 2
        assert c.model.precision == "auto" and c.model.resolved_precision(True) == "bf16"
        assert c.model.resolved_precision(False) == "fp32"
        # what trains, and at which lr, is the model's stage view: defined there once, shown in the config
        assert c.lr_mults == STAGE_GROUPS[c.stage]
        assert c.to_dict()["optim"]["lr_mults"] == STAGE_GROUPS[c.stage]
        assert c.data.mixture_stage == c.stage and c.resume_key()["mixture_stage"] == str(c.stage)
    assert dict(s1.lr_mults)["sam_encoder"] == 0.1
    assert set(dict(s2.lr_mults)) == {"visual_projector", "seg_projector"}
    assert dict(s3.lr_mults)["sam_encoder"] == dict(s3.lr_mults)["vision_encoder"] == 0.1
    assert (s2.data.max_length, s3.data.max_length) == (2319, 2319)
    # the paper's stage 1: warm-up then × 0.1 at epochs 24 and 30; stages 2 and 3: warm-up then cosine
    assert (s1.schedule.lr.kind, s1.schedule.lr.milestones, s1.schedule.lr.gamma) == (
        "multistep",
        (24, 30),
        0.1,
    )
    assert s2.schedule.lr.kind == s3.schedule.lr.kind == "cosine"
    # activation checkpointing: the SAM encoder where it trains (stage 1); everything in stages 2 and 3
    assert s1.model.checkpointing == ("sam",)
    assert {"siglip", "sam", "projectors", "connector"} <= set(s2.model.checkpointing)
    assert s2.model.checkpointing == s3.model.checkpointing == tuple(CHECKPOINT_PARTS)
    assert all(c.model.attn_implementation == "auto" for c in (s1, s2, s3))
    assert [c.checkpoint.every_steps for c in (s1, s2, s3)] == [2000, 2000, 200]
    assert [c.data.loader_workers for c in (s1, s2, s3)] == [4, 8, 4]
    # chaining: stage 2 from stage 1; stage 3 from both, segmentor + connector from 1, projectors from 2
    assert [p.stage for p in s2.parents] == [1] and [p.stage for p in s3.parents] == [1, 2]
    assert set(s3.parents[0].take) >= {"sam_encoder", "seg_connector"} and s3.parents[0].drop == (
        "mask_decoder.linear_head",
    )
    assert s3.parents[1].take == ("visual_projector", "seg_projector")
    assert set(STAGES) == {1, 2, 3} and all(STAGES[n]().stage == n for n in STAGES)


def test_debug_variant_edits_a_copy():
    base = stage3()
    d = debug(base)
    assert d.model.flavor == "debug" and d.schedule.max_steps == 6 and d.batch.world_size == 2
    assert base.model.flavor == "xsam-phi3" and base.schedule.max_steps is None  # the original is untouched
    assert (d.optim, d.parents, d.stage) == (base.optim, base.parents, base.stage)  # recipe values kept
    assert get_stage(3, flavor="debug") == d


def test_batch_arithmetic_is_checked_with_the_numbers():
    with pytest.raises(
        StageConfigError, match=r"global batch 64 != micro batch 4 × accumulation 2 × world size 16 = 128"
    ):
        BatchConfig(global_batch=64, micro_batch=4, grad_accum=2, world_size=16)
    with pytest.raises(StageConfigError, match=r"64 is not divisible by micro batch 4 × world size 3 = 12"):
        with_world_size(stage1(), 3)
    eight = with_world_size(
        stage1(), 8
    )  # X-SAM's README launches 8 GPUs: keep the global batch, accumulate 2
    assert (eight.batch.global_batch, eight.batch.grad_accum, eight.batch.world_size) == (64, 2, 8)
    assert with_world_size(stage2(), 4, micro_batch=8).batch.grad_accum == 8


def test_bad_fields_refused():
    with pytest.raises(StageConfigError, match="zero_stage"):
        dataclasses.replace(stage1(), zero_stage=3)
    with pytest.raises(StageConfigError, match="bf16 needs GPUs"):
        dataclasses.replace(stage1().model, precision="bf16").resolved_precision(False)
    with pytest.raises(StageConfigError, match="cannot start from stage 3"):
        dataclasses.replace(stage2(), parents=(dataclasses.replace(stage3().parents[0], stage=3),))
    with pytest.raises(StageConfigError, match="unknown stage"):
        get_stage(4)
    with pytest.raises(StageConfigError, match=r"unknown checkpointing parts \['vit'\]"):
        dataclasses.replace(stage1().model, checkpointing=("sam", "vit"))
    with pytest.raises(StageConfigError, match="attn_implementation"):
        dataclasses.replace(stage1().model, attn_implementation="flash")
    with pytest.raises(StageConfigError, match=r"unknown stage '3'"):  # keyed by int only
        get_stage("3")


def test_total_steps_and_warmup():
    s = stage3().schedule
    assert s.total_steps(steps_per_epoch=1000) == 1000
    assert s.warmup_steps(1000) == 30
    assert dataclasses.replace(stage1().schedule).total_steps(100) == 3600  # 36 epochs
    assert dataclasses.replace(s, max_steps=7).total_steps(1000) == 7


def test_resume_key_ignores_schedule_and_tracking():
    a = stage1()
    b = dataclasses.replace(a, schedule=dataclasses.replace(a.schedule, max_steps=5))
    assert a.resume_key() == b.resume_key()
    # the global batch, not its split over workers: a stage resumes on another world size
    assert a.resume_key() == with_world_size(a, 8).resume_key()
    assert a.resume_key() != with_world_size(a, 8, global_batch=128).resume_key()
