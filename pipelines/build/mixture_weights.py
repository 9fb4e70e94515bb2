"""Balance-resampling mixture weights per training stage → ``<out>/mixture.json`` (docs/contracts.md#mixture,
recipe §3).

    python -m pipelines.build.mixture_weights --out /shared/shards [--t 0.1] \
        [--stage3-extra ade20k_panoptic,lvis]

For each stage, each dataset ``d`` = (source, split "train") found under ``--out`` gets (X-SAM's
``ConcatDataset.get_dataset_repeats``)::

    f_d = N_d / Σ N            r_d = max(1, sqrt(t / f_d))        p_d = N_d·r_d / Σ N·r
    samples per epoch = Σ int(N_d·r_d)                               (the recipe's integer dataset lengths)

``N_d`` is the manifest's sample count minus samples whose ``meta`` carries an exclusion flag
(gRefCOCO's ``no_target`` expressions are left out of training by default), counted by the writer into the
manifest's ``counts``: no shard is read here. A manifest written before those counts existed is an error
that asks to rebuild that split. Stages are ints (1, 2, 3); ``mixture.json`` keys them "1", "2", "3" (JSON
keys are strings). The file also lists each dataset's shards (paths relative to ``--out``), so training never
lists folders, and the datasets a stage wants but that are not there (``missing``). Training reads this file
and never recomputes it; every load re-validates it (finite, positive probabilities summing to 1), like
torchtitan's dataset-mix configs.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from collections.abc import Mapping, Sequence

from pipelines import storage
from pipelines.errors import OutputError, run_cli
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity
from pipelines.mixture_file import (
    EXCLUDE_FLAGS,
    MIXTURE_FILE,
    DatasetWeight,
    Mixture,
    MixtureError,
    ShardRef,
    StageMixture,
    mixture_path,
)
from pipelines.shard_store import Manifest, MissingManifestError, list_manifests
from pipelines.sources import SOURCES

logger = logging.getLogger(__name__)

DEFAULT_T = 0.1
TRAIN_SPLIT = "train"

# Recipe §1.2: the datasets of each stage, in the recipe's order. Other sources only when asked for.
STAGE_DATASETS: dict[int, tuple[str, ...]] = {
    1: ("coco_panoptic",),
    2: ("llava_pretrain",),
    3: (
        "llava_instruct",
        "coco_panoptic",
        "refcoco",
        "refcoco+",
        "refcocog",
        "lisa_reasonseg",
        "grandf_gcg",
        "refcocog_gcg",
        "psg_gcg",
        "flickr_gcg",
        "coco_vgd",
    ),
}

# Every source name of docs/contracts.md#source-names-and-tasks (the registry may not hold them all yet).
CONTRACT_SOURCES: tuple[str, ...] = (
    "coco_panoptic",
    "coco_instance",
    "refcoco",
    "refcoco+",
    "refcocog",
    "grefcoco",
    "lisa_reasonseg",
    "grandf_gcg",
    "psg_gcg",
    "refcocog_gcg",
    "flickr_gcg",
    "ade20k_panoptic",
    "ade20k_semantic",
    "ade20k_instance",
    "lvis",
    "coco_vgd",
    "coco_interactive",
    "llava_pretrain",
    "llava_instruct",
)

# Sources whose samples may carry such flags; N_d subtracts ``manifest.counts[flag]`` (the writer counts every
# flag of shard_store.COUNTED_FLAGS, so these must be among them).
FLAGGED_SOURCES: dict[str, tuple[str, ...]] = {"grefcoco": ("no_target",)}


# ---------------------------------------------------------------------------------------------- arithmetic
def balance_weights(counts: Mapping[str, int], t: float = DEFAULT_T) -> dict[str, dict]:
    """``{name: N_d}`` → ``{name: {"fraction", "repeat", "epoch_samples", "probability"}}`` (recipe §3)."""
    if not math.isfinite(t) or t < 0:
        raise MixtureError(f"t must be a finite number >= 0, got {t!r}")
    bad = {k: v for k, v in counts.items() if not isinstance(v, int) or v <= 0}
    if bad:
        raise MixtureError(f"sample counts must be positive ints: {bad}")
    total = sum(counts.values())
    out = {}
    for name, n in counts.items():
        f = n / total
        r = max(1.0, math.sqrt(t / f))
        out[name] = {"fraction": f, "repeat": r, "epoch_samples": int(n * r)}
    z = sum(counts[k] * v["repeat"] for k, v in out.items())
    for name, v in out.items():
        v["probability"] = counts[name] * v["repeat"] / z
    return out


# ---------------------------------------------------------------------------------------------- from
# manifests
def _manifest(out_url: str, source: str, cache: dict[str, Manifest | None]) -> Manifest | None:
    """The train manifest of ``source`` (read once per compute), or None when that source was not built."""
    if source not in cache:
        try:
            cache[source] = Manifest.read(out_url, source, TRAIN_SPLIT)
        except MissingManifestError:
            cache[source] = None
    return cache[source]


def _dataset_weight(name: str, m: Manifest, samples: int, excluded: dict[str, int], w: dict) -> DatasetWeight:
    shards = tuple(
        ShardRef(
            file=f"{m.source}/{m.split}/{sh.file}",
            samples=sh.samples,
            bytes=sh.bytes,
            sha256=sh.sha256,
            index_sha256=sh.index_sha256,
        )
        for sh in m.shards
    )
    return DatasetWeight(
        name=name,
        source=m.source,
        split=m.split,
        task=m.task,
        samples=samples,
        fraction=w["fraction"],
        repeat=w["repeat"],
        epoch_samples=w["epoch_samples"],
        probability=w["probability"],
        shards=shards,
        shard_samples=sum(s.samples for s in shards),
        excluded=excluded,
        fingerprint=m.fingerprint,
        generation=m.generation,
        # what identifies the split, not the manifest's bytes (they hold its wall time): two identical
        # builds write a byte-identical mixture.json, and a loader state made with one resumes on the other
        split_sha256=m.content_sha256(),
    )


def compute_stage(
    out_url: str,
    stage: int,
    sources: Sequence[str],
    t: float,
    exclude_flags: Sequence[str],
    cache: dict[str, Manifest | None],
) -> StageMixture:
    """One stage's mixture over the train manifests of ``sources`` (absent or empty ones: ``missing``)."""
    found: dict[str, tuple[Manifest, int, dict[str, int]]] = {}
    missing = []
    for source in sources:
        name = f"{source}/{TRAIN_SPLIT}"
        m = _manifest(out_url, source, cache)
        if m is None:
            missing.append({"dataset": name, "reason": "no manifest (source not built)"})
            continue
        excluded = {f: m.flag_count(f) for f in FLAGGED_SOURCES.get(source, ()) if f in exclude_flags}
        n = m.samples - sum(excluded.values())
        if n <= 0:
            reason = f"no trainable samples ({m.samples} in shards, excluded {excluded})"
            missing.append({"dataset": name, "reason": reason})
            continue
        found[name] = (m, n, excluded)
    weights = balance_weights({k: v[1] for k, v in found.items()}, t) if found else {}
    datasets = tuple(_dataset_weight(name, *found[name], w) for name, w in weights.items())
    return StageMixture(
        stage=stage, t=t, datasets=datasets, missing=tuple(missing), exclude_flags=tuple(exclude_flags)
    )


