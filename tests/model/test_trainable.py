"""Stage views (trainable sets, lr multipliers), export → load round trips and the strict errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.model import image_bytes
from xsam_model import (
    WeightMismatchError,
    build_xsam,
    export_trainable,
    load_exported,
    param_groups,
    stage_view,
)
from xsam_model.trainable import trainable_names, unused_parameters


@pytest.fixture()
def model():
    torch.manual_seed(1)
    return build_xsam("debug")


def _prefixes(names):
    return {
        n.split(".")[0] if not n.startswith("mask_decoder") else ".".join(n.split(".")[:2]) for n in names
    }


def test_trainable_sets_per_stage(model):
    s1, s2, s3 = (set(trainable_names(model, s)) for s in (1, 2, 3))
    assert _prefixes(s1) == {
        "sam_encoder",
        "seg_connector",
        "mask_decoder.pixel_decoder",
        "mask_decoder.transformer",
        "mask_decoder.linear_head",
    }
    assert _prefixes(s2) == {"visual_projector", "seg_projector"}
    assert _prefixes(s3) == {
        "vision_encoder",
        "sam_encoder",
        "llm",
        "visual_projector",
        "seg_projector",
        "llm_projector",
        "seg_connector",
        "mask_decoder.pixel_decoder",
        "mask_decoder.transformer",
        "mask_decoder.phrase_head",
    }
    assert "mask_decoder.phrase_head.bg_embed" in s3 and "mask_decoder.phrase_head.logit_scale" in s3
    # SigLIP's last layer and final norm come after the selected hidden state (-2): never trained
    unused = unused_parameters(model)
    assert unused and all(n.startswith("vision_encoder.") for n in unused) and not unused & s3


def test_stage_view_sets_requires_grad_and_multipliers(model):
    groups = param_groups(model, 3, lr=4e-5, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert by_name["vision_encoder"]["lr"] == pytest.approx(4e-6) and by_name["sam_encoder"]["lr_mult"] == 0.1
    assert by_name["llm"]["lr"] == pytest.approx(4e-5) and all(g["weight_decay"] == 0.05 for g in groups)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert {id(p) for p in model.parameters() if p.requires_grad} == in_groups
    g1 = {g["name"]: g["lr_mult"] for g in stage_view(model, 1)}
    assert (
        g1["sam_encoder"] == 0.1 and g1["seg_connector"] == 1.0 and not model.llm.lm_head.weight.requires_grad
    )
    stage_view(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(trainable_names(model, 2))
    torch.optim.AdamW(param_groups(model, 2, lr=1e-3))  # groups are valid optimizer input
    with pytest.raises(ValueError, match="stage"):
        stage_view(model, 0)


@pytest.mark.parametrize(
    "stage,task", [(1, "genseg"), (2, "chat"), (3, "genseg"), (3, "refseg"), (3, "vgdseg")]
)
def test_every_trainable_parameter_gets_a_gradient(model, samples, stage, task):
    """No trainable parameter is left without a gradient (DDP/ZeRO would stall or error on it)."""
    stage_view(model, stage)
    proc = model.processor
    batch = proc.collate([proc(samples[task], image_bytes(i)) for i in range(2)])
    model(batch, stage=stage).loss.backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


def test_export_load_round_trip(model, tmp_path):
    state = export_trainable(model, stage=1)
    assert set(state) == set(trainable_names(model, 1)) and all(
        v.device.type == "cpu" for v in state.values()
    )
    save_file(state, tmp_path / "s1.safetensors")
    torch.manual_seed(2)
    other = build_xsam("debug")
    key = "mask_decoder.transformer.queries_features.weight"
    assert not torch.equal(other.state_dict()[key], state[key])
    report = load_exported(other, load_file(tmp_path / "s1.safetensors"), stage=1)
    assert len(report["loaded"]) == len(state) and not report["missing"]
    for k, v in state.items():
        assert torch.equal(other.state_dict()[k], v), k
    # stage 2 export into a stage-3 model; requires_grad drives export_trainable without a stage
    stage_view(model, 2)
    s2 = export_trainable(model)
    assert set(s2) == set(trainable_names(model, 2))
    load_exported(other, s2, stage=2)
    assert torch.equal(other.seg_projector.mlp[0].weight, model.seg_projector.mlp[0].weight)


def test_strict_errors_list_every_key(model):
    state = export_trainable(model, stage=2)
    state.pop("visual_projector.0.bias")
    state.pop("seg_projector.mlp.0.weight")
    state["visual_projector.9.weight"] = torch.zeros(1)
    state["seg_projector.mlp.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightMismatchError) as err:
        load_exported(model, state, stage=2)
    msg = str(err.value)
    assert "2 missing, 1 unexpected, 1 shape-mismatched" in msg
    for k in (
        "visual_projector.0.bias",
        "seg_projector.mlp.0.weight",
        "visual_projector.9.weight",
        "seg_projector.mlp.2.weight: file (3, 3)",
    ):
        assert k in msg, k
    # without a stage, a partially present module is still reported missing
    with pytest.raises(WeightMismatchError, match="visual_projector.0.bias"):
        load_exported(model, {"visual_projector.0.weight": model.visual_projector[0].weight.detach().clone()})
    before = model.seg_projector.mlp[2].weight.detach().clone()
    report = load_exported(model, state, stage=2, strict=False)
    assert report["unexpected"] == ["visual_projector.9.weight"] and len(report["mismatched"]) == 1
    assert torch.equal(model.seg_projector.mlp[2].weight, before), "a mismatched key is never loaded"


def test_a_weight_mismatch_leaving_an_entry_point_is_one_line_and_exit_2(model, capsys):
    """WeightMismatchError is an XsamError: a CLI that meets it prints one line and exits 2, no traceback."""
    from pipelines.errors import run_cli

    state = export_trainable(model, stage=2)
    state.pop("visual_projector.0.bias")
    state["seg_projector.mlp.2.weight"] = torch.zeros(3, 3)

    def main(argv):
        load_exported(model, state, stage=2)

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "visual_projector.0.bias" in err and "seg_projector.mlp.2.weight" in err
