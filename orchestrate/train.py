"""Train one X-SAM stage with Ray Train + DeepSpeed (a Ray job).

    ray job submit --working-dir . -- python orchestrate/train.py --stage 1 --shards /shared/shards \
        --run-root /shared/runs/xsam-a --init-dir /shared/inits --num-workers 16 --use-gpu
    python orchestrate/train.py --stage 1 --flavor debug --shards demo_out/shards --run-root demo_out/runs \
        --num-workers 2 --max-steps 6                                     # joins RAY_ADDRESS or starts Ray
    python orchestrate/train.py --stage 3 --print-config                  # the resolved config, nothing run
    python orchestrate/train.py --stage 3 --plan --gpu-memory 40          # per-GPU memory/FLOPs

Stage N starts from stage N-1's export under the same --run-root (stage 3: from stages 1 and 2) unless
--init-from says otherwise; submitting a stage again continues from its newest complete checkpoint, and a
submission into a stage folder that a running training holds is refused (<run-root>/stage<N>/.train.lock
names its host and pid). Where things go:
<run-root>/stage<N>/ (checkpoints, export/, metrics.jsonl, wandb/), see orchestrate/run_layout.py. The work
is in orchestrate/runner.py (driver) and orchestrate/trainer.py (workers). Bad input or configuration exits
with code 2 and a one-line message; a failed training run with code 1 and Ray's error. -v/-q: more or less
on the console (one progress line per stage by default; framework logs with -v).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from orchestrate.console import configure_logging  # noqa: E402
from orchestrate.memory_plan import PlanRequest, format_plan, plan_stage  # noqa: E402
from orchestrate.plan import model_config  # noqa: E402
from orchestrate.runner import (  # noqa: E402
    RunArgs,
    build_config,
    check_flavor,
    elastic_workers,
    fit,
    prepare,
    ray_init,
    stage_lock,
)
from pipelines.errors import run_cli  # noqa: E402
from pipelines.logs import add_verbosity_flags  # noqa: E402
from xsam_model.config import config_dict

# Heavy imports (ray) are deferred until the run starts: --help and the config checks need no Ray.

logger = logging.getLogger("orchestrate.train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--stage", type=int, required=True, choices=(1, 2, 3))
    add("--flavor", default="xsam-phi3", help="model flavor: xsam-phi3 (recipe) or debug (tiny, CPU)")
    add("--shards", help="shards folder/URI (with mixture.json); required unless --print-config")
    add("--mixture", help="mixture.json to use (default: <shards>/mixture.json)")
    add("--run-root", help="folder/URI holding stage1/ stage2/ stage3/; required unless --print-config")
    add("--run-name", help="wandb group (default: the run root's folder name)")
    add("--init-dir", help="X-SAM's inits/ folder with the pretrained HF sub-folders")
    add(
        "--init-from",
        action="append",
        default=[],
        metavar="STAGE=EXPORT",
        help="a parent export other than <run-root>/stage<K>/export, e.g. 1=/runs/a/stage1/export",
    )
    add("--num-workers", type=int, help="Ray Train workers, one per GPU (default: the recipe's 16)")
    add(
        "--min-workers",
        type=int,
        help="elastic: start (and restart after a lost node) with as many workers as fit, at least this many "
        "and at most --num-workers; every count must keep the global batch",
    )
    add("--use-gpu", action="store_true")
    add("--cpus-per-worker", type=float, default=1.0)
    add("--max-steps", type=int, help="stop after N optimizer steps (default: the recipe's epochs)")
    add("--zero-stage", type=int, choices=(0, 1, 2, 3), help="training takes 0-2; --plan also 3")
    add("--global-batch", type=int, help="default: the recipe's (accumulation absorbs fewer workers)")
    add("--micro-batch", type=int)
    add("--loader-workers", type=int, help="DataLoader processes per training worker")
    add("--precision", choices=("auto", "bf16", "fp32"))
    add("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    add("--max-failures", type=int, help="worker-group restarts from the last checkpoint")
    add(
        "--resume", default="auto", help="auto (latest checkpoint of this stage), never, or a checkpoint path"
    )
    add(
        "--wandb-mode",
        choices=("auto", "offline", "online", "disabled"),
        help="auto: online when WANDB_API_KEY is set, else offline under the run root",
    )
    add("--wandb-dir", help="default: <run-root>/stage<N>/wandb")
    add("--trace-data", action="store_true", help="record every micro-batch's sample keys")
    add(
        "--stored-categories",
        action="store_true",
        help="genseg keeps its stored category prompt (no per-use use_variant_cat re-draw)",
    )
    add("--vgd-same-image", action="store_true", help="VGD prompts from the sample's own image (main)")
    add("--vgd-no-negatives", action="store_true", help="no VGD negative slots (X-SAM main)")
    add("--lr", type=float, help="peak learning rate (default: the recipe's; groups keep their multipliers)")
    add("--grad-clip", type=float, help="global gradient-norm clip, 0: none (default: the recipe's)")
    add("--lr-schedule", choices=("cosine", "multistep"), help="after the warm-up (default: the recipe's)")
    add("--eval-every", type=int, metavar="STEPS", help="evaluate on val sets every STEPS steps (stage 3, 1)")
    add("--eval-sets", help="comma list of built <source>/<split> val sets for --eval-every")
    add("--eval-max-samples", type=int, default=16, help="samples per set evaluated (the first N)")
    add("--eval-data-root", default="", help="the folder the build read (COCO sets read originals)")
    add(
        "--print-config",
        action="store_true",
        help="print the resolved stage and model configs (JSON, every field) and exit",
    )
    add(
        "--peak-tflops",
        type=float,
        help="the GPU's dense bf16 peak for the logged mfu (default: a table of known GPUs by name)",
    )
    _add_plan_args(p)
    add_verbosity_flags(p)
    return p


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    """``--plan`` and its options (:mod:`orchestrate.memory_plan`)."""
    plan = p.add_argument_group("planning (--plan: nothing trains, no GPU needed; docs/scale.md)")
    plan.add_argument(
        "--plan",
        action="store_true",
        help="trace one training step of the stage's model on fake tensors and print per-GPU memory, FLOPs "
        "per sample and the largest micro batch that fits; --num-workers, --micro-batch, --zero-stage, "
        "--precision, --global-batch set the layout",
    )
    plan.add_argument(
        "--gpu-memory",
        type=float,
        nargs="+",
        default=[80.0],
        help="GiB per GPU, one or more cards (default 80)",
    )
    plan.add_argument("--seq-len", type=int, help="LLM tokens per sample (default: the stage's longest)")
    plan.add_argument("--plan-json", metavar="PATH", help="also write the plan as JSON")


def parse_args(argv: list[str] | None = None) -> tuple[RunArgs, argparse.Namespace]:
    """``(RunArgs, the namespace)``; the namespace also holds ``verbose``, ``quiet`` and ``print_config``."""
    p = _parser()
    a = p.parse_args(argv)
    if not (a.print_config or a.plan) and not (a.shards and a.run_root):
        p.error("the following arguments are required: --shards, --run-root")
    if a.num_workers is not None and a.num_workers < 1:  # 0 used to mean "the recipe's default" silently
        p.error(f"--num-workers {a.num_workers}: needs at least 1 worker")
    if a.lr is not None and not a.lr > 0:  # 0 used to mean "the recipe's lr" silently; it trains nothing
        p.error(f"--lr {a.lr}: the learning rate must be > 0")
    if a.grad_clip is not None and not a.grad_clip >= 0:
        p.error(f"--grad-clip {a.grad_clip}: must be >= 0 (0: no clipping)")
    if (
        a.run_root
        and "://" not in a.run_root
        and os.path.exists(a.run_root)
        and not os.path.isdir(a.run_root)
    ):
        p.error(f"--run-root {a.run_root}: is a file, expected a folder (or a path that can be created)")
    init_from = {}
    for item in a.init_from:
        k, sep, v = item.partition("=")
        if not sep or not k.isdigit():
            p.error(f"--init-from {item!r}: expected STAGE=EXPORT_FOLDER")
        init_from[int(k)] = v
    skip = {"init_from", "print_config", "verbose", "quiet", "shards", "run_root"}
    skip |= {"plan", "gpu_memory", "seq_len", "plan_json"}
    kw = {k: v for k, v in vars(a).items() if k not in skip}
    return RunArgs(**kw, shards=a.shards or "", run_root=a.run_root or "", init_from=init_from), a


def _report(plan, result) -> None:
    """The result table (stdout): where the stage's outputs are."""
    layout = plan.layout
    losses = ", ".join(  # components a stage does not compute are 0
        f"{k.removeprefix('loss/')} {v:.4g}"
        for k, v in result.metrics.items()
        if k == "loss" or (k != "step" and v)
    )
    print(f"stage {plan.stage} finished: {result.metrics.get('step')} steps; {losses}")
    print(f"  checkpoint  {result.checkpoint.path if result.checkpoint else None}")
    print(f"  export      {layout.export_dir}")
    print(f"  metrics     {layout.metrics_jsonl}")
    print(f"  wandb       {plan.wandb_dir} (offline runs: wandb sync {plan.wandb_dir}/wandb/offline-run-*)")


