"""``predictions.jsonl``: the contract between inference and scoring (DESIGN §4.8).

One JSON object per line, one line per sample key::

    {"key": "refcoco/val/…", "text": "<generated answer>" | null,
     "panoptic":  [{"rle": {"size": [h, w], "counts": "…"}, "category_id": 17}, …],          # PQ, mIoU
     "instances": [{"rle": {…}, "category_id": 17, "score": 0.93}, …],                       # AP
     "masks":     [{"rle": {…}, "label": 0}, …]}          # <SEG> turn (refseg/reaseg/intseg) or <p> span (GCG)

RLEs are COCO *compressed* RLE at the original image size; ``panoptic`` segments never overlap; a field a
task does not use may be omitted. This module reads and checks what can be checked without the ground truth:
the file is indexed once (key -> byte span, nothing else kept), a worker reads back only the lines it scores,
and every RLE is validated in numpy before pycocotools sees it (a malformed compressed string would make
its C decoder read or write out of bounds).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from orchestrate.evaluation.errors import EvaluationError, listing, where

FIELDS = ("key", "text", "panoptic", "instances", "masks")
_MAX_GROUP = 7  # chars of one compressed count: 7 x 5 bits covers any uint32 count


@dataclass(frozen=True)
class PredRef:
    """Where one prediction sits in the file: 1-based line number, byte offset and length."""

    line: int
    offset: int
    length: int


@dataclass
class Prediction:
    """One parsed line. A field the line omits is ``None`` (not the same as an empty list)."""

    key: str
    line: int
    text: str | None = None
    panoptic: list[tuple[dict, int]] | None = None  # (rle, category_id)
    instances: list[tuple[dict, int, float]] | None = None  # (rle, category_id, score)
    masks: list[tuple[dict, int]] | None = None  # (rle, label)
    present: set[str] = field(default_factory=set)


# ------------------------------------------------------------------------------------------ the index
def index_predictions(path: str) -> dict[str, PredRef]:
    """``{key: PredRef}`` of every line; a truncated or non-object line, a missing key or a duplicated key is
    an :class:`EvaluationError` naming the file and line (all duplicates listed)."""
    refs: dict[str, PredRef] = {}
    duplicates: list[str] = []
    offset = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read the predictions file: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            length = len(raw)
            if raw.strip():
                key = _line_key(raw, path, n)
                if key in refs:
                    duplicates.append(f"{key!r} (lines {refs[key].line} and {n})")
                else:
                    refs[key] = PredRef(n, offset, length)
            offset += length
    if duplicates:
        raise EvaluationError(f"{path}: {len(duplicates)} duplicated keys: {listing(duplicates)}")
    return refs


def _line_key(raw: bytes, path: str, n: int) -> str:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        cut = "" if raw.endswith(b"\n") else " (truncated last line?)"
        raise EvaluationError(
            f"{where(path, n)}: not valid JSON{cut}: {e.msg if hasattr(e, 'msg') else e}"
        ) from None
    if not isinstance(obj, dict):
        raise EvaluationError(f"{where(path, n)}: a line must be a JSON object, got {type(obj).__name__}")
    key = obj.get("key")
    if not isinstance(key, str) or not key:
        raise EvaluationError(f"{where(path, n)}: no string 'key'")
    return key


class PredictionReader:
    """Reads single lines back by :class:`PredRef` (one open file, one seek per line)."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb")

    def read(self, ref: PredRef) -> Prediction:
        self._f.seek(ref.offset)
        raw = self._f.read(ref.length)
        if len(raw) != ref.length:
            raise EvaluationError(f"{where(self.path, ref.line)}: the file changed while it was scored")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EvaluationError(
                f"{where(self.path, ref.line)}: the file changed while it was scored"
            ) from None
        return parse_prediction(obj, self.path, ref.line)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PredictionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_predictions(path: str, refs: Iterable[PredRef]) -> Iterator[Prediction]:
    """Parse and structurally check the lines at ``refs``."""
    with PredictionReader(path) as reader:
        for ref in refs:
            yield reader.read(ref)


