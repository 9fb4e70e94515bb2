"""Mask helpers: every annotation form in, COCO compressed RLE out (pure functions, pycocotools inside).

Shapes: dense masks are ``HxW`` uint8/bool; a stack of masks is ``HxWxN`` in Fortran order, which is what
``pycocotools.mask.encode`` wants (it would copy anything else). RLE ``counts`` are returned as ``str``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


class MaskFormatError(ValueError):
    """An annotation's segmentation cannot be turned into a mask; ``reason`` is a stable skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _str_counts(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _bytes_counts(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """Polygons ``[[x1, y1, x2, y2, …], …]`` (parts OR-ed) to one compressed RLE.

    A part with fewer than 6 numbers (3 points) or an odd count is a :class:`MaskFormatError`.
    """
    if not polygons:
        raise MaskFormatError("bad_polygon", "empty polygon list")
    for part in polygons:
        if not isinstance(part, list | tuple) or len(part) < 6 or len(part) % 2:
            n = len(part) if isinstance(part, list | tuple) else type(part).__name__
            raise MaskFormatError("bad_polygon", f"polygon part with {n} numbers (need an even count >= 6)")
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return _str_counts(mask_utils.merge(rles))


def segmentation_to_rle(segm, height: int, width: int) -> dict:
    """Any COCO ``segmentation`` (polygons, uncompressed RLE, compressed RLE) to compressed RLE.

    The RLE's own size must equal ``(height, width)``; a mismatch is a :class:`MaskFormatError`
    (``rle_size_mismatch``), never a silent resize.
    """
    if isinstance(segm, list) and segm and isinstance(segm[0], dict):
        # X-SAM's refer data wraps one RLE in a list; several are OR-ed
        return merge_rles([segmentation_to_rle(s, height, width) for s in segm])
    if isinstance(segm, list):
        return polygons_to_rle(segm, height, width)
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(segm["size"][0]), int(segm["size"][1])] != [height, width]:
            raise MaskFormatError("rle_size_mismatch", f"RLE size {list(segm['size'])} != image {[height, width]}")
        if isinstance(segm["counts"], list):  # uncompressed (crowd) RLE
            return _str_counts(mask_utils.frPyObjects(segm, height, width))
        return _str_counts(segm)
    raise MaskFormatError("bad_segmentation", f"unknown segmentation type {type(segm).__name__}")


def encode(masks: np.ndarray) -> list[dict]:
    """``HxW`` or ``HxWxN`` binary masks to a list of compressed RLEs (one pycocotools call for all N)."""
    if masks.ndim == 2:
        masks = masks[:, :, None]
    arr = np.asfortranarray(masks.astype(np.uint8, copy=False))
    return [_str_counts(r) for r in mask_utils.encode(arr)]


def decode(rle: dict) -> np.ndarray:
    """One compressed RLE to an ``HxW`` uint8 mask."""
    return mask_utils.decode(_bytes_counts(rle))


def merge_rles(rles: Sequence[dict]) -> dict:
    """Union of RLEs of one size."""
    if len(rles) == 1:
        return _str_counts(rles[0])
    return _str_counts(mask_utils.merge([_bytes_counts(r) for r in rles], intersect=False))


def area(rle: dict) -> int:
    return int(mask_utils.area(_bytes_counts(rle)))


def bbox(rle: dict) -> list[float]:
    """``[x, y, w, h]`` of the mask's extent."""
    return [float(v) for v in mask_utils.toBbox(_bytes_counts(rle))]


def rgb2id(png: np.ndarray) -> np.ndarray:
    """Panoptic RGB ``HxWx3`` to segment ids ``HxW`` int32: ``id = R + 256·G + 256²·B`` (0 = void)."""
    png = png.astype(np.int32, copy=False)
    return png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]


def read_panoptic_png(data: bytes) -> np.ndarray:
    """Bytes of a panoptic PNG to its ``HxW`` int32 id map.

    OpenCV's decoder (BGR order) is used when it reads the file; palette or odd modes fall back to PIL.
    """
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is not None and arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        b, g, r = (arr[..., i].astype(np.int32) for i in range(3))
        return r + (g << 8) + (b << 16)
    with Image.open(io.BytesIO(data)) as im:
        return rgb2id(np.asarray(im.convert("RGB")))


def id_map_to_rles(id_map: np.ndarray, segment_ids: Sequence[int]) -> list[dict]:
    """One RLE per requested segment id, from one decoded ``HxW`` id map.

    Vectorised: one broadcast comparison builds the ``NxWxH`` boolean stack from the transposed map, which
    *is* the ``HxWxN`` Fortran-ordered array ``pycocotools.mask.encode`` wants (no copy), and one encode call
    turns all N masks into RLEs. The PNG is decoded once, not once per segment. A segment id absent from
    the map gives an empty RLE (the caller decides what that means).
    """
    if len(segment_ids) == 0:
        return []
    ids = np.asarray(segment_ids, dtype=id_map.dtype)
    stack = ids[:, None, None] == np.ascontiguousarray(id_map.T)[None]  # N x W x H, C order
    fortran = stack.view(np.uint8).transpose(2, 1, 0)  # H x W x N, Fortran order: same memory
    return [_str_counts(r) for r in mask_utils.encode(fortran)]
