"""Post-processing (xsam_model.postprocess) on hand-made queries whose answer is known: the resampling back to
the original image, Mask2Former's panoptic / instance / semantic rules, one mask per phrase and intseg's box
rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import masks as mask_ops
from pipelines.loader import decode
from xsam_model import postprocess as pp


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("hw", [(40, 56), (56, 40), (37, 64)])
def test_to_original_maps_the_sam_frame_back_to_the_image(hw):
    """A mask taken into the SAM frame the way the processor does it, pooled to the decoder's grid, comes back
    at the original (non-square) size where it was."""
    h, w = hw
    truth = np.zeros((h, w), np.uint8)
    truth[h // 4 : h // 2 + 5, w // 3 : w - 4] = 1
    frame = 64
    scaled = decode.scaled_size(h, w, frame)
    in_frame = decode.masks_to_frame(mask_ops.encode(truth), scaled, pad_to=frame).astype(np.float32)
    grid = torch.nn.functional.avg_pool2d(torch.from_numpy(in_frame)[None], 2)[0]  # 1x32x32, stride 2
    logits = (grid - 0.5) * 12
    back = pp.to_original(logits, pp.Geometry(frame, scaled, (h, w)))[0] > 0
    assert back.shape == (h, w)
    inter = (back.numpy() & truth.astype(bool)).sum()
    union = (back.numpy() | truth.astype(bool)).sum()
    assert inter / union > 0.9


def test_to_original_is_the_identity_on_an_unscaled_grid():
    x = torch.randn(3, 8, 8)
    out = pp.to_original(x, pp.Geometry(8, (8, 8), (8, 8)))
    assert torch.allclose(out, x, atol=1e-6)


# ------------------------------------------------------------------------------------------ rules
def _queries(masks: list[np.ndarray], probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary 8x8 masks → mask logits ±8; class probabilities (K real + no-object) → logits."""
    m = torch.tensor(np.stack(masks), dtype=torch.float32) * 16 - 8
    return torch.tensor(probs).log(), m


def _rect(y0, y1, x0, x1, n=8):
    a = np.zeros((n, n), bool)
    a[y0:y1, x0:x1] = True
    return a


GEO8 = pp.Geometry(8, (8, 8), (8, 8))


def test_panoptic_fuses_stuff_and_gives_each_pixel_one_segment():
    cls, masks = _queries(
        [_rect(0, 8, 0, 4), _rect(0, 8, 4, 8), _rect(0, 4, 4, 8)],
        [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.8, 0.15]],
    )
    segs = pp.panoptic(cls, masks, GEO8, stuff_columns={1})
    assert sorted(c for _, c in segs) == [0, 1]  # the two stuff queries became one segment
    covered = torch.stack([m for m, _ in segs]).sum(0)
    assert int(covered.max()) == 1  # no overlap
    stuff = next(m for m, c in segs if c == 1)
    assert torch.equal(stuff, torch.from_numpy(_rect(0, 8, 4, 8)))


def test_panoptic_drops_a_query_that_keeps_too_little_of_its_mask():
    # query 1 is mostly covered by the more confident query 0: it keeps 1/4 of its mask (< 0.8)
    cls, masks = _queries([_rect(0, 8, 0, 8), _rect(0, 4, 0, 4)], [[0.95, 0.04, 0.01], [0.02, 0.5, 0.48]])
    segs = pp.panoptic(cls, masks, GEO8, stuff_columns=set())
    assert [c for _, c in segs] == [0]


def test_instances_score_is_class_times_mask_probability():
    # flattened (query, class) probabilities: q0c0 .7, q0c1 .2, q1c1 .15, q1c0 .1; top-k with k = Q = 2
    cls, masks = _queries([_rect(0, 4, 0, 4), _rect(4, 8, 4, 8)], [[0.7, 0.2, 0.1], [0.1, 0.15, 0.75]])
    found = pp.instances(cls, masks, GEO8)
    mask_prob = torch.sigmoid(torch.tensor(8.0)).item()
    assert [c for _, c, _ in found] == [0, 1]  # query 0 with both classes; query 1 is not in the top 2
    assert found[0][2] == pytest.approx(0.7 * mask_prob, rel=1e-5)
    assert found[1][2] == pytest.approx(0.2 * mask_prob, rel=1e-5)
    assert all(torch.equal(m, torch.from_numpy(_rect(0, 4, 0, 4))) for m, _, _ in found)
    cls, masks = _queries([_rect(0, 4, 0, 4), np.zeros((8, 8), bool)], [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    assert [c for _, c, _ in pp.instances(cls, masks, GEO8)] == [0]  # (q1, c0) is in the top 2 but empty


def test_best_query_mask_and_semantic():
    cls, masks = _queries([_rect(0, 8, 0, 4), _rect(0, 8, 4, 8)], [[0.3, 0.6, 0.1], [0.8, 0.1, 0.1]])
    mask, score = pp.best_query_mask(cls, masks, 0, GEO8)
    assert score == pytest.approx(0.8) and torch.equal(mask, torch.from_numpy(_rect(0, 8, 4, 8)))
    segs = pp.semantic(cls, masks, GEO8)
    assert int(torch.stack([m for m, _ in segs]).sum()) == 64  # every pixel, once
    assert {c: int(m.sum()) for m, c in segs} == {0: 32, 1: 32}


def test_interactive_takes_the_candidate_boxed_like_the_prompt():
    cls, masks = _queries([_rect(0, 3, 0, 3), _rect(4, 8, 4, 8)], [[0.9, 0.1], [0.6, 0.4]])
    prompt = torch.from_numpy(_rect(5, 7, 5, 8))
    picked = pp.interactive(cls, masks, GEO8, prompt)
    assert torch.equal(picked, torch.from_numpy(_rect(4, 8, 4, 8)))
