"""Stage exports and the checks that chain stages: every expected key with its shape, nothing unused."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrate.exports import (
    ParentExportError,
    check_parents,
    load_parent_weights,
    resolve_parents,
)
from orchestrate.plan import param_shapes
from orchestrate.stages import debug, stage2, stage3
from xsam_model import build_xsam, export_trainable
from xsam_model.export import Export, ExportError, safetensors_header, write_export


@pytest.fixture(scope="module")
def trained():
    """A debug model whose stage-1 and stage-2 weights differ from a fresh build's (as after training)."""
    torch.manual_seed(1)
    model = build_xsam("debug")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    return model


def _write(root, stage, state):
    url = str(root / f"stage{stage}" / "export")
    return write_export(url, state, stage=stage, config={"stage": {"stage": stage}}, lineage={})


def test_round_trip_and_header(tmp_path, trained):
    state = export_trainable(trained, 1)
    url = _write(tmp_path, 1, state)
    info = Export.find(url, 1)
    assert set(info.keys) == set(state)
    assert all(info.keys[k]["shape"] == tuple(v.shape) for k, v in state.items())
    assert info.lineage["tensors"] == len(state) and len(info.lineage["model_sha256"]) == 64
    back = info.state()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert safetensors_header(info.model_url) == info.keys
    assert not list(tmp_path.glob("stage1/.tmp-*"))  # written to a temporary folder, then moved
    _write(tmp_path, 1, {k: v * 2 for k, v in state.items()})  # a re-run replaces the export
    assert torch.equal(Export.find(url, 1).state()[next(iter(state))], 2 * next(iter(state.values())))


def test_missing_parent_export_says_where(tmp_path):
    with pytest.raises(
        ParentExportError,
        match=r"stage 3 starts from stage 1's export, expected .*model\.safetensors.* in "
        r".*stage1/export \(run stage 1 first",
    ):
        resolve_parents(str(tmp_path), 3, stage3().parents)
    _write(tmp_path, 2, {"x": torch.zeros(1)})
    with pytest.raises(ExportError, match="export of stage 2, expected stage 1"):
        Export.find(str(tmp_path / "stage2" / "export"), 1)


def test_stage3_takes_segmentor_from_1_and_projectors_from_2(tmp_path, trained):
    _write(tmp_path, 1, export_trainable(trained, 1))
    _write(tmp_path, 2, export_trainable(trained, 2))
    cfg = debug(stage3())
    shapes, skip = param_shapes(cfg)
    exports = resolve_parents(str(tmp_path), 3, cfg.parents)
    plan = check_parents(shapes, cfg.parents, exports, skip=skip)
    assert plan.dropped[1] and all(k.startswith("mask_decoder.linear_head.") for k in plan.dropped[1])
    assert {k.split(".")[0] for k in plan.take[1]} == {"sam_encoder", "seg_connector", "mask_decoder"}
    assert {k.split(".")[0] for k in plan.take[2]} == {"visual_projector", "seg_projector"}
    torch.manual_seed(2)
    fresh = build_xsam("debug")
    counts = load_parent_weights(fresh, plan, exports)
    assert counts == {1: len(plan.take[1]), 2: len(plan.take[2])}
    got, want = dict(fresh.named_parameters()), dict(trained.named_parameters())
    for k in plan.take[1] + plan.take[2]:
        assert torch.equal(got[k], want[k]), k
    assert not torch.equal(got["llm_projector.0.weight"], want["llm_projector.0.weight"])  # no parent has it


def test_stage2_takes_the_sam_encoder_of_stage1(tmp_path, trained):
    _write(tmp_path, 1, export_trainable(trained, 1))
    cfg = debug(stage2())
    shapes, skip = param_shapes(cfg)
    plan = check_parents(shapes, cfg.parents, resolve_parents(str(tmp_path), 2, cfg.parents), skip=skip)
    assert plan.take[1] and all(k.startswith("sam_encoder.") for k in plan.take[1])
    assert {k.split(".")[0] for k in plan.dropped[1]} == {"seg_connector", "mask_decoder"}


def test_an_export_that_does_not_fit_lists_every_key(tmp_path, trained):
    state = export_trainable(trained, 1)
    gone = "seg_connector.levels.0.convs.0.weight"
    state.pop(gone)
    grown = next(k for k in state if k.startswith("mask_decoder.transformer.") and state[k].dim() == 2)
    state[grown] = torch.zeros(state[grown].shape[0] + 1, state[grown].shape[1])
    state["segmentor.old_head.weight"] = torch.zeros(3)
    _write(tmp_path, 1, state)
    _write(tmp_path, 2, export_trainable(trained, 2))
    cfg = debug(stage3())
    shapes, skip = param_shapes(cfg)
    with pytest.raises(ParentExportError) as e:
        check_parents(shapes, cfg.parents, resolve_parents(str(tmp_path), 3, cfg.parents), skip=skip)
    msg = str(e.value)
    assert "stage 1 export" in msg and "model.safetensors" in msg
    assert "1 missing, 1 unexpected, 1 shape-mismatched keys" in msg  # the counts of xsam_model.weight_fit
    assert f"    missing     {gone}\n" in msg
    assert (
        f"mismatched  {grown}: export ({shapes[grown][0] + 1}, {shapes[grown][1]}) vs model {shapes[grown]}"
        in msg
    )
    assert "unexpected  segmentor.old_head.weight (not under ['sam_encoder'" in msg
    assert "stage 2 export" not in msg  # the other parent is fine


def test_lineage_is_written_last_and_is_json(tmp_path):
    url = write_export(
        str(tmp_path / "e"), {"a": torch.ones(2)}, stage=1, config={"k": 1}, lineage={"parents": []}
    )
    lineage = json.loads((tmp_path / "e" / "lineage.json").read_text())
    assert lineage["stage"] == 1 and lineage["tensors"] == 1 and url.endswith("/e")
