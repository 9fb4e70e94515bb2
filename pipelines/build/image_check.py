"""Reading an image's original bytes and proving they are a whole, sane image, without re-encoding them.

Checks, in order of cost: the file exists under the data root; its header names a JPEG or PNG whose size is
within the pixel limit (decompression bombs are refused before decoding) and equals the annotation's size;
the data decodes to the end (a truncated or corrupt file is refused). JPEGs are decoded with libjpeg-turbo
(simplejpeg) at 1/8 scale, which still walks every entropy-coded byte but costs a fraction of a full decode.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import simplejpeg
from PIL import Image

from pipelines.errors import SkipRecord
from pipelines.images import png_header, sniff_ext

if TYPE_CHECKING:
    from pipelines.sources.base import ConvertContext


def _check_jpeg(data: bytes, rel: str) -> tuple[int, int]:
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise SkipRecord("corrupt_image", f"{rel}: {e}") from None
    # libjpeg pads a truncated stream with fake EOI markers and only warns; the EOI marker itself must be
    # there
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
