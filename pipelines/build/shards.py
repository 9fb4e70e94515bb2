"""Deterministic WebDataset shards and their manifests (docs/contracts.md#shards-and-manifests).

Layout under ``--out``::

    <source>/<split>/<source>-<split>-000000.tar     one shard per index chunk, samples in key order
    <source>/<split>/<source>-<split>-000000.tar.idx.json   its member index (offsets, sizes, sample digests)
    <source>/<split>/manifest.json                   shards, counts, skips by reason, inputs, options,
                                                     versions
    <source>/<split>/skipped.jsonl                   every skipped record and dropped annotation
    <source>/<split>/_parts/000000.json              per-shard completion markers (what resume checks)
    <source>/<split>/_index/                         index chunk files (removed when the split completes)

Commit: a split's manifest is written last and names its build generation; before any shard is replaced,
the previous manifest is removed (:func:`retire_manifest`), so a killed rebuild leaves no manifest that
describes partly-new shards. Determinism: tar members carry mtime 0, uid/gid 0, mode 0444 and fixed user
names; the JSON member is canonical; images are the original bytes. Resume: a shard counts as done when its
tar exists with the size its completion marker recorded (and the sha256, re-read), its member index is the
recorded one, and the marker's fingerprint (source version, options, input hashes, chunk digest) matches the
current build; everything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field

from pipelines import storage
from pipelines.build.chunks import Chunk, read_chunk
from pipelines.build.image_check import load_image
from pipelines.build_options import BuildOptions
from pipelines.errors import BuildConfigError, SampleError, Skip, SkipRecord
from pipelines.schema import SCHEMA_VERSION, to_wds
from pipelines.shard_store import (
    COUNTED_FLAGS,
    INDEX_SUFFIX,
    Manifest,
    ShardEntry,
    generation_of,
    index_shard,
    manifest_path,
    member_index,
    sample_digest,
    shard_name,
    split_dir,
)
from pipelines.sources.base import ConvertContext, SourceFiles

# Heavy imports (webdataset) are deferred into the shard writer: it imports torch, the driver needs none.

TAR_MTIME = 0.0


def index_dir(out_url: str, source: str, split: str) -> str:
    """Index chunk files: rewritten by every run, removed when the split completes."""
    return storage.join(split_dir(out_url, source, split), "_index")


@dataclass
class PartResult:
    """What converting one chunk produced; also its completion marker on disk."""

    chunk: int
    fingerprint: str
    chunk_digest: str
    records_in: int
    samples: int = 0
    file: str | None = None  # shard file name, None when every record was skipped
    bytes: int = 0
    sha256: str | None = None
    index_sha256: str | None = None  # of ``<file>.idx.json``, the shard's member index
    skips: list[dict] = field(default_factory=list)  # Skip.to_dict() of records and dropped annotations
    stats: dict = field(default_factory=dict)  # masks, regions, turns, category_counts
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _HashingWriter:
    """A file wrapper that hashes and counts what passes through it (so the shard is read once)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def marker_path(out_url: str, source: str, split: str, index: int) -> str:
    return storage.join(split_dir(out_url, source, split), "_parts", f"{index:06d}.json")


def completed_part(
    out_url: str, source: str, split: str, chunk: Chunk, fingerprint: str
) -> PartResult | None:
    """The recorded result of ``chunk`` if its shard is complete and built with the same fingerprint."""
    fs, _ = storage.fs_and_path(out_url)
    mpath = marker_path(out_url, source, split, chunk.index)
    if not fs.exists(mpath):
        return None
    try:
        part = PartResult(**storage.read_json(fs, mpath))
    except (ValueError, TypeError):
        return None
    if part.fingerprint != fingerprint or part.chunk_digest != chunk.digest:
        return None
    if any(flag not in part.stats for flag in COUNTED_FLAGS):  # a marker from before flags were counted
        return None
    if part.file is not None:
        tar = storage.join(split_dir(out_url, source, split), part.file)
        if not fs.exists(tar) or fs.size(tar) != part.bytes or _sha256_of(fs, tar) != part.sha256:
            return None  # gone, cut, or changed since it was written: rebuilt
        if part.index_sha256 is None or _sha256_of(fs, tar + INDEX_SUFFIX) != part.index_sha256:
            return None  # a marker from before member indexes, or an index that is gone or changed
    return part


