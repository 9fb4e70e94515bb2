"""The one exception of evaluation: bad predictions, bad ground truth, bad options.

Every message is one line that names the file, the line and the key where there is one, so the CLI can print
it as is (exit code 2, no traceback).
"""

from __future__ import annotations

from pipelines.errors import XsamError


class EvaluationError(XsamError, ValueError):
    """Predictions, ground truth or options that cannot be scored; the message says where and why."""


def where(path: str, line: int | None = None, key: str | None = None) -> str:
    """``file:line (key …)`` prefix of an error message."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if key is not None:
        out += f" (key {key!r})"
    return out


def listing(items: list[str], limit: int = 5) -> str:
    """``a, b, c (and 7 more)``: a list short enough for a one-line message."""
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
