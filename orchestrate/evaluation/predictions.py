"""``predictions.jsonl``: the contract between inference and scoring
(docs/contracts.md#predictions-and-results).

One JSON object per line, one line per sample key::

    {"key": "refcoco/val/…", "text": "<generated answer>" | null,
     "panoptic":  [{"rle": {"size": [h, w], "counts": "…"}, "category_id": 17}, …],   # PQ, mIoU
     "semantic":  [{"rle": {…}, "category_id": 17}, …],   # COCO panoptic sets: the dense semantic pass
     "instances": [{"rle": {…}, "category_id": 17, "score": 0.93}, …],                # AP
     "masks":     [{"rle": {…}, "label": 0}, …]}   # <SEG> turn (refseg/reaseg/intseg) or <p> span (GCG)

RLEs are COCO *compressed* RLE at the original image size; ``panoptic`` segments never overlap; a field a
task does not use may be omitted. This module reads and checks what can be checked without the ground truth:
the file is indexed once (key -> byte span, nothing else kept), a worker reads back only the lines it scores,
and every RLE is validated in numpy before pycocotools sees it (a malformed compressed string would make
its C decoder read or write out of bounds).

Hostile files are refused in one line before they cost time or memory (docs/evaluation.md): the file must be
a regular file (a FIFO or ``/dev/zero`` would block or never end), a line at most :data:`MAX_LINE_BYTES`, a
``text`` at most :data:`MAX_TEXT_CHARS`, a line's JSON nested at most as deep as Python's parser recurses, and
an RLE's ``counts`` at most :func:`max_counts_chars` of its size (checked from the length, before decoding).
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from orchestrate.evaluation.eval_errors import EvaluationError, listing, where

FIELDS = ("key", "text", "panoptic", "semantic", "instances", "masks")
_MAX_GROUP = 7  # chars of one compressed count: 7 x 5 bits covers any uint32 count
MAX_TEXT_CHARS = 65_536
"""Longest ``text`` a prediction may hold. A generated answer is at most ``--max-new-tokens`` tokens (512 by
default: a few KB of text), so 64 K characters leave room for any real answer while bounding what the caption
cleaning, the ``<p>`` parse and the Java PTB tokenizer are given."""
MAX_LINE_BYTES = 64 << 20
"""Longest line of a predictions file (64 MiB): one image's prediction; 200 panoptic segments of a 4K image
take a few MB. A line is read with this limit, so a file without newlines is refused, not read whole."""


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
    semantic: list[tuple[dict, int]] | None = None  # (rle, category_id): every pixel a class
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
    with open_regular(path, "the predictions file") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            length = len(raw)
            if length > MAX_LINE_BYTES:
                raise EvaluationError(f"{where(path, n)}: a line longer than {MAX_LINE_BYTES} bytes")
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


def open_regular(path: str, what: str, max_bytes: int | None = None):
    """``path`` opened for binary reading when it is a regular file (at most ``max_bytes``), else an
    :class:`EvaluationError` naming it: a FIFO would block the reader, a device such as ``/dev/zero`` never
    ends. Opened without blocking, so a FIFO is refused rather than waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read {what}: {e.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode)
            else "not a file"
        )
        problem = f"{what} must be a regular file, this is {kind}"
    elif max_bytes is not None and st.st_size > max_bytes:
        problem = f"{what} is {st.st_size} bytes, more than the limit of {max_bytes}"
    if problem:
        os.close(fd)
        raise EvaluationError(f"{path}: {problem}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def load_line(raw: bytes) -> object:
    """``json.loads`` whose too-deep nesting is a ``ValueError`` like any other malformed line."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _line_key(raw: bytes, path: str, n: int) -> str:
    try:
        obj = load_line(raw)
    except (ValueError, UnicodeDecodeError) as e:
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
        self._f = open_regular(path, "the predictions file")

    def read(self, ref: PredRef) -> Prediction:
        self._f.seek(ref.offset)
        raw = self._f.read(ref.length)
        if len(raw) != ref.length:
            raise EvaluationError(f"{where(self.path, ref.line)}: the file changed while it was scored")
        try:
            obj = load_line(raw)
        except (ValueError, UnicodeDecodeError):
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
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise EvaluationError(f"{loc}: 'text' has {len(text)} characters, more than {MAX_TEXT_CHARS}")
    pred.text = text
    for name in ("panoptic", "semantic"):
        if name in obj:
            segs = [
                (_rle(e, loc, f"{name}[{i}]"), _int(e, "category_id", loc, f"{name}[{i}]"))
                for i, e in enumerate(_entries(obj, name, loc))
            ]
            setattr(pred, name, segs)
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
    problem = rle_problem(rle["counts"], size[0] * size[1])  # from its length first, then decoded
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
    if len(counts) > max_counts_chars(num_pixels):
        return f"counts has {len(counts)} characters, more than an RLE of {num_pixels} pixels can have"
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


def max_counts_chars(num_pixels: int) -> int:
    """The longest compressed RLE string of a mask of ``num_pixels`` pixels: every run but the first and the
    last covers at least one pixel (pycocotools leaves a run empty only there: the first when the mask starts
    with a 1, the last after some merges), so there are at most ``num_pixels + 2`` runs, each written in at
    most ``_MAX_GROUP`` characters (7 x 5 bits hold any 32-bit count). A longer string would need an empty
    run inside, and is refused from its length, before anything is allocated for it."""
    return _MAX_GROUP * (num_pixels + 2)


def phrase_spans(text: str) -> list[str]:
    """The phrases between ``<p>`` and ``</p>`` (stripped), as ``re.findall(r"<p>(.*?)</p>", text,
    re.DOTALL)`` finds them, in one forward scan: each search starts where the previous one ended, so the
    time is linear in ``len(text)`` (the regex retries every ``<p>`` to the end of the text: quadratic when
    ``</p>`` is missing)."""
    out, pos = [], 0
    while (start := text.find("<p>", pos)) >= 0:
        end = text.find("</p>", start + 3)
        if end < 0:  # no later <p> can be closed either
            break
        out.append(text[start + 3 : end].strip())
        pos = end + 4
    return out


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
