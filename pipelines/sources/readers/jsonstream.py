"""Streaming reads of big JSON annotation files (ijson's C backend): memory stays flat whatever the size.

A malformed file fails at once with :class:`MalformedJSON`, naming the file and the byte position.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import ijson

from pipelines import validate
from pipelines.errors import MalformedJSON

try:  # the C backend is ~10x faster; fall back quietly where it is not built
    _ijson = ijson.get_backend("yajl2_c")
except ImportError:  # pragma: no cover
    _ijson = ijson


def _fail(path: str, f, err: Exception) -> MalformedJSON:
    try:
        pos = f.tell()
    except (OSError, ValueError):
        pos = "?"
    return MalformedJSON(f"{path}: malformed JSON near byte {pos}: {err}")


def iter_items(path: str, prefix: str) -> Iterator[Any]:
    """Yield each element under ``prefix`` (ijson prefix, e.g. ``"images.item"`` or ``"item"``).

    The file's nesting depth is checked first: ijson's C backend crashes on a deep enough element."""
    if (pos := validate.file_too_deep(path)) is not None:
        raise MalformedJSON(f"{path}: JSON nested deeper than {validate.MAX_DEPTH} levels at byte {pos}")
    with open(path, "rb") as f:
        try:
            yield from _ijson.items(f, prefix, use_float=True)
        except (ijson.JSONError, ijson.IncompleteJSONError) as e:
            raise _fail(path, f, e) from None


def load_small(path: str) -> Any:
    """``json.load`` for files known to be small, with the same error form as the streaming readers."""
    with open(path, "rb") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise MalformedJSON(
                f"{path}: malformed JSON at line {e.lineno} column {e.colno} (byte {e.pos}): {e.msg}"
            ) from None
        except UnicodeDecodeError as e:
            raise MalformedJSON(f"{path}: not UTF-8 text at byte {e.start}") from None
        except RecursionError:
            raise MalformedJSON(f"{path}: JSON nested too deeply") from None
