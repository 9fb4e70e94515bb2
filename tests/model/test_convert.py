"""X-SAM archive checkpoints ↔ stage exports (the key mapping: xsam_model.xsam_keys;
the command: orchestrate.convert).

X-SAM's side is built here, independently of our builder, from transformers' classes under X-SAM's module
names (archive ``model/xsam.py``, ``segmentors/x_segmentor.py``, ``modules/{projector,connector}``): the
full flavor at the sizes of the Hugging Face folders X-SAM starts from, the debug flavor at its own sizes.
Expectations on our side come from the model built in the test, never from a key list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    Mask2FormerConfig,
    Phi3Config,
    Phi3ForCausalLM,
    SamConfig,
    SamModel,
    SamVisionConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerTransformerModule,
)
from transformers.models.sam.modeling_sam import SamLayerNorm

from orchestrate import exports
from orchestrate.convert import main
from orchestrate.stages import ParentSpec
from pipelines import errors
from tests.support.model import image_bytes
from xsam_model import build_xsam, export_trainable, load_exported
from xsam_model.builder import llm_hf_config, m2f_hf_config, sam_hf_config, siglip_hf_config
from xsam_model.export import MODEL_FILE, Export, sha256_of, write_export
from xsam_model.trainable import STAGE_GROUPS, trainable_names, unused_parameters
from xsam_model.xsam_keys import (
    DROPS,
    UNUSED_REASON,
    ConvertError,
    from_xsam,
    keymap,
    to_xsam,
)


# ---------------------------------------------------------------------------------------------- X-SAM's side
@dataclass
class ArchiveSizes:
    """What X-SAM's ``XSamModel`` is built from: the four HF configs and its own module settings."""

    siglip: SiglipVisionConfig
    sam: SamVisionConfig
    llm: Phi3Config
    """With ``vocab_size`` = ``len(tokenizer)`` after the special tokens (X-SAM resizes to it)."""
    m2f: Mask2FormerConfig
    connector_hidden: int
    scales: tuple[float, ...] = (2.0, 1.0, 0.5)
    """``connector_scale_factor[-3:]`` of X-SAM's configs."""
    seg_downsample: float = 0.5


def full_sizes() -> ArchiveSizes:
    """X-SAM's phi3 s1/s3 configs: the config.json values of siglip2-so400m-patch14-384, sam-vit-large,
    Phi-3-mini-4k-instruct (32011 tokens + <SEG>, <p>, </p>) and mask2former-swin-large-coco-panoptic;
    connector_hidden_dim=512, feature_channels [512, 1024, 2048]."""
    return ArchiveSizes(
        siglip=SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
        ),
        sam=SamVisionConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            mlp_dim=4096,
            image_size=1024,
            patch_size=16,
            window_size=14,
            global_attn_indexes=[5, 11, 17, 23],
            output_channels=256,
        ),
        llm=Phi3Config(
            vocab_size=32011 + 3,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        m2f=Mask2FormerConfig(
            hidden_dim=256,
            num_queries=200,
            decoder_layers=10,
            encoder_layers=6,
            num_attention_heads=8,
            dim_feedforward=2048,
            encoder_feedforward_dim=1024,
            feature_size=256,
            mask_feature_size=256,
            num_labels=133,
        ),
        connector_hidden=512,
    )


def debug_sizes(model) -> ArchiveSizes:
    """The debug flavor's sizes, as X-SAM would build them (SigLIP with its head, SAM with its neck)."""
    cfg = model.config
    siglip = siglip_hf_config(cfg)
    siglip.vision_use_head = True
    llm = llm_hf_config(cfg)
    llm.vocab_size = model.llm.get_input_embeddings().weight.shape[0]
    m2f = m2f_hf_config(cfg)
    return ArchiveSizes(
        siglip=siglip,
        sam=sam_hf_config(cfg),
        llm=llm,
        m2f=m2f,
        connector_hidden=cfg.connector.hidden_dim,
        scales=tuple(cfg.connector.scale_factors),
        seg_downsample=cfg.projector.seg_downsample,
    )


