"""The paper-recipe switches of the model (reference/xsam_fidelity.md D2, D8–D11, D13–D17): each default is
the paper's, and each option does what its docstring says."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from tests.support.model import image_bytes
from xsam_model import XSAM_FLAVORS, build_xsam
from xsam_model.builder import resolve_attn_implementation
from xsam_model.config import (
    CHECKPOINT_PARTS,
    RegionSamplerConfig,
    XSamConfig,
    config_dict,
    main_branch,
    stage_checkpointing,
    with_checkpointing,
)
from xsam_model.modeling.connector import ConnectorLevel
from xsam_model.modeling.decoder import PhraseClassifier
from xsam_model.modeling.region_sampler import RegionSampler, sample_pixels
from xsam_model.modeling.xsam import TargetLabelError


def _cfg(**parts):
    cfg = copy.deepcopy(XSAM_FLAVORS["debug"])
    for name, edits in parts.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **edits))
    return cfg


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_xsam(cfg)


def _batch(model, sample, n=2):
    return model.processor.collate([model.processor(sample, image_bytes(i)) for i in range(n)])


# ------------------------------------------------------------------ D2 / D11 region tokens
@pytest.mark.parametrize("pool,tokens", [("max", 1), ("mean", 4)])
def test_region_tokens_per_region(samples, pool, tokens):
    """Each <region> placeholder becomes exactly ``num_tokens`` LM tokens: one for the paper's max pooling."""
    model = _build(_cfg(region={"pool": pool, "num_tokens": tokens}))
    batch = _batch(model, samples["vgdseg"], n=1)
    out = model(batch, stage=3, compute_loss=False)
    regions = len(samples["vgdseg"].regions)
    text = int(batch["attention_mask"].sum())
    assert out.lm_logits.shape[1] == text + model.config.num_image_tokens - 1 + regions * (tokens - 1)


def test_region_sampler_pools_and_geometry():
    torch.manual_seed(0)
    grid = torch.randn(8, 8, 5)  # GxGxD
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:20, 6:30] = True
    masks[1, 30:, 31:] = True  # 2 pixels at the bottom-right border
    g = torch.Generator().manual_seed(1)
    pts = sample_pixels(masks[0], 16, torch.Generator().manual_seed(1))
    assert len({tuple(p) for p in pts.tolist()}) == 16 and masks[0][pts[:, 0], pts[:, 1]].all()  # no repeats
    few = sample_pixels(masks[1], 16, g)
    assert {tuple(p) for p in few.tolist()} == {(30, 31), (31, 31)} and len(few) == 16  # all pixels + repeats
    # max pooling = the max over the sampled points' features (same draw)
    out = RegionSampler(num_points=16, pool="max")(grid, masks[:1], torch.Generator().manual_seed(1))
    yx = pts.float() / 32 * 7  # X-SAM: y/L, x/L on a grid of cell centres (align_corners=True)
    ref = []
    for y, x in yx.tolist():
        y0, x0 = int(y), int(x)
        y1, x1, fy, fx = min(y0 + 1, 7), min(x0 + 1, 7), y - y0, x - x0
        ref.append(
            grid[y0, x0] * (1 - fy) * (1 - fx)
            + grid[y0, x1] * (1 - fy) * fx
            + grid[y1, x0] * fy * (1 - fx)
            + grid[y1, x1] * fy * fx
        )
    torch.testing.assert_close(out[0, 0], torch.stack(ref).amax(0), atol=1e-5, rtol=1e-5)
    # border pixels read the grid, not zero padding: a constant grid stays constant
    ones = RegionSampler(num_points=16, pool="mean", num_tokens=4)(torch.ones(8, 8, 3), masks)
    assert ones.shape == (2, 4, 3) and torch.allclose(ones, torch.ones_like(ones))


def test_main_branch_flavor():
    cfg = XSAM_FLAVORS["xsam-phi3-main"]
    assert cfg.decoder.seg_reduce == "main" and cfg.decoder.logit_clamp == 50.0
    assert (cfg.region.pool, cfg.region.num_tokens) == ("mean", 64)
    paper = XSAM_FLAVORS["xsam-phi3"]
    assert paper.decoder.seg_reduce == "per_seg" and paper.decoder.logit_clamp == 500.0
    assert (paper.region.pool, paper.region.num_tokens) == ("max", 1)
    assert main_branch(paper).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="pool"):
        RegionSamplerConfig(pool="avg")