def _sha256_of(fs, path: str) -> str | None:
    """sha256 of a file's bytes; None when it does not exist."""
    if not fs.exists(path):
        return None
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def convert_chunk(
    source,
    files: SourceFiles,
    split: str,
    options: BuildOptions,
    chunk: Chunk,
    out_url: str,
    fingerprint: str,
    shared: dict | None = None,
) -> PartResult:
    """Convert one chunk's records into one shard plus its completion marker. Runs in a Ray task."""
    t0 = time.perf_counter()
    fs, _ = storage.fs_and_path(out_url)
    ctx = ConvertContext(
        data_root=files.data_root, split=split, options=options, files=files, shared=shared or {}
    )
    part = PartResult(chunk=chunk.index, fingerprint=fingerprint, chunk_digest=chunk.digest, records_in=0)
    counts: Counter = Counter(dict.fromkeys(COUNTED_FLAGS, 0))  # every flag recorded, zero included
    categories: Counter = Counter()
    name = shard_name(source.name, split, chunk.index)
    final = storage.join(split_dir(out_url, source.name, split), name)
    digests: list[tuple[str, str]] = []  # (key, sample_digest) of every sample written
    try:
        with storage.atomic_write(fs, final) as raw:
            hw = _HashingWriter(raw)
            import webdataset as wds  # here, not at the top: it imports torch (~200 MB) the driver never needs

            writer = wds.TarWriter(hw, user="xsam", group="xsam", mode=0o444, mtime=TAR_MTIME, encoder=False)
            try:
                for record in read_chunk(chunk.path):
                    _convert_one(source, record, ctx, options, part, writer, counts, categories, digests)
            finally:
                writer.close()  # also on a strict-mode error, before the temporary file is removed
            if part.samples == 0:
                raise _EmptyShard()  # aborts the atomic write: no empty tar files
        part.file, part.bytes, part.sha256 = name, hw.n, hw.h.hexdigest()
        part.index_sha256 = _write_member_index(fs, final, part, digests)
    except _EmptyShard:
        for stale in (final, final + INDEX_SUFFIX):
            if fs.exists(stale):  # an earlier build of this chunk had samples
                fs.rm(stale)
    part.stats = {**counts, "category_counts": dict(sorted(categories.items()))}
    part.seconds = round(time.perf_counter() - t0, 3)
    storage.write_json(fs, marker_path(out_url, source.name, split, part.chunk), part.to_dict())
    return part


class _EmptyShard(Exception):
    """Control flow inside :func:`convert_chunk` only: a chunk whose every record was skipped aborts the
    atomic write (no empty tar) and is caught right there; it never leaves this module, so it is not an
    :class:`~pipelines.errors.XsamError`."""


def _write_member_index(fs, tar: str, part: PartResult, digests: list[tuple[str, str]]) -> str:
    """Write ``<tar>.idx.json`` (:func:`pipelines.shard_store.member_index`) from one header scan of the tar
    just written and the digests computed while writing; returns its sha256 (for the manifest). The keys the
    scan finds must be the keys written, in order."""
    idx = index_shard(fs, tar, part.samples)
    if idx.error is not None or idx.keys != [k for k, _ in digests]:
        raise RuntimeError(f"{tar}: the tar just written does not read back ({idx.error or 'keys differ'})")
    raw = member_index(idx, part.file, part.bytes, part.sha256, [d for _, d in digests])
    with storage.atomic_write(fs, tar + INDEX_SUFFIX) as f:
        f.write(raw)
    return hashlib.sha256(raw).hexdigest()


