"""``train.py --stage N --print-config`` prints the resolved config, every field of the stage config and of
the model config the stage builds, as JSON, and needs no other flag (no shards, run root or Ray)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchestrate import train
from orchestrate.stages import StageConfig
from pipelines.errors import run_cli
from xsam_model.config import CHECKPOINT_PARTS, XSamConfig


def _print_config(capsys, *argv: str) -> dict:
    assert run_cli(train.main, [*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    "stage,kind,parts", [(1, "multistep", {"sam"}), (2, "cosine", None), (3, "cosine", None)]
)
def test_every_field_of_stage_and_model(capsys, stage, kind, parts):
    out = _print_config(capsys, "--stage", str(stage))
    assert set(out) == {"stage", "model"}
    s, m = out["stage"], out["model"]
    assert set(s) == _field_names(StageConfig) and s["stage"] == stage
    assert {"optim", "schedule", "data", "batch"} <= set(s) and s["batch"]["world_size"] == 16
    assert s["schedule"]["lr"]["kind"] == kind and s["schedule"]["lr"]["warmup_ratio"] == 0.03
    if kind == "multistep":
        assert (s["schedule"]["epochs"], s["schedule"]["lr"]["milestones"]) == (36, [24, 30])
    # the model: every field of every sub-config, the paper's defaults, the stage's checkpointing
    assert set(m) == _field_names(XSamConfig) and m["name"] == "xsam-phi3"
    for f in dataclasses.fields(XSamConfig):
        if dataclasses.is_dataclass(getattr(XSamConfig(), f.name)):
            assert set(m[f.name]) == _field_names(type(getattr(XSamConfig(), f.name))), f.name
    assert m["decoder"]["seg_reduce"] == "per_seg"
    assert (m["region"]["pool"], m["region"]["num_tokens"]) == ("max", 1)
    assert m["llm"]["attn_implementation"] == "auto"
    on = {part for part, attr in CHECKPOINT_PARTS.items() if m[attr]["gradient_checkpointing"]}
    assert on == (parts or set(CHECKPOINT_PARTS)) == set(s["model"]["checkpointing"])
    if stage > 1:
        assert m["processor"]["max_length"] == s["data"]["max_length"] == 2319


def test_the_model_is_the_flavor_the_stage_builds(capsys):
    main = _print_config(capsys, "--stage", "3", "--flavor", "xsam-phi3-main")["model"]
    assert main["name"] == "xsam-phi3-main" and main["decoder"]["seg_reduce"] == "main"
    assert (main["region"]["pool"], main["region"]["num_tokens"]) == ("mean", 64)
    debug = _print_config(capsys, "--stage", "1", "--flavor", "debug")
    assert debug["model"]["name"] == "debug" and debug["model"]["sam"]["hidden_size"] == 32
    assert (
        debug["model"]["sam"]["gradient_checkpointing"]
        and not debug["model"]["llm"]["gradient_checkpointing"]
    )
    assert (
        debug["stage"]["schedule"]["max_steps"] == 6
        and debug["stage"]["schedule"]["lr"]["kind"] == "multistep"
    )


def test_vgd_switches_reach_the_processor(capsys):
    """Paper defaults (cross-image prompts, negatives); each flag turns one off in the model config built."""
    proc = _print_config(capsys, "--stage", "3")["model"]["processor"]
    assert (proc["vgd_cross_image"], proc["vgd_negatives"]) == (True, True)
    out = _print_config(capsys, "--stage", "3", "--vgd-same-image")
    assert (out["model"]["processor"]["vgd_cross_image"], out["model"]["processor"]["vgd_negatives"]) == (
        False,
        True,
    )
    assert out["stage"]["data"]["vgd_cross_image"] is False
    proc = _print_config(capsys, "--stage", "3", "--vgd-no-negatives")["model"]["processor"]
    assert (proc["vgd_cross_image"], proc["vgd_negatives"]) == (True, False)


def test_a_min_workers_range_that_cannot_keep_the_global_batch_is_one_line(capsys, tmp_path):
    """Global batch 64 with micro batch 4: on 3 workers 64 is not a multiple of 12 — refused before Ray
    starts."""
    argv = [
        "--stage",
        "3",
        "--shards",
        str(tmp_path),
        "--run-root",
        str(tmp_path / "r"),
        "--num-workers",
        "4",
    ]
    assert run_cli(train.main, [*argv, "--min-workers", "3", "--micro-batch", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "min_workers 3" in err[0]


def test_stored_categories_switches_the_genseg_variant_prompt_off(capsys):
    assert _print_config(capsys, "--stage", "3")["stage"]["data"]["variant_categories"] is True
    assert (
        _print_config(capsys, "--stage", "3", "--stored-categories")["stage"]["data"]["variant_categories"]
        is False
    )
