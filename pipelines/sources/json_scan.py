"""Fast, memory-bounded scanning of the top-level arrays of a big JSON object (COCO / LVIS files).

Every element of every top-level array (``images``, ``annotations``, ``categories`` …) comes back as its raw
bytes, in file order, in **one** pass over the file, holding one read block (8 MiB) and one element at a time.
Nothing is parsed into Python objects here: the caller ``json.loads`` the small elements it needs and can
carry big ones (polygons) on as raw text, so the indexing driver never pays for building millions of floats.

Why not ijson: its event stream costs about as much as ``json.load`` (≈20 s for a 450 MB LVIS-style file on
a 2-core box, per pass), and COCO files need two passes because ``images`` may come after ``annotations``.
Here an element is delimited by one C-level regular-expression match (objects nested up to two levels deep,
which covers every COCO-style element, RLE dicts included); deeper elements fall back to a bracket walker
that handles any depth. The scanner checks structure (brackets, strings, separators), not value syntax:
callers parse what they use, and a malformed element fails there with the file named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container, Iterator

from pipelines.jsonstream import MalformedJSON

BLOCK_SIZE = 8 << 20

_STR = rb'"(?:[^"\\]++|\\.)*+"'
_FLAT = rb"(?:[^{}\"]++|" + _STR + rb")*+"  # object body without nested objects
OBJECT = rb"\{(?:[^{}\"]++|" + _STR + rb"|\{" + _FLAT + rb"\})*+\}"  # nested objects one level deep
# An annotation-like object capturing three top-level scalars: "id", "image_id" (int or string) and
# "category_id". Keys of nested objects are matched by _FLAT, never captured.
ANNOTATION = (
    rb"\{(?:[^{}\"]++"
    rb'|"id"\s*+:\s*+(-?\d++)(?![.eE])'
    rb'|"image_id"\s*+:\s*+(-?\d++(?![.eE])|' + _STR + rb")"
    rb'|"category_id"\s*+:\s*+(-?\d++)(?![.eE])'
    rb"|" + _STR + rb"|\{" + _FLAT + rb"\})*+\}"
)
# An image-like object capturing its top-level "id" (int or string).
WITH_ID = rb"\{(?:[^{}\"]++" rb'|"id"\s*+:\s*+(-?\d++(?![.eE])|' + _STR + rb")" rb"|" + _STR + rb"|\{" + _FLAT + rb"\})*+\}"
_WS = re.compile(rb"[ \t\r\n]*+")
_TOKEN = re.compile(rb"(?:[^\[\]{}\"]++|" + _STR + rb")*+")  # up to the next bracket outside strings
_SCALAR = re.compile(rb"(?:" + _STR + rb"|[^\s,\]}\"\[{]++)")


def _element_pattern(source: bytes) -> tuple[re.Pattern, int]:
    """``source`` (an object regex) wrapped with its surrounding whitespace and the following ',' or ']'.

    One ``match`` then delimits an element and its separator in C; group 1 is the element, groups 2…
    the captures of ``source``.
    """
    pattern = re.compile(rb"[ \t\r\n]*+(" + source + rb")[ \t\r\n]*+[,\]]")
    return pattern, pattern.groups - 1


class _Buffer:
    """A sliding window over the file: ``data[pos:]`` is unread; ``more()`` appends a block."""

    def __init__(self, f, path: str, block_size: int):
        self.f, self.path, self.block_size = f, path, block_size
        self.data, self.pos, self.base, self.eof = b"", 0, 0, False

    def more(self) -> bool:
        if self.eof:
            return False
        # read at least as much as is pending, so an element longer than a block costs linear time overall
        chunk = self.f.read(max(self.block_size, len(self.data) - self.pos))
        if not chunk:
            self.eof = True
            return False
        self.base += self.pos
        self.data = self.data[self.pos :] + chunk
        self.pos = 0
        return True

    def error(self, what: str) -> MalformedJSON:
        return MalformedJSON(f"{self.path}: malformed JSON near byte {self.base + self.pos}: {what}")

    def peek(self) -> int:
        """The next non-whitespace byte (consumes the whitespace); raises at end of file."""
        while True:
            self.pos = _WS.match(self.data, self.pos).end()
            if self.pos < len(self.data):
                return self.data[self.pos]
            if not self.more():
                raise self.error("unexpected end of file")

    def expect(self, char: bytes) -> None:
        if self.peek() != char[0]:
            raise self.error(f"expected {char.decode()!r}, found {bytes([self.data[self.pos]])!r}")
        self.pos += 1

    def walk(self) -> int:
        """End index of the array/object starting at ``pos`` (any depth), reading more as needed."""
        while True:
            depth, p, data = 0, self.pos, self.data
            while True:
                p = _TOKEN.match(data, p).end()
                if p >= len(data):
                    break
                c = data[p]
                if c in b"{[":
                    depth += 1
                elif c in b"}]":
                    depth -= 1
                    if depth == 0:
                        return p + 1
                else:  # an unterminated string: the element continues in the next block
                    break
                p += 1
            if not self.more():
                raise self.error("unexpected end of file inside a value")

    def element(self) -> bytes:
        """The raw bytes of the value at ``pos`` (any depth, read on as needed); advances past it."""
        c = self.peek()
        if c in b"{[":
            end = self.walk()
            raw = self.data[self.pos : end]
            self.pos = end
            return raw
        while True:
            m = _SCALAR.match(self.data, self.pos)
            if m and (m.end() < len(self.data) or self.eof):
                self.pos = m.end()
                return m.group()
            if not self.more():
                raise self.error("bad value")


def _array(buf: _Buffer, key: str, pattern: re.Pattern, n_captures: int, wanted: bool) -> Iterator[list]:
    """Batches of the elements of the array whose '[' was just consumed, each ``(raw, *captures)``."""
    no_captures = (None,) * n_captures
    while True:
        # fast path: one C-level match per element and its separator, as far as the buffer goes; a batch
        # per buffer keeps the per-element cost a list append instead of a generator round trip
        data, pos, match = buf.data, buf.pos, pattern.match
        batch: list = []
        add = batch.append
        while True:
            m = match(data, pos)
            if m is None:
                break
            pos = m.end()
            if wanted:
                add(m.groups())
            if data[pos - 1] == 93:  # ']'
                buf.pos = pos
                if batch:
                    yield batch
                return
        buf.pos = pos
        if batch:
            yield batch
        # slow path: an element cut by the block end, nested deeper, a scalar, or the array's end
        if buf.peek() == 93:
            buf.pos += 1
            return
        raw = buf.element()
        if wanted:
            yield [(raw, *no_captures)]
        c = buf.peek()
        buf.pos += 1
        if c == 93:
            return
        if c != 44:  # ','
            buf.pos -= 1
            raise buf.error(f"expected ',' or ']' in {key!r}")


def iter_arrays(
    path: str,
    keys: Container[str] | None = None,
    patterns: dict[str, bytes] | None = None,
    block_size: int | None = None,
) -> Iterator[tuple[str, list[tuple]]]:
    """Yield ``(key, batch)`` for the elements of each top-level array, in file order, a batch at a time.

    Each element of a batch is ``(raw_bytes, *captures)``. ``keys``: only these arrays (others are scanned
    past); None = all. ``patterns``: per array, the regex source delimiting an object element (default
    :data:`OBJECT`); its capture groups follow the raw bytes, all None for an element the fallback walker
    delimited (the caller then parses the raw bytes). Top-level values that are not arrays are skipped.
    ``block_size``: bytes read at a time (default :data:`BLOCK_SIZE`).
    """
    patterns = patterns or {}
    compiled: dict[bytes, tuple[re.Pattern, int]] = {}
    with open(path, "rb") as f:
        buf = _Buffer(f, path, block_size or BLOCK_SIZE)
        while len(buf.data) < 3 and buf.more():
            pass
        if buf.data.startswith(b"\xef\xbb\xbf"):
            buf.pos = 3
        buf.expect(b"{")
        if buf.peek() == ord("}"):
            return
        while True:
            raw_key = buf.element()
            if not raw_key.startswith(b'"'):
                raise buf.error("expected a string key")
            key = json.loads(raw_key)
            buf.expect(b":")
            if buf.peek() != ord("["):
                buf.element()  # a non-array value: skipped
            else:
                buf.pos += 1
                source = patterns.get(key, OBJECT)
                if source not in compiled:
                    compiled[source] = _element_pattern(source)
                pattern, n_captures = compiled[source]
                for batch in _array(buf, key, pattern, n_captures, keys is None or key in keys):
                    yield key, batch
            c = buf.peek()
            buf.pos += 1
            if c == ord("}"):
                return
            if c != ord(","):
                buf.pos -= 1
                raise buf.error("expected ',' or '}' at the top level")


def loads(raw: bytes, path: str) -> object:
    """``json.loads`` of one scanned element, failing with the file named."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedJSON(f"{path}: malformed element {raw[:80]!r}: {e}") from None
