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
from tests.support.faults import write_export_killed_at
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


# ---------------------------------------------------------------------------------------------- verified
# reads
def _flip_a_tensor_byte(url: str) -> None:
    """One byte of the tensor data changed in place (the file keeps its size and a valid header)."""
    path = f"{url}/model.safetensors"
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 0x01
    open(path, "wb").write(bytes(blob))


def test_a_flipped_byte_is_refused_on_every_read(tmp_path, trained):
    url = _write(tmp_path, 1, export_trainable(trained, 1))
    _flip_a_tensor_byte(url)
    with pytest.raises(
        ExportError, match=r"model\.safetensors: sha256 .* differs from .* recorded in its lineage"
    ):
        Export.find(url, 1)
    with pytest.raises(ExportError, match="differs"):
        Export.find(url, 1, verify=False).state()  # the bytes read are checked, not only the file once
    with pytest.raises(ParentExportError, match=rf"{url}/model\.safetensors: sha256"):
        resolve_parents(str(tmp_path), 2, stage2().parents)


def test_an_export_without_a_recorded_hash_is_refused(tmp_path, trained):
    url = _write(tmp_path, 1, export_trainable(trained, 1))
    lineage = json.loads((tmp_path / "stage1" / "export" / "lineage.json").read_text())
    del lineage["model_sha256"]
    (tmp_path / "stage1" / "export" / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(ExportError, match="records no model_sha256"):
        Export.find(url, 1)


def test_the_child_lineage_records_the_hash_of_the_bytes_it_loaded(tmp_path, trained):
    from orchestrate.exports import _parent_lineage
    from xsam_model.export import sha256_of

    url = _write(tmp_path, 1, export_trainable(trained, 1))
    cfg = debug(stage2())
    shapes, skip = param_shapes(cfg)
    found = resolve_parents(str(tmp_path), 2, cfg.parents, verify=False)
    counts = load_parent_weights(
        build_xsam("debug"), check_parents(shapes, cfg.parents, found, skip=skip), found
    )
    loaded_hash = sha256_of(f"{url}/model.safetensors")
    _flip_a_tensor_byte(url)  # the parent changes after the child loaded it
    (parent,) = _parent_lineage(found, counts)
    assert parent["model_sha256"] == loaded_hash == found[1].verified_sha256
    assert parent["tensors_loaded"] == counts[1] > 0


# ---------------------------------------------------------------------------------------------- replacing
def test_an_export_survives_a_kill_at_every_step_of_its_replacement(tmp_path):
    """Old export in place, a new one written and killed before each file-system change in turn: afterwards
    an export (the old or the new, complete and verified) is always found, and the next write leaves no
    temporaries."""
    old = {"a": torch.zeros(3), "b": torch.ones(2)}
    new = {k: v + 7 for k, v in old.items()}
    kills = 0
    for k in range(1, 40):
        root = tmp_path / f"k{k}"
        url = str(root / "export")
        write_export(url, old, stage=1, config={"v": "old"}, lineage={})
        code = write_export_killed_at(url, k, new, config={"v": "new"})
        found = Export.find(url, 1)  # verified; a .prev- left by the kill is put back
        got = found.state()
        assert found.config["v"] in ("old", "new")
        assert all(torch.equal(got[n], (old if found.config["v"] == "old" else new)[n]) for n in old)
        write_export(url, new, stage=1, config={"v": "again"}, lineage={})
        assert sorted(p.name for p in root.iterdir()) == ["export"], (k, sorted(root.iterdir()))
        assert Export.find(url, 1).config["v"] == "again"
        if code == 0:  # no k-th change: every step was covered
            break
        assert code == -9, code
        kills += 1
    assert kills >= 6  # the writes of the new export's files, and each rename of the swap


def test_a_missing_export_is_restored_from_its_previous_copy(tmp_path):
    url = write_export(str(tmp_path / "export"), {"a": torch.ones(2)}, stage=1, config={}, lineage={})
    (tmp_path / "export").rename(tmp_path / "export.prev-0000")  # killed between the two renames
    assert Export.find(url, 1).state()["a"].sum() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_temporaries_of_killed_writers_are_cleaned_by_the_next_write(tmp_path):
    url = write_export(str(tmp_path / "export"), {"a": torch.ones(2)}, stage=1, config={}, lineage={})
    for stale in ("export.tmp-1234abcd", ".tmp-export-5678abcd", "export.prev-9abc0000"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / "other.tmp-1").mkdir()  # another export's: not ours to delete
    write_export(url, {"a": torch.zeros(2)}, stage=1, config={}, lineage={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "other.tmp-1"]
