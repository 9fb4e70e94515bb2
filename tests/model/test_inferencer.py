"""Inference (xsam_model.inferencer) on the debug model and the hand-built Samples of every task: generation
with the KV cache equals generation without it, a generation forced to the reference answer equals the
teacher-forced pass (so the generated ``<SEG>`` and ``<p>`` states condition the decoder as
in training), a sample's result does not depend on its batch, and masks come back at the original size.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines import masks as mask_ops
from tests.support.model import H, W, box, image_bytes
from xsam_model import postprocess as pp
from xsam_model.inferencer import (
    Decoded,
    InferenceConfig,
    InferenceError,
    Inferencer,
    greedy_generate,
    span_ids,
)


def _pairs(samples, *names, seed=0):
    return [(samples[n], image_bytes(seed + i)) for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------------ the model
def test_generation_with_the_kv_cache_equals_recomputing(debug_model, samples):
    """Greedy decoding of prompts of different lengths: same tokens and same states with and without the
    cache (the random debug model produces arbitrary tokens, which is what matters here)."""
    inf = Inferencer(debug_model, InferenceConfig(mode="generate"))
    pairs = _pairs(samples, "refseg", "refseg")
    pairs[1] = (dataclasses.replace(samples["reaseg"], task="refseg"), pairs[1][1])
    items = [inf.processor(s, b) for s, b in pairs]
    batch = inf.processor.collate(items)
    model = debug_model.eval()
    with torch.inference_mode():
        sam, _ = model.encode_sam(batch["extra_pixel_values"])
        tokens, grid = model.encode_images(batch["pixel_values"], sam)
        x = model._expand(batch, tokens, grid)
        runs = [
            greedy_generate(
                model.llm, x["embeds"], x["attention_mask"], stop_ids=[], max_new_tokens=12, use_cache=c
            )
            for c in (True, False)
        ]
    assert runs[0].tokens == runs[1].tokens and all(len(t) == 12 for t in runs[0].tokens)
    for a, b in zip(runs[0].hidden, runs[1].hidden, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def _forcing(inf: Inferencer, pairs):
    """A logits hook that makes greedy decoding write each sample's reference answers, turn after turn."""
    answers = []
    for s, image in pairs:
        item = inf.processor(s, image)
        runs = inf_runs(item["labels"])
        answers.append([item["input_ids"][a:e].tolist() for a, e in runs])
    state = {"round": -1}

    def hook(step, logits):
        state["round"] += step == 0
        out = torch.full_like(logits, -1e9)
        live = [a for a in answers if len(a) > state["round"]]
        for b, a in enumerate(live):
            ref = a[state["round"]]
            out[b, ref[min(step, len(ref) - 1)]] = 0
        return out

    return hook


def inf_runs(labels):
    from xsam_model.inferencer import _answer_runs

    return _answer_runs(labels)


@pytest.mark.parametrize("task", ["refseg", "gcgseg", "vgdseg"])
def test_generation_forced_to_the_answer_equals_teacher_forcing(debug_model, samples, task):
    """The generated ``<SEG>`` / ``<p>`` states condition the decoder exactly like the teacher-forced ones
    (refseg: two turns, so the second turn's prompt holds the first generated answer)."""
    pairs = _pairs(samples, task)
    teacher = Inferencer(debug_model, InferenceConfig(mode="teacher"))(pairs)[0]
    gen = Inferencer(debug_model, InferenceConfig(mode="generate", max_new_tokens=40))
    forced = gen(pairs, logits_hook=_forcing(gen, pairs))[0]
    assert forced.text == teacher.text and forced.turn_seg == teacher.turn_seg
    assert forced.num_seg == teacher.num_seg and forced.run_seg == teacher.run_seg
    assert torch.allclose(forced.class_logits, teacher.class_logits, atol=1e-4)
    assert torch.allclose(forced.mask_logits, teacher.mask_logits, atol=1e-4)


def test_a_sample_does_not_depend_on_its_batch(debug_model, samples):
    """Per-``<SEG>`` runs see the batch's phrases in training; inference keeps each run's own columns."""
    inf = Inferencer(debug_model, InferenceConfig(mode="teacher"))
    alone = inf(_pairs(samples, "refseg"))[0]
    other = dataclasses.replace(samples["reaseg"], task="refseg", key="src_refseg/train/9999")
    together = inf(_pairs(samples, "refseg") + [(other, image_bytes(5))])[0]
    assert alone.class_logits.shape == together.class_logits.shape == (2, 8, 3)
    assert torch.allclose(alone.class_logits, together.class_logits, atol=1e-4)


def _lines(decoded: list[Decoded], specs: list[pp.OutputSpec]) -> list[dict]:
    return [pp.prediction_line(d, s) for d, s in zip(decoded, specs, strict=True)]


