"""What goes wrong, said one way: the project's exception family, the skip carrier, and the CLI wrapper.

Every error the project raises *on purpose* — bad configuration or bad input — is an :class:`XsamError`
whose message is one line naming the file, key or option at fault. Entry points run their ``main`` through
:func:`run_cli`, which turns such an error into that line on stderr and exit code 2, never a traceback. Any
other exception is a bug and keeps its traceback. Each part of ``pipelines`` has its subclass below (each
also derives from the builtin type callers caught before, e.g. ``ValueError``); ``orchestrate`` and
``xsam_model`` subclass :class:`XsamError` for their own parts.

Bad *data* is usually not fatal: a record that cannot become a Sample raises :class:`SkipRecord` (``reason``:
a stable snake_case name counted in the manifest, ``detail``: what was found), and whoever catches it records
a :class:`Skip` (the same pair plus the key and level, one row of ``skipped.jsonl`` or of the loader's stats).
Whether a skip stops the run is the error policy's call (:class:`ErrorPolicy`, shared by the build and the
loader).

This module imports nothing from the project, so every module may import it.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class XsamError(Exception):
    """Base of every error the project raises on purpose. ``str(e)`` is the one-line message a user sees."""

    def __reduce__(self):
        # Pickled by message and attributes, not by constructor arguments: subclasses with their own
        # ``__init__`` signature still cross process boundaries (Ray tasks, DataLoader workers) intact.
        return _restore, (type(self), str(self), dict(self.__dict__))


def _restore(cls: type[XsamError], message: str, state: dict) -> XsamError:
    e = cls.__new__(cls)
    BaseException.__init__(e, message)
    e.__dict__.update(state)
    return e


# ---------------------------------------------------------------------------------------------- configuration
class BuildConfigError(XsamError, ValueError):
    """Bad build configuration (unknown source or option, a bad option value, a named source whose files are
    missing): the build fails at once, before converting anything."""


class SourceNotFound(XsamError, FileNotFoundError):
    """A source's files are not under the data root. ``looked_at`` lists every path tried."""

    def __init__(self, source: str, looked_at: list[str]):
        super().__init__(f"{source}: not found: {', '.join(looked_at)}")
        self.source = source
        self.looked_at = looked_at


class StrictModeError(XsamError):
    """Raised under ``--strict`` at the first skipped record or dropped annotation that is not a deliberate
    filter. The message is ``<key>: <reason>: <detail>``."""


class MixtureError(XsamError, ValueError):
    """A mixture that breaks an invariant (non-finite or non-positive weight, sum ≠ 1, bad counts, unknown
    source)."""


class LoaderError(XsamError, RuntimeError):
    """The training loader met a bad sample or shard in strict mode, or cannot go on (a dataset with no usable
    sample, a state that does not fit)."""


class BuildError(XsamError, RuntimeError):
    """A build cannot finish: a conversion worker died (a crash in a native library) or another build holds
    the output folder. The message names the chunk and records, or the other build's host and pid."""


class CardTextError(XsamError, ValueError):
    """A dataset-card text file is missing or malformed."""


class DemoDataError(XsamError, ValueError):
    """A demo-data request that cannot be met (an unknown family)."""


class OutputError(XsamError, ValueError):
    """An output location an offline tool cannot use (e.g. a remote folder where a local one is needed), or
    nothing built where a tool expected shards."""


# ---------------------------------------------------------------------------------------------- bad input
class SkipRecord(XsamError):
    """This record (or annotation) cannot be used. ``reason`` is a stable snake_case name counted in the
    manifest; ``detail`` says what was found. The one carrier of a ``(reason, detail)`` pair: the code that
    catches it turns it into a :class:`Skip` with :meth:`at`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def at(self, key: str, level: str = "record") -> Skip:
        """This skip recorded for ``key`` (``level``: see :class:`Skip`)."""
        return Skip(key, self.reason, self.detail, level)


class MaskFormatError(SkipRecord, ValueError):
    """An annotation's segmentation cannot be turned into a mask (``reason``: e.g. ``bad_polygon``)."""


class PromptTooSmall(SkipRecord, ValueError):
    """The mask has no connected component large enough to hold a visual prompt."""

    reason = "mask_too_small_for_prompt"

    def __init__(self, detail: str):
        super().__init__(type(self).reason, detail)