def compute(
    out_url: str,
    t: float = DEFAULT_T,
    stages: Mapping[int, Sequence[str]] | None = None,
    stage3_extra: Sequence[str] = (),
    exclude_flags: Sequence[str] = EXCLUDE_FLAGS,
    log: object = None,
) -> Mixture:
    """The mixture of every stage (int keys) from the train manifests under ``out_url``.

    ``log`` is deprecated and ignored (messages go to this module's logger); it goes once no caller passes it.
    """
    if log is not None:
        warnings.warn("mixture.compute(log=...) is ignored: it logs through logging", DeprecationWarning, 2)
    stages = {k: list(v) for k, v in (stages or STAGE_DATASETS).items()}
    if stage3_extra:
        known = set(SOURCES) | set(CONTRACT_SOURCES)
        unknown = [s for s in stage3_extra if s not in known]
        if unknown:
            raise MixtureError(f"unknown source(s) {unknown} in stage3_extra; known: {sorted(known)}")
        stages[3] = stages.get(3, []) + [s for s in stage3_extra if s not in stages.get(3, [])]
    cache: dict[str, Manifest | None] = {}
    result = {}
    for stage, sources in stages.items():
        result[stage] = compute_stage(out_url, stage, sources, t, exclude_flags, cache)
        if result[stage].missing:
            missing = ", ".join(x["dataset"] for x in result[stage].missing)
            logger.info("mixture stage %s: missing %s", stage, missing)
    return Mixture(t=t, stages=result)


def write(out_url: str, mixture: Mixture) -> str:
    """Write ``<out>/mixture.json`` atomically; returns its path/URI."""
    fs, root = storage.fs_and_path(out_url)
    storage.write_json(fs, storage.join(root, MIXTURE_FILE), mixture.to_dict())
    return mixture_path(out_url)


def write_mixture(out_url: str, t: float = DEFAULT_T, stage3_extra: Sequence[str] = ()) -> str:
    """compute + write (what ``build()`` calls at its end)."""
    return write(out_url, compute(out_url, t=t, stage3_extra=stage3_extra))


def format_table(mixture: Mixture) -> str:
    rows = []
    for name, s in sorted(mixture.stages.items()):
        rows.append(
            f"stage {name}: {len(s.datasets)} datasets, {sum(d.samples for d in s.datasets)} samples, "
            f"{s.samples_per_epoch} samples/epoch (t={s.t})"
        )
        for d in s.datasets:
            rows.append(
                f"  {d.name:<26} N={d.samples:>9}  r={d.repeat:7.3f}  p={d.probability:.5f}  "
                f"epoch={d.epoch_samples}"
            )
        for m in s.missing:
            rows.append(f"  {m['dataset']:<26} missing: {m['reason']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", required=True, help="the shards folder or URI (holds <source>/train/manifest.json)"
    )
    p.add_argument("--t", type=float, default=DEFAULT_T, help="oversample ratio t (default 0.1)")
    p.add_argument(
        "--stage3-extra", default="", help="comma list of sources added to stage 3 (e.g. grefcoco,lvis)"
    )
    add_verbosity_flags(p)
    args = p.parse_args(argv)
    configure_logging(verbosity(args))
    if not list_manifests(args.out):
        raise OutputError(
            f"--out {args.out}: no <source>/<split>/manifest.json under it (nothing built there)"
        )
    extra = [s for s in args.stage3_extra.split(",") if s]
    mix = compute(args.out, t=args.t, stage3_extra=extra)
    path = write(args.out, mix)
    print(format_table(mix))  # the result asked for: stdout
    print(f"mixture written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
