"""The shard build: for each (source, split), index once in the driver, convert chunks in Ray tasks,
write the manifest. ``orchestrate/build_shards.py`` is the thin command line around :func:`build`.

Where work runs: ``index()`` streams annotation files in the driver (memory-bounded; records spill to chunk
files under the output folder, which must be storage every node can read); each chunk becomes one Ray task
that writes one shard and a completion marker; the driver only gathers small results and writes manifests.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import ray

from pipelines import storage
from pipelines.build import eval_guard, mixture_weights, shards
from pipelines.build.chunks import Chunk, spill
from pipelines.build.lock import build_lock
from pipelines.build_options import BuildOptions
from pipelines.errors import BuildConfigError, BuildError, Skip, SourceNotFound
from pipelines.logs import Progress, quiet_third_party_warnings
from pipelines.sources import SOURCES
from pipelines.sources.base import SourceFiles

logger = logging.getLogger(__name__)


@dataclass
class SplitResult:
    source: str
    split: str
    samples: int
    skipped: int
    shards: int
    bytes: int
    seconds: float
    reused_shards: int


def code_version() -> dict:
    try:
        pkg = version("xsam-pipeline")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        git = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"package": pkg, "git": git}


def resolve_jobs(
    data_root: str,
    sources: Sequence[str] | None,
    splits: Sequence[str],
    overrides: dict[str, dict[str, str]],
) -> list[tuple[object, str, SourceFiles]]:
    """The (source, split, files) to build. Named sources must exist; unnamed ones are skipped if absent."""
    explicit = sources is not None
    names = list(sources) if explicit else list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise BuildConfigError(f"unknown source(s) {unknown}; known: {sorted(SOURCES)}")
    unknown = sorted(n for n in overrides if n not in SOURCES)
    if unknown:
        raise BuildConfigError(f"--path names unknown source(s) {unknown}; known: {sorted(SOURCES)}")
    for name, roles in overrides.items():
        known_roles = getattr(SOURCES[name], "path_roles", None)
        bad = sorted(r for r in roles if known_roles is not None and r not in known_roles)
        if bad:  # locate() would never read it: the override would be ignored silently
            raise BuildConfigError(
                f"--path {name}.{bad[0]}=…: {name} has no input role {bad[0]!r}; its roles: {', '.join(known_roles)}"
            )
    jobs = []
    for name in names:
        src = SOURCES[name]
        wanted = [s for s in splits if s in src.splits]
        if explicit and not wanted:
            raise BuildConfigError(f"{name} has no split among {list(splits)}; it has {list(src.splits)}")
        for split in wanted:
            try:
                files = src.locate(data_root, split, overrides.get(name))
            except SourceNotFound as e:
                if explicit:
                    raise BuildConfigError(str(e)) from None
                logger.info("skip %s/%s: %s", name, split, e)
                continue
            jobs.append((src, split, files))
    return jobs


TASK_RETRIES = 3
"""Times Ray runs a chunk again after its worker process or node died (a lost or preempted node, the OOM
killer). Safe: a chunk's shard is a pure function of the chunk, written under a temporary name and renamed
when complete, so a retry writes the same bytes; a chunk that crashes its worker every time still ends as
one :class:`BuildError` naming it, after the retries."""


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES)
def _convert_task(source_name, files, split, options, chunk, out_url, fp, shared):
    quiet_third_party_warnings()  # a worker process: the driver's warning filters do not reach it
    return shards.convert_chunk(SOURCES[source_name], files, split, options, chunk, out_url, fp, shared)


def _run_chunks(
    src, files, split, options, chunks, out_url, fp, shared, num_workers
) -> Iterator[shards.PartResult]:
    """Convert chunks as Ray tasks (at most ``num_workers`` in flight), or inline when Ray is not running
    (unit tests, debugging with pdb); results are yielded as they complete."""
    if not ray.is_initialized():
        for c in chunks:
            yield shards.convert_chunk(src, files, split, options, c, out_url, fp, shared)
        return
    shared_ref = ray.put(shared)
    pending: list = []
    chunk_of: dict = {}
    queue = list(chunks)
    while queue or pending:
        while queue and len(pending) < num_workers:
            c = queue.pop(0)
            ref = _convert_task.remote(src.name, files, split, options, c, out_url, fp, shared_ref)
            pending.append(ref)
            chunk_of[ref] = c
        ready, pending = ray.wait(pending, num_returns=1)
        yield _chunk_result(ready[0], chunk_of.pop(ready[0]), f"{src.name}/{split}")


def _chunk_result(ref, chunk: Chunk, where: str) -> shards.PartResult:
    """A chunk task's result; a worker or node that died on every attempt (a segfault in a native library,
    the OOM killer, nodes lost) is a :class:`BuildError` naming the chunk and its records, so the records can
    be looked at or left out."""
    try:
        return ray.get(ref)
    except (
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.OutOfMemoryError,
        ray.exceptions.NodeDiedError,
    ) as e:
        raise BuildError(
            f"{where}: the worker converting chunk {chunk.index} ({chunk.records} records, {chunk.first_key} .. "
            f"{chunk.last_key}, {chunk.path}) died: {type(e).__name__}; rerun with -v to see its last lines"
        ) from None


@dataclass
class _Indexed:
    """A split after indexing: its (possibly guard-extended) files, input hashes, fingerprint and chunks."""

    files: SourceFiles
    hashes: list[dict]
    fp: str
    chunks: list[Chunk]
    index_skips: list[Skip]
    shared: dict


def index_split(
    src,
    split: str,
    files: SourceFiles,
    out_url: str,
    options: BuildOptions,
    guard: eval_guard.EvalGuard | None,
) -> _Indexed:
    """Hash the inputs and stream the source's index into chunk files; index-time skips go through the
    error policy here, before anything is converted."""
    if guard is not None:  # RefCOCO eval images are left out of this split: eval_images.json is an input
        files = guard.with_input(files)
    hashes = shards.hash_inputs(files)
    fp = shards.fingerprint(src, files, split, options, hashes)
    logger.info("%s/%s: indexing %s", src.name, split, ", ".join(files.inputs.values()))
    items = src.index(files, split, options)
    try:
        chunks, index_skips, shared = spill(
            guard.exclude(items) if guard is not None else items,
            out_url,
            shards.index_dir(out_url, src.name, split),
            options.samples_per_shard,
        )
    except (
        OSError
    ) as e:  # an annotation path that is a folder, unreadable, a symlink loop: one line naming it
        raise BuildConfigError(
            f"{src.name}/{split}: cannot read {e.filename or '?'}: {e.strerror or e}"
        ) from None
    for skip in index_skips:
        options.policy.check(skip)
    return _Indexed(files, hashes, fp, chunks, index_skips, shared)


def build_split(
    src,
    split: str,
    files: SourceFiles,
    out_url: str,
    options: BuildOptions,
    num_workers: int,
    guard: eval_guard.EvalGuard | None = None,
) -> SplitResult:
    t0 = time.perf_counter()
    fs, _ = storage.fs_and_path(out_url)
    storage.remove_temporaries(fs, shards.split_dir(out_url, src.name, split))
    ix = index_split(src, split, files, out_url, options, guard)
    done = {c.index: p for c in ix.chunks if (p := shards.completed_part(out_url, src.name, split, c, ix.fp))}
    todo = [c for c in ix.chunks if c.index not in done]
    if todo and shards.retire_manifest(out_url, src.name, split):  # the old generation ends here
        logger.info("%s/%s: previous manifest removed until this build commits", src.name, split)
    records = sum(c.records for c in ix.chunks)
    logger.debug("%s/%s: %d records, %d shards already complete", src.name, split, records, len(done))
    parts = list(done.values())
    with Progress(logger, f"{src.name}/{split}", len(ix.chunks), done=len(done)) as progress:
        for part in _run_chunks(src, ix.files, split, options, todo, out_url, ix.fp, ix.shared, num_workers):
            parts.append(part)
            progress.update(1, part.samples)
    # a node lost mid-conversion leaves its half-written temporary (Ray converted that chunk again elsewhere)
    storage.remove_temporaries(fs, shards.split_dir(out_url, src.name, split))
    wall = time.perf_counter() - t0
    manifest = shards.write_manifest(
        out_url, src, split, ix.files, options, parts, ix.index_skips, ix.hashes, ix.fp, wall, code_version()
    )
    fs.rm(shards.index_dir(out_url, src.name, split), recursive=True)
    return SplitResult(
        src.name,
        split,
        manifest["counts"]["samples"],
        manifest["counts"]["skipped"],
        len(manifest["shards"]),
        sum(s["bytes"] for s in manifest["shards"]),
        time.perf_counter() - t0,
        len(done),
    )


def build(
    data_root: str,
    out_url: str,
    sources: Sequence[str] | None = None,
    splits: Sequence[str] = ("train",),
    options: BuildOptions | None = None,
    num_workers: int | None = None,
    overrides: dict[str, dict[str, str]] | None = None,
    log: object = None,
) -> list[SplitResult]:
    """Build shards for every requested (source, split).

    Conversion runs as Ray tasks when Ray is initialised (``ray.init`` by the caller), inline otherwise.
    Progress goes to this package's loggers (a command line shows it; library use stays quiet unless
    logging is configured). ``log`` is deprecated and ignored; it goes once no caller passes it.
    """
    if log is not None:
        warnings.warn("build(log=...) is ignored: the build logs through logging", DeprecationWarning, 2)
    options = options or BuildOptions()
    if not os.path.isdir(data_root):
        raise BuildConfigError(f"--data-root {data_root!r} is not a folder")
    jobs = resolve_jobs(os.path.abspath(data_root), sources, splits, overrides or {})
    if not jobs:
        raise BuildConfigError(f"no source found under {data_root} for splits {list(splits)}")
    workers = num_workers or (
        max(1, int(ray.available_resources().get("CPU", 1))) if ray.is_initialized() else 1
    )
    guarded = any(split in getattr(src, "eval_image_guard_splits", ()) for src, split, _ in jobs)
    guard = eval_guard.prepare(os.path.abspath(data_root), out_url, overrides or {}, options, guarded)
    with build_lock(out_url):  # one build per --out: two would remove each other's temporary files
        results = [
            build_split(src, split, files, out_url, options, workers, guard.for_split(src, split))
            for src, split, files in jobs
        ]
        # balance-resampling weights over every train manifest now under out_url (not only this run's)
        logger.info("mixture weights written to %s", mixture_weights.write_mixture(out_url))
    return results


def format_table(results: Sequence[SplitResult]) -> str:
    head = (
        f"{'source':<18} {'split':<10} {'samples':>9} {'skipped':>8} {'shards':>7} {'MB':>9} {'seconds':>8}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.source:<18} {r.split:<10} {r.samples:>9} {r.skipped:>8} {r.shards:>7} "
            f"{r.bytes / 1e6:>9.2f} {r.seconds:>8.1f}"
        )
    return "\n".join(rows)
