"""The loader's counters: :class:`LoaderStats`, one rank's (or one micro-batch's) batches, samples, skips by
reason and I/O.

A DataLoader worker counts each micro-batch into a fresh :class:`LoaderStats` and hands it over with the
batch; the rank adds them up with :meth:`LoaderStats.merge`. :meth:`LoaderStats.to_dict` is what the loader
state stores under ``"stats"`` (plain JSON, the key order below), and :meth:`LoaderStats.from_dict` reads
it back — also the per-lane dicts of an ``xsam-loader/1`` state, whose extra keys are ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

MAX_ERRORS = 16  # recent skip details kept
# the I/O counters a ShardReader adds to (a plain dict: the shard store knows nothing of this class)
IO_COUNTERS = ("bytes_read", "ranged_reads", "shards_indexed")


@dataclass
class LoaderStats:
    """Counters of a loader (one rank), or of one micro-batch on its way from a worker.

    ``skipped``/``filtered``: reason → samples replaced (unreadable or bad data / a deliberate exclusion
    flag such as ``no_target``); ``errors``: the last :data:`MAX_ERRORS` skips as ``key: reason: detail``.
    """

    batches: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    ranged_reads: int = 0
    shards_indexed: int = 0
    batches_by_source: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, names: Sequence[str] = ()) -> LoaderStats:
        """Zero counters, with every dataset of ``names`` listed in ``batches_by_source``."""
        return cls(batches_by_source=dict.fromkeys(names, 0))

    def merge(self, other: LoaderStats) -> LoaderStats:
        """Add ``other``'s counters into these (in place; returns self). Reasons and datasets keep the order
        they were first seen in; ``errors`` keeps the most recent."""
        self.batches += other.batches
        self.samples += other.samples
        self.bytes_read += other.bytes_read
        self.ranged_reads += other.ranged_reads
        self.shards_indexed += other.shards_indexed
        for mine, theirs in (
            (self.skipped, other.skipped),
            (self.filtered, other.filtered),
            (self.batches_by_source, other.batches_by_source),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.errors = (self.errors + other.errors)[-MAX_ERRORS:]
        return self

    def add_io(self, counters: Mapping[str, int]) -> None:
        """Add a shard reader's I/O counters (:data:`IO_COUNTERS`)."""
        for k in IO_COUNTERS:
            setattr(self, k, getattr(self, k) + int(counters.get(k, 0)))

    def skip(self, reason: str, key: str | None, detail: str) -> None:
        """Count a replaced sample and keep its one-line reason."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.errors = (self.errors + [f"{key}: {reason}: {detail}"[:300]])[-MAX_ERRORS:]

    def filter(self, reason: str) -> None:
        """Count a sample left out by an exclusion flag."""
        self.filtered[reason] = self.filtered.get(reason, 0) + 1

    def batch(self, source: str) -> None:
        """Count a micro-batch of dataset ``source``."""
        self.batches += 1
        self.batches_by_source[source] = self.batches_by_source.get(source, 0) + 1

    def to_dict(self) -> dict:
        """Plain JSON (a deep copy), as the loader state stores it."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> LoaderStats:
        """Counters from :meth:`to_dict`'s form (missing keys are zero, unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in known})
