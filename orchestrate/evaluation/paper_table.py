"""X-SAM's published table beside a ``results.json``: one row per number of the paper.

    python -m orchestrate.evaluation.paper_table EVAL/results.json [--flavor xsam-phi3] [--shards SHARDS]
    python orchestrate/evaluate.py … --compare-paper          # the same table, printed and logged to wandb

The paper's numbers are data (``paper_table.json`` beside this module, with their source: X-SAM's
``docs/mds/benchmarks.md`` images on branch ``AAAI26_Archive``). Each row maps a published number to our
``<source>/<split>`` and metric key (COCO-Interactive's "mIoU" is our ``gIoU_<prompt>``, ReasonSeg's test
short/long/overall are ``gIoU_short``/``gIoU_long``/``gIoU`` of ``lisa_reasonseg/test``, …). A row without our
number says why: ``not built`` (the shards hold no such split), ``not evaluated`` (``results.json`` has no
such set), ``not computed`` (the set was scored without this metric, with the note ``details.json`` gives) or
``undefined`` (the metric was ``null``). See docs/evaluation.md, "Reproducing the paper's table".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.eval_errors import EvaluationError
from pipelines.errors import run_cli

log = logging.getLogger(__name__)

# Heavy imports (wandb) are deferred into log_to_wandb: printing a comparison never loads it.

TABLE_FILE = Path(__file__).with_name("paper_table.json")
PAPER_FLAVOR = "xsam-phi3"
"""The flavor whose weights the paper's numbers come from (X-SAM's released checkpoint)."""
PAPER_SETS = "paper"
"""The ``--sets`` word that stands for every set of the paper's table."""


RUNBOOK_BUILD = """\
ray job submit --working-dir . -- python orchestrate/build_shards.py \\
    --data-root /shared/datas --out /shared/shards --preset paper \\
    --sources coco_panoptic,coco_instance,ade20k_panoptic,ade20k_instance,ade20k_semantic,refcoco,refcoco+,refcocog,lisa_reasonseg,grandf_gcg,coco_interactive,coco_vgd \\
    --splits val,testA,testB,test,val_point,val_scribble,val_box,val_mask"""
"""The runbook's build of exactly the paper's val/test splits
(docs/evaluation.md#reproducing-the-papers-table): each source builds the splits of the list it has."""
RUNBOOK_EVALUATE = """\
ray job submit --working-dir . -- python orchestrate/evaluate.py \\
    --export /shared/runs/xsam-paper/stage3/export --shards /shared/shards --data-root /shared/datas \\
    --sets paper --protocol paper --compare-paper --num-workers 8 --use-gpu --out /shared/eval/xsam-paper"""
"""The runbook's one command that scores the paper's table
(docs/evaluation.md#reproducing-the-papers-table)."""


@dataclass(frozen=True)
class PaperRow:
    """One published number and where ours is found."""

    benchmark: str  # the paper's table, e.g. "Referring seg. refcoco"
    set: str  # our <source>/<split>
    metric: str  # our results.json key
    paper_metric: str  # the paper's column name
    paper: float  # percent
    source: str  # the image it was read from
    note: str = ""


@dataclass(frozen=True)
class Compared:
    """A row of the comparison: ``ours`` None means ``status`` says why."""

    row: PaperRow
    ours: float | None
    status: str = ""

    @property
    def delta(self) -> float | None:
        return None if self.ours is None else self.ours - self.row.paper


def load_table(path: str | os.PathLike = TABLE_FILE) -> tuple[dict, list[PaperRow]]:
    """``(header, rows)`` of the paper's table."""
    doc = json.loads(Path(path).read_text())
    return {k: v for k, v in doc.items() if k != "rows"}, [PaperRow(**r) for r in doc["rows"]]


def paper_sets() -> list[str]:
    """The sets the paper reports, in the table's order."""
    return list(dict.fromkeys(r.set for r in load_table()[1]))