def _convert_one(
    source,
    record: dict,
    ctx: ConvertContext,
    options: BuildOptions,
    part: PartResult,
    writer,
    counts: Counter,
    categories: Counter,
    digests: list[tuple[str, str]],
) -> None:
    """Record -> Sample -> checked image -> tar members (and the sample's digest); a skip is recorded in
    ``part`` instead."""
    part.records_in += 1
    ctx.drops = []
    key = record["key"]
    try:
        sample = source.to_sample(record, ctx)
        image_bytes, ext = None, "jpg"
        if sample.image is not None:
            image_bytes, ext = load_image(ctx, sample.image.path, sample.image.height, sample.image.width)
        item = to_wds(sample, image_bytes, ext)
    except (SkipRecord, SampleError, *_MALFORMED) as e:
        skip = _skip_of(key, e)
        part.skips.append(options.policy.check(skip, cause=e).to_dict())
        part.skips.extend(d.to_dict() for d in ctx.drops)
        return
    if sample.key != key:
        raise RuntimeError(f"{source.name}.to_sample changed the key {key!r} to {sample.key!r}")
    writer.write(item)
    digests.append((key, sample_digest(item["json"], image_bytes)))
    part.samples += 1
    part.skips.extend(d.to_dict() for d in ctx.drops)
    counts["masks"] += len(sample.masks)
    counts["regions"] += len(sample.regions)
    counts["turns"] += sum(t.role == "user" for t in sample.conversation)
    for flag in COUNTED_FLAGS:
        counts[flag] += bool(sample.meta.get(flag))
    categories.update(str(m.category_id) for m in sample.masks if m.category_id is not None)


# What a record's values may still raise deep in a source after validation missed a case (a missing key, a
# string where a number belongs, an int beyond C's range): a skip naming the record, never a dead build.
_MALFORMED = (KeyError, TypeError, IndexError, OverflowError, RecursionError, AttributeError)


def _skip_of(key: str, e: Exception) -> Skip:
    if isinstance(e, SkipRecord):
        return e.at(key)
    if isinstance(e, SampleError):
        return Skip(key, "invalid_sample", str(e))
    return Skip(key, "malformed_record", f"{type(e).__name__}: {str(e)[:200]}")


