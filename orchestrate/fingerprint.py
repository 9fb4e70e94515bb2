"""The per-step data fingerprint (docs/training.md#proving-a-run-saw-the-same-data-per-step-data-fingerprint):
which samples each global step trained on.

Every step's record (``metrics.jsonl`` and wandb) carries two fields:

    data/source        the step's dataset, ``<source>/<split>`` (one per global step,
                       docs/contracts.md#loader-state)
    data/fingerprint   sha256 of the step's GLOBAL batch keys, sorted, as a JSON list; the first 16 hex
                       characters (64 bits: two different batches collide with probability ~2^-64 per
                       comparison, and the field stays readable in a table)

The fingerprint is a pure function of the sorted keys (:func:`fingerprint`): it does not depend on which
rank, DataLoader worker or micro-batch read a sample, so runs on different world sizes, worker counts or
micro-batch × accumulation splits compare equal exactly when their global batches hold the same samples.
Sample keys are unique within a dataset and carry their source, so the key multiset identifies the batch.

How the global keys are collected (:func:`gather_keys`): each rank knows only its own micro-batches' keys,
so the ranks exchange them with ``torch.distributed.all_gather_object`` on the group the trainer already has
(gloo on CPU, NCCL on GPU). That is exact — the keys of the samples that really entered the batches — and
cheap: one small collective per optimizer step (global batch × ~40 bytes, e.g. 64 keys ≈ 3 KB), next to the
gradient all-reduce of a step. The alternative, every rank recomputing the other ranks' keys from the
loader's deterministic plan, is not cheap: what a rank puts in a batch depends on the samples themselves
(unreadable ones are skipped, ``no_target`` ones filtered, length groups sorted by token count), so every
rank would have to read and parse the whole global batch — world size × the I/O.

Reading and comparing: :func:`read_fingerprints` takes a stage's ``metrics.jsonl`` (a step logged twice —
before and after a restart from an older checkpoint — keeps its last record, the one the final weights
saw) and :func:`compare` lines two runs up step by step; ``python -m orchestrate.summary --run-root R
--compare R2`` prints it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from orchestrate.run_errors import RunSetupError
from pipelines import storage

# Heavy imports (torch) are deferred into the rank check: fingerprints are computed on the driver without.

SOURCE_FIELD = "data/source"
FINGERPRINT_FIELD = "data/fingerprint"
FINGERPRINT_CHARS = 16
"""Hex characters kept of the sha256 (64 bits)."""


def fingerprint(keys: Iterable[str]) -> str:
    """sha256 of ``json.dumps(sorted(keys))``, first :data:`FINGERPRINT_CHARS` hex characters.

    JSON makes the encoding unambiguous for any key text (no separator a key could contain); sorting makes
    it independent of which rank or micro-batch held each sample. Duplicate keys count (a multiset)."""
    text = json.dumps(sorted(keys), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def gather_keys(local_keys: Sequence[str]) -> list[str]:
    """The global batch's keys: every rank's ``local_keys`` (all ranks must call it, once per step).

    Without an initialised process group (or with one rank) the local keys are the global ones."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local_keys)
    parts: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(local_keys))
    return [k for part in parts for k in part or ()]


def step_fields(source: str, global_keys: Iterable[str]) -> dict[str, str]:
    """The two fields a step's record carries."""
    return {SOURCE_FIELD: source, FINGERPRINT_FIELD: fingerprint(global_keys)}


# ---------------------------------------------------------------------------------------------- read, compare
def read_fingerprints(metrics_url: str) -> dict[int, tuple[str, str]]:
    """``{step: (source, fingerprint)}`` from a stage's ``metrics.jsonl`` (local path or URI); records
    without a fingerprint (mixture rows, runs logged before fingerprints existed) are left out; a step
    logged twice keeps its last record. Raises :class:`RunSetupError` for a missing or unreadable file."""
    fs, path = storage.fs_and_path(metrics_url)
    try:
        with fs.open(path, "rt") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunSetupError(f"{metrics_url}: cannot read ({type(e).__name__}: {e})") from e
    out: dict[int, tuple[str, str]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if FINGERPRINT_FIELD in row:
                out[int(row["step"])] = (str(row[SOURCE_FIELD]), str(row[FINGERPRINT_FIELD]))
        except (ValueError, KeyError, TypeError) as e:
            raise RunSetupError(f"{metrics_url}:{n}: not a metrics record ({type(e).__name__}: {e})") from e
    return out


@dataclass(frozen=True)
class Difference:
    """The first common step where the two runs' global batches differ."""

    step: int
    a: tuple[str, str]
    """(source, fingerprint) of run a at that step."""
    b: tuple[str, str]


@dataclass(frozen=True)
class Comparison:
    """Two runs' fingerprints lined up on the steps both logged."""

    common: list[int]
    only_a: list[int] = field(default_factory=list)
    only_b: list[int] = field(default_factory=list)
    differing: list[int] = field(default_factory=list)
    first: Difference | None = None

    @property
    def same(self) -> bool:
        """True when every common step saw the same data (and there is at least one)."""
        return bool(self.common) and not self.differing


def compare(a: Mapping[int, tuple[str, str]], b: Mapping[int, tuple[str, str]]) -> Comparison:
    """Compare two ``{step: (source, fingerprint)}`` maps on the steps both have."""
    common = sorted(set(a) & set(b))
    differing = [s for s in common if a[s] != b[s]]
    first = Difference(differing[0], a[differing[0]], b[differing[0]]) if differing else None
    return Comparison(
        common=common,
        only_a=sorted(set(a) - set(b)),
        only_b=sorted(set(b) - set(a)),
        differing=differing,
        first=first,
    )
