"""The sampling contract and its torch-free core, :class:`MixtureStream`: one source per global step, a
world-size-free data order, exact resume on any world size (docs/architecture.md, "Loader").

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
  length order. Every rank measures the whole group from verified reads (the cost is in that module).
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
- **Pinned generation.** A read that meets a damaged or missing shard re-checks the split's build generation
  (:func:`pipelines.loader.dataset.check_pinned`): a rebuild under the run stops it with one ``LoaderError``.

The state (:meth:`~pipelines.loader.mixture_loader.MixtureLoader.state_dict`, :mod:`pipelines.loader.state`)
holds no rank or worker count: any rank's state resumes any rank of any world size / worker count / split
with the same global batch. The DataLoader workers are :mod:`pipelines.loader.workers`.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from pipelines.errors import ErrorPolicy, ImageDecodeError, LoaderError, Skip
from pipelines.loader import grouping, redraw
from pipelines.loader.dataset import StoredDataset
from pipelines.loader.order import MAX_ATTEMPTS, StepPlan, step_sources
from pipelines.loader.stats import IO_COUNTERS, LoaderStats
from pipelines.mixture_file import DatasetWeight, StageMixture
from pipelines.schema import Sample
from pipelines.shard_store import RawSample, ShardReader

logger = logging.getLogger(__name__)


def _default_transform(sample: Sample, image_bytes: bytes | None) -> dict:
    return {"sample": sample, "image_bytes": image_bytes}


# a sample that cannot be used: ("skipped" | "filtered", reason, key, detail)
_Failure = tuple[str, str, "str | None", str]


@dataclass
class _Context:
    """Per-process (per DataLoader worker) caches: step plan, datasets, length groups, the shard reader."""

    plan: StepPlan
    reader: ShardReader
    groups: grouping.LengthGroups
    datasets: dict[int, StoredDataset] = field(default_factory=dict)


def _check_sizes(rank: int, **sizes: int) -> None:
    """ValueError naming the first size that is not a positive int, or a rank outside the world."""
    for name, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 0 <= rank < sizes["world_size"]:
        raise ValueError(f"rank {rank} outside [0, {sizes['world_size']})")


class MixtureStream:
    """The torch-free core: this rank's micro-batches, each a pure function of its micro-step number."""

    def __init__(
        self,
        shards: str,
        stage: StageMixture,
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
        _check_sizes(
            rank,
            batch_size=batch_size,
            world_size=world_size,
            lanes=lanes,
            grad_accum=grad_accum,
            shuffle_window=shuffle_window,
            length_group=length_group,
        )
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
        self.verify = bool(verify)  # each sample's sha256 against its shard's member index
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
        io = dict.fromkeys(IO_COUNTERS, 0)  # replaced per micro-batch (micro_batch)
        reader = ShardReader(self.shards, self.storage_options, self.max_cached_indexes, io, self.verify)
        groups = grouping.LengthGroups(self.seed, self.global_batch, self.length_group)
        return _Context(StepPlan(self.seed, self.probabilities), reader, groups)

    def _dataset(self, ctx: _Context, di: int) -> StoredDataset:
        if di not in ctx.datasets:
            d = self.stage.datasets[di]
            ctx.datasets[di] = StoredDataset(d, ctx.reader, self.shards, self.seed, self.shuffle_window)
        return ctx.datasets[di]

    # ------------------------------------------------------------------ micro-batches
    def iter_lane(self, lane: int, first_micro_step: int) -> Iterator[tuple[dict, Any]]:
        """Micro-steps ``first, first + L, …`` of ``lane``: yields ``(meta, collated batch)``;
        ``meta["stats"]`` holds the counters of that micro-batch alone (the caller adds them up)."""
        if first_micro_step % self.lanes != lane:
            raise ValueError(f"micro-step {first_micro_step} does not belong to lane {lane} of {self.lanes}")
        ctx = self.context()
        m = first_micro_step
        while True:
            yield self.micro_batch(ctx, m, lane)
            m += self.lanes

    def micro_batch(self, ctx: _Context, m: int, lane: int = 0) -> tuple[dict, Any]:
        """This rank's micro-step ``m``: ``(meta, collated batch)``."""
        stats, io = LoaderStats.new(self.names), dict.fromkeys(IO_COUNTERS, 0)
        ctx.reader.stats = io  # the reads of this micro-batch alone
        step, a = divmod(m, self.grad_accum)
        ds, items, keys = self.take(ctx, step, a * self.world_size + self.rank, stats)
        data = self.collate(items)
        stats.batch(ds.d.name)
        stats.add_io(io)
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

    def positions(self, ctx: _Context, step: int, j: int) -> tuple[StoredDataset, list[int], dict | None]:
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

    def take(
        self, ctx: _Context, step: int, j: int, stats: LoaderStats
    ) -> tuple[StoredDataset, list, list[str]]:
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
        stats.samples += len(items)
        return ds, items, keys

    def _resolve(self, ds: StoredDataset, p: int, attempt: int, raw: RawSample | None, stats: LoaderStats):
        """The item and key used for stream position ``p``: its candidate at ``attempt`` (``raw``) or the
        first usable replacement after it."""
        use = ds.order.epoch(p)
        for a in range(attempt, MAX_ATTEMPTS):
            if raw is None:
                i = ds.order.candidate(p, a)
                raw = ds.read([i])[i]
            got = self.check(raw, ds.d, use)
            if isinstance(got, tuple):
                self._count(stats, got)
            else:
                item = self.transform_one(got, raw.image, raw.key, stats)
                if item is not None:
                    return item, raw.key
            raw = None
        raise LoaderError(
            f"{ds.d.name}: no usable sample in {MAX_ATTEMPTS} draws for stream position {p} "
            f"({ds.n} samples); recent errors: {stats.errors[-3:]}"
        )

    def measure(self, ds: StoredDataset, positions: list[int]) -> list[grouping.Resolved]:
        """JSON-level resolution of ``positions`` for length grouping: the attempt each lands on, its text
        length, the failures before it (nothing counted here: the rank that trains on it counts them).

        Each candidate is read whole and checked against its shard's member index before its JSON is
        parsed (the sample's sha256 covers JSON and image), a global batch of positions per ranged read, so
        a changed member is a ``digest_mismatch`` failure here, the same on every rank."""
        out = []
        for lo in range(0, len(positions), self.global_batch):  # at most G samples' bytes held at once
            block = positions[lo : lo + self.global_batch]
            raws = ds.read([ds.order.candidate(p, 0) for p in block])
            out += [self._measure_one(ds, p, raws[ds.order.candidate(p, 0)]) for p in block]
        return out

    def _measure_one(self, ds: StoredDataset, p: int, raw: RawSample) -> grouping.Resolved:
        """Position ``p`` resolved from its first candidate's ``raw`` (replacements read one at a time)."""
        use, failures = ds.order.epoch(p), []
        for a in range(MAX_ATTEMPTS):
            if a:
                i = ds.order.candidate(p, a)
                raw = ds.read([i])[i]
            got = self.check(raw, ds.d, use)
            if not isinstance(got, tuple):
                return grouping.Resolved(a, grouping.text_length(got), failures)
            failures.append(got)
        raise LoaderError(
            f"{ds.d.name}: no usable sample in {MAX_ATTEMPTS} draws for stream position {p} "
            f"({ds.n} samples); last: {failures[-1][1]}: {failures[-1][3]}"
        )

    # ------------------------------------------------------------------ one sample
    def _count(self, stats: LoaderStats, failure: _Failure) -> None:
        """Count a sample that cannot be used (the first of each reason per process is also a warning), unless
        the error policy stops on it (filtered samples never stop it)."""
        kind, reason, key, detail = failure
        if kind == "filtered":
            stats.filter(reason)
            return
        skip = self.policy.check(Skip(key or "?", reason, detail))
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"loader: skipping {skip} (counted in stats; strict=True raises)", stacklevel=3)
        stats.skip(reason, key, detail)

    def check(self, raw: RawSample, d: DatasetWeight, use: int) -> Sample | _Failure:
        """Raw bytes → the (re-drawn) Sample of this use, or why it cannot be used (nothing counted)."""
        if raw.reason is not None:
            return ("skipped", raw.reason, raw.key, raw.detail)
        # raw.json was checked against the shard's member index when it was read (ShardReader.read); a build
        # without an index, or verify=False, can still hand over hostile bytes: a nesting too deep for the
        # parser (RecursionError) is a corrupt member like any other
        try:
            sample = Sample.from_dict(json.loads(raw.json))
        except (ValueError, KeyError, TypeError, RecursionError) as e:
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
        if sample.image is not None and raw.image is None:
            return ("skipped", "missing_image", raw.key, "no image member in the shard")
        if self.redraw_conversations:  # a re-drawn sample that breaks the schema raises LoaderError
            sample = redraw.redraw(sample, self.seed, use, self.variant_categories)
        sample.meta["draw"] = [self.seed, use]  # the transform's own draws (stage-1 jitter) key on these
        return sample

    def transform_one(self, sample: Sample, image: bytes | None, key: str, stats: LoaderStats) -> Any | None:
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
    return isinstance(e, UnidentifiedImageError) or (isinstance(e, OSError) and "image file" in str(e))


def global_batch_keys(stream: MixtureStream, step: int) -> list[str]:
    """Sorted sample keys of global ``step``'s whole batch (every rank's micro-batches), computed in this
    process with ``stream``'s own transform — what :func:`orchestrate.fingerprint.fingerprint` digests. It
    reads and transforms the whole global batch (``G`` samples), so it is for tests and audits, not for
    every training step (the trainer gathers the ranks' :attr:`Batch.keys` instead)."""
    ctx, stats, keys = stream.context(), LoaderStats.new(stream.names), []
    for j in range(stream.global_batch // stream.batch_size):
        keys += stream.take(ctx, step, j, stats)[2]
    return sorted(keys)
