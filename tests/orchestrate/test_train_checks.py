"""docs/integrity.md: train.py refuses bad arguments at once on the driver, before Ray: exit 2, one line."""

from __future__ import annotations

import pytest

from orchestrate.train import parse_args


def _args(tmp_path, *extra: str) -> list[str]:
    return ["--stage", "1", "--flavor", "debug", "--shards", str(tmp_path / "shards"), *extra]


def test_num_workers_zero_is_refused_not_the_default(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(_args(tmp_path, "--run-root", str(tmp_path / "runs"), "--num-workers", "0"))
    assert e.value.code == 2
    assert "--num-workers 0: needs at least 1 worker" in capsys.readouterr().err


def test_run_root_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        parse_args(_args(tmp_path, "--run-root", str(tmp_path / "runs")))
    assert e.value.code == 2
    assert "is a file, expected a folder" in capsys.readouterr().err


def test_a_run_root_that_does_not_exist_yet_is_accepted(tmp_path):
    args, _ = parse_args(_args(tmp_path, "--run-root", str(tmp_path / "new/runs"), "--num-workers", "1"))
    assert args.num_workers == 1


# ---------------------------------------------------------------------------------------------- item 5, rest
def _run(argv: list[str], capsys) -> tuple[int, str]:
    """``train.py`` through ``run_cli``: (exit code, stderr)."""
    from orchestrate import train
    from pipelines.errors import run_cli

    code = run_cli(train.main, argv)
    return code, capsys.readouterr().err


def _inits(root, skip: str = ""):
    """An ``inits/`` folder with the full flavor's Hugging Face folders (``skip`` left out)."""
    from xsam_model.builder import resolve_config

    mc = resolve_config("xsam-phi3")
    for f in (mc.siglip.folder, mc.sam.folder, mc.llm.folder, mc.decoder.folder):
        if f != skip:
            (root / f).mkdir(parents=True)
            (root / f / "config.json").write_text("{}")
    return root


def _export(url, stage: int, seed: int = 0):
    import torch

    from xsam_model import build_xsam, export_trainable
    from xsam_model.export import write_export

    torch.manual_seed(seed)
    model = build_xsam("debug")
    write_export(str(url), export_trainable(model, stage), stage=stage, config={}, lineage={})
    return model


def test_unknown_flavor_lists_the_known_ones(tmp_path, capsys):
    argv = ["--stage", "1", "--flavor", "nope", "--shards", str(tmp_path), "--run-root", str(tmp_path / "r")]
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    from xsam_model.flavors import XSAM_FLAVORS

    assert f"unknown --flavor 'nope'; known flavors: {', '.join(sorted(XSAM_FLAVORS))}" in err
    assert "debug" in XSAM_FLAVORS and "xsam-phi3" in XSAM_FLAVORS
    code, err = _run([*argv, "--print-config"], capsys)  # --print-config too
    assert code == 2 and "unknown --flavor 'nope'" in err


def test_full_flavor_needs_init_dir_with_every_folder(tmp_path, capsys):
    base = [
        "--stage",
        "1",
        "--flavor",
        "xsam-phi3",
        "--shards",
        str(tmp_path),
        "--run-root",
        str(tmp_path / "r"),
    ]
    code, err = _run(base, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--flavor xsam-phi3 needs --init-dir" in err and "sam-vit-large" in err
    inits = _inits(tmp_path / "inits", skip="Phi-3-mini-4k-instruct")
    code, err = _run([*base, "--init-dir", str(inits)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--init-dir {inits}: missing Phi-3-mini-4k-instruct" in err and "siglip" not in err
    # complete: the run goes on to the next check (the shards folder here)
    full = _inits(tmp_path / "inits2")
    code, err = _run([*base, "--init-dir", str(full)], capsys)
    assert code == 2 and "mixture not found" in err, err


def test_truncated_parent_export_is_one_line_naming_it(train_shards, tmp_path, capsys):
    run = tmp_path / "run"
    _export(run / "stage1" / "export", 1)
    model = run / "stage1" / "export" / "model.safetensors"
    argv = ["--stage", "2", "--flavor", "debug", "--shards", str(train_shards), "--run-root", str(run)]
    argv += ["--num-workers", "2"]
    blob = model.read_bytes()
    model.write_bytes(blob[:-100])
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{model}: truncated or damaged safetensors file: {len(blob) - 100} bytes" in err
    model.write_bytes(blob[:20])  # the header itself cut
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and f"{model}: truncated or damaged safetensors" in err
    model.write_bytes(blob + b"\0")  # longer than its header says: not the file that was exported either
    code, err = _run(argv, capsys)
    assert code == 2 and "truncated or damaged safetensors file" in err


def test_init_from_a_parent_the_stage_does_not_have(tmp_path, capsys):
    _export(tmp_path / "e2", 2)
    for stage, parent, want in (
        (1, 2, "its parents: none"),
        (2, 2, "its parents: 1"),
        (3, 4, "its parents: 1, 2 or 3"),
    ):
        argv = ["--stage", str(stage), "--flavor", "debug", "--shards", str(tmp_path)]
        argv += ["--run-root", str(tmp_path / "r"), "--init-from", f"{parent}={tmp_path / 'e2'}"]
        code, err = _run(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"--init-from {parent}=…: stage {stage} has no stage-{parent} parent ({want})" in err
    argv = ["--stage", "3", "--flavor", "debug", "--shards", str(tmp_path), "--run-root", str(tmp_path / "r")]
    argv += ["--init-from", f"3={tmp_path}", "--init-from", f"1={tmp_path}"]
    code, err = _run(argv, capsys)
    assert code == 2 and "drop --init-from 1" in err


def test_stage3_starts_from_a_stage3_export(tmp_path):
    """``--init-from 3=EXPORT`` (e.g. X-SAM's released weights imported by ``orchestrate.convert import``):
    every module stage 3 trains comes from that one export, checked key by key."""
    import torch

    from orchestrate import exports
    from orchestrate.plan import param_shapes
    from orchestrate.runner import RunArgs, _checked_parents, build_config
    from xsam_model import build_xsam
    from xsam_model.export import Export, write_export
    from xsam_model.trainable import trainable_names

    trained = _export(tmp_path / "s3", 3, seed=7)
    args = RunArgs(
        stage=3, flavor="debug", shards="", run_root=str(tmp_path / "r"), init_from={3: str(tmp_path / "s3")}
    )
    cfg = build_config(args)
    assert [p.stage for p in cfg.parents] == [3]
    assert _checked_parents(cfg, str(tmp_path / "r"), args.init_from) == {3: str(tmp_path / "s3")}
    shapes, skip = param_shapes(cfg)
    found = exports.resolve_parents(str(tmp_path / "r"), 3, cfg.parents, args.init_from)
    plan = exports.check_parents(shapes, cfg.parents, found, skip=skip)
    torch.manual_seed(8)
    fresh = build_xsam("debug")
    exports.load_parent_weights(fresh, plan, found)
    got, want = dict(fresh.named_parameters()), dict(trained.named_parameters())
    names = trainable_names(fresh, 3)
    assert set(plan.take[3]) == set(names) - skip
    assert all(torch.equal(got[k], want[k]) for k in plan.take[3])
    # an export missing a trainable module does not fit (xsam_model.weight_fit names it)
    state = Export.read(str(tmp_path / "s3")).state()
    gone = next(k for k in state if k.startswith("llm_projector."))
    state.pop(gone)
    write_export(str(tmp_path / "s3b"), state, stage=3, config={}, lineage={})
    from orchestrate.run_errors import RunSetupError

    with pytest.raises(RunSetupError, match=rf"1 missing.*\n    missing     {gone}"):
        _checked_parents(cfg, str(tmp_path / "r"), {3: str(tmp_path / "s3b")})
    # a stage-1 export given as 3= is refused by its lineage
    _export(tmp_path / "s1", 1)
    with pytest.raises(RunSetupError, match="is the export of stage 1, expected stage 3"):
        _checked_parents(cfg, str(tmp_path / "r"), {3: str(tmp_path / "s1")})


def test_init_from_a_damaged_export_is_refused_naming_the_file(tmp_path):
    """``--init-from`` (and the chaining of stages, the same check) hashes the parent's model.safetensors
    against its lineage on the driver: a byte flipped in place is one line naming the file."""
    from orchestrate.run_errors import RunSetupError
    from orchestrate.runner import RunArgs, _checked_parents, build_config

    _export(tmp_path / "s1", 1)
    blob = bytearray((tmp_path / "s1" / "model.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (tmp_path / "s1" / "model.safetensors").write_bytes(bytes(blob))
    args = RunArgs(
        stage=2, flavor="debug", shards="", run_root=str(tmp_path / "r"), init_from={1: str(tmp_path / "s1")}
    )
    with pytest.raises(RunSetupError, match=rf"{tmp_path}/s1/model\.safetensors: sha256 \S+ differs") as e:
        _checked_parents(build_config(args), str(tmp_path / "r"), args.init_from)
    assert len(str(e.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------- --lr,
# --grad-clip
def test_grad_clip_zero_is_taken_as_given_and_means_no_clipping(tmp_path):
    from orchestrate.deepspeed_config import deepspeed_config
    from orchestrate.runner import build_config

    args, _ = parse_args(_args(tmp_path, "--run-root", str(tmp_path / "r"), "--grad-clip", "0"))
    cfg = build_config(args)
    assert cfg.optim.grad_clip == 0.0  # used to be replaced by the recipe's 0.01 (a falsy check)
    assert (
        deepspeed_config(cfg, use_gpu=False)["gradient_clipping"] == 0.0
    )  # DeepSpeed clips only when it is > 0


def test_lr_given_is_kept_and_the_other_field_keeps_the_recipe(tmp_path):
    from orchestrate.runner import build_config

    args, _ = parse_args(_args(tmp_path, "--run-root", str(tmp_path / "r"), "--lr", "2e-4"))
    cfg = build_config(args)
    assert (cfg.optim.lr, cfg.optim.grad_clip) == (2e-4, 0.01)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "0", "--lr 0.0: the learning rate must be > 0"),
        ("--lr", "-0.0001", "--lr -0.0001: the learning rate must be > 0"),
        ("--grad-clip", "-1", "--grad-clip -1.0: must be >= 0 (0: no clipping)"),
    ],
)
def test_lr_zero_and_negative_values_are_refused_in_one_line(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        parse_args(_args(tmp_path, "--run-root", str(tmp_path / "r"), flag, value))
    assert e.value.code == 2
    assert message in capsys.readouterr().err