# ------------------------------------------------------------------ D8 connector channel order
def test_connector_uses_xsam_pixel_shuffle():
    torch.manual_seed(0)
    up = ConnectorLevel(in_dim=8, hidden_dim=4, scale=2.0)  # conv output C = 16 → 4 channels at 2x
    x = torch.randn(1, 3, 3, 8)
    conv = up.convs(x.permute(0, 3, 1, 2))[0]  # 16x3x3
    out = up(x)[0]  # 4x6x6
    C = 16
    for c in range(4):
        for i in range(2):
            for j in range(2):
                assert torch.equal(out[c, i::2, j::2], conv[j * C // 2 + i * C // 4 + c])
    down = ConnectorLevel(in_dim=8, hidden_dim=4, scale=0.5)  # conv output C = 4 → 16 channels at x/2
    x = torch.randn(1, 4, 4, 8)
    conv = down.convs(x.permute(0, 3, 1, 2))[0]  # 4x4x4
    out = down(x)[0]  # 16x2x2
    for c in range(4):
        for i in range(2):
            for j in range(2):
                assert torch.equal(out[i * 2 * 4 + j * 4 + c], conv[c, i::2, j::2])


# ------------------------------------------------------------------ D10 phrase head
def test_phrase_head_clamp_padding_and_background():
    q, cond = torch.randn(1, 3, 8), torch.randn(1, 2, 8)
    valid = torch.tensor([[True, False]])
    for clamp in (500.0, 50.0):
        head = PhraseClassifier(dim=8, logit_scale_init=math.log(1e4), clamp=clamp)
        logits = head(q, cond, valid)
        assert logits[..., [0, 2]].abs().max() == clamp  # exp(scale) = 1e4: the clamp bites
        assert (logits[..., 1] == -1e9).all()
    bf16 = PhraseClassifier(dim=8).to(torch.bfloat16)(q.bfloat16(), cond.bfloat16(), valid)
    assert torch.isfinite(bf16).all() and (bf16[..., 1] < -9e8).all()
    assert bf16.float().softmax(-1)[..., 1].max() == 0
    torch.manual_seed(0)
    assert (
        0.9 < float(PhraseClassifier(dim=4096).bg_embed.detach().std()) < 1.1
    )  # X-SAM: nn.Embedding, N(0, 1)
    assert float(PhraseClassifier(dim=4096, bg_init_std=0.02).bg_embed.detach().std()) < 0.03


# ------------------------------------------------------------------ D17 initialisation
def test_decoder_and_connector_init():
    xsam = _build(_cfg())
    pix, tr = xsam.mask_decoder.pixel_decoder, xsam.mask_decoder.transformer
    assert (pix.level_embed == 0).all()  # X-SAM: normal_(std=0)
    assert float(tr.queries_features.weight.detach().std()) < 0.04  # N(0, 0.02) on embeddings
    conv = xsam.seg_connector.levels[1].convs[2].weight
    assert abs(float(conv.std()) - 0.02) < 0.005
    off = pix.encoder.layers[0].self_attn.sampling_offsets.weight
    assert (
        off.abs().max() <= math.sqrt(6 / sum(off.shape)) + 1e-6 and off.abs().max() > 0
    )  # xavier overrides 0
    hf = _build(_cfg(decoder={"init": "transformers"}))
    assert float(hf.mask_decoder.transformer.queries_features.weight.std()) > 0.5  # transformers: N(0, 1)
    assert not (hf.mask_decoder.pixel_decoder.level_embed == 0).all()
    assert abs(float(hf.seg_connector.levels[1].convs[2].weight.std()) - 0.02) > 0.005


# ------------------------------------------------------------------ D9 ignored pixels
@pytest.mark.parametrize("mode", ["background", "exclude"])
def test_ignore_pixels_option(samples, monkeypatch, mode):
    model = _build(_cfg(loss={"ignore_pixels": mode}))
    seen = []
    forward = model.criterion.forward
    monkeypatch.setattr(
        model.criterion,
        "forward",
        lambda p, m, c, ignore=None: seen.append(ignore) or forward(p, m, c, ignore),
    )
    batch = _batch(model, samples["reaseg"])
    assert batch["ignore_mask"].any()
    assert torch.isfinite(model(batch, stage=3).loss)
    if mode == "background":  # paper: ignore shapes are plain background in the target
        assert seen == [None]
    else:  # one ignore map per decoder run (per <SEG> for reaseg)
        assert seen[0].shape == (4, *batch["ignore_mask"].shape[1:])
        assert torch.equal(seen[0][1], batch["ignore_mask"][0]) and torch.equal(
            seen[0][2], batch["ignore_mask"][1]
        )


# ------------------------------------------------------------------ D13 labels out of range
def test_out_of_range_labels(samples):
    model = _build(_cfg())
    batch = _batch(model, samples["genseg"])
    batch["category_labels"][1] = batch["category_labels"][1].clone()
    batch["category_labels"][1][0] = -100  # stage 1's unknown category: dropped and counted
    out = model(batch, stage=1)
    assert float(out.metrics["dropped_targets"]) == 1 and torch.isfinite(out.loss)
    batch["category_labels"][1][0] = 133  # outside the 133-class head
    with pytest.raises(TargetLabelError, match=batch["keys"][1]):
        model(batch, stage=1)
    batch = _batch(model, samples["genseg"])
    assert float(model(batch, stage=3).metrics["dropped_targets"]) == 0
    batch["class_labels"][0] = torch.tensor([0, 1, 2, 3])  # 3 phrases: label 3 is an off-by-one
    with pytest.raises(TargetLabelError, match=r"\[3\] outside \[0, 3\)"):
        model(batch, stage=3)


# ------------------------------------------------------------------ D14 / D16 vocabulary and attention
def test_vocabulary_without_tokenizer_and_attention_kernel(monkeypatch):
    tiny = dataclasses.replace(_cfg(), name="tiny")  # not "debug": no tokenizer, like the full flavor
    assert build_xsam(tiny, device="meta").llm.get_input_embeddings().weight.shape[0] == 384 + 3
    tiny.llm = dataclasses.replace(tiny.llm, tokenizer_size=None)
    assert build_xsam(tiny, device="meta").llm.get_input_embeddings().weight.shape[0] == 387 + 3
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda") == "eager"
    monkeypatch.setattr("xsam_model.builder.is_flash_attn_2_available", lambda: True)
    assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    eager = build_xsam(_cfg(llm={"attn_implementation": "eager"}))
    assert (
        eager.llm.config._attn_implementation == "eager" and eager.config.llm.attn_implementation == "eager"
    )


# ------------------------------------------------------------------ D15 activation checkpointing
def _saved_and_grads(cfg, batch):
    model = _build(cfg).train()
    n = [0]

    def pack(t):
        n[0] += 1
        return t

    torch.manual_seed(5)  # the same loss points and region draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch, stage=3)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return n[0], out.loss.detach(), grads


def test_each_checkpointing_switch_recomputes_its_part(samples):
    base = _cfg()
    batch = _batch(_build(base), samples["vgdseg"])
    n0, loss0, grads0 = _saved_and_grads(base, batch)
    for part in CHECKPOINT_PARTS:
        n, _, _ = _saved_and_grads(with_checkpointing(base, [part]), batch)
        assert n < n0, part  # fewer tensors kept for backward: that part is recomputed
    n, loss, grads = _saved_and_grads(with_checkpointing(base, list(CHECKPOINT_PARTS)), batch)
    torch.testing.assert_close(loss, loss0)
    assert grads.keys() == grads0.keys()
    for k in grads0:
        torch.testing.assert_close(grads[k], grads0[k], atol=1e-5, rtol=1e-4, msg=k)
    assert stage_checkpointing(1) == ("sam",) and set(stage_checkpointing(3)) == set(CHECKPOINT_PARTS)
    with pytest.raises(ValueError, match="unknown checkpointing"):
        with_checkpointing(base, ["vit"])


def test_config_dict_has_every_field():
    d = config_dict(XSamConfig())
    assert d["decoder"]["seg_reduce"] == "per_seg" and d["region"] == {
        "num_points": 256,
        "pool": "max",
        "num_tokens": 1,
    }
    assert d["sam"]["global_attn_indexes"] == [5, 11, 17, 23] and d["llm"]["tokenizer_size"] == 32011
    for name in ("siglip", "sam", "llm", "projector", "connector", "decoder", "loss", "region", "processor"):
        sub = getattr(XSamConfig(), name)
        assert set(d[name]) == {f.name for f in dataclasses.fields(sub)}, name
