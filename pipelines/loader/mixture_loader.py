"""The training loader: :class:`MixtureLoader`, one rank's micro-batches of a stage's mixture as
:class:`Batch` items, with a plain-JSON state that resumes on any world size.

    loader = MixtureLoader("s3://bucket/shards", stage=3, batch_size=4, rank=r, world_size=n, num_workers=4,
                           transform=processor, collate=processor.collate, seed=0)
    loader.load_state_dict(ckpt["loader"])          # optional: resume (any world size, same global batch)
    for batch in loader:                            # Batch(step, micro_step, source, task, data, keys)
        ...; ckpt["loader"] = loader.state_dict()

What it reads and in which order is :mod:`pipelines.loader.stream` (the sampling contract); the state is
:mod:`pipelines.loader.state`, the counters :mod:`pipelines.loader.stats`, the DataLoader workers
:mod:`pipelines.loader.workers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import LoaderError, MixtureError
from pipelines.loader import state as state_mod
from pipelines.loader.stats import LoaderStats
from pipelines.loader.stream import MixtureStream
from pipelines.mixture_file import Mixture, StageMixture, check_generations
from pipelines.mixture_file import load as load_mixture
from pipelines.schema import Sample

# Heavy imports (torch) are deferred into the worker path: building shards and reading mixtures import this
# package and never need it.


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the loader hands it out."""

    step: int  # global (optimizer) step
    micro_step: int
    source: str  # dataset name "<source>/<split>"
    task: str
    data: Any  # collate(list of transform outputs)
    keys: tuple[str, ...] = field(default=())  # sample keys of this micro-batch, in batch order


class MixtureLoader:
    """One rank's loader over a stage's mixture (see the module docstring for the sampling contract).

    Args:
        shards: the shards root (local folder or fsspec URI) holding ``<source>/<split>/*.tar``.
        stage: which stage of the mixture (1, 2, 3).
        batch_size: samples per micro-batch on this rank (global batch = batch_size × grad_accum ×
            world_size).
        rank, world_size: this rank and the number of ranks (data-parallel).
        num_workers: DataLoader worker processes (0 = in this process); the lanes of the sampling contract.
        seed: the run's data seed.
        grad_accum: micro-batches per global step (all from the step's dataset).
        transform: ``(Sample, image bytes | None) -> item`` — e.g. ``XSamProcessor``; default keeps both.
        collate: ``list[item] -> batch`` — e.g. ``processor.collate``; default ``list``.
        mixture: a :class:`~pipelines.mixture_file.Mixture`, a path/URI of ``mixture.json``; default
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
        mixture: Mixture | StageMixture | str | None = None,
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
        self._stats = LoaderStats.new(self.stream.names)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        start = self._micro_step
        if self.num_workers == 0:
            source = self.stream.iter_lane(0, start)
        else:
            # torch is imported only when workers start: building shards and reading mixtures import this
            # package and never need it (its import costs seconds and ~300 MB of start-up memory)
            from pipelines.loader.workers import worker_batches

            source = worker_batches(
                self.stream, start, self.num_workers, self.opencv_threads, self.dataloader_kwargs
            )
        for meta, data in source:
            if "error" in meta:  # a worker's LoaderError, raised here with its one line
                raise LoaderError(meta["error"])
            if meta["micro_step"] != self._micro_step:  # DataLoader round-robin is what makes lanes work
                raise LoaderError(
                    f"expected micro-step {self._micro_step}, a worker produced {meta['micro_step']}"
                )
            self._micro_step += 1
            self._stats.merge(meta["stats"])
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
        return state_mod.identity(
            stage=s.stage.stage,
            mixture_digest=self.digest,
            seed=s.seed,
            global_batch=s.global_batch,
            shuffle_window=s.shuffle_window,
            exclude_flags=s.exclude_flags,
            length_group=s.length_group,
            redraw_conversations=s.redraw_conversations,
            variant_categories=s.variant_categories,
        )

    def _split(self) -> state_mod.Split:
        s = self.stream
        return state_mod.Split(s.batch_size, s.grad_accum, s.world_size, s.lanes, s.rank)

    def state_dict(self) -> dict:
        """Plain-JSON state after the last batch handed out: resume with :meth:`load_state_dict`.

        ``cursors`` are the datasets' global stream positions at the start of ``step`` (what steps before it
        consumed); ``split`` records how this loader split the global batch; ``stats`` are this rank's."""
        return {
            **self._identity(),
            "split": self._split().to_dict(),
            "micro_step": self._micro_step,
            "step": self.step,
            "cursors": self.stream.cursors(self.step),
            "stats": self._stats.to_dict(),
        }

    def load_state_dict(self, state: dict, *, keep_stats: bool = True) -> None:
        """Continue from ``state`` — any rank's, written under any world size, worker count or batch_size ×
        grad_accum split with the same global batch, seed, mixture and order settings (ValueError naming the
        fields that differ). A state inside a global step resumes only under the same split. An
        ``xsam-loader/1`` state loads only with every size equal (see :func:`pipelines.loader.state.from_v1`).
        The cursors are recomputed from ``(seed, step)`` and must equal the saved ones. ``keep_stats=False``
        starts this rank's counters at zero (e.g. a rank that did not exist when the state was written)."""
        s = self.stream
        micro, stats = state_mod.resume(state, self._identity(), self._split(), s.names, s.cursors, s.seed)
        self._micro_step = micro
        self._stats = LoaderStats.from_dict(stats) if keep_stats else LoaderStats.new(s.names)

    # ------------------------------------------------------------------ reporting
    @property
    def planned(self) -> dict[str, float]:
        """Dataset → planned probability p_d."""
        return dict(zip(self.stream.names, self.stream.probabilities.tolist(), strict=True))

    def seen(self) -> dict[str, float]:
        """Dataset → share of this rank's batches so far (compare with :attr:`planned`)."""
        counts = self.stats().batches_by_source
        total = sum(counts.values())
        return {n: (counts.get(n, 0) / total if total else 0.0) for n in self.stream.names}

    def stats(self) -> LoaderStats:
        """A copy of this rank's counters: batches, samples, skipped/filtered by reason, bytes read…"""
        return LoaderStats.new(self.stream.names).merge(self._stats)

    def steps_per_epoch(self) -> int:
        """Global steps per epoch of the mixture (X-SAM: Σ ceil(N_d·r_d / global batch))."""
        return self.stream.stage.steps_per_epoch(self.stream.global_batch)


def _stage_mixture(shards: str, stage: int, mixture) -> StageMixture:
    """The stage's mixture (given, or read from ``mixture`` / ``<shards>/mixture.json``), after checking that
    the shards are still the build generation it was computed from (:class:`LoaderError` otherwise)."""
    if isinstance(mixture, StageMixture):
        stage_mix = mixture
    else:
        mix = mixture if isinstance(mixture, Mixture) else load_mixture(mixture or shards)
        stage_mix = mix.stage(stage)
    try:
        check_generations(str(shards), stage_mix)
    except MixtureError as e:
        raise LoaderError(str(e)) from None
    return stage_mix
