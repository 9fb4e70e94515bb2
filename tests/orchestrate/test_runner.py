"""Bad input fails at once, before any Ray worker starts, with what was expected and where."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from orchestrate import summary, train
from orchestrate.run_errors import RunSetupError
from orchestrate.runner import RunArgs, prepare
from orchestrate.stages import StageConfig, debug, stage1
from orchestrate.train_checkpoints import TRAIN_STATE, TrainState, marker_file, marker_record
from pipelines import mixture_file
from pipelines.build import mixture_weights
from pipelines.errors import run_cli
from xsam_model import build_xsam, export_trainable
from xsam_model.export import write_export


def _args(shards, run_root, stage=1, **kw) -> RunArgs:
    return RunArgs(
        stage=stage, flavor="debug", shards=str(shards), run_root=str(run_root), num_workers=2, **kw
    )


@pytest.fixture
def stage1_export(tmp_path):
    """A stage-1 export of the debug model under ``tmp_path/run``."""
    model = build_xsam("debug")
    url = str(tmp_path / "run" / "stage1" / "export")
    write_export(url, export_trainable(model, 1), stage=1, config={}, lineage={})
    return tmp_path / "run"


def _inits(root):
    """The full flavor's Hugging Face folders (config.json only: the driver checks they are there)."""
    from xsam_model.builder import resolve_config

    mc = resolve_config("xsam-phi3")
    for f in (mc.siglip.folder, mc.sam.folder, mc.llm.folder, mc.decoder.folder):
        (root / f).mkdir(parents=True)
        (root / f / "config.json").write_text("{}")
    return root


def test_plan_from_the_mixture(train_shards, tmp_path):
    plan = prepare(_args(train_shards, tmp_path / "run", max_steps=None))
    steps = mixture_file.load(str(train_shards)).stage(1).steps_per_epoch(4)
    assert plan.steps_per_epoch == steps and plan.total_steps == 6  # the debug variant's max_steps
    assert plan.layout.dir == str(tmp_path / "run" / "stage1") and plan.init_from == {}
    assert plan.run_name == "run" and plan.wandb_dir == str(tmp_path / "run" / "stage1" / "wandb")
    assert plan.code["source_sha256"]
    full = prepare(
        RunArgs(
            stage=1,
            flavor="xsam-phi3",
            shards=str(train_shards),
            run_root=str(tmp_path / "r"),
            num_workers=16,
            init_dir=str(_inits(tmp_path / "inits")),
        )
    )
    assert full.total_steps == 36 * mixture_file.load(str(train_shards)).stage(1).steps_per_epoch(64)


def test_missing_shards_or_mixture(train_shards, tmp_path):
    with pytest.raises(RunSetupError, match=r"shards folder not found: .*/nowhere"):
        prepare(_args(tmp_path / "nowhere", tmp_path / "run"))
    copy = tmp_path / "shards"
    shutil.copytree(train_shards, copy)
    (copy / "mixture.json").unlink()
    with pytest.raises(RunSetupError, match=r"mixture not found: expected .*/shards/mixture.json"):
        prepare(_args(copy, tmp_path / "run"))


