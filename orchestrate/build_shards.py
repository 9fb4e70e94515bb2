"""Build WebDataset shards from raw sources (a Ray job).

    ray job submit --working-dir . -- python orchestrate/build_shards.py --data-root /path/to/datas \\
        --out /shared/shards
    # joins RAY_ADDRESS or starts Ray:
    python orchestrate/build_shards.py --data-root demo_out/datas --out demo_out/shards

Every option is documented in ``--help``; the work itself is in :mod:`pipelines.build.driver`. Bad input or
configuration ends with exit code 2 and one line naming the file or option at fault.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run as a script from anywhere

import ray

from pipelines.build.driver import build, format_table  # noqa: E402
from pipelines.build_options import PRESETS, BuildOptions, SourceOptions  # noqa: E402
from pipelines.errors import BuildConfigError, run_cli  # noqa: E402
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity  # noqa: E402
from pipelines.mixture_file import mixture_path  # noqa: E402
from pipelines.storage import check_writable  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-root", required=True, help="folder laid out like X-SAM's datas/ (docs/contracts.md#data-root)"
    )
    p.add_argument(
        "--out", required=True, help="output folder or fsspec URI (s3://…, gs://…) every node can reach"
    )
    p.add_argument("--sources", help="comma list; default: every source whose files are found")
    p.add_argument("--splits", default="train", help="comma list (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad record instead of skipping it"
    )
    p.add_argument(
        "--num-workers", type=int, help="concurrent conversion tasks (default: the cluster's CPUs)"
    )
    p.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="SOURCE.ROLE=PATH",
        help="override one input path, e.g. coco_panoptic.annotations=/x/panoptic_train2017.json",
    )
    p.add_argument(
        "--genseg-num-class", type=int, help="sample categories as X-SAM main (128) instead of listing all"
    )
    p.add_argument(
        "--no-image-newline", action="store_true", help="'<image>' without the paper's trailing newline"
    )
    p.add_argument(
        "--keep-eval-images", action="store_true", help="keep RefCOCO eval images in COCO train splits"
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="paper: X-SAM's archive data exactly (no eval-image guard, archive refseg sentence "
        "combinations, LISA images without an explanation skipped); default: this project's choices",
    )
    p.add_argument("--max-image-pixels", type=int, default=BuildOptions.max_image_pixels)
    p.add_argument(
        "--max-image-bytes",
        type=int,
        default=BuildOptions.max_image_bytes,
        help="skip an image file larger than this, unread (default: 256 MiB)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a source-specific option, checked against its type (booleans: true/false), e.g. "
        f"refseg_chunk=8, gcg_force_period=true, lvis_max_phrases=100; valid: {', '.join(SourceOptions.names())}",
    )
    add_verbosity_flags(p)
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, path = item.partition("=")
        source, dot, role = target.rpartition(".")
        if not sep or not dot or not source or not role:
            raise BuildConfigError(f"--path {item!r}: expected SOURCE.ROLE=PATH")
        out.setdefault(source, {})[role] = path
    return out


def options_from(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        strict=args.strict,
        max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_image_bytes,
        image_token="<image>" if args.no_image_newline else "<image>\n",
        genseg_num_class=args.genseg_num_class,
        keep_eval_images=args.keep_eval_images,
        extra=SourceOptions.from_args(args.option),
        preset=args.preset,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(verbosity(args))
    options = options_from(args)  # checked before Ray starts: a bad option fails in a second
    overrides = parse_overrides(args.path)
    check_writable(args.out, "--out")  # a read-only or full --out: one line before Ray starts
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        num_cpus=None if os.environ.get("RAY_ADDRESS") else args.num_workers,
        log_to_driver=True,  # a task's errors and warnings still reach the console
        logging_level=logging.INFO if verbosity(args) > 0 else logging.WARNING,  # no start-up chatter
    )
    try:
        results = build(
            args.data_root,
            args.out,
            sources=args.sources.split(",") if args.sources else None,
            splits=args.splits.split(","),
            options=options,
            num_workers=args.num_workers,
            overrides=overrides,
        )
    finally:
        ray.shutdown()
    print(format_table(results))
    print(f"shards and manifests written under {args.out}")
    print(f"mixture weights (stages 1-3) written to {mixture_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