class SampleError(XsamError, ValueError):
    """A Sample breaks an invariant of the schema (docs/contracts.md#sample); the message names the first
    broken one."""


class MalformedJSON(XsamError, ValueError):
    """A JSON input cannot be parsed. Names the file and where parsing stopped."""


class UnsafePickleError(XsamError, pickle.UnpicklingError):
    """A pickle tried to load a global (or a persistent id) outside the allow-list. Names file and global."""

    def __init__(self, path: str, what: str):
        super().__init__(
            f"{path}: refused to load {what}: only lists, dicts, tuples, sets, str/bytes, numbers, bools and "
            "None may be unpickled (nothing from this file was run)"
        )
        self.path = path
        self.what = what


class MalformedPickle(XsamError, pickle.UnpicklingError):
    """The file is not a complete, well-formed pickle of allowed objects (truncated, corrupt, wrong type)."""


class ImageDecodeError(XsamError, ValueError):
    """The bytes are not a decodable JPEG/PNG (the loader counts it as ``corrupt_image``)."""


@dataclass(frozen=True)
class Skip:
    """One skipped unit, as written to ``skipped.jsonl`` and counted by reason.

    level "record": a would-be Sample that was not written (counted in ``records in``);
    level "annotation": a part of a record that was dropped while the rest became a Sample.
    """

    key: str
    reason: str
    detail: str = ""
    level: str = "record"

    def to_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason, "detail": self.detail, "level": self.level}

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}: {self.detail}"


# ---------------------------------------------------------------------------------------------- error policy
# Skips that are deliberate filters, not bad data: counted and listed like any skip, but ``--strict`` does
# not stop on them (RefCOCO eval images kept out of COCO training splits; LLaVA text-only records in stage 3;
# LVIS images that carry only negative labels; GCG phrases whose span overlaps a kept one, X-SAM's rule; LISA
# images without an explanation under the paper preset).
POLICY_REASONS = frozenset(
    {"eval_image_leak", "text_only", "only_negative_labels", "overlapping_span", "no_explanation"}
)


@dataclass(frozen=True)
class ErrorPolicy:
    """The one place that decides what a skip does (webdataset's ``handler=`` idea): by default every skip
    is recorded and counted by reason; ``strict`` turns the first one into an error, except the deliberate
    filters in ``filters``, which are always recorded.

    Every site that meets bad data builds a :class:`Skip` and hands it to :meth:`check`.
    """

    strict: bool = False
    filters: frozenset[str] = POLICY_REASONS
    error: type[XsamError] = StrictModeError  # what strict mode raises (the loader raises LoaderError)

    def stops(self, reason: str) -> bool:
        """Whether a skip with ``reason`` ends the run under this policy."""
        return self.strict and reason not in self.filters

    def check(self, skip: Skip, cause: BaseException | None = None) -> Skip:
        """``skip`` itself, to be recorded; raises :attr:`error` (``<key>: <reason>: <detail>``) instead when
        the policy stops on it."""
        if self.stops(skip.reason):
            raise self.error(str(skip)) from cause
        return skip


# ---------------------------------------------------------------------------------------------- entry points
# OSErrors that, in a command-line tool, mean "the path you gave is wrong" rather than "the code is wrong".
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line ``main`` and return its exit code: 0 (or what it returned) on success; 2 with one
    line ``error: <message>`` on stderr for an :class:`XsamError` or a bad path; 130 on Ctrl-C.

    ``python -m pkg.tool`` modules end with ``raise SystemExit(run_cli(main))``. The traceback of a handled
    error is still logged at DEBUG level (``-v``), for the rare case where a bad path is the code's fault.
    """
    try:
        return int(main(argv) or 0)
    except (XsamError, *_PATH_ERRORS) as e:
        logger.debug("traceback of the error below", exc_info=True)
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def _one_line(e: BaseException) -> str:
    if isinstance(getattr(e, "cause", None), BaseException):  # Ray's RayTaskError wraps the task's error
        e = e.cause
    text = str(e) or type(e).__name__
    return " ".join(text.split()) if "\n" in text else text
