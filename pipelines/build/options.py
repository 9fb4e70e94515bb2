"""What a build is asked to do and how it treats bad data: :class:`BuildOptions` and the skip carriers.

Everything here is imported by both the build driver and the sources (which raise :class:`SkipRecord`), so
this module depends on nothing else in the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_IMAGE_PIXELS = (
    100_000_000  # a 10k x 10k image; anything larger is treated as a decompression bomb
)


class SkipRecord(Exception):
    """This record becomes no Sample. ``reason`` is a stable snake_case name counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StrictModeError(RuntimeError):
    """Raised under ``--strict`` at the first skipped record or dropped annotation."""


# Skips that are deliberate filters, not bad data: counted and listed like any skip, but ``--strict`` does
# not stop on them (RefCOCO eval images kept out of COCO training splits; LLaVA text-only records in stage 3;
# LVIS images that carry only negative labels).
POLICY_REASONS = frozenset({"eval_image_leak", "text_only", "only_negative_labels"})


@dataclass(frozen=True)
class Skip:
    """One skipped unit, as written to ``skipped.jsonl``.

    level "record": a would-be Sample that was not written (counted in ``records in``);
    level "annotation": a part of a record that was dropped while the rest became a Sample.
    """

    key: str
    reason: str
    detail: str = ""
    level: str = "record"

    def to_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason, "detail": self.detail, "level": self.level}


@dataclass(frozen=True)
class BuildOptions:
    """Options that change what a build writes (all are in the manifest and the resume fingerprint)."""

    seed: int = 0
    samples_per_shard: int = 1000
    strict: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    image_token: str = "<image>\n"  # paper (AAAI26_Archive) default; X-SAM main uses "<image>"
    genseg_num_class: int | None = None  # None: every category in the prompt (paper); 128: X-SAM main
    keep_eval_images: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific options, e.g. {"refseg_chunk": 8}

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "samples_per_shard": self.samples_per_shard,
            "strict": self.strict,
            "max_image_pixels": self.max_image_pixels,
            "image_token": self.image_token,
            "genseg_num_class": self.genseg_num_class,
            "keep_eval_images": self.keep_eval_images,
            "extra": dict(sorted(self.extra.items())),
        }
