"""The training-side streaming reader: one source per global step, a world-size-free data order, exact resume
on any world size (DESIGN §4.6, issue 21 item 1).

    loader = MixtureLoader("s3://bucket/shards", stage=3, batch_size=4, rank=r, world_size=n, num_workers=4,
                           transform=processor, collate=processor.collate, seed=0)
    loader.load_state_dict(ckpt["loader"])          # optional: resume (any world size, same global batch)
    for batch in loader:                            # Batch(step, micro_step, source, task, data, keys)
        ...; ckpt["loader"] = loader.state_dict()

The global sample sequence of a stage is a function of ``(seed, global step)`` only (:mod:`pipelines.loader.
order`); ranks, DataLoader workers and the micro-batch × accumulation split only decide who reads which part:

- **Source.** Global step ``s`` draws its dataset from the mixture's ``p`` with a counter-based RNG keyed by
  ``(seed, s)`` (splitmix64), identical on every rank and worker; every micro-batch of the step (every rank,
  every accumulation step) comes from that one dataset, hence one task.
- **Global stream.** Each dataset has one global stream per epoch: a window-local shuffle of all its stored
  samples (windows of ``shuffle_window`` consecutive samples; window order and in-window order drawn from
  ``(seed, dataset, epoch[, window])``). With ``G = batch_size × grad_accum × world_size`` (the global batch),
  step ``s`` takes positions ``[c, c + G)`` of its dataset's stream, where the cursor ``c = G ×`` (steps
  before ``s`` that drew that dataset) — a pure function of ``seed`` and ``s``
  (:class:`~pipelines.loader.order.StepPlan`, cached per block of steps).
- **Micro-batches.** Micro-step ``m`` of a rank is accumulation step ``a = m % grad_accum`` of global step
  ``m // grad_accum``; it is micro-batch ``j = a·world_size + rank`` of the step and takes positions
  ``[c + j·B, c + (j+1)·B)`` (``B`` = batch_size). So the SET of samples of each global batch does not depend
  on the (world size, workers, micro × accumulation) split with ``G`` fixed; micro-batches of a step hold
  disjoint positions (a global batch holds a sample twice only when it straddles the end of an epoch of its
  dataset, or through a replacement draw).
- **Length grouping** (``length_group`` > 1, default 8, :mod:`pipelines.loader.grouping`): positions are
  permuted inside groups of ``length_group`` consecutive global batches of a dataset's stream, counted per
  epoch of the stream (sorted by text length, cut into global batches of ``G``, handed out in an order drawn
  from ``(seed, dataset, epoch, group)``); micro-batch ``j`` takes the ``j``-th ``B`` of its global batch's
  length order. Every rank measures the whole group from JSON-only reads (the cost is in that module).
- **Lanes.** Micro-step ``m`` is served by DataLoader worker lane ``m % L`` (``L`` = workers, 1 without);
  PyTorch hands out worker results round-robin. A lane keeps no positions of its own: everything follows
  from the micro-step number.
- **Reads.** A micro-batch reads only its own samples' members (consecutive stored samples with one ranged
  read, :class:`pipelines.shard_store.ShardReader`; its member indexes cached), so nothing beyond the
  micro-batch's bytes is held; each sample's sha256 is verified against its shard's member index.
- **Use.** A sample's JSON is parsed, its exclusion flags checked (gRefCOCO ``no_target``), its conversation
  re-drawn for ``use`` = the epoch of its position in the dataset's stream (``redraw.redraw(sample, seed,
  use)``, ``sample.meta["draw"] = [seed, use]``), and ``transform(sample, image_bytes)`` called when it is
  about to enter a batch. An unusable sample — a truncated or missing shard, a corrupt JSON member, a missing
  or undecodable image, a failed transform, a filtered one — is counted by reason in
  :meth:`MixtureLoader.stats` and replaced by a sample drawn from ``(seed, dataset, position, attempt)``
  (:meth:`~pipelines.loader.order.WindowOrder.candidate`: first inside its window, then over the dataset),
  so the replacement is world-size-free too; ``strict=True`` raises :class:`LoaderError` instead, and a
  position with no usable sample in :data:`~pipelines.loader.order.MAX_ATTEMPTS` draws is a
  :class:`LoaderError` naming the dataset.
- **Pinned generation.** The loader pins each split's build generation (``mixture.json``'s, checked against
  the manifests when it is made). A read that meets a damaged or missing shard first re-reads that split's
  manifest: another generation, or none (a rebuild in progress), stops the run with one ``LoaderError``
  ("the shards of <split> changed under this run"); the same generation is real damage, a counted skip.

The state (:meth:`MixtureLoader.state_dict`, format ``xsam-loader/2``) is plain JSON with no rank or worker
count in its data: identity fields, the split it was written under (informative; it decides only where a
state inside a step can resume), the next micro-step and its step, the per-dataset global cursors at that
step (recomputed and compared on load) and this rank's counters. Any rank's state resumes any rank of any
world size / worker count / split with the same global batch (see :meth:`MixtureLoader.load_state_dict`).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.errors import ErrorPolicy, ImageDecodeError, LoaderError, MixtureError, Skip
from pipelines.loader import grouping, redraw
from pipelines.loader import mixture as mixture_mod
from pipelines.loader.order import (
    MAX_ATTEMPTS,
    StepPlan,
    WindowOrder,
    dataset_tag,
    step_sources,
    step_uniforms,
)
from pipelines.schema import Sample
from pipelines.shard_store import Manifest, MissingManifestError, RawSample, ShardReader, ShardStoreError

logger = logging.getLogger(__name__)

STATE_FORMAT = "xsam-loader/2"
V1_FORMAT = "xsam-loader/1"
V1_BEFORE = "030c8b6"  # the last commit whose loader wrote xsam-loader/1 (per-(rank, lane) slices)
_MAX_ERRORS = 16  # recent skip details kept in stats
_COUNTERS = ("batches", "samples", "bytes_read", "ranged_reads", "shards_indexed")


# ---------------------------------------------------------------------------------------------- pinned generation
# a sample read as one of these may mean the split was rebuilt since the run pinned its generation
_CHANGED_REASONS = frozenset({"digest_mismatch", "shard_mismatch", "unreadable_shard", "truncated_shard"})


def check_pinned(shards: str, d: mixture_mod.DatasetWeight) -> None:
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


# ---------------------------------------------------------------------------------------------- one dataset
class _Dataset:
    """One dataset's stored samples by index (shards concatenated in manifest order) and its global stream."""

    def __init__(
        self, d: mixture_mod.DatasetWeight, reader: ShardReader, shards: str, seed: int, window: int
    ):
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
        """Stored samples ``indices`` → raws (JSON + image, digest-checked); each run of consecutive samples
        inside one shard is one ranged read."""
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
        if any(r.reason in _CHANGED_REASONS for r in out.values()):
            check_pinned(self.shards, self.d)  # a rebuild landing under the run, not bad data
        return out

    def read_json(self, i: int) -> tuple[RawSample, bool]:
        """Stored sample ``i``'s JSON member only (no image bytes, no digest check) and whether it has an
        image member — what length grouping measures other ranks' samples with."""
        s, j = self._locate(int(i))
        ref = self.d.shards[s]
        idx = self.reader.index(ref.file, ref.samples, ref.bytes, ref.index_sha256)
        if j >= idx.n:
            if idx.reason in _CHANGED_REASONS:
                check_pinned(self.shards, self.d)
            return RawSample(None, reason=idx.reason, detail=f"{ref.file} sample {j}: {idx.error}"), False
        start = int(idx.json_off[j])
        try:
            blob = self.reader.fs.cat_file(
                self.reader.path(ref.file), start=start, end=start + int(idx.json_len[j])
            )
        except OSError as e:
            check_pinned(self.shards, self.d)
            return RawSample(idx.keys[j], reason="unreadable_shard", detail=f"{ref.file}: {e}"), False
        self.reader.stats["bytes_read"] += len(blob)
        self.reader.stats["ranged_reads"] = self.reader.stats.get("ranged_reads", 0) + 1
        return RawSample(idx.keys[j], blob), bool(idx.img_off[j] >= 0)


