"""Reading back what a build wrote, for the source tests."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from pipelines.schema import from_wds


def read_split(out: Path, source: str, split: str = "train", with_images: bool = True):
    """``(manifest, samples, skipped rows)`` of ``<out>/<source>/<split>``.

    ``samples`` are ``(Sample, image bytes)`` pairs in shard order, or bare Samples with ``with_images=False``.
    """
    d = Path(out) / source / split
    manifest = json.loads((d / "manifest.json").read_text())
    items = [
        from_wds(item)
        for s in manifest["shards"]
        for item in wds.WebDataset(str(d / s["file"]), shardshuffle=False)
    ]
    skipped = [json.loads(line) for line in (d / "skipped.jsonl").read_text().splitlines()]
    return manifest, (items if with_images else [sample for sample, _ in items]), skipped