def expand_sets(names: Sequence[str], built: Sequence[str]) -> list[str]:
    """``names`` with the word ``paper`` replaced by the paper's sets that are built (``built``); the paper's
    sets that are not are logged, and show as "not built" in the comparison. Order kept, duplicates
    dropped."""
    out: list[str] = []
    for name in names:
        if name != PAPER_SETS:
            out.append(name)
            continue
        have = [s for s in paper_sets() if s in set(built)]
        missing = [s for s in paper_sets() if s not in set(built)]
        if missing:
            log.warning(
                "--sets paper: %d of the paper's sets are not built: %s", len(missing), ", ".join(missing)
            )
        if not have:
            raise EvaluationError("--sets paper: none of the paper's sets is built under --shards")
        out += have
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------ comparison
def compare(
    results: Mapping[str, object],
    details: Mapping[str, object] | None = None,
    built: Sequence[str] | None = None,
) -> list[Compared]:
    """One :class:`Compared` per row of the paper's table. ``results``: a ``results.json``; ``details``:
    its ``details.json`` (notes explain a metric that was not computed); ``built``: the sets under the
    shards (None: unknown, so a set absent from ``results`` is "not evaluated")."""
    sets_notes = (details or {}).get("sets", {}) if isinstance(details, Mapping) else {}
    out = []
    for row in load_table()[1]:
        metrics = results.get(row.set)
        if not isinstance(metrics, Mapping):
            why = "not built" if built is not None and row.set not in built else "not evaluated"
            out.append(Compared(row, None, why))
        elif row.metric not in metrics:
            notes = [n for n in sets_notes.get(row.set, {}).get("notes", []) if row.metric in n]
            why = notes[0] if notes and "not computed" in notes[0] else "not computed"
            out.append(
                Compared(row, None, why if not notes or why != "not computed" else f"{why}: {notes[0]}")
            )
        elif metrics[row.metric] is None or not math.isfinite(float(metrics[row.metric])):
            out.append(Compared(row, None, "undefined (no sample of its kind)"))
        else:
            out.append(Compared(row, float(metrics[row.metric])))
    return out


def protocol_of(results: Mapping | None, details: Mapping | None) -> str:
    """The evaluation protocol a run recorded, else ``unknown`` (runs from before it was recorded). Read
    leniently: a top-level ``protocol`` (or ``*protocol*``) of ``details.json`` or ``results.json``, a name or
    ``{"name": …}``, or the one protocol every set of ``details.json`` names."""
    for doc in (details, results):
        if not isinstance(doc, Mapping):
            continue
        keys = ["protocol"] + sorted(
            k for k in doc if isinstance(k, str) and "protocol" in k and k != "protocol"
        )
        for key in keys:
            name = _protocol_name(doc.get(key))
            if name:
                return name
    sets = details.get("sets") if isinstance(details, Mapping) else None
    names = (
        {_protocol_name(d.get("protocol")) for d in sets.values() if isinstance(d, Mapping)}
        if sets
        else set()
    )
    return names.pop() if len(names) == 1 and None not in names else "unknown"