def fingerprint(
    source, files: SourceFiles, split: str, options: BuildOptions, input_hashes: list[dict]
) -> str:
    """What a shard's content depends on, besides its chunk: a change in any of these rebuilds it."""
    basis = {
        "schema": SCHEMA_VERSION,
        "source": source.name,
        "source_version": source.version,
        "split": split,
        "options": {k: v for k, v in options.to_dict().items() if k != "strict"},
        "inputs": [{k: h[k] for k in ("role", "sha256")} for h in input_hashes],
        "dirs": files.dirs,
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def hash_inputs(files: SourceFiles) -> list[dict]:
    """Size and sha256 of every annotation input (streamed in 8 MiB blocks)."""
    out = []
    for role, path in sorted(files.inputs.items()):
        fs, p = storage.fs_and_path(path)
        _check_input(fs, p, role)
        if fs.isdir(p):
            h = hashlib.sha256()
            size = 0
            for f in sorted(fs.find(p)):
                st = fs.info(f)
                h.update(f"{f[len(p) :]}\x00{st['size']}\n".encode())
                size += st["size"]
            out.append(
                {"role": role, "path": path, "bytes": size, "sha256": h.hexdigest(), "kind": "folder-listing"}
            )
            continue
        h = hashlib.sha256()
        with fs.open(p, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        out.append({"role": role, "path": path, "bytes": fs.size(p), "sha256": h.hexdigest(), "kind": "file"})
    return out


def _check_input(fs, path: str, role: str) -> None:
    """An annotation input is a regular file or a folder that can be read: a FIFO would hang the build in
    ``open`` and a symlink loop or a missing permission would fail later naming nothing."""
    if getattr(fs, "protocol", None) not in ("file", ("file", "local")):
        return
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            os.listdir(path)
        elif stat.S_ISREG(st.st_mode):
            os.close(os.open(path, os.O_RDONLY))
        else:
            raise BuildConfigError(f"{role} input {path} is not a regular file or folder")
    except OSError as e:
        raise BuildConfigError(f"{role} input {path}: cannot read: {e.strerror or e}") from None


def write_manifest(
    out_url: str,
    source,
    split: str,
    files: SourceFiles,
    options: BuildOptions,
    parts: list[PartResult],
    index_skips: list[Skip],
    input_hashes: list[dict],
    fp: str,
    wall_time_s: float,
    code_version: dict,
) -> dict:
    """Write ``manifest.json`` (a :class:`~pipelines.shard_store.Manifest`) and ``skipped.jsonl`` for a
    finished split; check nothing was lost. Returns the manifest's JSON dict."""
    fs, _ = storage.fs_and_path(out_url)
    parts = sorted(parts, key=lambda p: p.chunk)
    skip_rows, skipped, dropped = _tally_skips(index_skips, parts)
    records_in = sum(p.records_in for p in parts) + sum(s.level == "record" for s in index_skips)
    samples = sum(p.samples for p in parts)
    if records_in != samples + sum(skipped.values()):  # the contract: nothing is lost silently
        raise RuntimeError(
            f"{source.name}/{split}: {records_in} records in != {samples} samples + {sum(skipped.values())} skipped"
        )
    stats, categories = _sum_stats(parts)
    entries = tuple(ShardEntry(p.file, p.samples, p.bytes, p.sha256, p.index_sha256) for p in parts if p.file)
    manifest = Manifest(
        schema=SCHEMA_VERSION,
        source=source.name,
        task=source.task,
        split=split,
        shards=entries,
        counts={
            "records_in": records_in,
            "samples": samples,
            "skipped": sum(skipped.values()),
            "dropped_annotations": sum(dropped.values()),
            **dict(sorted(stats.items())),  # masks, regions, turns and every COUNTED_FLAGS count
        },
        skipped=dict(sorted(skipped.items())),
        dropped=dict(sorted(dropped.items())),
        category_counts=dict(
            sorted(categories.items(), key=lambda kv: int(kv[0]) if kv[0].lstrip("-").isdigit() else 0)
        ),
        inputs=input_hashes,
        dirs=files.dirs,
        info=files.info,
        options=options.to_dict(),
        source_version=source.version,
        code_version=code_version,
        fingerprint=fp,
        generation=generation_of(fp, entries),
        wall_time_s=round(wall_time_s, 3),
    )
    sdir = split_dir(out_url, source.name, split)
    _write_skipped(fs, sdir, skip_rows)
    manifest.write(out_url)  # last: a split is complete once its manifest exists
    _remove_unlisted_shards(fs, sdir, manifest)
    return manifest.to_dict()


def _write_skipped(fs, sdir: str, skip_rows: list[dict]) -> None:
    """``skipped.jsonl``: one sorted-key JSON row per skipped record or dropped annotation."""
    with storage.atomic_write(fs, storage.join(sdir, "skipped.jsonl")) as f:
        for row in skip_rows:
            f.write(json.dumps(row, sort_keys=True).encode() + b"\n")


def retire_manifest(out_url: str, source: str, split: str) -> bool:
    """Before a build replaces any shard of a split, its manifest goes: the previous generation no longer
    describes the shards, so nothing may train on them (a mixture naming that generation is refused) until
    the new manifest commits the new one. Returns whether there was one."""
    fs, path = storage.fs_and_path(manifest_path(out_url, source, split))
    if not fs.exists(path):
        return False
    fs.rm(path)
    return True


def _tally_skips(index_skips: list[Skip], parts: list[PartResult]) -> tuple[list[dict], Counter, Counter]:
    """Every skip row of a split in ``skipped.jsonl`` order, and the counts by reason of skipped records and
    dropped annotations."""
    rows = [s.to_dict() for s in index_skips] + [s for p in parts for s in p.skips]
    rows.sort(key=lambda s: (s["key"], s["level"], s["reason"], s["detail"]))
    skipped = Counter(s["reason"] for s in rows if s["level"] == "record")
    dropped = Counter(s["reason"] for s in rows if s["level"] == "annotation")
    return rows, skipped, dropped


def _sum_stats(parts: list[PartResult]) -> tuple[Counter, Counter]:
    """(masks/regions/turns/flag counts, category id -> masks) summed over a split's parts."""
    stats: Counter = Counter()
    categories: Counter = Counter()
    for p in parts:
        categories.update(p.stats.get("category_counts", {}))
        stats.update({k: v for k, v in p.stats.items() if k != "category_counts"})
    return stats, categories


def _remove_unlisted_shards(fs, sdir: str, manifest: Manifest) -> None:
    """Shards of chunks that no longer exist (the input shrank) must not linger beside the manifest."""
    listed = {s.file for s in manifest.shards}
    listed |= {f + INDEX_SUFFIX for f in listed}
    for pattern in ("*.tar", "*.tar" + INDEX_SUFFIX):
        for p in fs.glob(f"{sdir}/{manifest.source}-{manifest.split}-{pattern}"):
            if p.rsplit("/", 1)[-1] not in listed:
                fs.rm(p)