def _projector(inp: int, out: int) -> nn.Module:
    """X-SAM's ``DynamicProjectorModel`` (depth 2): ``model`` = Linear → GELU → Linear, with biases."""
    m = nn.Module()
    m.model = nn.Sequential(nn.Linear(inp, out), nn.GELU(), nn.Linear(out, out))
    return m


def _connector(sam_dim: int, hidden: int, scales: tuple[float, ...]) -> nn.Module:
    """X-SAM's ``ConnectorModel`` (``conv``, bias=False): ``model[i].model`` = Conv1×1, LN, Conv3×3, LN,
    Conv1×1 (→ C·s), LN."""
    levels = []
    for s in scales:
        layer = nn.Module()
        out = int(sam_dim * s)
        layer.model = nn.Sequential(
            nn.Conv2d(sam_dim, hidden, 1, bias=False),
            SamLayerNorm(hidden, data_format="channels_first"),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            SamLayerNorm(hidden, data_format="channels_first"),
            nn.Conv2d(hidden, out, 1, bias=False),
            SamLayerNorm(out, data_format="channels_first"),
        )
        levels.append(layer)
    m = nn.Module()
    m.model = nn.ModuleList(levels)
    return m


def _segmentor(z: ArchiveSizes, stage: int) -> nn.Module:
    """X-SAM's ``XSegmentor`` with a SAM encoder and a Mask2Former decoder (s1: ``close_cls``, s3:
    ``open_cls``); no prompt encoder in that branch, and its vendored loss has no buffers."""
    sam = SamModel(SamConfig(vision_config=z.sam.to_dict()))
    seg = nn.Module()
    seg.shared_image_embedding = sam.shared_image_embedding
    seg.encoder = sam.vision_encoder
    channels = [int(z.sam.hidden_size / s) for s in z.scales]
    seg.pixel_decoder = Mask2FormerPixelDecoder(z.m2f, feature_channels=channels)
    seg.decoder = Mask2FormerTransformerModule(in_features=z.m2f.feature_size, config=z.m2f)
    if stage == 1:
        seg.class_predictor = nn.Linear(z.m2f.hidden_dim, z.m2f.num_labels + 1)
    else:
        seg.logit_scale = nn.Parameter(torch.ones(1) * 2.6593)
    return seg


def xsam_archive(z: ArchiveSizes, stage: int) -> nn.Module:
    """X-SAM's ``XSamModel`` of ``stage`` (1: segmentor + connector; 3: everything) under its module names;
    the naive vision sampler has no parameters and is left out."""
    root = nn.Module()
    root.segmentor = _segmentor(z, stage)
    root.seg_connector = _connector(z.sam.hidden_size, z.connector_hidden, z.scales)
    if stage == 3:
        siglip = SiglipVisionModel(z.siglip)
        if not any(k.startswith("vision_model.") for k in siglip.state_dict()):
            wrapper = nn.Module()  # transformers 5 flattened SiglipVisionModel; X-SAM ran on 4.x
            wrapper.vision_model = siglip
            siglip = wrapper
        root.visual_encoder = siglip
        root.llm = Phi3ForCausalLM(z.llm)
        d_llm, d_dec = z.llm.hidden_size, z.m2f.hidden_dim
        root.visual_projector = _projector(z.siglip.hidden_size, d_llm)
        root.seg_projector = _projector(int(z.sam.hidden_size / z.seg_downsample**2), d_llm)
        root.llm_projector = _projector(d_llm, d_dec)
        root.bg_embeds = nn.Embedding(1, d_dec)
    return root


def archive_state(z: ArchiveSizes, stage: int, device: str = "meta") -> dict[str, torch.Tensor]:
    """``XSamModel.state_dict()`` of ``stage``: every module trained there (nothing frozen in s1 or s3)."""
    with torch.device(device):
        return dict(xsam_archive(z, stage).state_dict())


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_a():
    torch.manual_seed(11)
    return build_xsam("debug").eval()


