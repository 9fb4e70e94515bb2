"""pipelines.masks against pycocotools and an independent panoptic decode."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines import masks
from pipelines.masks import MaskFormatError


def _random_masks(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    return rng.random((h, w, n)) > 0.7


def test_encode_decode_round_trip_matches_pycocotools():
    rng = np.random.default_rng(0)
    m = _random_masks(rng, 37, 53, 4)
    ours = masks.encode(m)
    ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert [r["counts"] for r in ours] == [r["counts"].decode() for r in ref]
    for k, rle in enumerate(ours):
        assert isinstance(rle["counts"], str)
        np.testing.assert_array_equal(masks.decode(rle), m[:, :, k].astype(np.uint8))


def test_polygons_equal_pycocotools_merge():
    polys = [[10, 10, 40, 12, 30, 35], [50, 50, 60, 50, 60, 60, 50, 60]]
    ours = masks.polygons_to_rle(polys, 80, 100)
    ref = mask_utils.merge(mask_utils.frPyObjects(polys, 80, 100))
    np.testing.assert_array_equal(masks.decode(ours), mask_utils.decode(ref))


@pytest.mark.parametrize("bad", [[[1, 2, 3, 4]], [[1, 2, 3, 4, 5, 6, 7]], []])
def test_bad_polygons_are_refused(bad):
    with pytest.raises(MaskFormatError) as e:
        masks.polygons_to_rle(bad, 10, 10)
    assert e.value.reason == "bad_polygon"


def test_uncompressed_rle_converts_and_size_is_checked():
    m = np.zeros((6, 5), np.uint8)
    m[1:4, 2:4] = 1
    flat = m.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    rle = masks.segmentation_to_rle({"counts": counts, "size": [6, 5]}, 6, 5)
    np.testing.assert_array_equal(masks.decode(rle), m)
    with pytest.raises(MaskFormatError) as e:
        masks.segmentation_to_rle({"counts": counts, "size": [6, 5]}, 5, 6)
    assert e.value.reason == "rle_size_mismatch"


def test_compressed_rle_passes_through_and_list_of_rles_is_unioned():
    a = np.zeros((8, 8), np.uint8)
    a[:2] = 1
    b = np.zeros((8, 8), np.uint8)
    b[:, :2] = 1
    ra, rb = masks.encode(a)[0], masks.encode(b)[0]
    assert masks.segmentation_to_rle(ra, 8, 8) == ra
    np.testing.assert_array_equal(masks.decode(masks.segmentation_to_rle([ra, rb], 8, 8)), a | b)
    assert masks.area(ra) == 16
    assert masks.bbox(ra) == [0.0, 0.0, 8.0, 2.0]


def test_panoptic_id_map_to_rles_matches_per_segment_equality():
    """Independent decode: one boolean comparison per segment id, as panopticapi users do."""
    rng = np.random.default_rng(1)
    ids = np.array([0, 5, 300, 70000, 12345678])
    id_map = ids[rng.integers(0, len(ids), size=(30, 40))]
    rgb = np.stack([id_map % 256, (id_map // 256) % 256, id_map // 65536], axis=-1).astype(np.uint8)
    decoded = masks.rgb2id(rgb)
    np.testing.assert_array_equal(decoded, id_map)
    wanted = [70000, 5, 12345678, 999]  # unsorted, and one id absent from the map
    rles = masks.id_map_to_rles(decoded, wanted)
    for seg_id, rle in zip(wanted, rles, strict=True):
        np.testing.assert_array_equal(masks.decode(rle), (id_map == seg_id).astype(np.uint8))
    assert masks.area(rles[-1]) == 0


def test_a_polygon_keeps_its_good_parts_and_reports_the_bad_one():
    good = [[2.0, 2.0, 20.0, 2.0, 20.0, 15.0, 2.0, 15.0]]
    dropped = []
    rle = masks.segmentation_to_rle(
        [good[0], [1, 2, 3, 4], [5, 6, 7]], 30, 40, lambda r, d: dropped.append((r, d))
    )
    assert rle == masks.polygons_to_rle(good, 30, 40)  # the good part only, unchanged
    assert [r for r, _ in dropped] == ["bad_polygon_part", "bad_polygon_part"]
    assert "part 1 with 4 numbers" in dropped[0][1] and "part 2 with 3 numbers" in dropped[1][1]
    with pytest.raises(MaskFormatError, match="no usable polygon part"):  # nothing good: the polygon fails,
        masks.segmentation_to_rle([[1, 2, 3, 4]], 30, 40, lambda r, d: dropped.append((r, d)))
    assert len(dropped) == 2  # ...and no part is counted on top of it
    with pytest.raises(MaskFormatError) as e:  # without a reporter, one bad part fails it (LISA's shapes)
        masks.segmentation_to_rle([good[0], [1, 2, 3, 4]], 30, 40)
    assert e.value.reason == "bad_polygon"
