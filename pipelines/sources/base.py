"""The Source protocol and what every source shares: skips, safe paths, image checks, convert context.

A source turns raw files under the data root into Samples in three steps (docs/architecture.md#the-flow):

1. ``locate(data_root, split)`` finds its files, or raises :class:`SourceNotFound` listing the paths looked
   at;
2. ``index(files, split, options)`` streams the annotation files once (never loading a huge JSON whole) and
   yields **records**: plain JSON-able dicts, one per would-be Sample, each with a ``"key"``, in key order,
   plus index-time :class:`Skip` entries for units that can never become a record (duplicate ids,
   annotations of missing images). Records are spilled to chunk files by :mod:`pipelines.build.chunks`;
3. ``to_sample(record, ctx)`` is a pure function of one record (plus reads under the data root through
   ``ctx``) returning a :class:`~pipelines.schema.Sample`, or raising :class:`SkipRecord`.

A record that becomes no Sample is a skip with a reason; nothing is lost silently:
``records in = samples out + skipped``.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from pipelines.build_options import BuildOptions
from pipelines.errors import Skip, SkipRecord, SourceNotFound, StrictModeError
from pipelines.schema import Sample

# What a source needs besides this module, importable from here too (``orchestrate`` and the benches do).
__all__ = ["BuildOptions", "Skip", "SkipRecord", "SourceNotFound", "StrictModeError"]


@dataclass(frozen=True)
class Shared:
    """Index-level data every record of a split needs (e.g. the category table), stored once, not per
    record."""

    data: dict[str, Any]


@dataclass(frozen=True)
class SourceFiles:
    """What ``locate`` found. ``inputs`` are hashed into the manifest (annotation files, not images)."""

    data_root: str
    inputs: dict[str, str]  # role -> absolute path of an annotation file (or folder listing)
    dirs: dict[str, str] = field(default_factory=dict)  # role -> folder, relative to data_root
    info: dict[str, Any] = field(
        default_factory=dict
    )  # anything locate learned (e.g. which layout held files)


def record_rng(seed: int, key: str) -> random.Random:
    """The RNG of one sample: seeded by ``(seed, key)`` so a rebuild renders identical text."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def safe_join(data_root: str | os.PathLike, rel: str) -> Path:
    """``data_root / rel`` if it stays inside the data root; :class:`SkipRecord` ``path_outside_root``
    otherwise.

    Paths in annotation files are untrusted: absolute paths and ``..`` components are refused before any
    filesystem access, and symlinked folders inside the root (X-SAM's layout uses them) are allowed.
    """
    if not rel or "\x00" in rel:
        raise SkipRecord("path_outside_root", f"empty or NUL path {rel!r}")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise SkipRecord("path_outside_root", f"{rel!r} leaves the data root")
    return Path(data_root).joinpath(*p.parts)


def relpath(folder: str, name: str) -> str:
    """``folder/name`` as a data-root-relative path, refusing a ``name`` from an annotation file that is
    absolute or climbs with ``..`` (:class:`SkipRecord` ``path_outside_root``)."""
    if not isinstance(name, str) or not name:
        raise SkipRecord("path_outside_root", f"empty file name {name!r}")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise SkipRecord("path_outside_root", f"{name!r} leaves the data root")
    return f"{folder.rstrip('/')}/{p.as_posix()}" if folder else p.as_posix()


def key_id(*parts: Any) -> str:
    """A key's id part from any values: '.' and other separators become '_' (keys must not hold '.')."""
    out = "_".join(str(p) for p in parts)
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in out)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
    ):
        if test(mode):
            return name
    return "block device" if stat.S_ISBLK(mode) else "special file"


@runtime_checkable
class Source(Protocol):
    """One source family member (e.g. ``coco_panoptic``). Implementations are plain classes, one per file."""

    name: str
    task: str
    splits: tuple[str, ...]  # splits this source can build
    version: int  # bump when the Samples it writes change; part of the resume fingerprint
    path_roles: tuple[str, ...]
    """The roles ``build_shards.py --path SOURCE.ROLE=PATH`` may override (the keys ``locate`` reads)."""

    def locate(self, data_root: str, split: str, overrides: dict[str, str] | None = None) -> SourceFiles:
        """Find this split's files (``overrides``: role -> path replacing the default layout)."""
        ...

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        """Stream the inputs once; yield records in key order (and optionally one :class:`Shared` first)."""
        ...

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample: ...


@dataclass
class ConvertContext:
    """What ``to_sample`` may use besides its record: options, the data root, and a place to note drops."""

    data_root: str
    split: str
    options: BuildOptions
    files: SourceFiles
    shared: dict[str, Any] = field(default_factory=dict)
    drops: list[Skip] = field(default_factory=list)

    def rng(self, key: str) -> random.Random:
        return record_rng(self.options.seed, key)

    def path(self, rel: str) -> Path:
        return safe_join(self.data_root, rel)

    def read_bytes(
        self, rel: str, missing_reason: str = "missing_file", max_bytes: int | None = None
    ) -> bytes:
        """The bytes of the regular file ``rel`` under the data root, or :class:`SkipRecord`.

        ``os.stat`` comes first: a FIFO, device or socket is refused before ``open`` (opening a FIFO blocks
        forever), a file over ``max_bytes`` is ``image_file_too_large`` unread, and the read is bounded by
        the size the directory entry reports (a file that grows while being read, or a device that never
        ends, cannot take the build's memory).
        """
        p = self.path(rel)
        try:
            st = os.stat(p)
            if stat.S_ISDIR(st.st_mode):
                raise SkipRecord(missing_reason, f"{rel} is a folder")
            if not stat.S_ISREG(st.st_mode):
                raise SkipRecord(
                    "not_a_regular_file", f"{rel} is a {_file_kind(st.st_mode)}, not a regular file"
                )
            if max_bytes is not None and st.st_size > max_bytes:
                raise SkipRecord(
                    "image_file_too_large", f"{rel}: {st.st_size} bytes > {max_bytes} (--max-image-bytes)"
                )
            with open(p, "rb") as f:
                data = f.read(st.st_size)
        except FileNotFoundError:
            raise SkipRecord(missing_reason, f"{rel} not found under the data root") from None
        except OSError as e:  # permission, a symlink loop, an I/O error
            raise SkipRecord("unreadable_file", f"{rel}: {e.strerror or e}") from None
        if len(data) != st.st_size:
            raise SkipRecord(
                "unreadable_file", f"{rel}: read {len(data)} of {st.st_size} bytes (file changed)"
            )
        return data

    def part_dropper(self, key: str):
        """``on_bad_part`` for :func:`pipelines.masks.segmentation_to_rle`: a polygon part left out of
        annotation ``key`` (its good parts kept, X-SAM's rule) is counted as a dropped annotation part."""
        return lambda reason, detail: self.drop(key, reason, detail)

    def drop(self, key: str, reason: str, detail: str = "") -> None:
        """Note an annotation dropped from a record that still becomes a Sample (the build's error policy
        may stop here instead)."""
        self.drops.append(self.options.policy.check(Skip(key, reason, detail, level="annotation")))