# ---------------------------------------------------------------------------------------------- the stream
def new_stats(names: Sequence[str] = ()) -> dict:
    return {
        "batches": 0,
        "samples": 0,
        "skipped": {},
        "filtered": {},
        "bytes_read": 0,
        "ranged_reads": 0,
        "shards_indexed": 0,
        "batches_by_source": dict.fromkeys(names, 0),
        "errors": [],
    }


def merge_stats(total: dict, part: dict) -> dict:
    """Add the counters of ``part`` into ``total`` (in place; returns it)."""
    for k in _COUNTERS:
        total[k] = total.get(k, 0) + part.get(k, 0)
    for k in ("skipped", "filtered", "batches_by_source"):
        for r, v in part.get(k, {}).items():
            total.setdefault(k, {})[r] = total[k].get(r, 0) + v
    total["errors"] = (total.get("errors", []) + part.get("errors", []))[-_MAX_ERRORS:]
    return total


def _default_transform(sample: Sample, image_bytes: bytes | None) -> dict:
    return {"sample": sample, "image_bytes": image_bytes}


@dataclass(frozen=True)
class Batch:
    step: int  # global (optimizer) step
    micro_step: int
    source: str  # dataset name "<source>/<split>"
    task: str
    data: Any  # collate(list of transform outputs)
    keys: tuple[str, ...] = field(default=())  # sample keys of this micro-batch, in batch order


