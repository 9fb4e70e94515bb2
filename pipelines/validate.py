"""Values from annotation files, checked before they reach a C library (pycocotools, OpenCV, numpy casts).

Annotation files are untrusted (docs/integrity.md): Python's ``json`` writes ``NaN`` and ``Infinity``, a
careless or hostile file holds strings where numbers belong, counts beyond ``uint32``, ids beyond ``int64`` or
nesting thousands of levels deep. Each of these crashed a build from inside native code (a segfault in
pycocotools, an ``OverflowError`` in a numpy cast, a ``RecursionError`` in ``json``). Every check here raises
:class:`~pipelines.errors.SkipRecord` (or its :class:`~pipelines.errors.MaskFormatError` subclass for
segmentations) with a reason of its own, so the caller records a skip naming the record instead of dying.

Shapes: polygons are ``[[x1, y1, x2, y2, …], …]`` in pixels; an RLE is ``{"size": [h, w], "counts": …}`` with
``counts`` a list of run lengths (uncompressed) or COCO's compressed string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.errors import MaskFormatError, SkipRecord

MAX_DEPTH = 64  # deepest JSON nesting an annotation element may have (COCO segmentations need 4)
MAX_SIDE = 1 << 16  # an image side beyond this is no image this pipeline can hold
INT64 = (-(1 << 63), (1 << 63) - 1)
UINT32_MAX = (1 << 32) - 1


def check_int(value: Any, what: str, lo: int = INT64[0], hi: int = INT64[1], reason: str = "bad_id") -> int:
    """``value`` as an int in ``[lo, hi]`` (an integral float is accepted, a bool or string is not)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SkipRecord(reason, f"{what} is {type(value).__name__} {_short(value)}, expected an integer")
    if not lo <= value <= hi:
        raise SkipRecord(reason, f"{what} {_short(value)} is outside [{lo}, {hi}]")
    return value


def check_id(value: Any, what: str) -> int | str:
    """An annotation/segment/image id: an int within int64 or a non-empty string."""
    if isinstance(value, str) and value:
        return value
    return check_int(value, what)


