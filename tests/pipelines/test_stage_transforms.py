"""Stage transforms in the loader's decode path (docs/fidelity.md#data-recipe-fidelity): stage-1 large-scale
jitter moves an image and its masks identically, each draw a pure function of (seed, key, use); stage-2 SigLIP
pad-to-square."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.loader import decode
from tests.support.data import task_sample
from xsam_model.config import ProcessorConfig, stage_processor


def checkerboard(h: int, w: int, cell: int) -> tuple[np.ndarray, dict]:
    """An ``h×w×3`` black/white checkerboard and the RLE of its white cells."""
    yy, xx = np.mgrid[:h, :w]
    white = ((yy // cell + xx // cell) % 2 == 0).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(white))
    rle["counts"] = rle["counts"].decode()
    return np.repeat(white[..., None] * 255, 3, axis=2).astype(np.uint8), rle


@pytest.mark.parametrize(
    "hw,scale",
    [
        ((300, 400), 0.1),
        ((300, 400), 0.63),
        ((300, 400), 1.0),
        ((300, 400), 1.7),
        ((480, 200), 2.0),
        ((1800, 2400), 1.5),
    ],  # the last: shrunk and still cropped (a huge image)
)
def test_jitter_moves_image_and_mask_identically(hw, scale):
    img, rle = checkerboard(*hw, cell=max(hw) // 8)
    geom = decode.jitter_geometry(*hw, 1024, scale)
    rh, rw, top, left, ch, cw = geom
    assert (ch, cw) == (min(1024, rh), min(1024, rw)) and abs(max(rh, rw) - int(1024 * scale + 0.5)) <= 1
    out = decode.jitter_image(img, geom)
    masks = decode.jitter_masks([rle], geom, pad_to=1024)
    assert out.shape == (ch, cw, 3) and masks.shape == (1, 1024, 1024)
    assert not masks[0, ch:].any() and not masks[0, :, cw:].any()  # the pad is background
    agree = ((out[..., 0] > 127) == masks[0, :ch, :cw].astype(bool)).mean()
    assert agree > 0.98, agree  # only cell borders (one resampled pixel wide) may differ
    # the centre crop: the output's centre shows the source's centre cell colour
    assert masks[0, ch // 2, cw // 2] == (img[hw[0] // 2, hw[1] // 2, 0] > 127)


def test_jitter_crop_is_centred():
    img, rle = checkerboard(100, 100, cell=10)
    img[:, :50] = (
        0  # left half black: a 2x fit of 100x100 is 2048 wide, the centre crop keeps columns 512..1535
    )
    geom = decode.jitter_geometry(100, 100, 1024, 2.0)
    assert geom == (2048, 2048, 512, 512, 1024, 1024)
    out = decode.jitter_image(img, geom)
    assert (out[:, :500] == 0).all()  # source columns 25..49.9: black
    assert out[:, 540:].max() == 255


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def test_siglip_pad_square_fills_with_the_mean_colour():
    img = np.zeros((40, 80, 3), np.uint8)
    img[..., 0] = 255
    x = decode.image_inputs(_jpeg(img), siglip_size=32, sam_size=64, siglip_pad_square=True)
    pv = x["pixel_values"]  # 3×32×32: rows 0..7 and 24..31 are the grey pad, (127/255 − .5)/.5 ≈ −0.004
    assert np.abs(pv[:, :7]).max() < 0.01 and np.abs(pv[:, 25:]).max() < 0.01
    assert pv[0, 16, 16] > 0.99 and pv[1, 16, 16] < -0.99
    plain = decode.image_inputs(_jpeg(img), siglip_size=32, sam_size=64)["pixel_values"]
    assert plain[0].min() > 0.99  # without it the red fills the whole square


def test_stage_configs_and_draws_are_pure():
    assert stage_processor(ProcessorConfig(), 1).sam_scale_jitter == (0.1, 2.0)
    assert stage_processor(ProcessorConfig(), 2).siglip_pad_square
    s3 = stage_processor(ProcessorConfig(), 3)
    assert s3.sam_scale_jitter is None and not s3.siglip_pad_square
    with pytest.raises(ValueError, match="sam_scale_jitter"):
        ProcessorConfig(sam_scale_jitter=(0.0, 2.0))
    from xsam_model.processor import XSamProcessor
    from xsam_model.tokenizer import build_debug_tokenizer, prepare_tokenizer

    tok = prepare_tokenizer(build_debug_tokenizer(), ("<SEG>", "<p>", "</p>"))
    proc = XSamProcessor(stage_processor(ProcessorConfig(siglip_size=32, sam_size=64), 1), tok)
    base = task_sample("genseg")

    def scale(seed, use, key=base.key):
        return proc.jitter_scale(replace(base, key=key, meta={"draw": [seed, use]}))

    draws = [scale(0, u) for u in range(2000)]
    assert draws[:5] == [scale(0, u) for u in range(5)]  # a pure function of (seed, key, use)
    assert scale(1, 0) != scale(0, 0) and scale(0, 0, key="other") != scale(0, 0)
    assert 0.1 <= min(draws) and max(draws) <= 2.0 and abs(np.mean(draws) - 1.05) < 0.05
    assert XSamProcessor(ProcessorConfig(), tok).jitter_scale(base) is None  # stage 3: no jitter


def test_processor_applies_one_jitter_to_image_masks_and_ignore():
    from tests.support.data import tiny_jpeg
    from xsam_model.processor import XSamProcessor
    from xsam_model.tokenizer import build_debug_tokenizer, prepare_tokenizer

    tok = prepare_tokenizer(build_debug_tokenizer(), ("<SEG>", "<p>", "</p>"))
    proc = XSamProcessor(stage_processor(ProcessorConfig(siglip_size=32, sam_size=64), 1), tok)
    sample = task_sample("genseg")
    sizes = set()
    for use in range(6):
        s = replace(sample, meta={"draw": [0, use]})
        item = proc(s, tiny_jpeg(200, (sample.image.width, sample.image.height)))
        h, w = item["scaled_size"].tolist()
        sizes.add((h, w))
        assert not item["mask_labels"][:, h:].any() and not item["mask_labels"][:, :, w:].any()
        assert (item["extra_pixel_values"][:, h:] == 0).all()  # the frame's pad
        again = proc(s, tiny_jpeg(200, (sample.image.width, sample.image.height)))
        assert (again["mask_labels"] == item["mask_labels"]).all()  # same (seed, key, use): same draw
    assert len(sizes) > 1  # the scale changes with the use


def test_each_stage_config_gets_its_transforms():
    from orchestrate.plan import model_config
    from orchestrate.stages import stage1, stage2, stage3

    p1, p2, p3 = (model_config(c()).processor for c in (stage1, stage2, stage3))
    assert p1.sam_scale_jitter == (0.1, 2.0) and not p1.siglip_pad_square
    assert p2.sam_scale_jitter is None and p2.siglip_pad_square
    assert p3.sam_scale_jitter is None and not p3.siglip_pad_square


def test_evaluation_samples_are_not_jittered():
    from xsam_model.processor import XSamProcessor
    from xsam_model.tokenizer import build_debug_tokenizer, prepare_tokenizer

    tok = prepare_tokenizer(build_debug_tokenizer(), ("<SEG>", "<p>", "</p>"))
    proc = XSamProcessor(stage_processor(ProcessorConfig(), 1), tok)
    s = task_sample("genseg")
    val = replace(s, key=s.key.replace("/train/", "/val/"), split="val", meta={"draw": [0, 3]})
    assert proc.jitter_scale(val) is None and proc.jitter_scale(replace(val, split="train", key=s.key))
