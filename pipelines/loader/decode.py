"""Fast decoding for the training side: image bytes → ``HxWx3`` uint8, resizes, COCO RLE → masks in a target
frame.

Pure functions on numpy arrays (no torch), so they run in DataLoader workers, benchmarks and tests alike.

- JPEG is decoded by libjpeg-turbo through simplejpeg (the same library and settings PIL uses, so pixels are
  equal to ``PIL.Image.open(...).convert("RGB")``); PNG by OpenCV; anything else falls back to PIL. EXIF
  orientation is ignored everywhere, as PIL does: COCO-style annotations are in stored-pixel coordinates.
- Resizes use OpenCV, one call per target size from the decoded original (never chained). ``"bicubic"`` and
  ``"bilinear"`` switch to a box filter (``INTER_AREA``) when shrinking, which stays within ~2/255 of PIL's
  antialiased resampling where a plain cubic kernel would alias.
- Masks are decoded from compressed RLE with numpy (no per-pixel C loop) and scaled to the target frame in
  run-length space with *nearest-exact* sampling — the same pixels as ``torch.nn.functional.interpolate(...,
  mode="nearest-exact")`` — then zero-padded bottom/right, as X-SAM's SAM frame wants.

Typical use (X-SAM's two encoders)::

    img = decode_image(image_bytes)                               # HxWx3 uint8
    siglip = normalize_chw(resize(img, (384, 384)), SIGLIP_MEAN, SIGLIP_STD)            # 3x384x384 float32
    sam_img, (sh, sw) = resize_longest(img, 1024, "bilinear")
    sam = normalize_chw(sam_img, SAM_MEAN, SAM_STD, pad_to=1024)                        # 3x1024x1024 float32
    masks = masks_to_frame([m.rle for m in sample.masks], (sh, sw), pad_to=1024)       # Nx1024x1024 uint8
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipelines.errors import ImageDecodeError
from pipelines.images import JPEG_MAGIC, PNG_MAGIC

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)

_INTERP = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


# ---------------------------------------------------------------------------------------------- images
def decode_image(data: bytes, *, min_hw: tuple[int, int] | None = None, fastdct: bool = False) -> np.ndarray:
    """JPEG/PNG bytes → ``HxWx3`` uint8 RGB.

    ``min_hw``: for a JPEG, let libjpeg-turbo scale by 1/2, 1/4 or 1/8 inside the DCT while both sides stay
    ≥ ``min_hw`` (a large photo headed for a 384 input decodes several times faster). The result then is
    smaller than the stored size; callers that need the stored size leave it None.
    """
    try:
        if data[:3] == JPEG_MAGIC:
            try:
                kw = {"min_height": min_hw[0], "min_width": min_hw[1]} if min_hw else {}
                return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fastdct, **kw)
            except ValueError:
                pass  # CMYK / unusual JPEG that turbojpeg will not convert: PIL below
        elif data[:8] == PNG_MAGIC:
            arr = cv2.imdecode(
                np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
            )
            if arr is not None and arr.dtype == np.uint8:
                return arr
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, cv2.error) as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from None


def scaled_size(h: int, w: int, longest: int) -> tuple[int, int]:
    """``(h, w)`` scaled so the longest side is ``longest`` (rounded as transformers' SAM processor)."""
    scale = longest / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize(img: np.ndarray, hw: tuple[int, int], kind: str = "bicubic") -> np.ndarray:
    """``HxWxC`` uint8 → ``hw[0]xhw[1]xC``. Shrinking with bilinear/bicubic uses a box filter
    (antialiasing)."""
    h, w = img.shape[:2]
    if (h, w) == tuple(hw):
        return img
    interp = _INTERP[kind]
    if kind in ("bilinear", "bicubic") and hw[0] <= h and hw[1] <= w:
        interp = cv2.INTER_AREA
    return cv2.resize(img, (hw[1], hw[0]), interpolation=interp)


def resize_longest(
    img: np.ndarray, longest: int, kind: str = "bilinear"
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize so the longest side is ``longest``; returns the image and its ``(h, w)``."""
    hw = scaled_size(img.shape[0], img.shape[1], longest)
    return resize(img, hw, kind), hw


def normalize_chw(
    img: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    pad_to: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``HxWx3`` uint8 → ``3xHxW`` float32 ``(x/255 − mean)/std``; with ``pad_to``, ``3xPxP`` zero-padded
    bottom/right (zero *after* normalisation, as transformers' SAM processor pads).

    ``out``: a float32 array of that shape to fill (e.g. a shared-memory tensor's ``.numpy()`` view, so a
    DataLoader worker hands it over without a copy)."""
    h, w = img.shape[:2]
    out = _padded((3,), (h, w), pad_to, np.float32, out)
    # one SIMD pass per channel plane, written straight into the (padded) output: x·a + b, a = 1/(255·std)
    for c, plane in enumerate(cv2.split(img)):
        cv2.addWeighted(
            plane, 1.0 / (255.0 * std[c]), plane, 0.0, -mean[c] / std[c], dst=out[c, :h, :w], dtype=cv2.CV_32F
        )
    return out


def _padded(
    lead: tuple[int, ...], hw: tuple[int, int], pad_to: int | None, dtype, out: np.ndarray | None = None
) -> np.ndarray:
    """An uninitialised ``lead + (P, P)`` array (``lead + hw`` without ``pad_to``) whose pad is zeroed: the
    caller fills ``[..., :h, :w]``, so the bulk is written once instead of zeroed and then written."""
    h, w = hw
    shape = (*lead, h, w) if pad_to is None else (*lead, pad_to, pad_to)
    if pad_to is not None and (h > pad_to or w > pad_to):
        raise ValueError(f"{h}x{w} does not fit pad_to={pad_to}")
    if out is None:
        out = np.empty(shape, dtype)
    elif out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out is {out.shape} {out.dtype}, expected {shape} {np.dtype(dtype)}")
    if pad_to is None:
        return out
    out[..., h:, :] = 0
    out[..., :h, w:] = 0
    return out


# ---------------------------------------------------------------------------------------------- masks
def rle_counts(rle: dict) -> np.ndarray:
    """Run lengths (int64, column-major, starting with a 0-run) of a COCO RLE, compressed or not.

    The compressed string stores each count in 5-bit groups (``char − 48``; bit 0x20 = more groups follow,
    0x10 of the last group = negative) and every count after the second as a delta to the count two before.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    if not raw:
        return np.zeros(0, np.int64)
    a = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if a.min() < 0 or a.max() > 63:
        raise ValueError("RLE counts string has characters outside the COCO alphabet")
    ends = np.flatnonzero((a & 0x20) == 0)  # last group of each count
    if len(ends) == 0 or ends[-1] != len(a) - 1:
        raise ValueError("truncated RLE counts string")
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    first = np.zeros(len(a), bool)
    first[starts] = True
    shift = 5 * (np.arange(len(a)) - starts[np.cumsum(first) - 1])  # 5·(group index within its count)
    vals = np.add.reduceat((a & 0x1F) << shift, starts)
    neg = (a[ends] & 0x10) != 0
    if neg.any():  # sign-extend from the top bit of the last group
        vals[neg] -= np.left_shift(1, shift[ends[neg]] + 5)
    if len(vals) > 3:  # undo the delta coding, separately for odd and even positions
        vals[3::2] = np.cumsum(vals[3::2]) + vals[1]
    if len(vals) > 4:
        vals[4::2] = np.cumsum(vals[4::2]) + vals[2]
    return vals


@functools.lru_cache(maxsize=64)
def _nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position, exactly as torch's ``nearest-exact`` computes it
    (``floorf((i + 0.5) · scale)`` with a float32 ``scale = n_in / n_out``), clipped to ``n_in − 1``."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.floor(((np.arange(n_out, dtype=np.float64) + 0.5) * scale).astype(np.float32)).astype(np.int64)
    return np.minimum(src, n_in - 1)


@functools.lru_cache(maxsize=64)
def _row_plan(h: int, sh: int) -> np.ndarray:
    """``cum[y]`` = number of output rows whose source row is < ``y`` (length h+1): maps a run boundary at
    source row y to output row ``cum[y]``, which scales a column's runs without touching pixels."""
    src = _nearest_exact_index(h, sh)
    return np.searchsorted(src, np.arange(h + 1), side="left")


def masks_to_frame(
    rles: Sequence[dict], hw: tuple[int, int], pad_to: int | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """N RLEs (same size ``H×W``) → ``N×hw`` (or ``N×P×P`` zero-padded) uint8 masks, nearest-exact resized
    (``out``: a uint8 array of that shape to fill, as in :func:`normalize_chw`).

    Per mask: run boundaries are moved to the output's rows in run-length space (a column of H source pixels
    becomes ``hw[0]`` output pixels), expanded with one ``np.repeat``, output columns gathered, transposed by
    OpenCV straight into the padded output. Cost is about one pass over the output pixels.
    """
    sh, sw = hw
    out = _padded((len(rles),), hw, pad_to, np.uint8, out)
    if not rles:
        return out
    h, w = (int(v) for v in rles[0]["size"])
    rows = _row_plan(h, sh)
    cols = _nearest_exact_index(w, sw)
    for i, rle in enumerate(rles):
        if [int(v) for v in rle["size"]] != [h, w]:
            raise ValueError(f"mask {i} is {list(rle['size'])}, mask 0 is {[h, w]}")
        counts = rle_counts(rle)
        ends = np.cumsum(counts)
        if len(ends) and ends[-1] != h * w:
            raise ValueError(f"mask {i}: RLE counts sum to {int(ends[-1])}, size is {h}x{w}")
        x, y = np.divmod(ends, h)
        new_counts = np.diff(x * sh + rows[y], prepend=0)  # run ends in the (w, sh) column-major grid
        values = np.zeros(len(counts), np.uint8)
        values[1::2] = 1
        by_col = np.repeat(values, new_counts).reshape(w, sh)  # row x = source column x, rows already scaled
        cv2.transpose(by_col[cols], dst=out[i, :sh, :sw])  # gather output columns, then (sw, sh) → (sh, sw)
    return out


def masks_to_frame_any(rles: Sequence[dict], hw: tuple[int, int], pad_to: int | None = None) -> np.ndarray:
    """Union of all ``rles`` in the frame (``hw`` or ``P×P``), bool — for ``ignore`` regions."""
    if not rles:
        out_hw = (pad_to, pad_to) if pad_to else hw
        return np.zeros(out_hw, bool)
    return masks_to_frame(rles, hw, pad_to).any(axis=0)


# ---------------------------------------------------------------------------------------------- stage
# transforms
def expand_to_square(img: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """``HxWx3`` → ``MxMx3`` (M = max(H, W)), the image centred on a ``fill`` background — LLaVA/X-SAM's
    ``expand2square`` (stage-2 SigLIP input, filled with the SigLIP mean colour), before the one resize."""
    h, w = img.shape[:2]
    if h == w:
        return img
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    return cv2.copyMakeBorder(
        img, top, m - h - top, left, m - w - left, cv2.BORDER_CONSTANT, value=tuple(int(v) for v in fill)
    )


def jitter_geometry(h: int, w: int, size: int, scale: float) -> tuple[int, int, int, int, int, int]:
    """Large-scale jitter (X-SAM stage 1, ``image_processing_sam.py``): fit ``h×w`` into ``(size·scale)²``,
    then centre-crop to at most ``size×size``. Returns ``(rh, rw, top, left, ch, cw)``: the fitted size, the
    crop's corner in it and the crop's size (the image part of the padded frame)."""
    target = int(size * scale + 0.5)
    r = min(target / h, target / w)
    rh, rw = max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))
    ch, cw = min(size, rh), min(size, rw)
    return rh, rw, (rh - ch) // 2, (rw - cw) // 2, ch, cw


def _inverse_affine(h: int, w: int, geom: tuple[int, ...]) -> np.ndarray:
    """Output pixel → source pixel (pixel centres, as ``cv2.resize``) of the fitted-and-cropped frame."""
    rh, rw, top, left = geom[:4]
    sy, sx = h / rh, w / rw
    return np.array([[sx, 0, (left + 0.5) * sx - 0.5], [0, sy, (top + 0.5) * sy - 0.5]], np.float64)


def jitter_image(img: np.ndarray, geom: tuple[int, ...]) -> np.ndarray:
    """``HxWx3`` → the ``ch×cw`` crop of the image fitted to ``rh×rw``, with one resample: a plain resize
    (box filter when shrinking) when nothing is cropped, else one affine warp straight into the crop (an
    enlarged image is never built)."""
    h, w = img.shape[:2]
    rh, rw, top, left, ch, cw = geom
    if (ch, cw) == (rh, rw):
        return resize(img, (rh, rw), "bilinear")
    if rh <= h and rw <= w:  # shrinking but cropped (a huge image): box filter, then slice
        return np.ascontiguousarray(resize(img, (rh, rw), "bilinear")[top : top + ch, left : left + cw])
    m = _inverse_affine(h, w, geom)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(img, m, (cw, ch), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def jitter_masks(
    rles: Sequence[dict], geom: tuple[int, ...], pad_to: int, out: np.ndarray | None = None
) -> np.ndarray:
    """N RLEs → ``N×P×P`` uint8 through the same geometry as :func:`jitter_image` (nearest), zero-padded."""
    rh, rw, top, left, ch, cw = geom
    out = _padded((len(rles),), (ch, cw), pad_to, np.uint8, out)
    if not rles:
        return out
    h, w = (int(v) for v in rles[0]["size"])
    if (ch, cw) == (rh, rw) or (rh <= h and rw <= w):
        full = masks_to_frame(rles, (rh, rw))
        out[:, :ch, :cw] = full[:, top : top + ch, left : left + cw]
        return out
    m = _inverse_affine(h, w, geom)
    for i, src in enumerate(masks_to_frame(rles, (h, w))):
        cv2.warpAffine(src, m, (cw, ch), dst=out[i, :ch, :cw], flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    return out


# ---------------------------------------------------------------------------------------------- both encoders
def image_inputs(
    data: bytes,
    *,
    siglip_size: int = 384,
    sam_size: int = 1024,
    siglip_mean: Sequence[float] = SIGLIP_MEAN,
    siglip_std: Sequence[float] = SIGLIP_STD,
    sam_mean: Sequence[float] = SAM_MEAN,
    sam_std: Sequence[float] = SAM_STD,
    expect_hw: tuple[int, int] | None = None,
    alloc: Callable[[tuple[int, ...], type], np.ndarray] | None = None,
    sam_scale: float | None = None,
    siglip_pad_square: bool = False,
) -> dict[str, np.ndarray | tuple[int, int]]:
    """Image bytes → X-SAM's two encoder inputs, each resized once from the decoded original.

    Returns ``pixel_values`` 3×S×S float32 (SigLIP: plain bicubic resize to S², normalised),
    ``extra_pixel_values`` 3×L×L float32 (SAM: longest side L bilinear, normalised, zero pad bottom/right),
    ``scaled_size`` (h, w) inside the SAM frame, ``image_hw`` the decoded size. ``alloc(shape, dtype)``, if
    given, provides the two output arrays (e.g. numpy views of shared-memory tensors).

    Stage transforms: ``sam_scale`` = one large-scale-jitter draw (:func:`jitter_geometry`; the SAM image is
    fitted into ``(L·scale)²``, centre-cropped to L, padded; ``sam_geometry`` is returned for
    :func:`jitter_masks`, None without jitter); ``siglip_pad_square`` centres the image on a square of the
    SigLIP mean colour before its resize (:func:`expand_to_square`).
    """
    img = decode_image(data)
    if expect_hw is not None and img.shape[:2] != tuple(expect_hw):
        raise ImageDecodeError(
            f"image is {img.shape[0]}x{img.shape[1]}, expected {expect_hw[0]}x{expect_hw[1]}"
        )
    new = alloc or (lambda shape, dtype: None)
    square = expand_to_square(img, [int(m * 255) for m in siglip_mean]) if siglip_pad_square else img
    siglip = normalize_chw(
        resize(square, (siglip_size, siglip_size), "bicubic"),
        siglip_mean,
        siglip_std,
        out=new((3, siglip_size, siglip_size), np.float32),
    )
    geom = None
    if sam_scale is None:
        sam_img, hw = resize_longest(img, sam_size, "bilinear")
    else:
        geom = jitter_geometry(img.shape[0], img.shape[1], sam_size, sam_scale)
        sam_img, hw = jitter_image(img, geom), geom[4:]
    sam = normalize_chw(
        sam_img, sam_mean, sam_std, pad_to=sam_size, out=new((3, sam_size, sam_size), np.float32)
    )
    return {
        "pixel_values": siglip,
        "extra_pixel_values": sam,
        "scaled_size": hw,
        "image_hw": img.shape[:2],
        "sam_geometry": geom,
    }