def resolved_config(args: RunArgs) -> dict:
    """What ``--print-config`` prints: the stage config (optimisation, schedule, data, batch, checkpointing,
    parents, ...) under ``stage`` and the model config the stage builds (the flavor with the stage's
    checkpointing, attention kernel and max length; every field) under ``model`` — the keys of an export's
    ``config.json``. Needs no shards, run root or Ray."""
    cfg = build_config(args)
    return {"stage": cfg.to_dict(), "model": config_dict(model_config(cfg))}


def print_plan(args: RunArgs, ns: argparse.Namespace) -> int:
    """``--plan``: the stage's per-GPU memory and FLOPs (:mod:`orchestrate.memory_plan`), as a table on
    stdout and, with ``--plan-json``, as JSON. A model that cannot be traced is an error naming its module
    (exit 2)."""
    req = PlanRequest(
        stage=args.stage,
        flavor=args.flavor,
        world=args.num_workers,
        micro_batch=args.micro_batch,
        zero_stage=2 if args.zero_stage is None else args.zero_stage,
        precision=args.precision if args.precision not in (None, "auto") else "bf16",
        gpu_memory_gib=tuple(ns.gpu_memory),
        seq_len=ns.seq_len,
        global_batch=args.global_batch,
    )
    check_flavor(args.flavor)
    plan = plan_stage(req)
    print(format_plan(plan))
    if ns.plan_json:
        with open(ns.plan_json, "w") as f:
            json.dump(plan, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run through :func:`pipelines.errors.run_cli`: an orchestrate error is exit code 2 and one line."""
    args, ns = parse_args(argv)
    verbosity = ns.verbose - ns.quiet
    configure_logging(verbosity)
    if ns.print_config:
        print(json.dumps(resolved_config(args), indent=2))
        return 0
    if ns.plan:
        return print_plan(args, ns)
    elastic_workers(build_config(args), args.min_workers)  # a range that cannot keep the batch: one line, now
    with stage_lock(args):  # one training per stage folder, taken before anything is checked or written
        plan = prepare(args)
        b = plan.cfg.batch
        logger.info(
            f"stage {plan.stage} ({plan.cfg.name}): {plan.total_steps} steps, global batch {b.global_batch} = "
            f"{b.micro_batch} × {b.grad_accum} × {b.world_size} workers, ZeRO-{plan.cfg.zero_stage}; "
            f"run folder {plan.layout.dir}"
        )
        ray_init(num_cpus=None, verbosity=verbosity)
        import ray
        import ray.train

        try:
            result = fit(
                plan, cpus_per_worker=args.cpus_per_worker, verbosity=verbosity, min_workers=args.min_workers
            )
        except ray.train.TrainingFailedError as e:
            print(f"error: stage {plan.stage} failed: {e}", file=sys.stderr)
            return 1
        finally:
            ray.shutdown()
    _report(plan, result)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
