"""Inference benchmarks (``evaluate.py --export``): samples/s of a stage-3 export over val shards.

    .venv/bin/python bench/evaluate_inference.py                      # CPU, debug: inline, 1, 2 Ray workers
    .venv/bin/python bench/evaluate_inference.py --device cuda        # GPU: xsam-phi3 bf16, ± KV cache
    .venv/bin/python bench/evaluate_inference.py --device cuda --init-dir /shared/inits   # real tokenizer

CPU part: the demo's val sets (``--sets``, run ``--repeat`` times) with a debug-flavor stage-3 export of
random weights, X-SAM's protocol (teacher-forced; GCG generated with ``--max-new-tokens``). Reported: wall
samples/s (Ray start-up of the actors and model loading included), steady samples/s (after the first result
came back) and per-worker samples/s over the time the workers spent predicting (``ShardLines.seconds``),
inline in this process and with 1 and 2 Ray actors (``ray.init(num_cpus=2)``); all passes go through one pool,
so each worker loads the model once.

``--semantic-cost``: X-SAM's COCO semantic mIoU comes from the dense semantic post-process of the same
teacher-forced output (our ``semantic`` field of a ``coco_panoptic`` line), not from a second forward pass:
the forward pass, the panoptic post-process and the dense one are timed apart on the same outputs
(``--repeat`` rounds after one warm-up), and scoring with and without the field; the ratio of the whole with
and without the dense pass is printed (one run, one process).

GPU part (``--device cuda``, one GPU): the full ``xsam-phi3`` flavor, random weights, bf16, built on the GPU.
Without ``--init-dir`` the debug BPE stands in for Phi-3's tokenizer (same special-token layout, more tokens
per word, so prompts are longer than Phi-3 would make them). On the demo images: teacher-forced samples/s at
batch 1 and 4, and generation (batch 1 and 4, ``--gen-tokens`` new tokens, stop tokens suppressed so every
run generates the same length) with and without the KV cache: samples/s, generated tokens/s, the speed-up,
peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DEFAULT_SETS = "coco_panoptic/val,refcoco/val,coco_vgd/val_box,grandf_gcg/val"


def demo_shards(work: Path, sets: list[str]) -> tuple[Path, Path]:
    """The demo ``datas/`` tree and its val shards for ``sets`` (built inline, 2 samples per shard)."""
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions
    from pipelines.demo_data import write_demo

    datas = write_demo(work / "datas")
    splits = sorted({s.split("/")[1] for s in sets})
    sources = sorted({s.split("/")[0] for s in sets})
    build(
        str(datas),
        str(work / "shards"),
        sources=sources,
        splits=splits,
        options=BuildOptions(samples_per_shard=2),
    )
    return datas, work / "shards"


def debug_export(path: Path) -> str:
    from xsam_model import build_xsam, export_trainable
    from xsam_model.export import write_export

    torch.manual_seed(0)
    model = build_xsam("debug")
    config = {"stage": {"model": {"flavor": "debug", "init_dir": None}}, "model": model.config.to_dict()}
    write_export(str(path), export_trainable(model, 3), stage=3, config=config, lineage={})
    return str(path)


# ------------------------------------------------------------------------------------------ CPU
def cpu_run(export: str, datas: Path, shards: Path, sets: list[str], workers: int, args) -> dict:
    """One :func:`run_inference` (``workers`` 0 = inline); wall and busy samples/s."""
    from orchestrate.evaluation import export_inference as inf

    opts = inf.InferenceOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    info = inf.open_export(export)
    jobs = inf.plan_sets(str(shards), str(datas), sets, info, opts.mode)
    # all passes through one pool: each worker loads the model once
    work = inf.shard_jobs(jobs, None) * args.repeat
    busy, samples = 0.0, 0
    out = Path(tempfile.mkdtemp(prefix=f"bench_inf_{workers}_"))
    t0 = time.perf_counter()
    stream = inf._inline(export, opts, work) if workers == 0 else inf._ray(export, opts, work, workers, False)
    first = None  # (time, samples) when the first result came back: start-up and model loading are over
    with open(out / "predictions.jsonl", "w") as f:
        for part in stream:
            busy += part.seconds
            samples += len(part.lines)
            f.writelines(json.dumps(x) + "\n" for x in part.lines)
            first = first or (time.perf_counter(), samples)
    wall = time.perf_counter() - t0
    steady = (samples - first[1]) / max(time.perf_counter() - first[0], 1e-9)
    n = max(1, workers)
    return {
        "workers": workers or "inline",
        "samples": samples,
        "wall_s": round(wall, 2),
        "wall_samples_per_s": round(samples / wall, 2),
        "steady_samples_per_s": round(steady, 2),
        "per_worker_samples_per_s": round(samples / busy, 2) if busy else None,
        "busy_share": round(busy / (wall * n), 2),
    }


def cpu_main(args) -> None:
    import ray

    sets = args.sets.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_inference_"))
    datas, shards = demo_shards(work, sets)
    export = debug_export(work / "export")
    rows = [cpu_run(export, datas, shards, sets, 0, args)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows += [cpu_run(export, datas, shards, sets, w, args) for w in (1, 2)]
    finally:
        ray.shutdown()
    print(f"debug flavor, CPU ({os.cpu_count()} cores), sets {sets} x {args.repeat}, batch {args.batch_size}")
    for r in rows:
        print(json.dumps(r))
    one, two = rows[1], rows[2]
    ratio = two["steady_samples_per_s"] / one["steady_samples_per_s"]
    print(
        f"2 workers vs 1: wall x{two['wall_samples_per_s'] / one['wall_samples_per_s']:.2f}, steady x{ratio:.2f}"
    )


def semantic_cost(args) -> None:
    """The forward pass, the panoptic post-process and the dense semantic one, timed apart on the same
    decoded outputs of ``coco_panoptic/val`` (interleaved, ``--repeat`` times; a loaded machine shifts all
    three alike), and scoring with and without the ``semantic`` field."""
    import dataclasses

    from orchestrate.evaluation import export_inference as inf
    from orchestrate.evaluation import ground_truth as gt
    from orchestrate.evaluation.run import score_predictions
    from xsam_model.postprocess import prediction_line

    sets = ["coco_panoptic/val"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_semantic_"))
    datas, shards = demo_shards(work, sets)
    export = debug_export(work / "export")
    opts = inf.InferenceOptions(batch_size=args.batch_size)
    (job,) = inf.plan_sets(str(shards), str(datas), sets, inf.open_export(export), opts.mode)
    predictor = inf.ShardPredictor(export, opts)
    pairs = [(*inf.prepare(job, s), img) for sh in job.evs.shards for s, img in gt.read_shard(job.evs, sh)]
    run = predictor.inferencers[job.mode]
    t = {"forward": 0.0, "panoptic": 0.0, "semantic": 0.0}
    lines = {True: [], False: []}
    for r in range(args.repeat + 1):  # the first round warms up, untimed
        for i in range(0, len(pairs), args.batch_size):
            batch = pairs[i : i + args.batch_size]
            t0 = time.perf_counter()
            decoded = run([(s, img) for s, _, img in batch])
            t1 = time.perf_counter()
            plain = [
                prediction_line(d, dataclasses.replace(spec, semantic_too=False))
                for d, (_, spec, _) in zip(decoded, batch, strict=True)
            ]
            t2 = time.perf_counter()
            dense = [prediction_line(d, spec) for d, (_, spec, _) in zip(decoded, batch, strict=True)]
            t3 = time.perf_counter()
            if r:
                t["forward"] += t1 - t0
                t["panoptic"] += t2 - t1
                t["semantic"] += (t3 - t2) - (t2 - t1)  # the dense pass on top of the panoptic one
            else:
                lines[False] += plain
                lines[True] += dense
    score = {}
    for dense in (False, True):
        path = work / f"p{int(dense)}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines[dense]))
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            score_predictions(str(path), str(shards), str(datas), sets, wandb_mode=None)
        score[dense] = time.perf_counter() - t0
    base = t["forward"] + t["panoptic"] + score[False]
    print(
        f"coco_panoptic/val, debug flavor, CPU, {len(pairs)} samples x {args.repeat}, batch {args.batch_size}"
    )
    print(
        json.dumps(
            {k: round(v, 3) for k, v in t.items()}
            | {"score_s": round(score[False], 3), "score_s_with_semantic": round(score[True], 3)}
        )
    )
    print(
        f"dense semantic pass: x{(base + t['semantic'] + score[True] - score[False]) / base:.3f} of forward + "
        f"post-process + scoring; post-process alone x{(t['panoptic'] + t['semantic']) / t['panoptic']:.2f}"
    )


# ------------------------------------------------------------------------------------------ GPU
def gpu_model(args):
    """``xsam-phi3`` with random weights in bf16 on the GPU, with a processor (see the module docstring)."""
    from xsam_model import build_xsam
    from xsam_model.processor import XSamProcessor
    from xsam_model.tokenizer import build_debug_tokenizer, load_tokenizer, prepare_tokenizer

    torch.manual_seed(0)
    model = build_xsam(args.flavor, device="cuda", dtype=torch.bfloat16).eval()
    cfg = model.config
    tok = load_tokenizer(Path(args.init_dir) / cfg.llm.folder) if args.init_dir else build_debug_tokenizer()
    model.processor = XSamProcessor(
        cfg.processor, prepare_tokenizer(tok, cfg.special_tokens), cfg.special_tokens
    )
    return model


def _timed(fn, repeat: int) -> float:
    fn()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def _gpu_batch(model, batch: list, args, no_stop) -> None:
    """Teacher-forced, then generated with and without the KV cache, on one batch; one JSON line each."""
    from xsam_model.inferencer import InferenceConfig, Inferencer

    b = len(batch)
    teacher = Inferencer(model, InferenceConfig("teacher"))
    torch.cuda.reset_peak_memory_stats()
    t = _timed(lambda: teacher(batch), args.repeat)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps({"batch": b, "mode": "teacher", "samples_per_s": round(b / t, 2), "peak_gb": peak}))
    times = {}
    for cache in (True, False):
        gen = Inferencer(model, InferenceConfig("generate", max_new_tokens=args.gen_tokens, use_cache=cache))
        torch.cuda.reset_peak_memory_stats()
        times[cache] = _timed(lambda g=gen: g(batch, logits_hook=no_stop), args.repeat)
        row = {
            "batch": b,
            "mode": "generate",
            "kv_cache": cache,
            "new_tokens": args.gen_tokens,
            "samples_per_s": round(b / times[cache], 3),
            "tokens_per_s": round(b * args.gen_tokens / times[cache], 1),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        print(json.dumps(row))
    print(f"batch {b}: KV cache speed-up x{times[False] / times[True]:.2f}")


def gpu_main(args) -> None:
    from orchestrate.evaluation import ground_truth as gt
    from pipelines import shard_store, storage
    from xsam_model.inferencer import Inferencer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_inference_gpu_"))
    datas, shards = demo_shards(work, ["refcoco/val"])
    evs = gt.open_set(str(shards), str(datas), "refcoco/val")
    fs, path = storage.fs_and_path(evs.shard_path(evs.shards[0]))
    sample, image = next(iter(shard_store.iter_shard_samples(fs, path)))
    model = gpu_model(args)
    tok = "init-dir" if args.init_dir else "debug BPE"
    print(f"{args.flavor} bf16 on {torch.cuda.get_device_name()}, random weights, tokenizer: {tok}")
    stops = torch.tensor(Inferencer(model).stop_ids, device="cuda")

    def no_stop(step, logits):  # every run generates --gen-tokens tokens
        return logits.index_fill(1, stops, -1e9)

    for b in (1, 4):
        _gpu_batch(model, [(sample, image)] * b, args, no_stop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sets", default=DEFAULT_SETS, help="CPU part: demo val sets")
    p.add_argument("--repeat", type=int, default=20, help="CPU: passes over the sets; GPU: timed repeats")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32, help="CPU: GCG caption length cap")
    p.add_argument("--flavor", default="xsam-phi3", help="GPU part's flavor")
    p.add_argument("--init-dir", help="GPU: X-SAM's inits/ for Phi-3's tokenizer (weights stay random)")
    p.add_argument("--gen-tokens", type=int, default=64, help="GPU: tokens generated per sample")
    p.add_argument("--workdir", help="scratch folder (default: a temp dir)")
    p.add_argument("--semantic-cost", action="store_true", help="CPU: cost of COCO's dense semantic field")
    args = p.parse_args()
    if args.semantic_cost:
        semantic_cost(args)
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