def test_predictions_are_at_the_original_size(debug_model, samples):
    """Every kind of line from a non-square image: RLEs of the image's size (H x W, H != W)."""
    inf = Inferencer(debug_model, InferenceConfig(mode="teacher"))
    genseg = inf(_pairs(samples, "genseg"))[0]
    lines = _lines(
        [genseg, genseg, genseg],
        [
            pp.OutputSpec("semantic", categories=(18, 199, 1)),
            pp.OutputSpec("panoptic", categories=(18, 199, 1), stuff=frozenset({1})),
            pp.OutputSpec("instances", categories=(18, 199, 1)),
        ],
    )
    for task, kind in (("refseg", "per_turn"), ("reaseg", "per_turn"), ("gcgseg", "phrases")):
        lines += _lines(inf(_pairs(samples, task)), [pp.OutputSpec(kind)])
    vgd = inf(_pairs(samples, "vgdseg"))
    lines += _lines(vgd, [pp.OutputSpec("instances", categories=(18, 1))])
    lines += _lines(vgd, [pp.OutputSpec("interactive", prompt=box(2, 18, 2, 18))])
    assert sum(len(v) for line in lines for k, v in line.items() if isinstance(v, list)) >= 3
    for line in lines:
        for field in ("panoptic", "instances", "masks"):
            for entry in line.get(field, []):
                assert entry["rle"]["size"] == [H, W]
                assert mask_ops.decode(entry["rle"]).shape == (H, W)
    semantic = mask_ops.merge_rles([e["rle"] for e in lines[0]["panoptic"]])
    assert mask_ops.area(semantic) == H * W  # semantic: every pixel of the original image, once


def test_no_seg_is_an_empty_prediction(debug_model, samples):
    gen = Inferencer(debug_model, InferenceConfig(mode="generate", max_new_tokens=3))
    seg_id = gen.special.seg

    def never_seg(step, logits):
        logits = logits.clone()
        logits[:, seg_id] = -1e9
        return logits

    dec = gen(_pairs(samples, "refseg"), logits_hook=never_seg)[0]
    assert dec.num_seg == 0 and dec.class_logits is None and len(dec.generated) == 2
    assert pp.prediction_line(dec, pp.OutputSpec("per_turn"))["masks"] == []


def test_stage1_uses_the_linear_head_and_stage2_is_refused(debug_model, samples):
    dec = Inferencer(debug_model, stage=1)(_pairs(samples, "genseg"))[0]
    n = debug_model.config.decoder.num_linear_classes
    assert dec.class_logits.shape[-1] == n + 1 and dec.text is None
    cats = debug_model.config.processor.category_ids
    keep = (0, 1, 2)
    line = pp.prediction_line(
        dec, pp.OutputSpec("panoptic", categories=tuple(cats[i] for i in keep), columns=keep)
    )
    assert {e["category_id"] for e in line["panoptic"]} <= {cats[i] for i in keep}
    with pytest.raises(InferenceError, match="stage 2"):
        Inferencer(debug_model, stage=2)


def test_span_ids_follow_the_text_regex():
    special = dataclasses.make_dataclass("S", ["seg", "p_open", "p_close"])(9, 1, 2)
    # stray </p>, a <p> inside a span (content), an unclosed span at the end (dropped)
    ids = [2, 1, 5, 1, 6, 2, 9, 1, 7]
    cond, seg, spans = span_ids(ids, special)
    assert cond == [-1, 0, 0, 0, 0, 0, -1, -1, -1] and seg == [-1] * 6 + [0, -1, -1] and spans == 1


def _xsam_expand2square(img, background):
    """Port of xtuner's ``expand2square`` (LLaVA's), which X-SAM's datasets call before the SigLIP processor
    when ``pad_image_to_square`` (``[A] xsam/xsam/dataset/base_dataset.py:276-279``; ``True`` in every
    ``val_datasets`` entry of the stage-3 paper config)."""
    from PIL import Image

    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return out


def test_eval_siglip_input_is_padded_to_a_square_as_xsam(debug_model, samples):
    """The SigLIP input of an evaluation batch is X-SAM's: the image centred on a square of the SigLIP mean
    colour, then the one resize and normalisation; the SAM input is the plain longest-side resize, no jitter.
    (The resize itself is ours, cv2 for PIL: docs/evaluation.md lists that difference.)"""
    import io

    import numpy as np
    from PIL import Image

    from pipelines.loader.decode import decode_image, normalize_chw, resize, resize_longest

    inf = Inferencer(debug_model)
    c = inf.processor.config
    assert c.siglip_pad_square and c.sam_scale_jitter is None and c.max_length is None
    seen = {}
    collate = inf.processor.collate
    inf.processor.collate = lambda items: seen.setdefault("batch", collate(items))
    pairs = _pairs(samples, "refseg")
    inf(pairs)
    got = seen["batch"]["pixel_values"][0].float().numpy()
    pil = Image.open(io.BytesIO(pairs[0][1])).convert("RGB")
    square = np.asarray(_xsam_expand2square(pil, tuple(int(m * 255) for m in c.siglip_mean)))
    assert square.shape[:2] == (W, W)
    want = normalize_chw(
        resize(square, (c.siglip_size, c.siglip_size), "bicubic"), c.siglip_mean, c.siglip_std
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    unpadded = normalize_chw(
        resize(np.asarray(pil), (c.siglip_size, c.siglip_size), "bicubic"), c.siglip_mean, c.siglip_std
    )
    assert np.abs(got - unpadded).max() > 0.1  # today's evaluation input (no padding) is not X-SAM's
    sam, _ = resize_longest(decode_image(pairs[0][1]), c.sam_size, "bilinear")
    want_sam = normalize_chw(sam, c.sam_mean, c.sam_std, pad_to=c.sam_size)
    np.testing.assert_allclose(seen["batch"]["extra_pixel_values"][0].float().numpy(), want_sam, atol=1e-6)
