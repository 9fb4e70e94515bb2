"""Reading an image's original bytes and proving they are a whole, sane image, without re-encoding them.

Checks, in order of cost: the file exists under the data root; its header names a JPEG or PNG whose size is
within the pixel limit (decompression bombs are refused before decoding) and equals the annotation's size;
the data decodes to the end (a truncated or corrupt file is refused). JPEGs are decoded with libjpeg-turbo
(simplejpeg) at 1/8 scale, which still walks every entropy-coded byte but costs a fraction of a full decode.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipelines import masks
from pipelines.errors import SkipRecord

if TYPE_CHECKING:
    from pipelines.sources.base import ConvertContext

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sniff_ext(data: bytes) -> str | None:
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def _check_jpeg(data: bytes, rel: str) -> tuple[int, int]:
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise SkipRecord("corrupt_image", f"{rel}: {e}") from None
    # libjpeg pads a truncated stream with fake EOI markers and only warns; the EOI marker itself must be there
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise SkipRecord("corrupt_image", f"{rel}: truncated JPEG (no end-of-image marker)")
    return h, w


def _decode_jpeg(data: bytes, rel: str) -> None:
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, min_height=1, min_width=1, strict=True)
    except ValueError as e:
        raise SkipRecord("corrupt_image", f"{rel}: {e}") from None


def _check_png(data: bytes, rel: str, max_pixels: int) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise SkipRecord("image_too_large", f"{rel}: {w}x{h} > {max_pixels} pixels")
                im.load()
    except SkipRecord:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise SkipRecord("corrupt_image", f"{rel}: {e}") from None
    return h, w


_last_ok: tuple | None = None  # (bytes, max_pixels, ext, h, w) of the last image that passed, in this process


def load_image(ctx: ConvertContext, rel: str, height: int | None, width: int | None) -> tuple[bytes, str]:
    """The original bytes and extension ("jpg"/"png") of ``rel``, checked; :class:`SkipRecord` if unusable.

    ``height``/``width`` are the annotation's claim; a file of another size is ``image_size_mismatch``.
    """
    global _last_ok
    data = ctx.read_bytes(rel, missing_reason="missing_image", max_bytes=ctx.options.max_image_bytes)
    max_pixels = ctx.options.max_image_pixels
    last = _last_ok
    if last is not None and last[1] == max_pixels and last[0] == data:
        # the check is a pure function of the bytes: samples of one image (consecutive keys) decode it once
        ext, h, w = last[2:]
    else:
        ext = sniff_ext(data)
        if ext == "jpg":
            h, w = _check_jpeg(data, rel)
            if w * h > max_pixels:
                raise SkipRecord("image_too_large", f"{rel}: {w}x{h} > {max_pixels} pixels")
            _decode_jpeg(data, rel)
        elif ext == "png":
            h, w = _check_png(data, rel, max_pixels)
        else:
            raise SkipRecord("corrupt_image", f"{rel}: neither JPEG nor PNG data")
        _last_ok = (data, max_pixels, ext, h, w)
    if height is not None and width is not None and (h, w) != (height, width):
        raise SkipRecord("image_size_mismatch", f"{rel}: file is {h}x{w}, annotation says {height}x{width}")
    return data, ext


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


def checked_header(data: bytes, rel: str, max_pixels: int) -> tuple[str, int, int]:
    """``(ext, height, width)`` of JPEG or PNG ``data`` from its header only, within ``max_pixels`` (the
    build's pixel limit); else :class:`SkipRecord` ``image_too_large`` or ``corrupt_image``. Nothing is
    decoded: a 631-byte JPEG claiming 30000x30000 pixels is refused before any allocation."""
    ext = sniff_ext(data)
    if ext == "png":
        if (
            data[12:16] == b"IHDR" and len(data) >= 24
        ):  # the size first, in our words (PIL's bomb limit is 2x)
            w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            if w * h > max_pixels:
                raise SkipRecord("image_too_large", f"{rel}: {w}x{h} > {max_pixels} pixels")
        h, w, _ = png_header(data, rel, max_pixels, "corrupt_image")
        return ext, h, w
    if ext != "jpg":
        raise SkipRecord("corrupt_image", f"{rel}: neither JPEG nor PNG data")
    h, w = _check_jpeg(data, rel)
    if w * h > max_pixels:
        raise SkipRecord("image_too_large", f"{rel}: {w}x{h} > {max_pixels} pixels")
    return ext, h, w


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
