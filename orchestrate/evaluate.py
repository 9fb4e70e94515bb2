"""Score predictions against built val sets, or run a stage export over them first (a Ray job, or a command).

    ray job submit --working-dir . -- python orchestrate/evaluate.py --predictions /shared/preds.jsonl \\
        --shards /shared/shards --data-root /shared/datas --sets coco_panoptic/val,refcoco/val \\
        --out /shared/eval
    python orchestrate/evaluate.py --predictions preds.jsonl --shards demo_out/shards \\
        --data-root demo_out/datas --out eval
    python orchestrate/evaluate.py --export RUN/stage3/export --shards SHARDS --data-root DATAS \\
        --sets refcoco/val,coco_panoptic/val --out DIR --num-workers 4 --use-gpu [--max-samples N]
    python orchestrate/evaluate.py --export RUN/stage3/export --shards SHARDS --data-root DATAS \\
        --sets paper --compare-paper --out DIR --num-workers 8 --use-gpu   # the paper's table, ours beside it

``--export`` runs inference over the sets' val shards on Ray workers that each load the model once
(:mod:`orchestrate.evaluation.export_inference`), streams ``<out>/predictions.jsonl`` and scores it as
``--predictions`` would; its wandb run joins the training run's group and shows prediction overlays.

Writes ``<out>/results.json`` (``{"<source>/<split>": {"<metric>": percent}}``), ``<out>/details.json`` and a
wandb run (``job_type="eval"``, offline by default), and prints the table. ``--out`` is replaced whole when
the run is complete (written beside it first, :mod:`orchestrate.evaluation.output`): a killed run leaves the
previous output as it was. Bad input (a predictions file whose keys are not the sets', a malformed line, an
unknown set, …) exits with code 2 and one line on stderr. The work itself is in :mod:`orchestrate.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run as a script from anywhere

from orchestrate.evaluation import ground_truth as gt  # noqa: E402
from orchestrate.evaluation.export_inference import InferenceOptions, evaluate_export
from orchestrate.evaluation.output import staged_output  # noqa: E402
from orchestrate.evaluation.paper_table import PAPER_SETS, expand_sets, read_eval_folder  # noqa: E402
from orchestrate.evaluation.report import format_table  # noqa: E402
from orchestrate.evaluation.run import score_predictions  # noqa: E402
from orchestrate.evaluation.scoring import check_protocol  # noqa: E402
from pipelines.errors import run_cli  # noqa: E402
from pipelines.logs import configure_logging  # noqa: E402
from pipelines.storage import check_writable  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)  # inference (--export) joins this group
    source.add_argument("--predictions", help="predictions.jsonl to score (one line per sample key)")
    source.add_argument("--export", help="a stage export (RUN/stage3/export): run inference, then score it")
    p.add_argument("--shards", required=True, help="the shard folder the val sets were built into")
    p.add_argument("--data-root", default="", help="the folder the build read (COCO sets read originals)")
    p.add_argument(
        "--sets",
        help="comma list of <source>/<split>; 'paper': every set of X-SAM's published table that is built; "
        "default: every set the predictions cover (--export: every built split but train that has a metric)",
    )
    p.add_argument("--out", required=True, help="folder for results.json, details.json and the wandb run")
    p.add_argument("--num-workers", type=int, default=1, help="> 1: score shards as Ray tasks (default: 1)")
    p.add_argument("--text-sim-model", help="local sentence-embedding folder for GCG recall (else omitted)")
    p.add_argument(
        "--compare-paper",
        action="store_true",
        help="print (and log to wandb) X-SAM's published numbers beside ours, one row per number of the paper",
    )
    p.add_argument("--wandb-mode", default="offline", choices=("offline", "online", "disabled", "auto"))
    p.add_argument(
        "--protocol",
        default="paper",
        help="paper (default): X-SAM's evaluation code where it departs from the standard definition; "
        "standard: the benchmark's own definition (docs/evaluation.md lists the differences)",
    )
    add_inference_args(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv: every library)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="warnings only (-qq: errors only)")
    return p.parse_args(argv)


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """Options of ``--export`` (inference over the sets, :mod:`orchestrate.evaluation.export_inference`)."""
    g = p.add_argument_group("inference (--export)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 (default: CPU, fp32)")
    g.add_argument("--max-samples", type=int, help="only each set's first N samples (scored on those)")
    g.add_argument("--mode", default="auto", choices=("auto", "teacher", "generate"), help="auto: as X-SAM")
    g.add_argument("--batch-size", type=int, default=4, help="samples per forward (default: 4)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="per generated answer (default: 512)")
    g.add_argument("--no-kv-cache", action="store_true", help="generate without the KV cache (checks)")
    g.add_argument("--overlays", type=int, default=2, help="prediction overlays per set in wandb")


def run_export(args: argparse.Namespace, sets: list[str] | None, out: str) -> dict:
    options = InferenceOptions(
        mode=args.mode,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        use_cache=not args.no_kv_cache,
        device="cuda" if args.use_gpu else "cpu",
        max_samples=args.max_samples,
        overlays=args.overlays,
        protocol=args.protocol,
    )
    return evaluate_export(
        args.export,
        args.shards,
        args.data_root,
        sets,
        out,
        options,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        text_sim_model=args.text_sim_model,
        wandb_mode=args.wandb_mode,
        compare_paper=args.compare_paper,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    check_protocol(args.protocol)  # one line and exit 2 (argparse's choices would print usage on two)
    check_writable(args.out, "--out")  # a read-only or full --out: one line now, not after scoring everything
    sets = [s.strip() for s in args.sets.split(",") if s.strip()] if args.sets else None
    if sets and PAPER_SETS in sets:
        sets = expand_sets(sets, gt.built_sets(args.shards))
    with staged_output(args.out, args.predictions) as (out, predictions):
        if args.export:
            results = run_export(args, sets, out)
        else:
            results = score_predictions(
                predictions,
                args.shards,
                args.data_root,
                sets=sets,
                out_dir=out,
                num_workers=args.num_workers,
                text_sim_model=args.text_sim_model,
                wandb_mode=args.wandb_mode,
                compare_paper=args.compare_paper,
                protocol=args.protocol,
            )
    return _print(results, args.out, args.compare_paper)


def _print(results: dict, out: str, compare_paper: bool) -> int:
    with open(os.path.join(out, "details.json")) as f:
        details = json.load(f)["sets"]
    print(format_table(results, details))
    if compare_paper:
        print()
        print(read_eval_folder(os.path.join(out, "results.json")).table())
    print(f"results: {os.path.join(out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
