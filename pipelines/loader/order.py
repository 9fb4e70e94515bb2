"""The world-size-free data order of a stage (docs/contracts.md#loader-state,
docs/scale.md#elastic-resume-another-world-size-the-same-data): pure functions of the seed and the global
step, with no rank, DataLoader worker or micro-batch split in them.

- :func:`step_sources` — the dataset of global step ``s``: inverse CDF of a counter-based uniform keyed by
  ``(seed, s)`` over the mixture's ``p`` (splitmix64), identical on every rank.
- :class:`StepPlan` — how many steps before ``s`` drew each dataset. Dataset ``d``'s global cursor at step
  ``s`` is ``G × StepPlan.counts_before(s)[d]`` (``G`` = global batch): step ``s`` takes positions
  ``[cursor, cursor + G)`` of ``d``'s global stream. Counts are cached at block boundaries, so any step is
  one cached block plus one vectorised draw of at most a block away.
- :class:`WindowOrder` — a dataset's global stream: position ``p`` (0, 1, … over all epochs) is in epoch
  ``p // N``; each epoch visits the windows of ``window`` consecutive stored samples in an order drawn from
  ``(seed, dataset, epoch)`` and the samples of a window in an order drawn from ``(seed, dataset, epoch,
  window)``, so consecutive positions stay inside one window (reads stay mostly sequential).
- :meth:`WindowOrder.candidate` — the stored sample tried at ``attempt`` for position ``p``: attempt 0 is the
  stream's own sample; a replacement for an unusable one (``attempt ≥ 1``) is drawn from ``(seed, dataset,
  p, attempt)`` — the first :data:`LOCAL_ATTEMPTS` inside ``p``'s window (its bytes are near), later ones
  over the whole dataset.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_TAG_WINDOWS, _TAG_INNER, _TAG_REPLACE = 1, 2, 4  # keep the RNG streams apart (3 is grouping's)
LOCAL_ATTEMPTS = 8
"""Replacement draws taken inside the unusable sample's own window before drawing over the whole dataset."""
MAX_ATTEMPTS = 64
"""Draws for one position before its dataset is declared to have no usable sample."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def step_uniforms(seed: int, steps: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per global step, a pure function of ``(seed, step)`` (float64, 53 random
    bits)."""
    key = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        x = _splitmix64(np.asarray(steps, dtype=np.int64).astype(np.uint64) ^ key)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def step_sources(seed: int, steps: np.ndarray, probabilities: Sequence[float]) -> np.ndarray:
    """Dataset index of each global step: inverse-CDF of :func:`step_uniforms` over ``probabilities``."""
    cdf = np.cumsum(np.asarray(probabilities, dtype=np.float64))
    cdf[-1] = 1.0  # absorb rounding: u < 1 always lands on a dataset
    return np.searchsorted(cdf, step_uniforms(seed, steps), side="right")


def rng(seed: int, *parts: int) -> np.random.Generator:
    """A generator seeded by ``seed`` (64 bits) and non-negative ints."""
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, *parts])


def dataset_tag(name: str) -> int:
    """The RNG key part of a dataset ``<source>/<split>`` (crc32 of its name)."""
    return zlib.crc32(name.encode())


class StepPlan:
    """Which dataset each global step draws and how many earlier steps drew each dataset (pure in ``seed``).

    ``counts_before(s)`` is shape ``(D,)`` int64; memory: one ``(D,)`` row per ``block`` steps reached plus
    one ``(block + 1, D)`` prefix table of the block last asked for."""

    def __init__(self, seed: int, probabilities: Sequence[float], block: int = 4096):
        self.seed, self.block = int(seed), int(block)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.n = len(self.probabilities)
        self._starts = [np.zeros(self.n, dtype=np.int64)]  # counts before step k·block
        self._prefix: tuple[int, np.ndarray, np.ndarray] | None = None  # (k, sources, prefix counts)

    def sources(self, steps: np.ndarray) -> np.ndarray:
        return step_sources(self.seed, steps, self.probabilities)

    def _block(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._prefix is None or self._prefix[0] != k:
            src = self.sources(np.arange(k * self.block, (k + 1) * self.block))
            onehot = np.zeros((self.block + 1, self.n), dtype=np.int64)
            onehot[np.arange(1, self.block + 1), src] = 1
            self._prefix = (k, src, np.cumsum(onehot, axis=0))
        return self._prefix[1], self._prefix[2]

    def counts_before(self, step: int) -> np.ndarray:
        """Steps in ``[0, step)`` that drew each dataset, shape ``(D,)``."""
        k, r = divmod(int(step), self.block)
        while len(self._starts) <= k:  # extend the cached block starts (each a vectorised draw of a block)
            j = len(self._starts) - 1
            src = self.sources(np.arange(j * self.block, (j + 1) * self.block))
            self._starts.append(self._starts[j] + np.bincount(src, minlength=self.n))
        return self._starts[k] + self._block(k)[1][r]

    def source(self, step: int) -> int:
        return int(self._block(int(step) // self.block)[0][int(step) % self.block])


class WindowOrder:
    """The global stream of one dataset of ``n`` stored samples (see the module docstring)."""

    def __init__(self, n: int, window: int, seed: int, tag: int, cache: int = 64):
        if n < 1:
            raise ValueError("a dataset stream needs at least one sample")
        self.n, self.seed, self.tag = int(n), int(seed), int(tag)
        self.window = max(1, min(int(window), self.n))
        self.n_windows = -(-self.n // self.window)
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, window order, cum sizes)
        self._inner: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache = cache

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = rng(self.seed, _TAG_WINDOWS, self.tag, epoch).permutation(self.n_windows)
            sizes = np.minimum(self.window, self.n - order * self.window)
            self._epoch = (epoch, order, np.cumsum(sizes))
        return self._epoch[1], self._epoch[2]

    def _inner_perm(self, epoch: int, wid: int) -> np.ndarray:
        key = (epoch, wid)
        if key not in self._inner:
            size = min(self.window, self.n - wid * self.window)
            self._inner[key] = rng(self.seed, _TAG_INNER, self.tag, epoch, wid).permutation(size)
            while len(self._inner) > self._cache:
                self._inner.popitem(last=False)
        return self._inner[key]

    def index(self, position: int) -> int:
        """The stored sample index (0 … n-1) at global stream ``position``."""
        epoch, i = divmod(int(position), self.n)
        order, cum = self._epoch_order(epoch)
        k = int(np.searchsorted(cum, i, side="right"))
        wid = int(order[k])
        offset = i - (int(cum[k - 1]) if k else 0)
        return wid * self.window + int(self._inner_perm(epoch, wid)[offset])

    def indices(self, positions: Sequence[int]) -> list[int]:
        return [self.index(p) for p in positions]

    def epoch(self, position: int) -> int:
        """The epoch of ``position``: the ``use`` a re-drawn wording keys on."""
        return int(position) // self.n

    def candidate(self, position: int, attempt: int) -> int:
        """The stored sample tried for ``position`` at ``attempt`` (0: the stream's own; see the module
        doc)."""
        if attempt == 0:
            return self.index(position)
        draw = int(rng(self.seed, _TAG_REPLACE, self.tag, int(position), int(attempt)).integers(1 << 62))
        if attempt <= LOCAL_ATTEMPTS:
            wid = self.index(position) // self.window
            lo = wid * self.window
            return lo + draw % (min(lo + self.window, self.n) - lo)
        return draw % self.n
