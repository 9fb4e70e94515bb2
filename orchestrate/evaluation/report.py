"""What a scoring run leaves behind: ``results.json``, ``details.json``, a printed table and a wandb run.

``results.json`` is the contract (docs/contracts.md#predictions-and-results): ``{"<source>/<split>":
{"<metric>": value in percent}}``, metric names as the papers print them; a metric that is undefined (no
sample of its kind) is ``null``. ``details.json`` holds per set the number of samples scored and the notes
(why a metric is missing), and which protocol scored the run: ``"protocol": "paper"`` or ``"standard"`` at its
top level and in every set's entry. ``results.json`` keeps its shape (every top-level key is a set), so
readers that iterate it are unchanged; the protocol is read from ``details.json`` beside it
(docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from orchestrate.evaluation.paper_table import log_to_wandb
from orchestrate.evaluation.wandb_helpers import resolve_mode, wandb_env

# Heavy imports (wandb) are deferred into log_wandb: a run with wandb disabled never loads it.

# column order of the table: the papers' order, then anything else alphabetically
METRIC_ORDER = (
    "PQ",
    "PQ_th",
    "PQ_st",
    "SQ",
    "SQ_th",
    "SQ_st",
    "RQ",
    "RQ_th",
    "RQ_st",
    "mIoU",
    "mIoU_panoptic",
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "cIoU",
    "gIoU",
    "cIoU_ReLA",
    "gIoU_ReLA",
    "N-acc",
    "T-acc",
    "METEOR",
    "CIDEr",
    "recall",
)


def _json_value(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def format_table(
    results: Mapping[str, Mapping[str, float]], details: Mapping[str, Mapping] | None = None
) -> str:
    """One row per set: its metrics as ``name value`` pairs in the papers' order, then its notes."""
    lines = []
    width = max((len(s) for s in results), default=3)
    for name, metrics in results.items():
        ordered = sorted(metrics, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else 99, m))
        cells = [f"{m} {'n/a' if _json_value(metrics[m]) is None else f'{metrics[m]:.2f}'}" for m in ordered]
        n = (details or {}).get(name, {}).get("samples")
        head = f"{name:<{width}}  {'' if n is None else f'{n:>6} samples  '}"
        lines.append(head + "  ".join(cells))
        for note in (details or {}).get(name, {}).get("notes", []):
            lines.append(f"{'':<{width}}  note: {note}")
    return "\n".join(lines)


def write_outputs(
    out_dir: str,
    results: Mapping[str, Mapping[str, float]],
    details: Mapping[str, Mapping],
    predictions: str,
    shards: str,
    wandb_mode: str | None,
    compare_paper: bool = False,
    protocol: str = "paper",
) -> None:
    """``results.json`` + ``details.json`` under ``out_dir``, and the wandb eval run (unless disabled; with
    ``compare_paper`` it also holds the paper's table beside ours)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {s: {m: _json_value(v) for m, v in ms.items()} for s, ms in results.items()}
    _write(out / "results.json", clean)
    _write(out / "details.json", details_document(predictions, shards, details, protocol))
    if wandb_mode and wandb_mode != "disabled":
        log_wandb(out, clean, details, wandb_mode, compare_paper, protocol)


def details_document(predictions: str, shards: str, details: Mapping[str, Mapping], protocol: str) -> dict:
    """What ``details.json`` holds: the inputs, the protocol, and per set its samples, notes and protocol."""
    sets = {name: {**d, "protocol": protocol} for name, d in details.items()}
    return {"predictions": os.path.abspath(predictions), "shards": shards, "protocol": protocol, "sets": sets}


def _write(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def log_wandb(
    out: Path,
    results: Mapping,
    details: Mapping,
    mode: str,
    compare_paper: bool = False,
    protocol: str = "paper",
) -> str | None:
    """One wandb run (``job_type="eval"``) with the results as a table and as summary values (and the
    paper's table beside ours with ``compare_paper``: scored predictions have no flavor); returns the run's
    folder."""
    mode = resolve_mode(mode)
    folder = out / "wandb"
    os.environ.update(wandb_env(folder, mode))
    os.environ.pop("WANDB_SERVICE", None)
    for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        Path(os.environ[k]).mkdir(parents=True, exist_ok=True)
    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "xsam"),
        job_type="eval",
        name=f"eval/{out.name}",
        dir=str(folder),
        mode=mode,
        config={"sets": sorted(results), "protocol": protocol},
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        rows = [[s, m, v] for s, ms in results.items() for m, v in ms.items()]
        run.log({"eval/results": wandb.Table(columns=["set", "metric", "value"], data=rows)})
        run.summary.update(
            {f"{s}/{m}": v for s, ms in results.items() for m, v in ms.items() if v is not None}
        )
        if compare_paper:
            log_to_wandb(run, out, flavor=None)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
