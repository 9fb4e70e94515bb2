"""Visual prompts: where each type lies relative to its mask, determinism, windowed RLE, too-small masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from pipelines import masks, vprompts
from pipelines.vprompts import PROMPT_TYPES, PromptTooSmall

H, W = 240, 320


def blob_mask() -> np.ndarray:
    """Two separated blobs (an ellipse and a rectangle touching the right edge) plus a 3-pixel speck."""
    m = np.zeros((H, W), dtype=np.uint8)
    cv2.ellipse(m, (100, 90), (50, 30), 20, 0, 360, 1, -1)
    m[150:200, 280:320] = 1
    m[10, 10:13] = 1
    return m.astype(bool)


def prompt(m: np.ndarray, kind: str, ann_id: object = 1, seed: int = 0) -> np.ndarray:
    return masks.decode(vprompts.prompt_rle(m, kind, seed=seed, key="src/train/0001", ann_id=ann_id)).astype(
        bool
    )


def grow(m: np.ndarray, r: int) -> np.ndarray:
    return cv2.dilate(m.astype(np.uint8), vprompts.disk(r)).astype(bool)


def test_components_keep_only_areas_above_min_area_and_match_bbox_hint():
    m = blob_mask()
    inst = vprompts.analyse(m)
    assert [(c.r0, c.c0, c.r1, c.c1) for c in inst.components] == [
        tuple(int(v) for v in (s[0].start, s[1].start, s[0].stop, s[1].stop))
        for s in ndimage.find_objects(ndimage.label(m & ~_speck(m), structure=np.ones((3, 3)))[0])
    ]
    assert inst.area == int(m.sum()) - 3
    hinted = vprompts.analyse(m, bbox=masks.bbox(masks.encode(m)[0]))
    assert [(c.r0, c.c0, c.r1, c.c1, c.area) for c in hinted.components] == [
        (c.r0, c.c0, c.r1, c.c1, c.area) for c in inst.components
    ]


def _speck(m: np.ndarray) -> np.ndarray:
    s = np.zeros_like(m)
    s[10, 10:13] = True
    return s


def test_point_is_one_disk_per_component_centred_on_the_mask():
    m = blob_mask()
    for ann_id in range(20):
        p = prompt(m, "point", ann_id)
        lab, n = ndimage.label(p)
        assert n == 2  # the speck is below min_area
        # possible centres = pixels whose radius-10 disk lies in the prompt (outside the image counts as
        # inside)
        padded = np.pad(p, 10, constant_values=True).astype(np.uint8)
        centres = cv2.erode(padded, vprompts.disk(10))[10:-10, 10:-10].astype(bool)
        for k in (1, 2):
            assert (centres & (lab == k) & m).any(), "each disk is centred on a mask pixel"
        assert not (p & ~grow(m, 10)).any()


def test_scribble_stays_near_its_component_box():
    m = blob_mask()
    for ann_id in range(20):
        p = prompt(m, "scribble", ann_id)
        assert p.any()
        ys, xs = np.nonzero(p)
        my, mx = np.nonzero(m & ~_speck(m))
        h, w = my.max() - my.min(), mx.max() - mx.min()
        # jittered box grows at most 10% per side; the sine moves rows by <= 20 px; the stroke radius is 5
        assert ys.min() >= my.min() - 0.1 * h - 26 and ys.max() <= my.max() + 0.1 * h + 26
        assert xs.min() >= mx.min() - 0.1 * w - 6 and xs.max() <= mx.max() + 0.1 * w + 6


def test_box_is_a_jittered_filled_box_per_component():
    m = np.zeros((H, W), dtype=bool)
    m[50:120, 40:200] = True
    for ann_id in range(20):
        p = prompt(m, "box", ann_id)
        ys, xs = np.nonzero(p)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert p.sum() == (y1 - y0) * (x1 - x0)  # filled rectangle
        inter = (min(y1, 120) - max(y0, 50)) * (min(x1, 200) - max(x0, 40))
        union = p.sum() + m.sum() - inter
        assert inter / union >= 0.8  # scale in U(0.9, 1.1)


def test_thin_component_still_gets_a_box():
    m = np.zeros((H, W), dtype=bool)
    m[100, 50:80] = True  # one pixel tall: X-SAM's truncation would give an empty box
    assert prompt(m, "box").sum() > 0


def test_mask_prompt_matches_a_whole_image_gaussian_filter():
    m = blob_mask() & ~_speck(blob_mask())
    ours = prompt(m, "mask")
    ref = ndimage.gaussian_filter(m.astype(float), sigma=2)
    ref = ref > ref.mean()  # X-SAM's generate_mask_vprompt
    assert (ours ^ ref).sum() <= 0.002 * ref.sum()
    assert (ours >= m).all() and not (ours & ~grow(m, 9)).any()


def test_prompts_are_deterministic_per_seed_key_and_annotation():
    m = blob_mask()
    for kind in PROMPT_TYPES:
        a = vprompts.prompt_rle(m, kind, seed=3, key="k/train/1", ann_id=7)
        assert a == vprompts.prompt_rle(m, kind, seed=3, key="k/train/1", ann_id=7)
        assert a["size"] == [H, W] and isinstance(a["counts"], str)
        if kind != "mask":  # the mask prompt has no randomness (as X-SAM's)
            others = {
                vprompts.prompt_rle(m, kind, seed=s, key=k, ann_id=i)["counts"]
                for s, k, i in ((4, "k/train/1", 7), (3, "k/train/2", 7), (3, "k/train/1", 8))
            }
            assert a["counts"] not in others
    # drawing several types at once gives the same prompts as one at a time
    both = vprompts.prompt_rles(m, ["box", "point"], seed=3, key="k/train/1", ann_id=7)
    assert both["point"] == vprompts.prompt_rle(m, "point", seed=3, key="k/train/1", ann_id=7)


def test_window_rle_equals_full_image_encoding():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        pix = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        win = vprompts.Window(pix, y0, x0, H, W)
        assert win.rle() == masks.encode(win.full())[0]


@pytest.mark.parametrize("radius", [5, 10])
def test_dilate_rle_draws_exact_disks(radius):
    m = np.zeros((H, W), dtype=np.uint8)
    m[100, 100] = 1
    m[0, 0] = 1  # clipped at the corner
    out = masks.decode(vprompts.dilate_rle(masks.encode(m)[0], radius))
    yy, xx = np.mgrid[:H, :W]
    ref = ((yy - 100) ** 2 + (xx - 100) ** 2 <= radius**2) | (yy**2 + xx**2 <= radius**2)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    empty = masks.encode(np.zeros((H, W), dtype=np.uint8))[0]
    assert vprompts.dilate_rle(empty, radius) == empty


def test_too_small_or_empty_mask_raises_at_once():
    m = np.zeros((H, W), dtype=bool)
    with pytest.raises(PromptTooSmall, match="empty"):
        vprompts.analyse(m)
    m[5:7, 5:7] = True  # 4 px: not > min_area=5
    m[50, 50:53] = True
    with pytest.raises(PromptTooSmall) as e:
        vprompts.prompt_rle(m, "point", seed=0, key="k/train/1", ann_id=1)
    assert e.value.reason == "mask_too_small_for_prompt" and "4 px" in e.value.detail
    with pytest.raises(ValueError, match="unknown prompt type"):
        vprompts.draw(vprompts.analyse(blob_mask()), "lasso", np.random.default_rng(0))
