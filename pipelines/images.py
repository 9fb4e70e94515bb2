"""Image bytes in the core: magic bytes, header-only sizes, and decoder errors turned into counted skips.

Used by the sources (header sizes, panoptic PNGs), the build's image check and the loader's decoder; nothing
here decodes more than a header except :func:`guarded_decode` and :func:`read_panoptic_png`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipelines import masks
from pipelines.errors import SkipRecord

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sniff_ext(data: bytes) -> str | None:
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from the header only."""
    if data.startswith(JPEG_MAGIC):
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return h, w
    with Image.open(io.BytesIO(data)) as im:
        return im.size[1], im.size[0]


# Everything a decoder may raise on hostile bytes: PIL's errors, OpenCV's cv2.error (an assertion on an empty
# buffer, an allocation failure), numpy's, and an allocation that fails outright.
DECODER_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    MemoryError,
    EOFError,
    cv2.error,
    Image.DecompressionBombError,
)


def png_header(data: bytes, rel: str, max_pixels: int, bad: str) -> tuple[int, int, str]:
    """``(height, width, mode)`` of a PNG from its header only; over ``max_pixels`` is ``image_too_large``.

    Nothing is decoded here: this is what keeps a 640 KB PNG claiming 20000x20000 pixels from allocating GBs.
    """
    if not data.startswith(PNG_MAGIC):
        raise SkipRecord(bad, f"{rel}: not PNG data ({len(data)} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours
            with Image.open(io.BytesIO(data)) as im:
                (w, h), mode = im.size, im.mode
    except Image.DecompressionBombError as e:  # PIL's own limit, far above ours: the same verdict
        raise SkipRecord("image_too_large", f"{rel}: {e}") from None
    except DECODER_ERRORS as e:
        raise SkipRecord(bad, f"{rel}: {e}") from None
    if w * h > max_pixels:
        raise SkipRecord("image_too_large", f"{rel}: {w}x{h} > {max_pixels} pixels")
    return h, w, mode


def guarded_decode(decode: Callable[[bytes], np.ndarray], data: bytes, rel: str, bad: str) -> np.ndarray:
    """``decode(data)`` with every decoder error a :class:`SkipRecord` ``bad`` naming ``rel``."""
    try:
        arr = decode(data)
    except SkipRecord:
        raise
    except DECODER_ERRORS as e:
        raise SkipRecord(bad, f"{rel}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}") from None
    if arr is None:
        raise SkipRecord(bad, f"{rel}: cannot be decoded")
    return arr


def read_panoptic_png(data: bytes, rel: str, max_pixels: int, bad: str) -> np.ndarray:
    """A panoptic PNG's ``HxW`` int32 id map (:func:`pipelines.masks.read_panoptic_png`), its size checked
    against ``max_pixels`` from the header first and every decoder error a skip ``bad``."""
    png_header(data, rel, max_pixels, bad)
    return guarded_decode(masks.read_panoptic_png, data, rel, bad)