def test_stage_without_data_or_with_a_missing_shard(train_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(train_shards, copy)
    mixture_weights.write(
        str(copy),
        mixture_weights.compute(str(copy), stages={1: ["coco_panoptic"], 2: ["llava_pretrain"]}),
    )
    with pytest.raises(
        RunSetupError, match=r"stage 2 has no datasets; missing: llava_pretrain/train \(no manifest"
    ):
        prepare(_args(copy, tmp_path / "run", stage=2))
    next(copy.glob("coco_panoptic/train/*.tar")).unlink()
    with pytest.raises(
        RunSetupError, match=r"1 shards listed in .*mixture.json are not under .*: coco_panoptic/train/"
    ):
        prepare(_args(copy, tmp_path / "run"))


def test_stage_without_its_parent_export(train_shards, tmp_path):
    with pytest.raises(
        RunSetupError, match=r"stage 2 starts from stage 1's export, expected .* in .*run/stage1/export"
    ):
        prepare(_args(train_shards, tmp_path / "run", stage=2))


def test_batch_that_does_not_divide(train_shards, tmp_path):
    with pytest.raises(
        RunSetupError, match=r"global batch 4 is not divisible by micro batch 2 × world size 3 = 6"
    ):
        prepare(
            RunArgs(
                stage=1,
                flavor="debug",
                shards=str(train_shards),
                run_root=str(tmp_path / "run"),
                num_workers=3,
            )
        )
    with pytest.raises(RunSetupError, match="bf16 needs GPUs"):
        prepare(_args(train_shards, tmp_path / "run", precision="bf16"))


def test_export_that_does_not_fit_the_model(train_shards, tmp_path, stage1_export):
    url = stage1_export / "stage1" / "export"
    state = export_trainable(build_xsam("debug"), 1)
    state["sam_encoder.vision_encoder.pos_embed"] = torch.zeros(1, 3, 3, 7)
    write_export(str(url), state, stage=1, config={}, lineage={})
    with pytest.raises(
        RunSetupError,
        match=r"(?s)stage 1 export .*model.safetensors: 0 missing, 0 unexpected, 1 shape-mismatched keys\n"
        r"    mismatched  sam_encoder.vision_encoder.pos_embed: export \(1, 3, 3, 7\) vs model",
    ):
        prepare(_args(train_shards, stage1_export, stage=2))
    # --init-from points elsewhere: that export is checked instead
    other = tmp_path / "other"
    write_export(str(other), export_trainable(build_xsam("debug"), 1), stage=1, config={}, lineage={})
    plan = prepare(_args(train_shards, stage1_export, stage=2, init_from={1: str(other)}))
    assert plan.init_from == {1: str(other)}


def _fake_checkpoint(stage_dir, cfg, step=2):
    ck = stage_dir / "checkpoint_2026-01-01_00-00-00.000000"
    ck.mkdir(parents=True)
    (ck / TRAIN_STATE).write_text(json.dumps(TrainState(step=step, resume_key=cfg.resume_key()).__dict__))
    (ck / marker_file(0)).write_text(json.dumps(marker_record(ck, 0, 1)))  # a complete checkpoint


def test_resume_checks(train_shards, tmp_path):
    cfg = debug(stage1())
    _fake_checkpoint(tmp_path / "run" / "stage1", cfg)
    assert prepare(_args(train_shards, tmp_path / "run")).resume == "auto"
    with pytest.raises(
        RunSetupError, match=r"already holds 1 checkpoints \(latest at step 2\); use --resume auto"
    ):
        prepare(_args(train_shards, tmp_path / "run", resume="never"))
    # another world size keeps the global batch (elastic resume); another global batch is refused
    with pytest.raises(RunSetupError, match=r"written by a run with other settings .*global_batch: 4 vs 8"):
        prepare(
            RunArgs(
                stage=1,
                flavor="debug",
                shards=str(train_shards),
                run_root=str(tmp_path / "run"),
                num_workers=2,
                global_batch=8,
            )
        )


def test_train_py_reports_bad_input_and_exits(train_shards, tmp_path, capsys):
    rc = run_cli(
        train.main,
        [
            "--stage",
            "2",
            "--flavor",
            "debug",
            "--shards",
            str(train_shards),
            "--run-root",
            str(tmp_path / "run"),
            "--num-workers",
            "2",
        ],
    )
    assert rc == 2
    assert "error: stage 2 starts from stage 1's export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "1", "--shards", "x", "--run-root", "y", "--init-from", "one=/x"])


def test_bad_input_is_one_line_and_exit_code_2(train_shards, tmp_path, capsys):
    """train.py and summary.py: an orchestrate error is exit code 2 and its message, never a traceback."""
    args = [
        "--stage",
        "1",
        "--flavor",
        "debug",
        "--shards",
        str(tmp_path / "none"),
        "--run-root",
        str(tmp_path),
    ]
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: shards folder not found: {tmp_path / 'none'} (build it with orchestrate/build_shards.py)\n"
    )
    assert run_cli(summary.main, ["--run-root", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: run root not found: {tmp_path / 'nowhere'}\n"
    (tmp_path / "run" / "stage1" / "export").mkdir(parents=True)
    (tmp_path / "run" / "stage1" / "export" / "lineage.json").write_text("{")
    assert run_cli(summary.main, ["--run-root", str(tmp_path / "run"), "-q"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {tmp_path}/run/stage1/export/lineage.json: not a readable"
    )


def test_print_config_needs_no_other_flag(capsys):
    assert (
        run_cli(train.main, ["--stage", "1", "--print-config", "--num-workers", "8", "--max-steps", "9"]) == 0
    )
    # "stage"; the model's config under "model" is checked in tests/orchestrate/test_print_config.py
    cfg = json.loads(capsys.readouterr().out)["stage"]
    assert set(cfg) == {f.name for f in dataclasses.fields(StageConfig)}  # every field
    assert cfg["batch"] == {"global_batch": 64, "micro_batch": 4, "grad_accum": 2, "world_size": 8}
    assert cfg["schedule"]["max_steps"] == 9 and cfg["data"]["mixture_stage"] == 1
    assert cfg["optim"]["lr_mults"][0] == ["sam_encoder", 0.1]
    assert run_cli(train.main, ["--stage", "1", "--print-config", "--num-workers", "3"]) == 2  # 64 ∤ 4 × 3
    assert capsys.readouterr().err.startswith("error: global batch 64 is not divisible")
    with pytest.raises(SystemExit):  # without --print-config, shards and run root are required
        train.parse_args(["--stage", "1"])
