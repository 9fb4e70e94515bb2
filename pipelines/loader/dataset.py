"""One dataset of a stage's mixture as the loader reads it: its stored samples by index (shards concatenated
in manifest order), their ranged, digest-checked reads, and its global stream order.

The loader pins each split's build generation (``mixture.json``'s, checked against the manifests when the
loader is made). A read that meets a damaged or missing shard first re-reads that split's manifest
(:func:`check_pinned`): another generation, or none (a rebuild in progress), stops the run with one
:class:`~pipelines.errors.LoaderError`; the same generation is real damage, a counted skip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.errors import LoaderError
from pipelines.loader.order import WindowOrder, dataset_tag
from pipelines.mixture_file import DatasetWeight
from pipelines.shard_store import Manifest, MissingManifestError, RawSample, ShardReader, ShardStoreError

# a sample read as one of these may mean the split was rebuilt since the run pinned its generation
CHANGED_REASONS = frozenset({"digest_mismatch", "shard_mismatch", "unreadable_shard", "truncated_shard"})


def check_pinned(shards: str, d: DatasetWeight) -> None:
    """Stop with :class:`LoaderError` when ``d``'s manifest no longer commits the generation this run pinned
    (``mixture.json``'s, checked when the loader was made): a rebuild landed or is in progress. The same
    generation means the damage is real, and the caller keeps it a counted skip. Called once per read that
    met a damaged sample, so clean reads never touch the manifest."""
    if d.generation is None:  # mixtures written before generations: nothing pinned
        return
    try:
        now = Manifest.read(shards, d.source, d.split).generation
    except MissingManifestError:
        now = "none (its manifest is gone: a rebuild is in progress)"
    except (ShardStoreError, OSError, ValueError) as e:
        now = f"unreadable manifest ({type(e).__name__})"
    if now != d.generation:
        raise LoaderError(
            f"the shards of {d.name} changed under this run (generation {d.generation} → {now}): "
            f"let the rebuild finish, rewrite mixture.json and resume"
        )


class StoredDataset:
    """One dataset's stored samples by index and its global stream (:class:`WindowOrder`)."""

    def __init__(self, d: DatasetWeight, reader: ShardReader, shards: str, seed: int, window: int):
        self.d, self.reader, self.shards = d, reader, shards
        self.tag = dataset_tag(d.name)
        self.starts = np.concatenate([[0], np.cumsum([s.samples for s in d.shards])]).astype(np.int64)
        self.n = int(self.starts[-1])
        if self.n == 0:
            raise LoaderError(f"{d.name}: its manifest lists no sample")
        self.order = WindowOrder(self.n, window, seed, self.tag)

    def _locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return s, i - int(self.starts[s])

    def read(self, indices: Sequence[int]) -> dict[int, RawSample]:
        """Stored samples ``indices`` → raws (JSON + image, each checked against its shard's member index
        before anyone parses it: a changed byte is a ``digest_mismatch`` raw); each run of consecutive
        samples inside one shard is one ranged read."""
        out: dict[int, RawSample] = {}
        todo = sorted(set(int(i) for i in indices))
        while todo:
            s, lo = self._locate(todo[0])
            run = 1
            while run < len(todo) and todo[run] == todo[0] + run and self._locate(todo[run])[0] == s:
                run += 1
            ref = self.d.shards[s]
            self.reader.stats["ranged_reads"] = self.reader.stats.get("ranged_reads", 0) + 1
            raws = self.reader.read(
                ref.file, ref.samples, lo, lo + run, size=ref.bytes, index_sha256=ref.index_sha256
            )
            out.update(zip(todo[:run], raws, strict=True))
            todo = todo[run:]
        if any(r.reason in CHANGED_REASONS for r in out.values()):
            check_pinned(self.shards, self.d)  # a rebuild landing under the run, not bad data
        return out