# ------------------------------------------------------------------------------------------ one line
def parse_prediction(obj: dict, path: str, line: int) -> Prediction:
    """Check the types and RLE encodings of one line (sizes against the image come later, with the GT)."""
    key = obj["key"]
    loc = where(path, line, key)
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise EvaluationError(f"{loc}: unknown field(s) {unknown}; a line has {list(FIELDS)}")
    pred = Prediction(key=key, line=line, present=set(obj) - {"key"})
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise EvaluationError(f"{loc}: 'text' must be a string or null, got {type(text).__name__}")
    pred.text = text
    if "panoptic" in obj:
        pred.panoptic = [
            (_rle(e, loc, f"panoptic[{i}]"), _int(e, "category_id", loc, f"panoptic[{i}]"))
            for i, e in enumerate(_entries(obj, "panoptic", loc))
        ]
    if "instances" in obj:
        pred.instances = [
            (
                _rle(e, loc, f"instances[{i}]"),
                _int(e, "category_id", loc, f"instances[{i}]"),
                _score(e, loc, f"instances[{i}]"),
            )
            for i, e in enumerate(_entries(obj, "instances", loc))
        ]
    if "masks" in obj:
        pred.masks = [
            (_rle(e, loc, f"masks[{i}]"), _int(e, "label", loc, f"masks[{i}]"))
            for i, e in enumerate(_entries(obj, "masks", loc))
        ]
    return pred


def _entries(obj: dict, name: str, loc: str) -> list[dict]:
    value = obj[name]
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise EvaluationError(f"{loc}: '{name}' must be a list of objects")
    return value


def _int(entry: dict, name: str, loc: str, what: str) -> int:
    v = entry.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise EvaluationError(f"{loc}: {what}.{name} must be an integer, got {v!r}")
    return v


def _score(entry: dict, loc: str, what: str) -> float:
    v = entry.get("score")
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise EvaluationError(f"{loc}: {what}.score must be a finite number, got {v!r}")
    return float(v)


def _rle(entry: dict, loc: str, what: str) -> dict:
    rle = entry.get("rle")
    if not isinstance(rle, dict) or set(rle) != {"size", "counts"}:
        raise EvaluationError(f"{loc}: {what}.rle must be {{'size': [h, w], 'counts': str}}")
    size = rle["size"]
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**16 for v in size)
    ):
        raise EvaluationError(f"{loc}: {what}.rle.size must be [h, w] (positive ints), got {size!r}")
    problem = rle_problem(rle["counts"], size[0] * size[1])
    if problem:
        raise EvaluationError(f"{loc}: {what}.rle: {problem}")
    return rle


def rle_problem(counts: object, num_pixels: int) -> str | None:
    """Why ``counts`` is not a valid compressed RLE of ``num_pixels`` pixels, or ``None``.

    Mirrors pycocotools' ``rleFrString`` in numpy: characters 48..111, each count a little-endian run of
    5-bit groups (bit 0x20 = more follows, bit 0x10 of the last = negative), counts from the 4th on stored
    as the difference to the count two before. The counts must be non-negative and sum to ``h*w``.
    """
    if not isinstance(counts, str):
        return "counts must be a compressed RLE string (uncompressed lists are not accepted)"
    if not counts:
        return "empty counts"
    if not counts.isascii():
        return "counts has non-ASCII characters"
    c = np.frombuffer(counts.encode("ascii"), np.uint8)
    if c.min() < 48 or c.max() > 111:
        return "counts has characters outside the RLE alphabet"
    if (c[-1] - 48) & 0x20:
        return "counts ends inside a number (truncated)"
    cnts = decode_counts(counts)
    if cnts is None:
        return "counts has a number too long for 32 bits"
    if (cnts < 0).any() or (cnts >= 2**32).any():
        return "counts decodes to a negative or oversized run"
    if int(cnts.sum()) != num_pixels:
        return f"counts cover {int(cnts.sum())} pixels, the size says {num_pixels}"
    return None


@functools.lru_cache(maxsize=512)  # about one image's GT + predicted RLEs, a few MB at most
def decode_counts(counts: str) -> np.ndarray | None:
    """The run lengths of a compressed RLE string (``None`` if a number has more than 7 characters).

    Unchecked: call it on strings :func:`rle_problem` accepted or pycocotools wrote. Cached, because a
    prediction's RLEs are validated when read and decoded again when painted.
    """
    c = np.frombuffer(counts.encode("ascii"), np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0  # a number ends at a char without the continuation bit
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    group = np.cumsum(np.concatenate(([False], last[:-1])))  # number index of every char
    pos = np.arange(c.size) - starts[group]  # position of a char inside its number
    if pos.max() >= _MAX_GROUP:
        return None
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    neg = (c[last] & 0x10) != 0
    x[neg] -= np.left_shift(1, 5 * (pos[last][neg] + 1))  # sign-extend, as `x |= -1 << 5k`
    cnts = x.copy()
    cnts[3::2] = np.cumsum(x[1::2])[1:]  # m >= 3: x[m] + cnts[m-2]
    if x.size > 4:
        cnts[4::2] = x[2] + np.cumsum(x[4::2])
    cnts.flags.writeable = False  # shared through the cache
    return cnts