def require(record: Any, key: str, types: type | tuple[type, ...], what: str) -> Any:
    """``record[key]`` if ``record`` is a dict holding it with one of ``types``; a skip naming it
    otherwise."""
    if not isinstance(record, dict):
        raise SkipRecord("wrong_type", f"{what} is {type(record).__name__}, expected an object")
    if key not in record:
        raise SkipRecord("missing_key", f"{what} has no {key!r}")
    value = record[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise SkipRecord("wrong_type", f"{what}.{key} is {type(value).__name__}, expected {names}")
    return value


def check_polygons(
    polygons: Any, height: int, width: int, on_bad_part: Callable[[str, str], None] | None = None
) -> list[list[float]]:
    """Polygon parts as float lists, each with an even count >= 6 of finite numbers near the image.

    ``on_bad_part(reason, detail)``: a part with too few numbers or an odd count is left out and reported
    (``bad_polygon_part``), the good parts kept, as X-SAM filters parts (only when a good part remains: a
    polygon with no good part is a ``bad_polygon`` error); without it, such a part fails the whole polygon.

    A coordinate may lie outside the image (COCO has slightly negative ones) but not by more than the image's
    larger side: pycocotools rasterises the outline at 5x and casts to C ints, so 1e300 or NaN is undefined
    behaviour there and 1e8 a multi-gigabyte allocation.
    """
    if not isinstance(polygons, list) or not polygons:
        raise MaskFormatError("bad_polygon", "empty polygon list")
    side = max(height, width)
    lo, hi = -float(side), 2.0 * side
    out, bad = [], []
    for i, part in enumerate(polygons):
        if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
            n = len(part) if isinstance(part, list) else type(part).__name__
            detail = f"polygon part {i} with {n} numbers (need an even count >= 6)"
            if on_bad_part is None:
                raise MaskFormatError("bad_polygon", detail)
            bad.append(detail)
            continue
        try:
            arr = np.asarray(part, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise MaskFormatError("bad_coordinate", f"polygon holds a non-number: {_short(part)}") from None
        if any(isinstance(v, str | bool) for v in part):  # np.asarray would have parsed "12" as 12.0
            raise MaskFormatError("bad_coordinate", f"polygon holds a non-number: {_short(part)}")
        if not np.isfinite(arr).all():
            raise MaskFormatError("bad_coordinate", f"polygon holds NaN or infinity: {_short(part)}")
        if arr.min() < lo or arr.max() > hi:
            raise MaskFormatError(
                "bad_coordinate",
                f"polygon coordinate {arr[np.argmax(np.abs(arr))]:g} outside [{lo:g}, {hi:g}]",
            )
        out.append(arr.tolist())
    if not out:
        raise MaskFormatError("bad_polygon", f"no usable polygon part: {'; '.join(bad)[:200]}")
    for detail in bad:  # reported once the polygon is known to survive, so nothing is counted twice
        on_bad_part("bad_polygon_part", detail)
    return out


def check_rle(segm: dict, height: int, width: int) -> None:
    """An RLE's size is the image's and its runs cover exactly ``height * width`` pixels.

    pycocotools decodes run lengths into a buffer of ``h*w`` bytes without bounds checks, so a count beyond
    uint32, a negative run or runs summing past the image would write outside it.
    """
    size = segm.get("size")
    if not isinstance(size, list) or len(size) != 2:
        raise MaskFormatError("bad_rle", f"RLE size {_short(size)} is not [height, width]")
    h = check_int(size[0], "RLE height", 1, MAX_SIDE, reason="bad_rle")
    w = check_int(size[1], "RLE width", 1, MAX_SIDE, reason="bad_rle")
    if [h, w] != [height, width]:
        raise MaskFormatError("rle_size_mismatch", f"RLE size {[h, w]} != image {[height, width]}")
    counts = segm.get("counts")
    if isinstance(counts, list):
        runs = _uncompressed_runs(counts)
    elif isinstance(counts, str | bytes):
        runs = _compressed_runs(counts.encode("ascii", "replace") if isinstance(counts, str) else counts)
    else:
        raise MaskFormatError("bad_rle", f"RLE counts is {type(counts).__name__}")
    if runs != h * w:
        raise MaskFormatError("bad_rle", f"RLE runs cover {runs} pixels, the image has {h * w}")


def _uncompressed_runs(counts: list) -> int:
    if any(not isinstance(c, int) or isinstance(c, bool) for c in counts):
        raise MaskFormatError("bad_rle", "RLE counts holds a non-integer")
    if counts and (min(counts) < 0 or max(counts) > UINT32_MAX):
        raise MaskFormatError("bad_rle", f"RLE count outside [0, {UINT32_MAX}]")
    return sum(counts)


def _compressed_runs(s: bytes) -> int:
    """Total of COCO's compressed counts (pycocotools' rleFrString, in Python): 5 bits a char from 48,
    0x20 continues a number, the last char's 0x10 is its sign, counts from the third on are deltas."""
    total, prev2, prev1, i, m = 0, 0, 0, 0, 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            if i >= len(s):
                raise MaskFormatError("bad_rle", "RLE string ends inside a number")
            c = s[i] - 48
            if not 0 <= c < 64:
                raise MaskFormatError("bad_rle", f"RLE string holds byte {s[i]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i, k = i + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
            if k > 7:
                raise MaskFormatError("bad_rle", "RLE string holds a number beyond 32 bits")
        if m > 2:
            x += prev2
        if not 0 <= x <= UINT32_MAX:
            raise MaskFormatError("bad_rle", f"RLE run {x} outside [0, {UINT32_MAX}]")
        total += x
        prev2, prev1, m = prev1, x, m + 1
    return total


def loads(raw: bytes | str, what: str) -> Any:
    """``json.loads`` of one annotation element, refusing nesting deeper than :data:`MAX_DEPTH`."""
    if too_deep(raw):
        raise SkipRecord("too_deep", f"{what}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipRecord("malformed_json", f"{what}: {e}") from None


def too_deep(raw: bytes | str) -> bool:
    """Whether a JSON text nests deeper than :data:`MAX_DEPTH` (brackets inside strings are told apart only
    when a cheap upper bound — every opening bracket, then the running bracket depth — is over the limit)."""
    data = raw.encode() if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False
    b = np.frombuffer(data, np.uint8)
    step = np.isin(b, (91, 123)).astype(np.int32) - np.isin(b, (93, 125))
    if int(np.cumsum(step).max(initial=0)) <= MAX_DEPTH:
        return False
    return _exact_depth(raw) > MAX_DEPTH


def file_too_deep(path: str, block_size: int = 8 << 20) -> int | None:
    """The byte offset where a JSON file first nests deeper than :data:`MAX_DEPTH`, or None.

    For files read by ijson, whose C backend dies (stack overflow) on an element nested a million levels deep
    before Python sees it: one vectorised pass, strings told apart by their unescaped quotes, state carried
    from block to block.
    """
    depth, in_str, backslashes, base = 0, 0, 0, 0
    with open(path, "rb") as f:
        while block := f.read(block_size):
            b = np.frombuffer(block, np.uint8)
            idx = np.arange(len(b))
            is_bs = b == 92
            last_other = np.maximum.accumulate(np.where(is_bs, -1, idx))
            # backslashes right before each byte (those before the block carried in)
            before = np.concatenate(([-1], last_other[:-1]))
            run = np.where(before >= 0, idx - 1 - before, idx + backslashes)
            quote = (b == 34) & (run % 2 == 0)
            parity = (in_str + np.cumsum(quote) - quote) % 2  # 1: this byte is inside a string
            step = (np.isin(b, (91, 123)).astype(np.int64) - np.isin(b, (93, 125))) * (parity == 0)
            run_depth = depth + np.cumsum(step)
            over = np.flatnonzero(run_depth > MAX_DEPTH)
            if over.size:
                return base + int(over[0])
            depth, in_str = int(run_depth[-1]), int((in_str + quote.sum()) % 2)
            backslashes = len(b) - 1 - int(last_other[-1]) if last_other[-1] >= 0 else backslashes + len(b)
            base += len(b)
    return None


def _exact_depth(raw: bytes | str) -> int:
    """The nesting depth outside strings, by a scan that skips string bodies (rarely needed)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    depth = best = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
