"""Predictions derived from the ground truth, for the evaluation tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from orchestrate.evaluation import ground_truth as gt
from pipelines.schema import Sample


def perfect_line(evs: gt.EvalSet, sample: Sample) -> dict:
    """The prediction that reproduces ``sample``'s ground truth in the fields its set is scored from."""
    line: dict = {"key": sample.key, "text": sample.conversation[-1].text}
    if evs.kind in ("panoptic", "semantic"):
        line["panoptic"] = [
            {"rle": m.rle, "category_id": m.category_id} for m in sample.masks if not m.iscrowd
        ]
        if evs.source in gt.DENSE_SEMANTIC_SOURCES:  # the dense pass: crowd pixels are their class too
            truth = gt.semantic_truth(evs, gt.panoptic_truth(evs, sample))
            line["semantic"] = [{"rle": r, "category_id": c} for r, c in truth]
    elif evs.kind in ("instance", "vgd"):
        line["instances"] = [
            {"rle": t.rle, "category_id": t.category_id, "score": 1.0}
            for t in gt.instance_truth(evs, sample)
            if not t.iscrowd
        ]
    elif evs.kind == "gcg":
        line["masks"] = [{"rle": m.rle, "label": m.label} for m in sample.masks if m.label >= 0]
    else:
        line["masks"] = [
            {"rle": t, "label": i} for i, t in enumerate(gt.turn_targets(sample)) if t is not None
        ]
    return line


def set_lines(shards: Path, data_root: Path, name: str) -> list[dict]:
    evs = gt.open_set(str(shards), str(data_root), name)
    return [perfect_line(evs, s) for shard in evs.shards for s in gt.iter_shard_samples(evs, shard)]


def write_jsonl(path: Path, lines: Iterable[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def evaluate_argv(predictions: Path, shards: Path, data_root: Path, out: Path, *extra: str) -> list[str]:
    """``orchestrate/evaluate.py`` arguments scoring ``predictions`` into ``out``: wandb off and ``-q``
    (progress lines off, so stderr holds only an error line), then ``extra``."""
    return [
        "--predictions",
        str(predictions),
        "--shards",
        str(shards),
        "--data-root",
        str(data_root),
        "--out",
        str(out),
        "--wandb-mode",
        "disabled",
        "-q",
        *extra,
    ]
