"""The training-side streaming reader: one source per global step, disjoint slices, exact resume (DESIGN §4.6).

    loader = MixtureLoader("s3://bucket/shards", stage=3, batch_size=4, rank=r, world_size=n, num_workers=4,
                           transform=processor, collate=processor.collate, seed=0)
    loader.load_state_dict(ckpt["loader"])          # optional: resume
    for batch in loader:                            # Batch(step, micro_step, source, task, data)
        ...; ckpt["loader"] = loader.state_dict()

How a micro-batch is chosen — a pure function of ``(seed, micro_step, rank, per-source position)``:

- **Source.** Global step ``s = micro_step // grad_accum`` draws its dataset from the mixture's ``p`` with a
  counter-based RNG keyed by ``(seed, s)`` (splitmix64), identical on every rank and worker; all micro-batches
  of a step (every rank, every accumulation step) come from that one dataset, hence one task.
- **Lanes.** Micro-step ``m`` is served by lane ``m % L`` (``L`` = DataLoader workers, 1 without workers);
  PyTorch's DataLoader hands out worker results round-robin, so worker ``w`` of an iteration that starts at
  micro-step ``m0`` serves lane ``(m0 + w) % L`` without any shared state.
- **Slices.** Consumer ``c = rank·L + lane`` of ``C = world_size·L`` reads only ``[c·N/C, (c+1)·N/C)`` of a
  dataset's ``N`` shard samples (concatenated in shard order): whole shards when there are many, a range of
  samples inside a shard when shards are fewer than consumers. Slices never overlap, so no sample is read by
  two ranks (or workers) in the same pass; a dataset smaller than ``C`` gives each consumer one sample.
- **Order.** Each pass (epoch) over a slice visits its windows of ``shuffle_window`` consecutive samples in
  a random order and the samples of a window in a random order, both seeded by ``(seed, dataset, consumer,
  epoch[, window])``; when the slice runs out the next epoch re-shuffles and repeats it. This is a shuffle
  buffer whose content is a function of the position, so a resumed run reads exactly what an uninterrupted
  one would without replaying anything. A window is read with one ranged read per shard it touches (the
  shard's member offsets come from one scan of its tar headers, :class:`pipelines.shard_store.ShardReader`),
  and only the current window of each dataset is held in memory.
- **Use.** A sample's JSON is parsed, its exclusion flags checked (gRefCOCO ``no_target``), and ``transform
  (sample, image_bytes)`` called only when it is about to enter a batch; RLE masks are decoded (if at all) by
  the transform. Anything unreadable — a truncated or missing shard, a corrupt JSON member, an image the
  transform cannot decode — is skipped, counted by reason in :meth:`MixtureLoader.stats` and the next sample
  taken; ``strict=True`` raises :class:`LoaderError` instead.
- **Pinned generation.** The loader pins each split's build generation (``mixture.json``'s, checked against
  the manifests when it is made). A window that meets a damaged or missing shard first re-reads that split's
  manifest: another generation, or none (a rebuild in progress), stops the run with one ``LoaderError``
  ("the shards of <split> changed under this run"); the same generation is real damage, a counted skip.

The state (:meth:`MixtureLoader.state_dict`) is plain JSON: the next micro-step and, per dataset, per lane,
the number of slice positions consumed, plus cumulative counters. Save one per rank.
"""

from __future__ import annotations

import copy
import json
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.build.options import ErrorPolicy
from pipelines.errors import ImageDecodeError, LoaderError, MixtureError, Skip
from pipelines.loader import grouping, redraw
from pipelines.loader import mixture as mixture_mod
from pipelines.schema import Sample
from pipelines.shard_store import Manifest, MissingManifestError, RawSample, ShardReader, ShardStoreError

STATE_FORMAT = "xsam-loader/1"
_TAG_WINDOWS, _TAG_INNER = 1, 2  # keep the two per-epoch RNG streams apart
_MAX_ERRORS = 16  # recent skip details kept in stats


