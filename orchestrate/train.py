"""Train one X-SAM stage with Ray Train + DeepSpeed (a Ray job).

    ray job submit --working-dir . -- python orchestrate/train.py --stage 1 --shards /shared/shards \
        --run-root /shared/runs/xsam-a --init-dir /shared/inits --num-workers 16 --use-gpu
    python orchestrate/train.py --stage 1 --flavor debug --shards demo_out/shards --run-root demo_out/runs \
        --num-workers 2 --max-steps 6                                     # joins RAY_ADDRESS or starts Ray

Stage N starts from stage N-1's export under the same --run-root (stage 3: from stages 1 and 2) unless
--init-from says otherwise; submitting a stage again continues from its latest checkpoint. Where things go:
<run-root>/stage<N>/ (checkpoints, export/, metrics.jsonl, wandb/). The work is in orchestrate/runner.py
and orchestrate/train_loop.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run as a script from anywhere

from orchestrate.runner import RunArgs, RunSetupError, fit, prepare, ray_init  # noqa: E402


def parse_args(argv: list[str] | None = None) -> RunArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    p.add_argument(
        "--flavor", default="xsam-phi3", help="model flavor: xsam-phi3 (recipe) or debug (tiny, CPU)"
    )
    p.add_argument("--shards", required=True, help="shards folder/URI (with mixture.json)")
    p.add_argument("--mixture", help="mixture.json to use (default: <shards>/mixture.json)")
    p.add_argument("--run-root", required=True, help="folder/URI holding stage1/ stage2/ stage3/")
    p.add_argument("--run-name", help="wandb group (default: the run root's folder name)")
    p.add_argument("--init-dir", help="X-SAM's inits/ folder with the pretrained HF sub-folders")
    p.add_argument(
        "--init-from",
        action="append",
        default=[],
        metavar="STAGE=EXPORT",
        help="a parent export other than <run-root>/stage<K>/export, e.g. 1=/runs/a/stage1/export",
    )
    p.add_argument(
        "--num-workers", type=int, help="Ray Train workers, one per GPU (default: the recipe's 16)"
    )
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument(
        "--max-steps", type=int, help="stop after N optimizer steps (default: the recipe's epochs)"
    )
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2))
    p.add_argument(
        "--global-batch", type=int, help="default: the recipe's (accumulation absorbs fewer workers)"
    )
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--loader-workers", type=int, help="DataLoader processes per training worker")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint")
    p.add_argument(
        "--resume", default="auto", help="auto (latest checkpoint of this stage), never, or a checkpoint path"
    )
    p.add_argument(
        "--wandb-mode",
        choices=("auto", "offline", "online", "disabled"),
        help="auto: online when WANDB_API_KEY is set, else offline under the run root",
    )
    p.add_argument("--wandb-dir", help="default: <run-root>/stage<N>/wandb")
    p.add_argument("--trace-data", action="store_true", help="record every micro-batch's sample keys")
    p.add_argument("--fault", help=argparse.SUPPRESS)  # test hook, see orchestrate.plan.RunPlan.fault
    a = p.parse_args(argv)
    init_from = {}
    for item in a.init_from:
        k, sep, v = item.partition("=")
        if not sep or not k.isdigit():
            p.error(f"--init-from {item!r}: expected STAGE=EXPORT_FOLDER")
        init_from[int(k)] = v
    kw = {k: v for k, v in vars(a).items() if k != "init_from"}
    return RunArgs(**kw, init_from=init_from)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = prepare(args)
    except (RunSetupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    b = plan.cfg.batch
    print(
        f"stage {plan.stage} ({plan.cfg.name}): {plan.total_steps} steps, global batch {b.global_batch} = "
        f"{b.micro_batch} × {b.grad_accum} × {b.world_size} workers, ZeRO-{plan.cfg.zero_stage}; "
        f"run folder {plan.stage_dir}",
        flush=True,
    )
    ray_init(num_cpus=None)
    import ray
    import ray.train

    try:
        result = fit(plan, cpus_per_worker=args.cpus_per_worker)
    except ray.train.TrainingFailedError as e:
        print(f"error: stage {plan.stage} failed: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(f"stage {plan.stage} finished: metrics {result.metrics}")
    print(f"  checkpoint  {result.checkpoint.path if result.checkpoint else None}")
    print(f"  export      {plan.export_dir}")
    print(f"  metrics     {plan.stage_dir}/metrics.jsonl")
    print(f"  wandb       {plan.wandb_dir} (offline runs: wandb sync {plan.wandb_dir}/wandb/offline-run-*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
