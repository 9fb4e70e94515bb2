"""Spilling a source's index to chunk files, so no process ever holds a whole annotation set.

The driver streams ``Source.index()`` once and writes its records, in key order, to
``<split dir>/_index/chunk-%06d.jsonl`` (``records_per_chunk`` each). A conversion task then reads only
its own chunk. One chunk becomes one shard, so a shard's number is its chunk's number and the build is
deterministic however many workers run it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pipelines import storage
from pipelines.errors import Skip, XsamError
from pipelines.sources.base import Shared


class IndexOrderError(XsamError, RuntimeError):
    """A source yielded records out of key order (a bug in the source, never bad data)."""


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str  # fsspec path of the chunk file
    records: int
    first_key: str
    last_key: str
    digest: str  # sha256 of the chunk file: a changed chunk invalidates its shard


def spill(
    items: Iterable[dict | Skip | Shared], out_url: str, folder: str, records_per_chunk: int
) -> tuple[list[Chunk], list[Skip], dict]:
    """Write records to chunk files under ``folder``; return the chunks, index-time skips and shared data."""
    fs, _ = storage.fs_and_path(out_url)
    fs.makedirs(folder, exist_ok=True)
    for old in fs.glob(f"{folder}/chunk-*.jsonl"):  # a previous index may have had more chunks
        fs.rm(old)
    chunks: list[Chunk] = []
    skips: list[Skip] = []
    shared: dict = {}
    buf: list[bytes] = []
    keys: list[str] = []
    last_key = ""

    def flush() -> None:
        if not buf:
            return
        idx = len(chunks)
        path = f"{folder}/chunk-{idx:06d}.jsonl"
        data = b"".join(buf)
        with storage.atomic_write(fs, path) as f:
            f.write(data)
        chunks.append(Chunk(idx, path, len(buf), keys[0], keys[-1], hashlib.sha256(data).hexdigest()))
        buf.clear()
        keys.clear()

    for item in items:
        if isinstance(item, Skip):
            skips.append(item)
            continue
        if isinstance(item, Shared):
            shared.update(item.data)
            continue
        key = item["key"]
        if key <= last_key:
            raise IndexOrderError(
                f"record {key!r} follows {last_key!r}: index() must yield keys in increasing order"
            )
        last_key = key
        buf.append(json.dumps(item, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        keys.append(key)
        if len(buf) >= records_per_chunk:
            flush()
    flush()
    return chunks, skips, shared


def read_chunk(path: str) -> Iterator[dict]:
    fs, p = storage.fs_and_path(path)
    with fs.open(p, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
