"""The mixture file's types and its reader (docs/contracts.md, "Mixture"): what the build writes, the loader
reads.

``<out>/mixture.json`` is written by :mod:`pipelines.build.mixture_weights` at the end of every build; this
module holds its frozen dataclasses (one :class:`StageMixture` per training stage, one :class:`DatasetWeight`
per source/split with its shards) and :func:`load`, which re-validates the file (finite, positive
probabilities summing to 1) like torchtitan's dataset-mix configs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from pipelines import storage
from pipelines.errors import MixtureError
from pipelines.shard_store import Manifest, MissingManifestError

MIXTURE_FILE = "mixture.json"
MIXTURE_VERSION = 1
# Samples whose ``meta[flag]`` is true are not trained on (the loader skips them; N_d leaves them out).
EXCLUDE_FLAGS: tuple[str, ...] = ("no_target",)


# ---------------------------------------------------------------------------------------------- frozen data
@dataclass(frozen=True)
class ShardRef:
    file: str  # relative to the shards root: "<source>/<split>/<source>-<split>-000000.tar"
    samples: int
    bytes: int
    sha256: str | None = None
    index_sha256: str | None = None  # its member index's sha256 (None: a build from before the index)


@dataclass(frozen=True)
class DatasetWeight:
    name: str  # "<source>/<split>"
    source: str
    split: str
    task: str
    samples: int  # N_d: trainable samples (shard samples minus excluded ones)
    fraction: float  # f_d
    repeat: float  # r_d
    epoch_samples: int  # int(N_d·r_d)
    probability: float  # p_d
    shards: tuple[ShardRef, ...]
    shard_samples: int  # samples in the shards, excluded ones included (the loader indexes these)
    excluded: dict[str, int] = field(default_factory=dict)  # flag → samples left out
    fingerprint: str | None = None  # the manifest's build fingerprint (lineage)
    generation: str | None = None  # the build generation its manifest committed (checked by the loader)
    manifest_sha256: str | None = None  # of the manifest.json's bytes: mixtures written before split_sha256
    split_sha256: str | None = None  # Manifest.content_sha256 of the split it was computed from (lineage)


@dataclass(frozen=True)
class StageMixture:
    stage: int  # 1, 2, 3 (the JSON file keys and labels it "1", "2", "3": JSON keys are strings)
    t: float
    datasets: tuple[DatasetWeight, ...]
    missing: tuple[dict, ...] = ()  # {"dataset": "refcoco/train", "reason": "..."} for each wanted but absent
    exclude_flags: tuple[str, ...] = EXCLUDE_FLAGS

    def __post_init__(self):
        validate_stage(self)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    @property
    def probabilities(self) -> list[float]:
        return [d.probability for d in self.datasets]

    @property
    def samples_per_epoch(self) -> int:
        return sum(d.epoch_samples for d in self.datasets)

    def steps_per_epoch(self, global_batch: int) -> int:
        """Σ_d ceil(N_d·r_d / global_batch): X-SAM's iterations per epoch with single-source batches."""
        return sum(-(-d.epoch_samples // global_batch) for d in self.datasets)

    def digest(self) -> str:
        """sha256 of the canonical JSON: a loader state refers to the mixture it was made with."""
        return hashlib.sha256(json.dumps(stage_to_dict(self), sort_keys=True).encode()).hexdigest()


def validate_stage(s: StageMixture) -> None:
    """Raise :class:`MixtureError` unless every weight is finite and positive and they sum to 1."""
    where = f"stage {s.stage}"
    if not isinstance(s.stage, int) or isinstance(s.stage, bool):
        raise MixtureError(f"{where}: stage must be an int (1, 2, 3), got {s.stage!r}")
    if not math.isfinite(s.t) or s.t < 0:
        raise MixtureError(f"{where}: t={s.t!r} must be finite and >= 0")
    names = [d.name for d in s.datasets]
    if len(set(names)) != len(names):
        raise MixtureError(f"{where}: duplicate datasets {names}")
    for d in s.datasets:
        if not (isinstance(d.samples, int) and d.samples > 0):
            raise MixtureError(f"{where}: {d.name} has {d.samples!r} samples (must be a positive int)")
        for k in ("fraction", "repeat", "probability"):
            v = getattr(d, k)
            if not (isinstance(v, float | int) and math.isfinite(v) and v > 0):
                raise MixtureError(f"{where}: {d.name}.{k}={v!r} must be finite and > 0")
        if d.repeat < 1:
            raise MixtureError(f"{where}: {d.name}.repeat={d.repeat} < 1")
        if d.shard_samples != sum(sh.samples for sh in d.shards):
            raise MixtureError(f"{where}: {d.name}: shard_samples {d.shard_samples} != sum over its shards")
        if d.samples + sum(d.excluded.values()) != d.shard_samples:
            raise MixtureError(f"{where}: {d.name}: samples + excluded != shard_samples")
    if s.datasets:
        total = math.fsum(d.probability for d in s.datasets)
        if abs(total - 1.0) > 1e-9:
            raise MixtureError(f"{where}: probabilities sum to {total!r}, not 1")


@dataclass(frozen=True)
class Mixture:
    t: float
    stages: dict[int, StageMixture]
    version: int = MIXTURE_VERSION

    def stage(self, stage: int) -> StageMixture:
        if not isinstance(stage, int) or isinstance(stage, bool):
            raise TypeError(f"a mixture stage is an int (1, 2, 3), got {stage!r}")
        if stage not in self.stages:
            raise KeyError(f"mixture has no stage {stage}; it has {sorted(self.stages)}")
        return self.stages[stage]

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "t": self.t,
            "stages": {str(k): stage_to_dict(v) for k, v in sorted(self.stages.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Mixture:
        if d.get("version") != MIXTURE_VERSION:
            raise MixtureError(f"mixture version {d.get('version')!r} is not {MIXTURE_VERSION}")
        return cls(
            t=d["t"],
            stages={_stage_key(k): stage_from_dict(v) for k, v in d["stages"].items()},
            version=d["version"],
        )


def _stage_key(key: str) -> int:
    """A stage key of the JSON file ("1") as the int it stands for."""
    try:
        return int(key)
    except ValueError:
        raise MixtureError(f"mixture stage key {key!r} is not an int") from None


def _shard_dict(sh: ShardRef) -> dict:
    """A shard's JSON; ``index_sha256`` only when there is one, so a mixture written before member indexes
    keeps its digest (and the loader states that refer to it stay resumable)."""
    d = asdict(sh)
    if d["index_sha256"] is None:
        del d["index_sha256"]
    return d


def _dataset_dict(d: DatasetWeight) -> dict:
    """A dataset's JSON; ``generation``/``manifest_sha256``/``split_sha256`` only when known (older mixtures
    keep their digest)."""
    out = {**asdict(d), "shards": [_shard_dict(sh) for sh in d.shards]}
    for k in ("generation", "manifest_sha256", "split_sha256"):
        if out[k] is None:
            del out[k]
    return out


def check_generations(shards: str, stage: StageMixture) -> None:
    """Every dataset's manifest under ``shards`` still commits the build generation ``mixture.json`` was
    computed from; else :class:`MixtureError` in one line: which split, what changed, how to fix it.
    Datasets of mixtures written before generations existed are not checked."""
    for d in stage.datasets:
        if d.generation is None:
            continue
        try:
            now = Manifest.read(shards, d.source, d.split).generation
        except MissingManifestError:
            raise MixtureError(
                f"{d.name}: its manifest is gone from {shards}: a rebuild of {d.name} started and has not "
                f"finished, so its shards are partly new; finish that build (it rewrites mixture.json) "
                f"before training"
            ) from None
        if now != d.generation:
            raise MixtureError(
                f"{d.name}: mixture.json was computed from build generation {d.generation}, its manifest now "
                f"commits {now} (rebuilt since); rewrite mixture.json "
                f"(python -m pipelines.build.mixture_weights --out {shards}) or restore the shards it was "
                "computed from"
            )


def stage_to_dict(s: StageMixture) -> dict:
    return {
        "stage": str(s.stage),  # a string in the file, as before: the digest (and so resume) is unchanged
        "t": s.t,
        "exclude_flags": list(s.exclude_flags),
        "samples": sum(d.samples for d in s.datasets),
        "samples_per_epoch": s.samples_per_epoch,
        "datasets": [_dataset_dict(d) for d in s.datasets],
        "missing": [dict(m) for m in s.missing],
    }


def stage_from_dict(d: dict) -> StageMixture:
    datasets = tuple(
        DatasetWeight(
            **{**x, "shards": tuple(ShardRef(**sh) for sh in x["shards"]), "excluded": dict(x["excluded"])}
        )
        for x in d["datasets"]
    )
    return StageMixture(
        stage=_stage_key(str(d["stage"])),
        t=d["t"],
        datasets=datasets,
        missing=tuple(d.get("missing", ())),
        exclude_flags=tuple(d.get("exclude_flags", EXCLUDE_FLAGS)),
    )


def mixture_path(out_url: str) -> str:
    return storage.join(str(out_url), MIXTURE_FILE)


def load(path_or_url: str) -> Mixture:
    """Read and validate a ``mixture.json`` (a folder/URI is taken to hold one)."""
    url = str(path_or_url)
    if not url.endswith(".json"):
        url = mixture_path(url)
    fs, path = storage.fs_and_path(url)
    return Mixture.from_dict(storage.read_json(fs, path))