# ---------------------------------------------------------------------------------------------- step → source
def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def step_uniforms(seed: int, steps: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per global step, a pure function of ``(seed, step)`` (float64, 53 random bits)."""
    key = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        x = _splitmix64(np.asarray(steps, dtype=np.int64).astype(np.uint64) ^ key)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def step_sources(seed: int, steps: np.ndarray, probabilities: Sequence[float]) -> np.ndarray:
    """Dataset index of each global step: inverse-CDF of :func:`step_uniforms` over ``probabilities``."""
    cdf = np.cumsum(np.asarray(probabilities, dtype=np.float64))
    cdf[-1] = 1.0  # absorb rounding: u < 1 always lands on a dataset
    return np.searchsorted(cdf, step_uniforms(seed, steps), side="right")


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, *parts])


# ---------------------------------------------------------------------------------------------- one dataset, one consumer
class _Cursor:
    """A consumer's view of one dataset: its slice, the epoch orders, and the current window's bytes."""

    def __init__(
        self,
        d: mixture_mod.DatasetWeight,
        consumer: int,
        consumers: int,
        seed: int,
        window: int,
        reader: ShardReader,
        shards: str = "",
    ):
        self.d, self.reader, self.seed, self.shards = d, reader, seed, shards
        self.tag = zlib.crc32(d.name.encode())
        self.consumer = consumer
        self.shard_starts = np.concatenate([[0], np.cumsum([s.samples for s in d.shards])]).astype(np.int64)
        n = int(self.shard_starts[-1])
        self.start, self.stop = consumer * n // consumers, (consumer + 1) * n // consumers
        if self.stop == self.start:  # fewer samples than consumers: one sample each, shared
            self.stop = self.start + 1
        self.length = self.stop - self.start
        self.window = max(1, min(window, self.length))
        self.n_windows = -(-self.length // self.window)
        self._epoch = None  # (epoch, window order, cumulative sizes in that order)
        self._loaded = None  # (epoch, window id, inner permutation, raws)

    def _epoch_order(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            order = _rng(self.seed, _TAG_WINDOWS, self.tag, self.consumer, epoch).permutation(self.n_windows)
            sizes = np.minimum(self.window, self.length - order * self.window)
            self._epoch = (epoch, order, np.cumsum(sizes))
        return self._epoch

    def get(self, position: int) -> RawSample:
        """The raw sample at ``position`` (0, 1, … over all epochs) of this consumer's stream."""
        epoch, i = divmod(position, self.length)
        _, order, cum = self._epoch_order(epoch)
        k = int(np.searchsorted(cum, i, side="right"))
        wid = int(order[k])
        offset = i - (int(cum[k - 1]) if k else 0)
        if self._loaded is None or self._loaded[:2] != (epoch, wid):
            lo = self.start + wid * self.window
            hi = min(lo + self.window, self.stop)
            inner = _rng(self.seed, _TAG_INNER, self.tag, self.consumer, epoch, wid).permutation(hi - lo)
            self._loaded = None  # drop the previous window before reading the next
            self._loaded = (epoch, wid, inner, self._read(lo, hi))
        return self._loaded[3][int(self._loaded[2][offset])]

    def _read(self, lo: int, hi: int) -> list[RawSample]:
        """Global sample range [lo, hi) of this dataset → raws, one ranged read per shard touched."""
        self.reader.stats["windows_read"] += 1
        out: list[RawSample] = []
        first = int(np.searchsorted(self.shard_starts, lo, side="right")) - 1
        for s in range(first, len(self.d.shards)):
            s0, s1 = int(self.shard_starts[s]), int(self.shard_starts[s + 1])
            if s0 >= hi:
                break
            a, b = max(lo, s0) - s0, min(hi, s1) - s0
            ref = self.d.shards[s]
            out += self.reader.read(
                ref.file, ref.samples, a, b, size=ref.bytes, index_sha256=ref.index_sha256
            )
        if any(r.reason in _CHANGED_REASONS for r in out):
            check_pinned(self.shards, self.d)  # a rebuild landing under the run, not bad data
        return out


# a sample read as one of these may mean the split was rebuilt since the run pinned its generation
_CHANGED_REASONS = frozenset({"digest_mismatch", "shard_mismatch", "unreadable_shard", "truncated_shard"})


def check_pinned(shards: str, d: mixture_mod.DatasetWeight) -> None:
    """Stop with :class:`LoaderError` when ``d``'s manifest no longer commits the generation this run pinned
    (``mixture.json``'s, checked when the loader was made): a rebuild landed or is in progress. The same
    generation means the damage is real, and the caller keeps it a counted skip. Called once per window read
    that met a damaged sample, so clean reads never touch the manifest."""
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


# ---------------------------------------------------------------------------------------------- the stream
def new_stats(names: Sequence[str] = ()) -> dict:
    return {
        "batches": 0,
        "samples": 0,
        "skipped": {},
        "filtered": {},
        "bytes_read": 0,
        "windows_read": 0,
        "shards_indexed": 0,
        "batches_by_source": dict.fromkeys(names, 0),
        "errors": [],
    }


def _default_transform(sample: Sample, image_bytes: bytes | None) -> dict:
    return {"sample": sample, "image_bytes": image_bytes}


@dataclass(frozen=True)
class Batch:
    step: int  # global (optimizer) step
    micro_step: int
    source: str  # dataset name "<source>/<split>"
    task: str
    data: Any  # collate(list of transform outputs)


class MixtureStream:
    """The torch-free core: lane ``l`` of this rank produces its micro-batches from a start state."""

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
        self.seed, self.grad_accum, self.shuffle_window, self.strict = (
            int(seed),
            grad_accum,
            shuffle_window,
            strict,
        )
        # no deliberate filters at load time: strict stops at the first unreadable sample of any kind
        self.policy = ErrorPolicy(strict=strict, filters=frozenset(), error=LoaderError)
        self.transform = transform or _default_transform
        self.collate = collate or list
        self.exclude_flags = tuple(stage.exclude_flags if exclude_flags is None else exclude_flags)
        self.storage_options = storage_options
        self.max_cached_indexes = max_cached_indexes
        # X-SAM re-draws wordings per access: use u of a sample (its u-th epoch) is pipelines.loader.redraw's
        self.redraw_conversations = bool(redraw_conversations)
        self.verify = bool(verify)  # each sample's sha256 against its shard's member index (issue 20)
        # micro-batches per length-sorted group (pipelines.loader.grouping); 1 = ungrouped, as main
        self.length_group = length_group if batch_size > 1 else 1
        self.names = stage.names
        self.probabilities = np.asarray(stage.probabilities, dtype=np.float64)

    def sources_of(self, micro_steps: np.ndarray) -> np.ndarray:
        """Dataset index of each micro-step (the draw of its global step)."""
        return step_sources(self.seed, np.asarray(micro_steps) // self.grad_accum, self.probabilities)

    def iter_lane(
        self,
        lane: int,
        first_micro_step: int,
        positions: dict[str, int],
        stats: dict,
        groups: dict[str, int] | None = None,
    ) -> Iterator[tuple[dict, Any]]:
        """Micro-steps ``first, first + L, …`` of ``lane``: yields ``(meta, collated batch)``; ``positions``,
        ``stats`` and ``groups`` (micro-batches handed out of each dataset's current length group) are this
        lane's start state (copied, not mutated)."""
        if first_micro_step % self.lanes != lane:
            raise ValueError(f"micro-step {first_micro_step} does not belong to lane {lane} of {self.lanes}")
        positions, stats, groups = dict(positions), copy.deepcopy(stats), dict(groups or {})
        reader = ShardReader(self.shards, self.storage_options, self.max_cached_indexes, stats, self.verify)
        consumer, consumers = self.rank * self.lanes + lane, self.world_size * self.lanes
        cursors = {}
        m = first_micro_step
        while True:
            block = m + self.lanes * np.arange(256)
            for m, di in zip(block.tolist(), self.sources_of(block).tolist(), strict=True):
                d = self.stage.datasets[di]
                if d.name not in cursors:
                    cursors[d.name] = _Cursor(
                        d, consumer, consumers, self.seed, self.shuffle_window, reader, self.shards
                    )
                if self.length_group > 1:
                    items, positions[d.name], groups[d.name] = grouping.take(
                        self, cursors[d.name], positions.get(d.name, 0), groups.get(d.name, 0), stats
                    )
                else:
                    items, positions[d.name] = self._take(cursors[d.name], positions.get(d.name, 0), stats)
                data = self.collate(items)
                stats["batches"] += 1
                stats["batches_by_source"][d.name] = stats["batches_by_source"].get(d.name, 0) + 1
                meta = {
                    "micro_step": m,
                    "step": m // self.grad_accum,
                    "lane": lane,
                    "source": d.name,
                    "task": d.task,
                    "position": positions[d.name],
                    "group": groups.get(d.name, 0),
                    "stats": copy.deepcopy(stats),
                }
                yield meta, data
            m += self.lanes

    def _take(self, cur: _Cursor, position: int, stats: dict) -> tuple[list, int]:
        """The next ``batch_size`` usable samples of a cursor from ``position``; returns (items, new position)."""
        items, bad = [], 0
        while len(items) < self.batch_size:
            raw = cur.get(position)
            use = position // cur.length  # the epoch of this consumer's slice: each key once per epoch
            position += 1
            item = self._use(raw, cur.d, stats, use)
            if item is None:
                bad += 1
                if bad >= cur.length + self.batch_size:  # a whole pass without a usable sample
                    raise LoaderError(
                        f"{cur.d.name}: no usable sample in consumer {cur.consumer}'s slice of "
                        f"{cur.length}; recent errors: {stats['errors'][-3:]}"
                    )
                continue
            bad = 0
            items.append(item)
            stats["samples"] += 1
        return items, position

    def _skip(self, stats: dict, reason: str, key: str | None, detail: str) -> None:
        """Count a sample that cannot be used (the first of each reason is also a warning), unless the
        error policy stops on it."""
        skip = self.policy.check(Skip(key or "?", reason, detail))
        if reason not in stats["skipped"]:
            warnings.warn(f"loader: skipping {skip} (counted in stats; strict=True raises)", stacklevel=3)
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
        stats["errors"] = (stats["errors"] + [f"{key}: {reason}: {detail}"[:300]])[-_MAX_ERRORS:]

    def _use(self, raw: RawSample, d: mixture_mod.DatasetWeight, stats: dict, use: int = 0) -> Any | None:
        """Raw bytes → transformed item, or None (skipped / filtered, counted)."""
        sample = self.prepare(raw, d, stats, use)
        return None if sample is None else self.transform_one(sample, raw.image, raw.key, stats)

    def prepare(self, raw: RawSample, d: mixture_mod.DatasetWeight, stats: dict, use: int) -> Sample | None:
        """Raw bytes → the (re-drawn) Sample of this use, or None (skipped / filtered, counted)."""
        if raw.reason is not None:
            return self._skip(stats, raw.reason, raw.key, raw.detail)
        try:
            sample = Sample.from_dict(json.loads(raw.json))
        except (ValueError, KeyError, TypeError) as e:
            return self._skip(stats, "corrupt_json", raw.key, f"{type(e).__name__}: {e}")
        if sample.source != d.source or sample.key != raw.key:
            return self._skip(
                stats, "foreign_sample", raw.key, f"holds {sample.key!r}, expected a {d.source} sample"
            )
        for flag in self.exclude_flags:
            if sample.meta.get(flag):
                stats["filtered"][flag] = stats["filtered"].get(flag, 0) + 1
                return None
        if sample.image is not None and raw.image is None:
            return self._skip(stats, "missing_image", raw.key, "no image member in the shard")
        if self.redraw_conversations:  # a re-drawn sample that breaks the schema raises LoaderError
            sample = redraw.redraw(sample, self.seed, use)
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
            return self._skip(stats, reason, key, f"{type(e).__name__}: {e}")


def _is_pil_decode_error(e: Exception) -> bool:
    from PIL import UnidentifiedImageError

    return isinstance(e, UnidentifiedImageError) or (isinstance(e, OSError) and "image file" in str(e))


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

        def __init__(
            self,
            stream: MixtureStream,
            start: int,
            positions: list[dict],
            stats: list[dict],
            groups: list[dict],
        ):
            self.stream, self.start, self.positions, self.stats = stream, start, positions, stats
            self.groups = groups

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            w, n = (info.id, info.num_workers) if info else (0, 1)
            if n != self.stream.lanes:
                raise LoaderError(
                    f"DataLoader has {n} workers but the stream was built for {self.stream.lanes}"
                )
            lane = (self.start + w) % n
            try:
                yield from self.stream.iter_lane(
                    lane, self.start + w, self.positions[lane], self.stats[lane], self.groups[lane]
                )
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


class MixtureLoader:
    """One rank's loader over a stage's mixture (see the module docstring for the sampling contract).

    Args:
        shards: the shards root (local folder or fsspec URI) holding ``<source>/<split>/*.tar``.
        stage: which stage of the mixture (1, 2, 3).
        batch_size: samples per micro-batch on this rank.
        rank, world_size: this rank and the number of ranks (data-parallel).
        num_workers: DataLoader worker processes (0 = in this process); the lanes of the sampling contract.
        seed: the run's data seed.
        grad_accum: micro-batches per global step (all from the step's dataset).
        transform: ``(Sample, image bytes | None) -> item`` — e.g. ``XSamProcessor``; default keeps both.
        collate: ``list[item] -> batch`` — e.g. ``processor.collate``; default ``list``.
        mixture: a :class:`~pipelines.loader.mixture.Mixture`, a path/URI of ``mixture.json``; default
            ``<shards>/mixture.json``.
        shuffle_window: samples per shuffle window (memory: one window per dataset per worker).
        strict: raise :class:`LoaderError` at the first unreadable sample instead of skipping it.
        verify: check each sample's sha256 against its shard's member index as it is read (a changed byte is
            a ``digest_mismatch`` skip, an error under ``strict``); False only to measure what it costs.
        exclude_flags: skip samples whose ``meta[flag]`` is true; default the mixture's (``no_target``).
        storage_options: passed to fsspec for ``shards``.
        prefetch_factor, pin_memory, multiprocessing_context: passed to ``torch.utils.data.DataLoader``.
        opencv_threads: OpenCV threads set in this process before workers start (inherited by them; default 1,
            one core per worker); None leaves OpenCV alone.
        length_group: micro-batches per length-sorted group of a dataset (:mod:`pipelines.loader.grouping`,
            X-SAM's length grouping); 1 = ungrouped (``main``). No effect at ``batch_size=1``.
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
        )
        self.dataloader_kwargs = {
            "prefetch_factor": prefetch_factor if num_workers else None,
            "pin_memory": pin_memory,
            "multiprocessing_context": multiprocessing_context,
        }
        self.digest = stage_mix.digest()
        self._micro_step = 0
        lanes = self.stream.lanes
        self._positions = [dict.fromkeys(self.stream.names, 0) for _ in range(lanes)]
        self._groups = [dict.fromkeys(self.stream.names, 0) for _ in range(lanes)]
        self._stats = [new_stats(self.stream.names) for _ in range(lanes)]

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        start = self._micro_step
        if self.num_workers == 0:
            source = self.stream.iter_lane(0, start, self._positions[0], self._stats[0], self._groups[0])
        else:
            import torch.utils.data

            if self.opencv_threads is not None:
                # one core per worker: OpenCV's own pool would oversubscribe. It must be set here, before the
                # fork — cv2.setNumThreads inside a forked worker deadlocks on the parent's pool state.
                import cv2

                cv2.setNumThreads(self.opencv_threads)
            ds = _lane_dataset_cls()(
                self.stream,
                start,
                copy.deepcopy(self._positions),
                copy.deepcopy(self._stats),
                copy.deepcopy(self._groups),
            )
            source = iter(
                torch.utils.data.DataLoader(
                    ds,
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
            self._positions[meta["lane"]][meta["source"]] = meta["position"]
            self._groups[meta["lane"]][meta["source"]] = meta["group"]
            self._stats[meta["lane"]] = meta["stats"]
            yield Batch(meta["step"], meta["micro_step"], meta["source"], meta["task"], data)

    # ------------------------------------------------------------------ state
    @property
    def micro_step(self) -> int:
        return self._micro_step

    @property
    def step(self) -> int:
        return self._micro_step // self.stream.grad_accum

    def _identity(self) -> dict:
        s = self.stream
        return {
            "format": STATE_FORMAT,
            "stage": s.stage.stage,
            "mixture_digest": self.digest,
            "seed": s.seed,
            "rank": s.rank,
            "world_size": s.world_size,
            "lanes": s.lanes,
            "batch_size": s.batch_size,
            "grad_accum": s.grad_accum,
            "shuffle_window": s.shuffle_window,
            "exclude_flags": list(s.exclude_flags),
            "length_group": s.length_group,
        }

    def state_dict(self) -> dict:
        """Plain-JSON state after the last batch handed out: resume with :meth:`load_state_dict`."""
        return {
            **self._identity(),
            "micro_step": self._micro_step,
            "step": self.step,
            "positions": {n: [p[n] for p in self._positions] for n in self.stream.names},
            "groups": {n: [g[n] for g in self._groups] for n in self.stream.names},
            "stats": copy.deepcopy(self._stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; every identity field (seed, rank, sizes, mixture) must match."""
        mine = self._identity()
        # states saved before stages were ints hold "1", "2", "3"
        if isinstance(state.get("stage"), str) and state["stage"].isdigit():
            state = {**state, "stage": int(state["stage"])}
        if "length_group" not in state:  # states saved before length grouping: ungrouped
            state = {**state, "length_group": 1}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(
                "loader state does not fit this loader (field: (state, loader)): "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
        if set(state["positions"]) != set(self.stream.names):
            raise ValueError(
                f"state datasets {sorted(state['positions'])} != mixture {sorted(self.stream.names)}"
            )
        self._micro_step = int(state["micro_step"])
        self._positions = [
            {n: int(state["positions"][n][lane]) for n in self.stream.names}
            for lane in range(self.stream.lanes)
        ]
        groups = state.get("groups", {})
        self._groups = [
            {n: int(groups.get(n, [0] * self.stream.lanes)[lane]) for n in self.stream.names}
            for lane in range(self.stream.lanes)
        ]
        self._stats = copy.deepcopy(state["stats"])

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
        """Counters summed over this rank's lanes: batches, samples, skipped/filtered by reason, bytes read…"""
        out = new_stats(self.stream.names)
        for s in self._stats:
            for k in ("batches", "samples", "bytes_read", "windows_read", "shards_indexed"):
                out[k] += s[k]
            for k in ("skipped", "filtered", "batches_by_source"):
                for r, v in s[k].items():
                    out[k][r] = out[k].get(r, 0) + v
            out["errors"] += s["errors"]
        out["micro_step"] = self._micro_step
        return out

    def steps_per_epoch(self) -> int:
        """Global steps per epoch of the mixture (X-SAM: Σ ceil(N_d·r_d / global batch))."""
        return self.stream.stage.steps_per_epoch(
            self.stream.batch_size * self.stream.grad_accum * self.stream.world_size
        )


__all__ = [
    "Batch",
    "LoaderError",
    "MixtureLoader",
    "MixtureStream",
    "step_sources",
    "step_uniforms",
]
