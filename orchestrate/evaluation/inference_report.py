"""The wandb run of an export's evaluation: the results table, the link to the training run, overlays.

The run (``job_type="eval"``) joins the training run's group and records the training stage's wandb id
(:func:`~orchestrate.evaluation.wandb_helpers.run_id` of the export's lineage: the id that stage's own run
has), so the eval sits next to the run that produced the weights. A few samples per set are shown as
prediction overlays drawn by :mod:`orchestrate.evaluation.overlay` (the drawing ``predict.py`` writes too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.overlay import draw, labelled_masks
from orchestrate.evaluation.paper_table import log_to_wandb
from orchestrate.evaluation.predictions import index_predictions, phrase_spans
from orchestrate.evaluation.wandb_helpers import resolve_mode, run_id, same_size, wandb_env
from pipelines import shard_store, storage
from pipelines.loader.decode import decode_image

if TYPE_CHECKING:
    from orchestrate.evaluation.export_inference import InferenceRun, SetJob

# Heavy imports (wandb) are deferred into the run's logging: a run with wandb disabled never loads it.


def training_link(lineage: Mapping[str, Any]) -> dict[str, Any]:
    """``{"training_run_id", "training_run_group", "training_stage", "training_run_root"}`` from an export's
    lineage (None values for an export that was imported rather than trained)."""
    name, root, stage = lineage.get("run_name"), lineage.get("run_root"), lineage.get("stage")
    return {
        "training_run_id": run_id(name, stage, root or "") if name and stage else None,
        "training_run_group": name,
        "training_stage": stage,
        "training_run_root": root,
    }


def entry_namer(evs: gt.EvalSet, sample, line: dict):
    """``name(field, entry)`` for :func:`orchestrate.evaluation.overlay.labelled_masks` on one sample's
    line."""
    spans = phrase_spans(line.get("text") or "")

    def name(field: str, entry: dict) -> str:
        if field in ("panoptic", "instances"):
            c = entry["category_id"]
            return evs.category_names.get(c, f"category {c}")
        label = entry["label"]
        if evs.kind == "gcg":
            return spans[label] if label < len(spans) else f"span {label}"
        if evs.kind == "interactive":
            return f"{sample.regions[0].type} prompt" if sample.regions else "prompt"
        return sample.phrases[label] if label < len(sample.phrases) else f"turn {label}"

    return name


def overlays(run: InferenceRun, per_set: int) -> Iterator[tuple[str, np.ndarray]]:
    """``(caption, RGB array)`` for the first ``per_set`` predicted samples of each set."""
    if per_set <= 0:
        return
    refs = index_predictions(run.predictions)
    with open(run.predictions, "rb") as f:
        for job in run.jobs:
            for sample, image in _first_samples(job, per_set, shard_store, storage):
                ref = refs.get(sample.key)
                if ref is None or image is None:
                    continue
                f.seek(ref.offset)
                line = json.loads(f.read(ref.length))
                masks = labelled_masks(line, entry_namer(job.evs, sample, line))
                yield sample.key, draw(decode_image(image), masks, line.get("text"))


def _first_samples(job: SetJob, n: int, shard_store, storage) -> list:
    out: list = []
    for shard in job.evs.shards:
        for pair in gt.read_shard(job.evs, shard):  # verified, as scoring reads it
            out.append(pair)
            if len(out) >= n:
                return out
    return out


def log_eval_run(
    out_dir: str,
    results: Mapping,
    details: Mapping,
    run: InferenceRun,
    mode: str,
    overlays: int = 2,
    compare_paper: bool = False,
) -> str | None:
    """One wandb run under ``<out_dir>/wandb``: results table and summary, inference counters, the training
    run's id, prediction overlays (and with ``compare_paper`` the paper's table beside ours, for the export's
    flavor). Returns the run's folder."""
    mode = resolve_mode(mode)
    folder = Path(out_dir) / "wandb"
    os.environ.update(wandb_env(folder, mode))
    os.environ.pop("WANDB_SERVICE", None)
    for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        Path(os.environ[k]).mkdir(parents=True, exist_ok=True)
    import wandb

    link = training_link(run.info.lineage)
    wb = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "xsam"),
        job_type="eval",
        group=link["training_run_group"],
        name=f"eval/stage{run.info.stage}/{Path(out_dir).name}",
        dir=str(folder),
        mode=mode,
        config={"sets": sorted(results), "inference": run.summary(), **link},
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        rows = [[s, m, v] for s, ms in results.items() for m, v in ms.items()]
        logged: dict[str, Any] = {"eval/results": wandb.Table(columns=["set", "metric", "value"], data=rows)}
        drawn = _overlays(run, overlays)
        padded = same_size([img for _, img in drawn]) if drawn else []  # one size per wandb panel
        images = [wandb.Image(img, caption=key) for (key, _), img in zip(drawn, padded, strict=True)]
        if images:
            logged["eval/predictions"] = images
        wb.log(logged)
        wb.summary.update({f"{s}/{m}": v for s, ms in results.items() for m, v in ms.items() if v == v})
        wb.summary.update({f"{s}/samples": d.get("samples") for s, d in details.items()})
        wb.summary.update({f"{s}/no_seg": n for s, n in run.no_seg.items()})
        if compare_paper:
            log_to_wandb(wb, out_dir, flavor=run.info.flavor)
        return str(Path(wb.dir).parent)
    finally:
        wb.finish()


def _overlays(run: InferenceRun, per_set: int):
    return list(overlays(run, per_set))
