"""Reading back what a build wrote, for the source tests: a thin use of :mod:`pipelines.shard_store`."""

from __future__ import annotations

from pathlib import Path

from pipelines import shard_store


def read_split(out: Path, source: str, split: str = "train", with_images: bool = True):
    """``(manifest dict, samples, skipped rows)`` of ``<out>/<source>/<split>``.

    ``samples`` are ``(Sample, image bytes)`` pairs in shard order, or bare Samples with ``with_images=False``.
    """
    manifest = shard_store.Manifest.read(str(out), source, split)
    items = list(shard_store.iter_samples(str(out), source, split, manifest))
    skipped = shard_store.read_skipped(str(out), source, split)
    return manifest.to_dict(), (items if with_images else [sample for sample, _ in items]), skipped


def member_exts(out: Path, source: str, split: str = "train") -> list[str]:
    """The extension of every ``<key>.<ext>`` member of a split's shards, in tar order."""
    manifest = shard_store.Manifest.read(str(out), source, split)
    exts = []
    for shard in manifest.shards:
        with open(Path(out) / source / split / shard.file, "rb") as f:
            exts += [m.ext for m in shard_store.iter_members(f, read_data=False)]
    return exts