# a sample that cannot be used: ("skipped" | "filtered", reason, key, detail)
_Failure = tuple[str, str, "str | None", str]


@dataclass
class _Context:
    """Per-process (per DataLoader worker) caches: step plan, datasets, length groups, the shard reader."""

    plan: StepPlan
    reader: ShardReader
    groups: grouping.LengthGroups
    datasets: dict[int, _Dataset] = field(default_factory=dict)


class MixtureStream:
    """The torch-free core: this rank's micro-batches, each a pure function of its micro-step number."""

    def __init__(
        self,
        shards: str,
        stage: mixture_mod.StageMixture,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        lanes: int = 1,
        seed: int = 0,
        grad_accum: int = 1,
        transform: Callable[[Sample, bytes | None], Any] | None = None,
        collate: Callable[[list], Any] | None = None,
        shuffle_window: int = 64,
        strict: bool = False,
        exclude_flags: Sequence[str] | None = None,
        storage_options: dict | None = None,
        max_cached_indexes: int = 256,
        redraw_conversations: bool = True,
        verify: bool = True,
        length_group: int = 8,
        variant_categories: bool = True,
    ):
        if not stage.datasets:
            raise LoaderError(
                f"stage {stage.stage} has no dataset (missing: {[m['dataset'] for m in stage.missing]})"
            )
        for name, v in (
            ("batch_size", batch_size),
            ("world_size", world_size),
            ("lanes", lanes),
            ("grad_accum", grad_accum),
            ("shuffle_window", shuffle_window),
            ("length_group", length_group),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.shards, self.stage = str(shards), stage
        self.batch_size, self.rank, self.world_size, self.lanes = batch_size, rank, world_size, lanes
        self.seed, self.grad_accum, self.shuffle_window = int(seed), grad_accum, shuffle_window
        self.strict = strict
        self.global_batch = batch_size * grad_accum * world_size
        # no deliberate filters at load time: strict stops at the first unreadable sample of any kind
        self.policy = ErrorPolicy(strict=strict, filters=frozenset(), error=LoaderError)
        self.transform = transform or _default_transform
        self.collate = collate or list
        self.exclude_flags = tuple(stage.exclude_flags if exclude_flags is None else exclude_flags)
        self.storage_options = storage_options
        self.max_cached_indexes = max_cached_indexes
        # X-SAM re-draws wordings per access: use u of a sample (its u-th epoch) is pipelines.loader.redraw's
        self.redraw_conversations = bool(redraw_conversations)
        # stage-3 genseg's category prompt re-drawn as the archive's use_variant_cat; False: the stored list
        self.variant_categories = bool(variant_categories)
        self.verify = bool(verify)  # each sample's sha256 against its shard's member index (issue 20)
        # global batches per length-sorted group (pipelines.loader.grouping); 1 = ungrouped
        self.length_group = length_group if self.global_batch > 1 else 1
        self.names = stage.names
        self.probabilities = np.asarray(stage.probabilities, dtype=np.float64)
        self._warned: set[str] = set()
        self._plan: StepPlan | None = None

    # ------------------------------------------------------------------ the plan
    def sources_of(self, micro_steps: np.ndarray) -> np.ndarray:
        """Dataset index of each micro-step (the draw of its global step)."""
        return step_sources(self.seed, np.asarray(micro_steps) // self.grad_accum, self.probabilities)

    def cursors(self, step: int) -> dict[str, int]:
        """Dataset → global stream position at the start of global ``step`` (positions consumed before it)."""
        # kept: a checkpoint every k steps extends the cached blocks instead of redrawing them from step 0
        if self._plan is None:
            self._plan = StepPlan(self.seed, self.probabilities)
        counts = self._plan.counts_before(step)
        return {n: int(self.global_batch * c) for n, c in zip(self.names, counts.tolist(), strict=True)}

    def context(self) -> _Context:
        stats = new_stats(self.names)
        reader = ShardReader(self.shards, self.storage_options, self.max_cached_indexes, stats, self.verify)
        groups = grouping.LengthGroups(self.seed, self.global_batch, self.length_group)
        return _Context(StepPlan(self.seed, self.probabilities), reader, groups)

    def _dataset(self, ctx: _Context, di: int) -> _Dataset:
        if di not in ctx.datasets:
            d = self.stage.datasets[di]
            ctx.datasets[di] = _Dataset(d, ctx.reader, self.shards, self.seed, self.shuffle_window)
        return ctx.datasets[di]

    # ------------------------------------------------------------------ micro-batches
    def iter_lane(self, lane: int, first_micro_step: int) -> Iterator[tuple[dict, Any]]:
        """Micro-steps ``first, first + L, …`` of ``lane``: yields ``(meta, collated batch)``; ``meta["stats"]``
        holds the counters of that micro-batch alone (the caller adds them up)."""
        if first_micro_step % self.lanes != lane:
            raise ValueError(f"micro-step {first_micro_step} does not belong to lane {lane} of {self.lanes}")
        ctx = self.context()
        m = first_micro_step
        while True:
            yield self.micro_batch(ctx, m, lane)
            m += self.lanes

    def micro_batch(self, ctx: _Context, m: int, lane: int = 0) -> tuple[dict, Any]:
        """This rank's micro-step ``m``: ``(meta, collated batch)``."""
        stats = ctx.reader.stats = new_stats(self.names)
        step, a = divmod(m, self.grad_accum)
        ds, items, keys = self.take(ctx, step, a * self.world_size + self.rank, stats)
        data = self.collate(items)
        stats["batches"] += 1
        stats["batches_by_source"][ds.d.name] = stats["batches_by_source"].get(ds.d.name, 0) + 1
        meta = {
            "micro_step": m,
            "step": step,
            "lane": lane,
            "source": ds.d.name,
            "task": ds.d.task,
            "keys": keys,
            "stats": stats,
        }
        return meta, data

    def positions(self, ctx: _Context, step: int, j: int) -> tuple[_Dataset, list[int], dict | None]:
        """Dataset, stream positions and (grouped) JSON-level resolution of micro-batch ``j`` of ``step``."""
        di = ctx.plan.source(step)
        ds = self._dataset(ctx, di)
        t = int(ctx.plan.counts_before(step)[di])  # the dataset's global batch number
        b = self.batch_size
        if self.length_group == 1:
            first = t * self.global_batch + j * b
            return ds, list(range(first, first + b)), None
        chunk, resolved = ctx.groups.global_batch_positions(
            ds.d.name, ds.tag, ds.n, t, lambda ps: self.measure(ds, ps)
        )
        mine = chunk[j * b : (j + 1) * b]
        return ds, mine, {p: resolved[p] for p in mine}

    def take(self, ctx: _Context, step: int, j: int, stats: dict) -> tuple[_Dataset, list, list[str]]:
        """Micro-batch ``j`` of global ``step``: its dataset, transformed items and sample keys."""
        ds, positions, resolved = self.positions(ctx, step, j)
        first = {p: resolved[p].attempt if resolved else 0 for p in positions}
        raws = ds.read([ds.order.candidate(p, first[p]) for p in positions])
        items, keys = [], []
        for p in positions:
            for f in resolved[p].failures if resolved else ():
                self._count(stats, f)
            item, key = self._resolve(ds, p, first[p], raws[ds.order.candidate(p, first[p])], stats)
            items.append(item)
            keys.append(key)
        stats["samples"] += len(items)
        return ds, items, keys

    def _resolve(self, ds: _Dataset, p: int, attempt: int, raw: RawSample | None, stats: dict):
        """The item and key used for stream position ``p``: its candidate at ``attempt`` (``raw``) or the
        first usable replacement after it."""
        use = ds.order.epoch(p)
        for a in range(attempt, MAX_ATTEMPTS):
            if raw is None:
                i = ds.order.candidate(p, a)
                raw = ds.read([i])[i]
            got = self.check(raw, ds.d, use, raw.image is not None)
            if isinstance(got, tuple):
                self._count(stats, got)
            else:
                item = self.transform_one(got, raw.image, raw.key, stats)
                if item is not None:
                    return item, raw.key
            raw = None
        raise LoaderError(
            f"{ds.d.name}: no usable sample in {MAX_ATTEMPTS} draws for stream position {p} "
            f"({ds.n} samples); recent errors: {stats['errors'][-3:]}"
        )

    def measure(self, ds: _Dataset, positions: list[int]) -> list[grouping.Resolved]:
        """JSON-level resolution of ``positions`` for length grouping: the attempt each lands on, its text
        length, the failures before it (nothing counted here: the rank that trains on it counts them)."""
        out = []
        for p in positions:
            use, failures = ds.order.epoch(p), []
            for a in range(MAX_ATTEMPTS):
                raw, has_image = ds.read_json(ds.order.candidate(p, a))
                got = self.check(raw, ds.d, use, has_image)
                if not isinstance(got, tuple):
                    out.append(grouping.Resolved(a, grouping.text_length(got), failures))
                    break
                failures.append(got)
            else:
                raise LoaderError(
                    f"{ds.d.name}: no usable sample in {MAX_ATTEMPTS} draws for stream position {p} "
                    f"({ds.n} samples); last: {failures[-1][1]}: {failures[-1][3]}"
                )
        return out

    # ------------------------------------------------------------------ one sample
    def _count(self, stats: dict, failure: _Failure) -> None:
        """Count a sample that cannot be used (the first of each reason per process is also a warning), unless
        the error policy stops on it (filtered samples never stop it)."""
        kind, reason, key, detail = failure
        if kind == "filtered":
            stats["filtered"][reason] = stats["filtered"].get(reason, 0) + 1
            return
        skip = self.policy.check(Skip(key or "?", reason, detail))
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"loader: skipping {skip} (counted in stats; strict=True raises)", stacklevel=3)
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
        stats["errors"] = (stats["errors"] + [f"{key}: {reason}: {detail}"[:300]])[-_MAX_ERRORS:]

    def check(
        self, raw: RawSample, d: mixture_mod.DatasetWeight, use: int, has_image: bool
    ) -> Sample | _Failure:
        """Raw bytes → the (re-drawn) Sample of this use, or why it cannot be used (nothing counted)."""
        if raw.reason is not None:
            return ("skipped", raw.reason, raw.key, raw.detail)
        try:
            sample = Sample.from_dict(json.loads(raw.json))
        except (ValueError, KeyError, TypeError) as e:
            return ("skipped", "corrupt_json", raw.key, f"{type(e).__name__}: {e}")
        if sample.source != d.source or sample.key != raw.key:
            return (
                "skipped",
                "foreign_sample",
                raw.key,
                f"holds {sample.key!r}, expected a {d.source} sample",
            )
        for flag in self.exclude_flags:
            if sample.meta.get(flag):
                return ("filtered", flag, raw.key, "")
        if sample.image is not None and not has_image:
            return ("skipped", "missing_image", raw.key, "no image member in the shard")
        if self.redraw_conversations:  # a re-drawn sample that breaks the schema raises LoaderError
            sample = redraw.redraw(sample, self.seed, use, self.variant_categories)
        sample.meta["draw"] = [self.seed, use]  # the transform's own draws (stage-1 jitter) key on these
        return sample

    def transform_one(self, sample: Sample, image: bytes | None, key: str, stats: dict) -> Any | None:
        """``transform(sample, image)``, or None when it fails (counted; strict raises)."""
        try:
            return self.transform(sample, image)
        except LoaderError:
            raise
        except Exception as e:  # noqa: BLE001 — a bad sample must not stop training; counted, shown, strict raises
            reason = (
                "corrupt_image"
                if isinstance(e, ImageDecodeError) or _is_pil_decode_error(e)
                else "transform_error"
            )
            self._count(stats, ("skipped", reason, key, f"{type(e).__name__}: {e}"))
            return None


def _is_pil_decode_error(e: Exception) -> bool:
    from PIL import UnidentifiedImageError

    return isinstance(e, UnidentifiedImageError) or (isinstance(e, OSError) and "image file" in str(e))


def global_batch_keys(stream: MixtureStream, step: int) -> list[str]:
    """Sorted sample keys of global ``step``'s whole batch (every rank's micro-batches), computed in this
    process with ``stream``'s own transform — what :func:`orchestrate.fingerprint.fingerprint` digests. It
    reads and transforms the whole global batch (``G`` samples), so it is for tests and audits, not for
    every training step (the trainer gathers the ranks' :attr:`Batch.keys` instead)."""
    ctx, stats, keys = stream.context(), new_stats(stream.names), []
    for j in range(stream.global_batch // stream.batch_size):
        keys += stream.take(ctx, step, j, stats)[2]
    return sorted(keys)


# ---------------------------------------------------------------------------------------------- DataLoader glue
def _passthrough(x):
    return x


def _lane_dataset_cls():
    """The DataLoader-facing dataset, built on first use so importing this module does not import torch
    (start-up RSS); it is published as ``pipelines.loader.stream._LaneDataset`` so spawn workers can unpickle it."""
    if "_LaneDataset" in globals():
        return globals()["_LaneDataset"]
    import torch.utils.data

    class _LaneDataset(torch.utils.data.IterableDataset):
        """Worker ``w`` of an iteration starting at micro-step ``m0`` serves lane ``(m0 + w) % L``."""

        def __init__(self, stream: MixtureStream, start: int):
            self.stream, self.start = stream, start

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            w, n = (info.id, info.num_workers) if info else (0, 1)
            if n != self.stream.lanes:
                raise LoaderError(
                    f"DataLoader has {n} workers but the stream was built for {self.stream.lanes}"
                )
            try:
                yield from self.stream.iter_lane((self.start + w) % n, self.start + w)
            except LoaderError as e:  # handed over as an item: PyTorch would glue a traceback to the line
                yield {"error": str(e)}, None

    _LaneDataset.__module__ = __name__
    globals()["_LaneDataset"] = _LaneDataset
    return _LaneDataset


def __getattr__(name: str):
    if name == "_LaneDataset":
        return _lane_dataset_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stage_mixture(shards: str, stage: int, mixture) -> mixture_mod.StageMixture:
    """The stage's mixture (given, or read from ``mixture`` / ``<shards>/mixture.json``), after checking that
    the shards are still the build generation it was computed from (:class:`LoaderError` otherwise)."""
    if isinstance(mixture, mixture_mod.StageMixture):
        stage_mix = mixture
    else:
        mix = mixture if isinstance(mixture, mixture_mod.Mixture) else mixture_mod.load(mixture or shards)
        stage_mix = mix.stage(stage)
    try:
        mixture_mod.check_generations(str(shards), stage_mix)
    except MixtureError as e:
        raise LoaderError(str(e)) from None
    return stage_mix


# ---------------------------------------------------------------------------------------------- state checks
def _fit(state: dict, mine: dict) -> None:
    """ValueError naming every identity field where ``state`` and this loader differ (a state written before
    ``variant_categories`` was a field re-drew genseg prompts: True)."""
    state = {"variant_categories": True, **state}
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
        raise ValueError(
            "loader state does not fit this loader (field: state vs loader): "
            + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
        )


def _v1_to_v2(state: dict, stream: MixtureStream, identity: dict) -> dict:
    """An ``xsam-loader/1`` state (per-(rank, lane) positions) as a v2 state, only when it was written by the
    same rank, world size, lanes, sizes and identity as this loader; else ValueError naming the fields.

    Its positions cannot be carried over (they index per-(rank, lane) slices that the world-size-free order
    does not have), so the run continues at the state's micro-step in the new order: from that step on it
    sees the samples any v2 run of this seed sees at those steps, not the ones a v1 run would have. That is
    logged as a warning."""
    state = dict(state)
    if isinstance(state.get("stage"), str) and state["stage"].isdigit():
        state["stage"] = int(state["stage"])  # states saved before stages were ints
    state.setdefault("length_group", 1)  # states saved before length grouping: ungrouped
    skip = ("format", "global_batch", "redraw_conversations", "variant_categories")
    v1 = {k: v for k, v in identity.items() if k not in skip}
    v1.update(rank=stream.rank, world_size=stream.world_size, lanes=stream.lanes)
    v1.update(batch_size=stream.batch_size, grad_accum=stream.grad_accum)
    if stream.batch_size == 1:  # v1 stored length_group 1 when batch_size was 1
        v1["length_group"] = 1
    try:
        _fit(state, v1)
    except ValueError as e:
        raise ValueError(
            f"{e} — an {V1_FORMAT} state (written by the per-(rank, lane) loader up to commit {V1_BEFORE}) "
            f"loads only on the same rank, world size, loader workers and sizes; restart the stage or resume "
            f"with the sizes it was written with"
        ) from None
    logger.warning(
        "loader: %s state at micro-step %d continues in the world-size-free order (xsam-loader/2): the samples "
        "from here on are not the ones the per-(rank, lane) loader would have read",
        V1_FORMAT,
        int(state["micro_step"]),
    )
    stats = new_stats(stream.names)
    for lane_stats in state.get("stats", []):
        merge_stats(stats, lane_stats)
    micro = int(state["micro_step"])
    return {
        **identity,
        "split": _split(stream),
        "micro_step": micro,
        "step": micro // stream.grad_accum,
        "stats": stats,
    }


def _split(s: MixtureStream) -> dict:
    """How the global batch is split (informative, and decides where a mid-step state can resume)."""
    return {
        "batch_size": s.batch_size,
        "grad_accum": s.grad_accum,
        "world_size": s.world_size,
        "lanes": s.lanes,
    }


def _resume_micro_step(state: dict, stream: MixtureStream) -> int:
    """The micro-step this loader resumes at: the state's under the same split, ``step × grad_accum`` under
    another one — which needs the state at a global-step boundary (ValueError with the reason otherwise)."""
    micro, split = int(state["micro_step"]), state.get("split", {})
    same = all(split.get(k) == v for k, v in _split(stream).items() if k != "lanes")
    if same:
        return micro
    accum = int(split.get("grad_accum", 0)) or None
    if accum is None or micro % accum:
        raise ValueError(
            f"loader state stopped at micro-step {micro}, inside a global step of its split {split} "
            f"(micro-batches of one step are only known as a whole); this loader splits the global batch as "
            f"{_split(stream)}: resume from a checkpoint taken at a global-step boundary, or with the same "
            f"batch_size / grad_accum / world_size"
        )
    return micro // accum * stream.grad_accum


class MixtureLoader:
    """One rank's loader over a stage's mixture (see the module docstring for the sampling contract).

    Args:
        shards: the shards root (local folder or fsspec URI) holding ``<source>/<split>/*.tar``.
        stage: which stage of the mixture (1, 2, 3).
        batch_size: samples per micro-batch on this rank (global batch = batch_size × grad_accum × world_size).
        rank, world_size: this rank and the number of ranks (data-parallel).
        num_workers: DataLoader worker processes (0 = in this process); the lanes of the sampling contract.
        seed: the run's data seed.
        grad_accum: micro-batches per global step (all from the step's dataset).
        transform: ``(Sample, image bytes | None) -> item`` — e.g. ``XSamProcessor``; default keeps both.
        collate: ``list[item] -> batch`` — e.g. ``processor.collate``; default ``list``.
        mixture: a :class:`~pipelines.loader.mixture.Mixture`, a path/URI of ``mixture.json``; default
            ``<shards>/mixture.json``.
        shuffle_window: consecutive stored samples per window of the global stream's window-local shuffle
            (memory: only a micro-batch's bytes are held, whatever the window).
        strict: raise :class:`LoaderError` at the first unreadable sample instead of skipping it.
        verify: check each sample's sha256 against its shard's member index as it is read (a changed byte is
            a ``digest_mismatch`` skip, an error under ``strict``); False only to measure what it costs.
        exclude_flags: skip samples whose ``meta[flag]`` is true; default the mixture's (``no_target``).
        storage_options: passed to fsspec for ``shards``.
        prefetch_factor, pin_memory, multiprocessing_context: passed to ``torch.utils.data.DataLoader``.
        opencv_threads: OpenCV threads set in this process before workers start (inherited by them; default 1,
            one core per worker); None leaves OpenCV alone.
        length_group: global batches per length-sorted group of a dataset (:mod:`pipelines.loader.grouping`,
            X-SAM's length grouping); 1 = ungrouped. No effect when the global batch is 1.
        variant_categories: stage-3 genseg train samples get the archive's ``use_variant_cat`` category prompt
            per use (:func:`pipelines.loader.redraw.variant_prompt`); False keeps the stored category list.
    """

    def __init__(
        self,
        shards: str,
        *,
        stage: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        grad_accum: int = 1,
        transform: Callable[[Sample, bytes | None], Any] | None = None,
        collate: Callable[[list], Any] | None = None,
        mixture: mixture_mod.Mixture | mixture_mod.StageMixture | str | None = None,
        shuffle_window: int = 64,
        strict: bool = False,
        exclude_flags: Sequence[str] | None = None,
        storage_options: dict | None = None,
        prefetch_factor: int | None = 2,
        pin_memory: bool = False,
        multiprocessing_context=None,
        opencv_threads: int | None = 1,
        redraw_conversations: bool = True,
        verify: bool = True,
        length_group: int = 8,
        variant_categories: bool = True,
    ):
        stage_mix = _stage_mixture(shards, stage, mixture)
        self.num_workers, self.opencv_threads = num_workers, opencv_threads
        self.stream = MixtureStream(
            shards,
            stage_mix,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            lanes=max(1, num_workers),
            seed=seed,
            grad_accum=grad_accum,
            transform=transform,
            collate=collate,
            shuffle_window=shuffle_window,
            strict=strict,
            exclude_flags=exclude_flags,
            storage_options=storage_options,
            redraw_conversations=redraw_conversations,
            verify=verify,
            length_group=length_group,
            variant_categories=variant_categories,
        )
        self.dataloader_kwargs = {
            "prefetch_factor": prefetch_factor if num_workers else None,
            "pin_memory": pin_memory,
            "multiprocessing_context": multiprocessing_context,
        }
        self.digest = stage_mix.digest()
        self._micro_step = 0
        self._stats = new_stats(self.stream.names)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        start = self._micro_step
        if self.num_workers == 0:
            source = self.stream.iter_lane(0, start)
        else:
            import torch.utils.data

            if self.opencv_threads is not None:
                # one core per worker: OpenCV's own pool would oversubscribe. It must be set here, before the
                # fork — cv2.setNumThreads inside a forked worker deadlocks on the parent's pool state.
                import cv2

                cv2.setNumThreads(self.opencv_threads)
            source = iter(
                torch.utils.data.DataLoader(
                    _lane_dataset_cls()(self.stream, start),
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_passthrough,
                    persistent_workers=False,
                    **self.dataloader_kwargs,
                )
            )
        for meta, data in source:
            if "error" in meta:  # a worker's LoaderError, raised here with its one line
                raise LoaderError(meta["error"])
            if meta["micro_step"] != self._micro_step:  # DataLoader round-robin is what makes lanes work
                raise LoaderError(
                    f"expected micro-step {self._micro_step}, a worker produced {meta['micro_step']}"
                )
            self._micro_step += 1
            merge_stats(self._stats, meta["stats"])
            yield Batch(
                meta["step"], meta["micro_step"], meta["source"], meta["task"], data, tuple(meta["keys"])
            )

    # ------------------------------------------------------------------ state
    @property
    def micro_step(self) -> int:
        return self._micro_step

    @property
    def step(self) -> int:
        return self._micro_step // self.stream.grad_accum

    @property
    def global_batch(self) -> int:
        """Samples per global step: batch_size × grad_accum × world_size."""
        return self.stream.global_batch

    def _identity(self) -> dict:
        s = self.stream
        return {
            "format": STATE_FORMAT,
            "stage": s.stage.stage,
            "mixture_digest": self.digest,
            "seed": s.seed,
            "global_batch": s.global_batch,
            "shuffle_window": s.shuffle_window,
            "exclude_flags": list(s.exclude_flags),
            "length_group": s.length_group,
            "redraw_conversations": s.redraw_conversations,
            "variant_categories": s.variant_categories,
        }

    def state_dict(self) -> dict:
        """Plain-JSON state after the last batch handed out: resume with :meth:`load_state_dict`.

        ``cursors`` are the datasets' global stream positions at the start of ``step`` (what steps before it
        consumed); ``split`` records how this loader split the global batch; ``stats`` are this rank's."""
        return {
            **self._identity(),
            "split": _split(self.stream),
            "micro_step": self._micro_step,
            "step": self.step,
            "cursors": self.stream.cursors(self.step),
            "stats": copy.deepcopy(self._stats),
        }

    def load_state_dict(self, state: dict, *, keep_stats: bool = True) -> None:
        """Continue from ``state`` — any rank's, written under any world size, worker count or batch_size ×
        grad_accum split with the same global batch, seed, mixture and order settings (ValueError naming the
        fields that differ). A state inside a global step resumes only under the same split. An
        ``xsam-loader/1`` state loads only with every size equal (see :func:`_v1_to_v2`). The cursors are
        recomputed from ``(seed, step)`` and must equal the saved ones. ``keep_stats=False`` starts this
        rank's counters at zero (e.g. a rank that did not exist when the state was written)."""
        mine = self._identity()
        if state.get("format") == V1_FORMAT:
            state = _v1_to_v2(state, self.stream, mine)
        elif state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r}: this loader reads {STATE_FORMAT}")
        _fit(state, mine)
        micro = _resume_micro_step(state, self.stream)
        saved_step = int(state["step"])
        if "cursors" in state:
            expected = self.stream.cursors(saved_step)
            if state["cursors"] != expected:
                raise ValueError(
                    f"loader state cursors {state['cursors']} at step {saved_step} are not the ones seed "
                    f"{self.stream.seed} gives ({expected}): written by another sampler"
                )
        self._micro_step = micro
        self._stats = copy.deepcopy(state["stats"]) if keep_stats else new_stats(self.stream.names)

    # ------------------------------------------------------------------ reporting
    @property
    def planned(self) -> dict[str, float]:
        """Dataset → planned probability p_d."""
        return dict(zip(self.stream.names, self.stream.probabilities.tolist(), strict=True))

    def seen(self) -> dict[str, float]:
        """Dataset → share of this rank's batches so far (compare with :attr:`planned`)."""
        counts = self.stats()["batches_by_source"]
        total = sum(counts.values())
        return {n: (counts.get(n, 0) / total if total else 0.0) for n in self.stream.names}

    def stats(self) -> dict:
        """This rank's counters: batches, samples, skipped/filtered by reason, bytes read, ranged reads…"""
        out = merge_stats(new_stats(self.stream.names), self._stats)
        out["micro_step"] = self._micro_step
        return out

    def steps_per_epoch(self) -> int:
        """Global steps per epoch of the mixture (X-SAM: Σ ceil(N_d·r_d / global batch))."""
        return self.stream.stage.steps_per_epoch(self.stream.global_batch)


__all__ = [
    "Batch",
    "LoaderError",
    "MixtureLoader",
    "MixtureStream",
    "global_batch_keys",
    "step_sources",
    "step_uniforms",
]