def _protocol_name(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("name", value.get("protocol"))
    return value if isinstance(value, str) and value else None


def flavor_warning(flavor: str | None) -> str | None:
    """The one-line warning when the scored model is not the paper's flavor (or is unknown)."""
    if flavor == PAPER_FLAVOR:
        return None
    what = "no flavor (predictions scored as given)" if flavor is None else f"flavor {flavor}"
    return f"warning: {what}; the paper's numbers are for X-SAM's flavor {PAPER_FLAVOR}"


def format_comparison(rows: Sequence[Compared], flavor: str | None, protocol: str) -> str:
    """The printed table: a header (protocol, flavor), the optional warning, one line per row."""
    head = f"X-SAM's paper table vs ours (protocol: {protocol}; flavor: {flavor or 'none'})"
    lines = [head]
    warning = flavor_warning(flavor)
    if warning:
        lines.append(warning)
    w_set = max(len(c.row.set) for c in rows)
    w_met = max(len(c.row.metric) for c in rows)
    lines.append(f"{'set':<{w_set}}  {'metric':<{w_met}}  {'ours':>7}  {'paper':>6}  {'Δ':>7}  paper's name")
    for c in rows:
        ours = f"{c.ours:7.2f}" if c.ours is not None else f"{'—':>7}"
        delta = f"{c.delta:+7.2f}" if c.delta is not None else f"{'':>7}"
        tail = c.row.paper_metric + (f"  [{c.status}]" if c.status else "")
        lines.append(
            f"{c.row.set:<{w_set}}  {c.row.metric:<{w_met}}  {ours}  {c.row.paper:6.1f}  {delta}  {tail}"
        )
    n = sum(c.ours is not None for c in rows)
    lines.append(f"{n}/{len(rows)} of the paper's numbers compared")
    return "\n".join(lines)


def wandb_rows(rows: Sequence[Compared]) -> tuple[list[str], list[list]]:
    """``(columns, data)`` of the comparison as a ``wandb.Table``."""
    columns = ["benchmark", "set", "metric", "paper_metric", "ours", "paper", "delta", "status"]
    data = [
        [c.row.benchmark, c.row.set, c.row.metric, c.row.paper_metric, c.ours, c.row.paper, c.delta, c.status]
        for c in rows
    ]
    return columns, data


# ------------------------------------------------------------------------------------------ an eval folder
@dataclass
class EvalFolder:
    """What a comparison reads from an evaluation's ``--out``: results, details, flavor, built sets."""

    results: dict
    details: dict
    flavor: str | None
    built: list[str] | None

    def compare(self) -> list[Compared]:
        return compare(self.results, self.details, self.built)

    def table(self, flavor: str | None = None) -> str:
        flavor = flavor if flavor is not None else self.flavor
        return format_comparison(self.compare(), flavor, protocol_of(self.results, self.details))


def read_eval_folder(results_path: str, shards: str | None = None) -> EvalFolder:
    """``results.json`` and, beside it, ``details.json`` (the shards it scored) and ``inference.json`` (the
    export's flavor), each optional; every problem is one :class:`EvaluationError` line."""
    results = _read_json(results_path, "results")
    bad = [k for k, v in results.items() if "/" in k and not isinstance(v, Mapping)]  # other keys: metadata
    if bad or not any(isinstance(v, Mapping) for v in results.values()) and results:
        raise EvaluationError(f"{results_path}: not a results.json ({{set: {{metric: value}}}})")
    folder = os.path.dirname(os.path.abspath(results_path))
    details_path = os.path.join(folder, "details.json")
    details = _read_json(details_path, "details") if os.path.exists(details_path) else {}
    inference_path = os.path.join(folder, "inference.json")
    inference = _read_json(inference_path, "inference") if os.path.exists(inference_path) else {}
    flavor = inference.get("flavor") if isinstance(inference.get("flavor"), str) else None
    return EvalFolder(results, details, flavor, _built(shards or details.get("shards")))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path}: not a readable {what} JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise EvaluationError(f"{path}: not a {what} JSON object")
    return doc


def _built(shards: str | None) -> list[str] | None:
    """The sets built under ``shards``; None when unknown (no path, or not reachable from here)."""
    if not isinstance(shards, str) or not shards:
        return None
    try:
        return gt.built_sets(shards)
    except Exception as e:  # a folder of another machine, a bucket without credentials: "not evaluated"
        log.info("%s: cannot list the built sets (%s); missing sets show as not evaluated", shards, e)
        return None


def log_to_wandb(run, out_dir: str | os.PathLike, flavor: str | None) -> None:
    """Log the comparison of ``<out_dir>/results.json`` to an open wandb ``run`` (a table, the protocol and
    the flavor warning in the summary)."""
    import wandb

    folder = read_eval_folder(os.path.join(out_dir, "results.json"))
    columns, data = wandb_rows(folder.compare())
    run.log({"eval/paper_table": wandb.Table(columns=columns, data=data)})
    run.summary.update(
        {
            "paper_table/protocol": protocol_of(folder.results, folder.details),
            "paper_table/flavor": flavor or "none",
            "paper_table/warning": flavor_warning(flavor) or "",
        }
    )


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="an evaluation's results.json")
    p.add_argument("--flavor", help="the model's flavor (default: the export's, from inference.json)")
    p.add_argument("--shards", help="the shard folder, to tell 'not built' (default: details.json's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(read_eval_folder(args.results, args.shards).table(args.flavor))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
