"""The debug flavor trains on CPU for every task and stage; the full flavor's structure on the meta device."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.model import image_bytes
from xsam_model import build_xsam
from xsam_model.modeling.loss import SegLoss

SEG_TASKS = ["genseg", "refseg", "reaseg", "gcgseg", "vgdseg"]


def _batch(model, sample, n=2):
    return model.processor.collate([model.processor(sample, image_bytes(i)) for i in range(n)])


def _grad_norm(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("task", [*SEG_TASKS, "chat"])
def test_forward_backward_every_task(debug_model, samples, task):
    model = debug_model
    model.zero_grad(set_to_none=True)
    batch = _batch(model, samples[task])
    out = model(batch, stage=3)
    assert set(out.losses) == {"lm", "cls", "mask_bce", "dice"}
    assert torch.isfinite(out.loss) and math.isclose(
        out.loss.item(), sum(v.item() for v in out.losses.values()), rel_tol=1e-5
    )
    out.loss.backward()
    assert out.losses["lm"] > 0 and _grad_norm(model.llm) > 0 and _grad_norm(model.visual_projector) > 0
    if task == "chat":
        assert out.predictions is None and all(float(out.losses[k]) == 0 for k in ("cls", "mask_bce", "dice"))
        assert _grad_norm(model.mask_decoder) == 0
        return
    for k in ("cls", "mask_bce", "dice"):
        assert out.losses[k] > 0, k
    cfg = model.config
    final = out.predictions[-1]
    n_phrases = len(samples[task].phrases)
    if task in cfg.decoder.seg_reduce_tasks:  # per-<SEG> runs (one <SEG> per phrase), classes of both samples
        assert final["class_queries_logits"].shape == (
            2 * n_phrases,
            cfg.decoder.num_queries,
            2 * n_phrases + 1,
        )
        assert out.runs.tolist() == [[b, j] for b in range(2) for j in range(n_phrases)]
    else:
        assert final["class_queries_logits"].shape == (2, cfg.decoder.num_queries, n_phrases + 1)
        assert out.runs.tolist() == [[0, -1], [1, -1]]
    assert final["masks_queries_logits"].shape[-1] == cfg.sam.image_size // cfg.feature_strides[0]
    assert len(out.predictions) == cfg.decoder.decoder_layers  # queries-only prediction + one per layer
    for part in ("mask_decoder", "llm_projector", "seg_connector", "sam_encoder", "seg_projector"):
        assert _grad_norm(getattr(model, part)) > 0, part
    # the LM sequence holds the image tokens (and num_tokens tokens per region for vgdseg)
    t = batch["attention_mask"].sum(1)[0]
    extra = cfg.num_image_tokens - 1 + len(samples[task].regions) * (cfg.region.num_tokens - 1)
    assert out.lm_logits.shape[1] == t + extra


def test_region_tokens_carry_region_features(debug_model, samples):
    """Changing a region's prompt mask changes the LM's output (its tokens come from that region)."""
    model = debug_model
    batch = _batch(model, samples["vgdseg"], n=1)
    torch.manual_seed(0)
    a = model(batch, stage=3, compute_loss=False).lm_logits
    batch["region_masks"][0][0] = torch.roll(batch["region_masks"][0][0], shifts=(30, 30), dims=(0, 1))
    torch.manual_seed(0)
    b = model(batch, stage=3, compute_loss=False).lm_logits
    assert not torch.allclose(a, b)


def test_stage1_linear_head_and_stage2_lm_only(debug_model, samples):
    model = debug_model
    batch = _batch(model, samples["genseg"])
    s1 = model(batch, stage=1)
    assert s1.predictions[-1]["class_queries_logits"].shape[-1] == model.config.decoder.num_linear_classes + 1
    assert float(s1.losses["lm"]) == 0 and s1.losses["cls"] > 0 and s1.lm_logits is None
    s2 = model(batch, stage=2)
    assert s2.predictions is None and s2.losses["lm"] > 0 and float(s2.losses["dice"]) == 0
    with pytest.raises(ValueError, match="stage"):
        model(batch, stage=4)


def test_ignore_region_carries_no_mask_loss(debug_model):
    crit: SegLoss = debug_model.criterion
    torch.manual_seed(0)
    L, q = 64, 8
    preds = [
        {"masks_queries_logits": torch.randn(1, q, 16, 16), "class_queries_logits": torch.randn(1, q, 3)}
    ]
    masks = [torch.zeros(1, L, L, dtype=torch.uint8)]
    masks[0][0, :32] = 1
    labels = [torch.tensor([0])]
    none = crit(preds, masks, labels, torch.zeros(1, L, L, dtype=torch.bool))
    half = torch.zeros(1, L, L, dtype=torch.bool)
    half[0, 32:] = True
    some = crit(preds, masks, labels, half)
    everything = crit(preds, masks, labels, torch.ones(1, L, L, dtype=torch.bool))
    assert float(none["mask_bce"]) > 0 and float(everything["mask_bce"]) == 0
    assert not math.isclose(float(none["mask_bce"]), float(some["mask_bce"]))
    # a sample without targets still gives a class loss (every query → no-object) and no mask loss
    empty = crit(preds, [torch.zeros(0, L, L, dtype=torch.uint8)], [torch.zeros(0, dtype=torch.long)])
    assert float(empty["cls"]) > 0 and float(empty["mask_bce"]) == 0


def test_loss_falls_when_overfitting_two_samples(samples):
    """X-SAM's decoder init (N(0, 0.02) queries and mask MLP) starts from near-zero, symmetric mask
    predictions: the debug model's seg losses plateau for ~80 steps before they fall, hence 120 steps."""
    torch.manual_seed(0)
    model = build_xsam("debug")
    batch = model.processor.collate([model.processor(samples["genseg"], image_bytes(i)) for i in (7, 8)])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    hist = []
    for _ in range(120):
        out = model(batch, stage=3)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        hist.append({k: v.item() for k, v in out.losses.items()} | {"total": out.loss.item()})
    first = sum(h["total"] for h in hist[:3]) / 3
    last = sum(h["total"] for h in hist[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert hist[-1]["lm"] < 0.5 * hist[0]["lm"]
    assert hist[-1]["dice"] < hist[0]["dice"]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_flavor_on_meta_device():
    model = build_xsam("xsam-phi3", device="meta")
    assert all(p.is_meta for p in model.parameters())
    counts = {name: _count(child) for name, child in model.named_children()}
    assert 0.38e9 < counts["vision_encoder"] < 0.45e9  # SigLIP2-so400m vision tower (no pooling head)
    assert 0.28e9 < counts["sam_encoder"] < 0.33e9  # SAM ViT-L image encoder (no neck)
    assert 3.7e9 < counts["llm"] < 3.9e9  # Phi-3-mini
    assert 5e6 < counts["visual_projector"] < 20e6 and 10e6 < counts["seg_projector"] < 30e6
    assert 5e6 < counts["seg_connector"] < 20e6 and 10e6 < counts["mask_decoder"] < 40e6
    assert 4.4e9 < sum(counts.values()) < 4.8e9
    cfg = model.config
    assert cfg.num_image_tokens == 729 + 1024 and cfg.feature_strides == (8, 16, 32)
    assert model.seg_connector.out_channels == [512, 1024, 2048]
    assert model.mask_decoder.transformer.queries_features.weight.shape == (200, 256)
    # the tokenizer path's vocabulary (Phi-3's len(tokenizer) 32011 + 3 special tokens), not 32064 + 3 (D14)
    assert model.special_token_ids == {"<SEG>": 32011, "<p>": 32012, "</p>": 32013}
    assert model.llm.get_input_embeddings().weight.shape == (32014, 3072) == model.llm.lm_head.weight.shape
    assert cfg.llm.vocab_size == 32014 and cfg.llm.attn_implementation == "sdpa"  # auto without CUDA
    assert model.processor is None  # no tokenizer without init_dir


def test_unknown_flavor_and_bad_config():
    from xsam_model.config import DecoderConfig, XSamConfig

    with pytest.raises(ValueError, match="unknown flavor"):
        build_xsam("nope")
    with pytest.raises(ValueError, match="multiple of 32"):
        DecoderConfig(feature_size=48)
    with pytest.raises(ValueError, match="sam_size"):
        from xsam_model.config import ProcessorConfig

        XSamConfig(processor=ProcessorConfig(sam_size=512))


@pytest.mark.gpu
def test_debug_flavor_bf16_on_gpu(samples):
    model = build_xsam("debug", device="cuda", dtype=torch.bfloat16)
    batch = {}
    for k, v in _batch(model, samples["vgdseg"]).items():
        if torch.is_tensor(v):
            v = v.cuda()
            v = v.bfloat16() if v.is_floating_point() else v
        batch[k] = v  # ragged lists (masks, regions) stay on the CPU; the model moves them
    out = model(batch, stage=3)
    out.loss.backward()
    assert torch.isfinite(out.loss)