def synthetic_checkpoint(model, stage: int) -> dict[str, torch.Tensor]:
    """X-SAM's file for ``model``'s weights: its stage parameters renamed by the mapping, plus the parts only
    X-SAM has (SAM neck, SigLIP head, SAM's positional buffer) and SigLIP's never-trained tail from an X-SAM
    module tree at the debug sizes, with random values."""
    torch.manual_seed(5)
    archive = archive_state(debug_sizes(model), stage, device="cpu")
    kmap = keymap(n for n, _ in model.named_parameters())
    ckpt = to_xsam(export_trainable(model, stage))
    extra = {k: v for k, v in archive.items() if k not in ckpt}
    assert all(kmap.dropped(k) or kmap.to_ours(k) in unused_parameters(model) for k in extra), extra.keys()
    return {**ckpt, **extra}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """``python -m orchestrate.convert ARGS`` in-process: exit code and stderr (one line on error)."""
    rc = errors.run_cli(main, [str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- the mapping
def test_every_parameter_has_one_xsam_name_and_back(model_a):
    names = [n for n, _ in model_a.named_parameters()]
    kmap = keymap(names)
    xsam = {n: kmap.to_xsam(n) for n in names}
    assert [n for n, x in xsam.items() if x is None] == []
    assert len(set(xsam.values())) == len(names)
    assert all(kmap.to_ours(x) == n and not kmap.dropped(x) for n, x in xsam.items())


def _xsam_pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """X-SAM's ``model/utils/pixel_shuffle.py`` on channels-first input: BxCxHxW → Bx(C/s²)x(H·s)x(W·s)."""
    x = x.permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    x = x.reshape(b, h, int(w * scale), int(c // scale)).permute(0, 2, 1, 3)
    x = x.reshape(b, int(w * scale), int(h * scale), int(c // (scale * scale))).permute(0, 2, 1, 3)
    return x.permute(0, 3, 1, 2)


def test_connector_computes_xsam_connector_with_mapped_weights(model_a):
    """The one place where names and shapes could match and numbers still differ (fidelity D8): X-SAM's
    ``ConvConnectorLayer`` (convs, then its pixel shuffle by the level's scale) with our weights converted by
    the mapping gives our connector's output, channel for channel, at every level, and the pixel decoder's
    input projection that reads the ×½ level gives the same result on both."""
    z = debug_sizes(model_a)
    xsam = _connector(z.sam.hidden_size, z.connector_hidden, z.scales)
    ours = {f"seg_connector.{k}": v for k, v in model_a.seg_connector.state_dict().items()}
    reads_half = 2 * z.sam.hidden_size  # channels of the ×½ level
    proj = next(
        k
        for k, v in model_a.named_parameters()
        if k.startswith("mask_decoder.pixel_decoder.input_projections.")
        and v.ndim == 4
        and v.shape[1] == reads_half
    )
    ours[proj] = model_a.get_parameter(proj).detach()
    converted = to_xsam(ours)
    xsam.load_state_dict(
        {k.removeprefix("seg_connector."): v for k, v in converted.items() if "connector" in k}
    )
    g = model_a.config.sam.grid
    torch.manual_seed(3)
    feats = [torch.randn(2, g, g, z.sam.hidden_size) for _ in z.scales]  # SAM hidden states, channels last
    with torch.no_grad():
        got = model_a.seg_connector(feats)
        want = [
            _xsam_pixel_shuffle(layer.model(f.permute(0, 3, 1, 2)), s)
            for layer, f, s in zip(xsam.model, feats, z.scales, strict=True)
        ]
        w_xsam = converted[keymap(ours).to_xsam(proj)]
        projected = (nn.functional.conv2d(got[2], ours[proj]), nn.functional.conv2d(want[2], w_xsam))
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(*projected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 3])
def test_synthetic_file_has_xsam_keys_and_shapes(model_a, stage):
    """At the debug sizes the renamed state dict plus X-SAM-only parts is exactly X-SAM's module tree."""
    ckpt = synthetic_checkpoint(model_a, stage)
    archive = archive_state(debug_sizes(model_a), stage)
    assert {k: tuple(v.shape) for k, v in ckpt.items()} == {k: tuple(v.shape) for k, v in archive.items()}


@pytest.mark.parametrize("stage", [1, 3])
def test_full_flavor_mapping_covers_xsam_archive(stage):
    """Every key of X-SAM's stage-``stage`` state dict at full size maps to a parameter of our xsam-phi3 with
    X-SAM's shape of it, or is dropped on purpose; every parameter we train in that stage is covered."""
    ours = build_xsam("xsam-phi3", device="meta")
    # a layout check: every tensor on meta (a few HF parameters made with torch.Tensor(n) ignore the meta
    # device and hold uninitialised memory, which the value check would rightly refuse)
    archive = {k: v.to("meta") for k, v in archive_state(full_sizes(), stage).items()}
    mapped = from_xsam(archive, ours, stage, source="X-SAM archive")  # raises with every misfit listed
    params = dict(ours.named_parameters())
    assert set(mapped.state) == set(trainable_names(ours, stage))
    assert all(mapped.state[n].shape == params[n].shape for n in mapped.state)
    by_prefix = {
        p: sum(k.startswith(p) for k in archive) for p in ("segmentor.pixel_decoder.", "segmentor.decoder.")
    }
    assert by_prefix == {"segmentor.pixel_decoder.": 117, "segmentor.decoder.": 209}  # fidelity doc counts
    dropped = mapped.dropped
    assert len(dropped[DROPS[1][1]]) == 6  # SAM's neck
    assert dropped[DROPS[2][1]] == ["segmentor.shared_image_embedding.positional_embedding"]
    if stage == 3:
        assert all(k.startswith("visual_encoder.vision_model.head.") for k in dropped[DROPS[0][1]])
        tail = {keymap(params).to_ours(k) for k in dropped[UNUSED_REASON]}
        assert tail == unused_parameters(ours)
        assert mapped.state["mask_decoder.phrase_head.bg_embed"].shape == (256,)
        assert tuple(archive["bg_embeds.weight"].shape) == (1, 256)
        assert tuple(archive["llm.lm_head.weight"].shape) == tuple(params["llm.lm_head.weight"].shape)


# ---------------------------------------------------------------------------------------------- import
def _forward(model, batch, stage: int):
    torch.manual_seed(0)  # the region sampler draws points
    with torch.no_grad():
        return model(batch, stage=stage, compute_loss=False)


def _same_outputs(a, b) -> bool:
    """Every decoder layer's mask and class logits, and the LM logits where the stage has them."""
    keys = ("masks_queries_logits", "class_queries_logits")
    same = all(
        torch.equal(pa[k], pb[k]) for pa, pb in zip(a.predictions, b.predictions, strict=True) for k in keys
    )
    if a.lm_logits is not None or b.lm_logits is not None:
        same = same and torch.equal(a.lm_logits, b.lm_logits)
    return same


@pytest.mark.parametrize("stage,task,suffix", [(1, "genseg", ".bin"), (3, "vgdseg", ".safetensors")])
def test_import_synthetic_checkpoint_forward_equals_source(
    model_a, samples, tmp_path, capsys, stage, task, suffix
):
    """X-SAM's file of model A, imported through the CLI and loaded into another model B as training and
    evaluation load exports, makes B compute exactly what A computes."""
    ckpt = synthetic_checkpoint(model_a, stage)
    src = tmp_path / f"pytorch_model{suffix}"
    if suffix == ".bin":
        torch.save(ckpt, src)
    else:
        save_file({k: v.contiguous() for k, v in ckpt.items()}, src)
    out = tmp_path / "export"
    rc, err = run_cli(
        ["import", "--xsam-checkpoint", src, "--stage", stage, "--flavor", "debug", "--out", out], capsys
    )
    assert rc == 0, err
    info = Export.find(str(out), stage)
    assert info.lineage["source"]["sha256"] == sha256_of(str(src))
    assert info.lineage["source"]["file"] == str(src.resolve())
    assert info.config["stage"]["model"]["flavor"] == "debug" and info.config["model"]["name"] == "debug"
    dropped = {k for keys in info.lineage["dropped"].values() for k in keys}
    assert dropped == set(ckpt) - set(to_xsam(export_trainable(model_a, stage)))
    # the training driver's check of a parent export: every module of the stage, nothing left over
    shapes = {n: tuple(p.shape) for n, p in model_a.named_parameters()}
    spec = ParentSpec(stage=stage, take=tuple(p for p, _ in STAGE_GROUPS[stage]))
    plan = exports.check_parents(shapes, [spec], {stage: info}, skip=unused_parameters(model_a))
    assert sorted(plan.take[stage]) == sorted(trainable_names(model_a, stage))

    torch.manual_seed(12)
    model_b = build_xsam("debug").eval()
    proc = model_a.processor
    batch = proc.collate([proc(samples[task], image_bytes(1))])
    want = _forward(model_a, batch, stage)
    assert not _same_outputs(want, _forward(model_b, batch, stage))  # B starts different
    load_exported(model_b, info.state(), stage=stage)
    assert _same_outputs(want, _forward(model_b, batch, stage))


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_export_to_xsam_and_back_is_byte_identical(model_a, tmp_path, capsys, suffix):
    state = export_trainable(model_a, 3)
    first = tmp_path / "stage3" / "export"
    write_export(str(first), state, stage=3, config={"model": model_a.config.to_dict()}, lineage={})
    xsam_file = tmp_path / f"xsam{suffix}"
    rc, err = run_cli(["export", "--export", first, "--out", xsam_file], capsys)
    assert rc == 0, err
    ckpt = torch.load(xsam_file, weights_only=True) if suffix == ".bin" else load_file(xsam_file)
    # X-SAM's names and shapes, in XSamModel.state_dict()'s module order
    archive = archive_state(debug_sizes(model_a), 3)
    assert set(ckpt) <= set(archive)
    assert all(tuple(v.shape) == tuple(archive[k].shape) for k, v in ckpt.items())
    if suffix == ".bin":  # (safetensors stores its keys sorted)
        assert list(ckpt)[0].startswith("visual_encoder.") and list(ckpt)[-1] == "bg_embeds.weight"
    assert torch.equal(ckpt["bg_embeds.weight"][0], state["mask_decoder.phrase_head.bg_embed"])
    again = tmp_path / "again"
    rc, err = run_cli(
        ["import", "--xsam-checkpoint", xsam_file, "--stage", 3, "--flavor", "debug", "--out", again], capsys
    )
    assert rc == 0, err
    assert (again / MODEL_FILE).read_bytes() == (first / MODEL_FILE).read_bytes()


# ---------------------------------------------------------------------------------------------- errors
def _missing(ckpt):
    ckpt.pop("bg_embeds.weight")
    ckpt.pop("segmentor.decoder.queries_features.weight")
    return ["missing     bg_embeds.weight", "missing     segmentor.decoder.queries_features.weight"]


def _unmapped(ckpt):
    ckpt["segmentor.mystery.weight"] = torch.zeros(2)
    ckpt["llm.model.extra_norm.weight"] = torch.zeros(2)
    ckpt["segmentor.class_predictor.weight"] = torch.zeros(2)
    return [
        "unexpected  segmentor.mystery.weight (no rule maps it)",
        "unexpected  llm.model.extra_norm.weight (→ llm.model.extra_norm.weight: no such parameter)",
        "unexpected  segmentor.class_predictor.weight (→ mask_decoder.linear_head.weight: not trained in stage 3)",
    ]


def _mismatched(ckpt):
    ckpt["bg_embeds.weight"] = ckpt["bg_embeds.weight"][0]  # our shape, not X-SAM's
    ckpt["llm.lm_head.weight"] = ckpt["llm.lm_head.weight"][:-3]  # the vocabulary before the special tokens
    d, v = ckpt["bg_embeds.weight"].shape[0], ckpt["llm.lm_head.weight"].shape[0]
    h = ckpt["llm.lm_head.weight"].shape[1]
    return [
        f"mismatched  bg_embeds.weight: file ({d},) vs model (1, {d})",
        f"mismatched  llm.lm_head.weight: file ({v}, {h}) vs model ({v + 3}, {h})",
    ]


@pytest.mark.parametrize("craft", [_missing, _unmapped, _mismatched])
def test_bad_checkpoint_is_one_error_listing_every_key(model_a, tmp_path, capsys, craft):
    ckpt = synthetic_checkpoint(model_a, 3)
    expected = craft(ckpt)
    src = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, src)
    with pytest.raises(ConvertError) as err:
        from_xsam(torch.load(src, weights_only=True), model_a, 3, source=str(src))
    lines = [line.strip() for line in str(err.value).splitlines()]
    assert lines[0].startswith(f"{src}: does not fit stage 3 of the debug model")
    assert sorted(lines[1:]) == sorted(expected)
    out = tmp_path / "export"
    rc, msg = run_cli(
        ["import", "--xsam-checkpoint", src, "--stage", 3, "--flavor", "debug", "--out", out], capsys
    )
    assert rc == 2 and len(msg.splitlines()) == 1 and all(one_line(e) in msg for e in expected)
    assert not out.exists()


class _Touch:
    """Unpickling this calls ``Path.touch``: what a malicious checkpoint would do with a worse callable."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_carrying_a_callable_is_refused(tmp_path, capsys):
    flag = tmp_path / "pwned"
    src = tmp_path / "pytorch_model.bin"
    torch.save({"llm.lm_head.weight": torch.zeros(2), "payload": _Touch(flag)}, src)
    rc, msg = run_cli(
        ["import", "--xsam-checkpoint", src, "--stage", 3, "--flavor", "debug", "--out", tmp_path / "e"],
        capsys,
    )
    assert rc == 2 and "refused: not plain weights" in msg and str(src) in msg
    assert not flag.exists()


def test_export_of_a_folder_that_is_not_an_export(tmp_path, capsys):
    rc, msg = run_cli(["export", "--export", tmp_path, "--out", tmp_path / "x.bin"], capsys)
    assert rc == 2 and "not a stage export" in msg and not (tmp_path / "x.bin").exists()


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~20 s on 2 busy cores
def test_module_entry_point_exit_code_and_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "orchestrate.convert", "export", "--export", str(tmp_path), "--out", "x.bin"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a stage export (expected model.safetensors, config.json, lineage.json there)"
    ]


def test_init_dir_is_checked_and_recorded(model_a, tmp_path, capsys):
    src = tmp_path / "pytorch_model.bin"
    torch.save(synthetic_checkpoint(model_a, 1), src)
    inits = tmp_path / "inits"
    cfg = model_a.config
    folders = [cfg.siglip.folder, cfg.sam.folder, cfg.llm.folder, cfg.decoder.folder]
    for f in folders[:2]:
        (inits / f).mkdir(parents=True)
        (inits / f / "config.json").write_text("{}")
    args = ["import", "--xsam-checkpoint", src, "--stage", 1, "--flavor", "debug", "--init-dir", inits]
    rc, msg = run_cli([*args, "--out", tmp_path / "e"], capsys)
    assert rc == 2 and f"{folders[2]}, {folders[3]}" in msg and not (tmp_path / "e").exists()
    for f in folders[2:]:
        (inits / f).mkdir(parents=True)
        (inits / f / "config.json").write_text("{}")
    rc, msg = run_cli([*args, "--out", tmp_path / "e"], capsys)
    assert rc == 0, msg
    info = Export.find(str(tmp_path / "e"), 1)
    assert info.config["stage"]["model"]["init_dir"] == str(inits) == info.lineage["init_dir"]


# ---------------------------------------------------------------------------------------------- hostile files
def _import(src, tmp_path, capsys, stage: int = 3):
    out = tmp_path / "export"
    rc, msg = run_cli(
        ["import", "--xsam-checkpoint", src, "--stage", stage, "--flavor", "debug", "--out", out], capsys
    )
    return rc, msg, out


def _short_record(dst: Path) -> None:
    """A torch zip checkpoint whose first tensor record is cut to half its length, the records after it
    intact: a memory map finds bytes where the record should be (the next record's)."""
    import zipfile

    src = dst.with_name("whole.bin")
    torch.save({"bg_embeds.weight": torch.arange(100, dtype=torch.float32), "b": torch.ones(50)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[: len(data) // 2] if info.filename.endswith("/data/0") else data)


def test_a_zip_record_shorter_than_its_tensor_is_refused(tmp_path, capsys):
    """Read with a memory map, torch takes such a tensor from the bytes after the record (wrong weights);
    read into memory it checks each record's size."""
    src = tmp_path / "pytorch_model.bin"
    _short_record(src)
    rc, msg, out = _import(src, tmp_path, capsys)
    assert rc == 2 and len(msg.splitlines()) == 1 and str(src) in msg and "record size" in msg, msg
    assert not out.exists()


@pytest.mark.parametrize(
    "spoil,expected",
    [
        (lambda t: t.index_fill_(0, torch.tensor([0]), float("nan")), "not finite  bg_embeds.weight: "),
        (lambda t: t.fill_(float("inf")), "not finite  bg_embeds.weight: "),
        (lambda t: t.to(torch.int64), "bad dtype   bg_embeds.weight: torch.int64"),
        (lambda t: t.to(torch.float64).fill_(1e300), "not finite  bg_embeds.weight"),  # inf as float32
    ],
)
def test_nan_inf_and_dtypes_the_model_cannot_hold_are_refused(model_a, tmp_path, capsys, spoil, expected):
    ckpt = synthetic_checkpoint(model_a, 3)
    ckpt["bg_embeds.weight"] = spoil(ckpt["bg_embeds.weight"].clone())
    src = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, src)
    rc, msg, out = _import(src, tmp_path, capsys)
    assert rc == 2 and len(msg.splitlines()) == 1 and one_line(expected) in msg, msg
    assert f"{src}: 1 tensors that the debug model cannot take" in msg
    assert not out.exists()


def _fifo(p: Path) -> None:
    import os

    os.mkfifo(p)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: p.mkdir(), "a folder"),
        (_fifo, "not a regular file"),
        (
            lambda p: p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"),
            "a Git LFS pointer",
        ),
        (lambda p: p.write_bytes(b"\n<!DOCTYPE html><html><body>Sign in</body></html>"), "an HTML page"),
        (lambda p: p.write_bytes(b"https://huggingface.co/hao9610/X-SAM/pytorch_model.bin\n"), "starts with"),
        (lambda p: torch.save("https://huggingface.co/x/pytorch_model.bin", p), "holds a str"),
        (lambda p: p.write_bytes(b""), "an empty file"),
    ],
)
def test_what_is_not_a_checkpoint_is_named(tmp_path, capsys, make, expected):
    src = tmp_path / "pytorch_model.bin"
    make(src)
    rc, msg, out = _import(src, tmp_path, capsys)  # a FIFO is never opened for reading: no hang
    assert rc == 2 and len(msg.splitlines()) == 1 and expected in msg and str(src) in msg, msg
    assert not out.exists()


def test_export_out_under_a_file_is_one_line(model_a, tmp_path, capsys):
    first = tmp_path / "export"
    write_export(str(first), export_trainable(model_a, 3), stage=3, config={}, lineage={})
    (tmp_path / "file").write_text("x")
    rc, msg = run_cli(["export", "--export", first, "--out", tmp_path / "file" / "x.bin"], capsys)
    assert rc == 2 and len(msg.splitlines()) == 1 and "a file is in the way" in msg, msg


def test_the_exported_bin_is_the_same_bytes_for_the_same_weights(model_a, tmp_path, capsys):
    """Twice from one export, and once from an export of the same tensors given in reverse order."""
    state = export_trainable(model_a, 3)
    write_export(str(tmp_path / "e1"), state, stage=3, config={}, lineage={})
    reverse = {k: state[k] for k in reversed(list(state))}
    write_export(str(tmp_path / "e2"), reverse, stage=3, config={}, lineage={})
    blobs = []
    for export, name in (("e1", "a"), ("e1", "b"), ("e2", "c")):
        (tmp_path / name).mkdir()
        rc, msg = run_cli(
            ["export", "--export", tmp_path / export, "--out", tmp_path / name / "x.bin"], capsys
        )
        assert rc == 0, msg
        blobs.append((tmp_path / name / "x.bin").read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
    keys = list(to_xsam(reverse))
    assert (
        keys == list(to_xsam(state))
        and keys[0].startswith("visual_encoder.")
        and keys[-1] == "bg_embeds.weight"
    )
