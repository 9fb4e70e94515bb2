"""Training step throughput through the real path: Ray Train workers running DeepSpeed ZeRO-2 on the
mixture loader (orchestrate/trainer.py), stage 3 (all tasks), read back from each run's metrics.jsonl.

    .venv/bin/python bench/train_step.py            # CPU: debug flavor, 1 and 2 workers, 30 steps each
    .venv/bin/python bench/train_step.py --small    # 10 steps, 1 and 2 workers, loader workers 0 only
    .venv/bin/python bench/train_step.py --init-dir /shared/inits   # + GPU: full xsam-phi3 stage 3

CPU (the baseline is the 1-worker run of the same configuration in the same process): steps/s,
samples/s and the data-wait share of step time (time the trainer waited on the loader / step time; target
≤ 5 %), with the loader inline (0 loader workers) and with 1 DataLoader process per trainer. Each trainer
keeps micro batch 2, so 2 workers process twice the samples per step. The first ``--warmup`` steps are
left out (one-off costs: the DeepSpeed engine's first step, shard indexing).

GPU (only with CUDA and ``--init-dir``, X-SAM's inits/ with the pretrained HF folders): one worker, bf16,
4 loader workers, micro batch 4: step time, samples/s, data-wait share (target ≤ 2 %) and a model-FLOPs
utilisation estimate (analytic FLOPs of bench/model_step.py at the run's mean text length over the GPU's
dense bf16 peak). Scratch data goes to a temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/xsam_torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = {
    1: ["coco_panoptic"],
    2: ["coco_panoptic"],
    3: ["coco_panoptic", "refcoco", "refcoco+", "lisa_reasonseg", "grandf_gcg", "psg_gcg"],
}


def demo_shards(out: Path) -> Path:
    """The demo tree's train shards with a mixture whose stage 3 mixes every task the demo has."""
    from pipelines.build import mixture_weights
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions
    from pipelines.demo_data import write_demo

    root = write_demo(out / "datas")
    shards = out / "shards"
    sources = sorted({s for v in STAGES.values() for s in v})
    build(
        str(root),
        str(shards),
        sources=sources,
        splits=["train"],
        options=BuildOptions(samples_per_shard=8),
    )
    mixture_weights.write(str(shards), mixture_weights.compute(str(shards), stages=STAGES))
    return shards


def parent_exports(out: Path, flavor: str, init_dir: str | None) -> dict[int, str]:
    """Stage-1 and stage-2 exports of a freshly built model, so stage 3 starts as it would in a real chain."""
    from xsam_model import build_xsam, export_trainable
    from xsam_model.export import write_export

    model = build_xsam(flavor, init_dir=init_dir)
    urls = {}
    for stage in (1, 2):
        urls[stage] = write_export(
            str(out / f"parents_{flavor}" / f"stage{stage}"),
            export_trainable(model, stage),
            {},
            {"stage": stage},
        )
    return urls


def read_steps(stage_dir: Path, warmup: int) -> list[dict]:
    rows = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step_time_s" in r and r["step"] > warmup]


def summarize(rows: list[dict]) -> dict:
    total = sum(r["step_time_s"] for r in rows)
    return {
        "steps": len(rows),
        "steps_per_s": len(rows) / total,
        "samples_per_s": sum(r["samples_per_s"] * r["step_time_s"] for r in rows) / total,
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in rows) / total,
        "median_step_ms": statistics.median(r["step_time_s"] for r in rows) * 1e3,
        "data_wait_share": sum(r["data_wait_s"] for r in rows) / total,
    }


def run(
    shards: Path,
    run_root: Path,
    *,
    workers: int,
    loader_workers: int,
    steps: int,
    warmup: int,
    flavor: str = "debug",
    use_gpu: bool = False,
    micro_batch: int = 2,
    init_dir: str | None = None,
) -> dict:
    from orchestrate.runner import RunArgs, fit, prepare

    parents = parent_exports(shards.parent, flavor, init_dir)
    plan = prepare(
        RunArgs(
            stage=3,
            flavor=flavor,
            shards=str(shards),
            run_root=str(run_root),
            num_workers=workers,
            use_gpu=use_gpu,
            global_batch=micro_batch * workers,
            micro_batch=micro_batch,
            max_steps=steps + warmup,
            checkpoint_every=steps + warmup,
            loader_workers=loader_workers,
            wandb_mode="disabled",
            init_dir=init_dir,
            init_from=parents,
        )
    )
    fit(plan)
    return summarize(read_steps(run_root / "stage3", warmup))


def fmt(name: str, r: dict, base: dict | None) -> str:
    ratio = f"  ×{r['samples_per_s'] / base['samples_per_s']:.2f} samples/s vs 1 worker" if base else ""
    return (
        f"{name:<34} {r['steps_per_s']:6.2f} steps/s  {r['samples_per_s']:7.2f} samples/s  "
        f"median step {r['median_step_ms']:7.1f} ms  data wait {r['data_wait_share'] * 100:5.1f} %{ratio}"
    )


def bench_cpu(args, shards: Path, out: Path) -> None:
    loader_options = (0,) if args.small else (0, 1)
    print(
        f"cpu  debug flavor, stage 3 mixture of {len(STAGES[3])} sources, micro batch 2 per worker, "
        f"{args.steps} timed steps after {args.warmup} warm-up steps"
    )
    for lw in loader_options:
        base = None
        for workers in (1, 2):
            r = run(
                shards,
                out / f"cpu_w{workers}_l{lw}",
                workers=workers,
                loader_workers=lw,
                steps=args.steps,
                warmup=args.warmup,
            )
            print(fmt(f"cpu  {workers} worker(s), {lw} loader proc(s)", r, base), flush=True)
            base = base or r


def bench_gpu(args, shards: Path, out: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu  skipped: no CUDA device")
        return
    if not args.init_dir:
        print(
            "gpu  skipped: the full flavor needs --init-dir (X-SAM's inits/: SigLIP2, SAM ViT-L, Phi-3 + tokenizer)"
        )
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_step import PEAK_BF16_TFLOPS, model_flops, synthetic_batch

    from xsam_model import build_xsam

    r = run(
        shards,
        out / "gpu",
        workers=1,
        loader_workers=4,
        steps=args.steps,
        warmup=args.warmup,
        flavor="xsam-phi3",
        use_gpu=True,
        micro_batch=4,
        init_dir=args.init_dir,
    )
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    meta = build_xsam("xsam-phi3", device="meta")
    per_sample = model_flops(meta, synthetic_batch(meta, 1, phrases=8))
    mfu = f"{per_sample * r['samples_per_s'] / (peak * 1e12) * 100:.1f} %" if peak else "n/a (--peak-tflops)"
    print(fmt(f"gpu  {name} xsam-phi3 s3, 4 loader procs", r, None) + f"  MFU ≈ {mfu}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="10 steps; loader inline only")
    ap.add_argument("--init-dir", help="X-SAM inits/ folder for the GPU run of the full flavor")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--out", help="keep scratch data and runs here (default: a temporary folder)")
    args = ap.parse_args()
    if args.small:
        args.steps = 10
    import ray

    with tempfile.TemporaryDirectory(prefix="xsam-bench-") as tmp:
        out = Path(args.out or tmp)
        shards = demo_shards(out)
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        try:
            bench_cpu(args, shards, out)
            bench_gpu(args, shards, out)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
