"""Model step benchmarks: per-``<SEG>`` decoding cost, the full-width smoke model on CPU, SAM ViT-L's memory
at 1024², and (``--device cuda``) the full ``xsam-phi3`` stage-3 step.

    .venv/bin/python bench/model_step.py                # CPU: debug per_seg vs last, smoke model, SAM at 1024
    .venv/bin/python bench/model_step.py --only debug   # one part: debug | smoke | sam
    .venv/bin/python bench/model_step.py --device cuda  # GPU: xsam-phi3 bf16, batch 1 and 4, ± checkpointing

CPU parts:

1. ``debug`` flavor, a synthetic refseg batch (``--batch`` samples × ``--turns`` turns, one ``<SEG>`` and mask
   per turn): forward + backward step time with ``seg_reduce="per_seg"`` (paper) and ``"last"``, and the
   ratio.
2. :func:`xsam_model.flavors.full_width_smoke` (every width of ``xsam-phi3``, 2 LLM layers, 224² inputs,
   fp32), as ``tests/model/test_full_width.py`` runs it: one stage-1 genseg and one stage-3 refseg forward +
   backward, time and peak RSS (VmHWM of a subprocess).
3. SAM ViT-L alone at 1024², one image, fp32, forward + backward through the hidden states X-SAM reads
   (12, 18, 22, 24), with and without activation checkpointing; each in a subprocess under an address-space
   limit (``--sam-limit-gb``, capped to leave 6 GB of the machine free), so a run that needs more is reported
   as "did not fit" instead of taking the machine's memory.

GPU part: the full flavor (random weights, bf16) stage-3 genseg step (``--phrases`` phrases, one mask each),
batch 1 and 4, without and with activation checkpointing of every part (X-SAM's stage 3): step time, peak
memory, MFU. MFU uses analytic model FLOPs (recomputation not counted): 6·N·tokens for every transformer (LLM,
SigLIP, SAM) plus 12·layers·width·context per token for attention (causal halves the LLM's), over the GPU's
dense bf16 peak (``--peak-tflops``; default from the device name). The optimizer step is not included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from xsam_model import build_xsam  # noqa: E402
from xsam_model.builder import apply_checkpointing  # noqa: E402
from xsam_model.trainable import stage_view  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
GB = 2**30


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _tokens(model, phrases: int, task: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One sample's token tensors: genseg = one question listing ``phrases`` spans and one ``<SEG>``; refseg =
    ``phrases`` turns, each a span and a ``<SEG>`` answer."""
    cfg, ids = model.config, model.special_token_ids
    vocab = min(ids.values())  # ordinary ids below the special tokens
    words = lambda n: torch.randint(10, max(11, vocab - 1), (n,), generator=g).tolist()  # noqa: E731
    seq, labels, cond, seg = (
        [1, cfg.processor.image_token_index, *words(12)],
        [-100] * 14,
        [-1] * 14,
        [-1] * 14,
    )

    def add(toks, lab, c=-1, s=-1):
        seq.extend(toks)
        labels.extend(toks if lab else [-100] * len(toks))
        cond.extend([c] * len(toks))
        seg.extend([s] * len(toks))

    for k in range(phrases):
        add([ids["<p>"], *words(2), ids["</p>"]], False, c=k)
        if task == "refseg":
            add(words(4), False)
            add(words(3), True)
            add([ids["<SEG>"]], True, s=k)
    if task != "refseg":
        add(words(10), False)
        add(words(3), True)
        add([ids["<SEG>"]], True, s=0)
    return {
        k: torch.tensor(v)
        for k, v in (("input_ids", seq), ("labels", labels), ("cond_ids", cond), ("seg_ids", seg))
    }


def synthetic_batch(model, batch_size: int, phrases: int, task: str = "genseg", seed: int = 0) -> dict:
    """A batch shaped like :func:`xsam_model.processor.collate` output, one target mask per phrase."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    toks = _tokens(model, phrases, task, g)
    L, S = cfg.processor.sam_size, cfg.processor.siglip_size
    masks = []
    for _ in range(batch_size):
        m = torch.zeros(phrases, L, L, dtype=torch.uint8)
        for j in range(phrases):
            y, x = torch.randint(0, L // 2, (2,), generator=g).tolist()
            m[j, y : y + L // 3, x : x + L // 3] = 1
        masks.append(m)
    rep = lambda t: t.unsqueeze(0).repeat(batch_size, 1)  # noqa: E731
    return {
        **{k: rep(v) for k, v in toks.items()},
        "attention_mask": torch.ones(batch_size, len(toks["input_ids"]), dtype=torch.long),
        "pixel_values": torch.randn(batch_size, 3, S, S, generator=g),
        "extra_pixel_values": torch.randn(batch_size, 3, L, L, generator=g),
        "ignore_mask": torch.zeros(batch_size, L, L, dtype=torch.bool),
        "scaled_size": torch.tensor([[L, L]] * batch_size),
        "mask_labels": masks,
        "class_labels": [torch.arange(phrases)] * batch_size,
        "category_labels": [torch.zeros(phrases, dtype=torch.long)] * batch_size,
        "region_masks": [torch.zeros(0, L, L, dtype=torch.bool)] * batch_size,
        "task": task,
        "keys": [f"synthetic/{i}" for i in range(batch_size)],
    }


def to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device)
            out[k] = v.to(dtype) if v.is_floating_point() else v
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            out[k] = [x.to(device) for x in v]
        else:
            out[k] = v
    return out


def run(model, batch: dict, steps: int, warmup: int, sync, stage: int = 3) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(batch, stage=stage)
        out.loss.backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return times


# ---------------------------------------------------------------------------------------------- CPU parts
def bench_debug(args) -> None:
    from xsam_model import XSAM_FLAVORS

    med, best = {}, {}
    for mode in ("per_seg", "last"):
        cfg = dataclasses.replace(XSAM_FLAVORS["debug"])
        cfg.decoder = dataclasses.replace(cfg.decoder, seg_reduce=mode)
        torch.manual_seed(0)
        model = build_xsam(cfg)
        batch = synthetic_batch(model, args.batch, args.turns, task="refseg")
        t = run(model, batch, args.steps, args.warmup, lambda: None)
        med[mode], best[mode] = statistics.median(t), min(t)
        print(
            f"cpu  debug refseg {args.batch}x{args.turns} turns, seg_reduce={mode:7s}: step {med[mode] * 1e3:7.1f} ms "
            f"(median of {len(t)}; min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f}) threads={torch.get_num_threads()}"
        )
    print(
        f"cpu  debug per_seg / last step time: {med['per_seg'] / med['last']:.2f}x (medians), "
        f"{best['per_seg'] / best['last']:.2f}x (fastest steps, least disturbed on a shared machine)"
    )


def _worker_smoke(args) -> dict:
    from xsam_model.flavors import full_width_smoke

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_xsam(full_width_smoke())
    result = {"build_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}
    for stage, task in ((1, "genseg"), (3, "refseg")):
        stage_view(model, stage)
        # as tests/model/test_full_width.py: the 0.2 B-parameter token embedding and LM head stay frozen
        model.llm.get_input_embeddings().weight.requires_grad_(False)
        model.llm.lm_head.weight.requires_grad_(False)
        batch = synthetic_batch(model, 1, 3, task=task)
        cpu = time.process_time()
        t = run(model, batch, 1, 0, lambda: None, stage=stage)
        result[f"stage{stage}_{task}_s"] = t[0]
        result[f"stage{stage}_{task}_cpu_s"] = (
            time.process_time() - cpu
        )  # all threads: shows a shared machine
        result["tokens"] = batch["input_ids"].shape[1] - 1 + model.config.num_image_tokens
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _worker_sam(args) -> dict:
    from torch import nn
    from transformers import SamVisionModel

    from xsam_model.builder import sam_hf_config
    from xsam_model.config import XSamConfig
    from xsam_model.modeling.activation_checkpointing import enable_hf_checkpointing

    cfg = XSamConfig()
    torch.manual_seed(0)
    sam = SamVisionModel(sam_hf_config(cfg)).train()
    sam.vision_encoder.neck = nn.Identity()
    if args.ckpt:
        enable_hf_checkpointing(sam)
    base = peak_rss_mb()
    x = torch.randn(1, 3, cfg.sam.image_size, cfg.sam.image_size)
    t0 = time.perf_counter()
    try:
        hs = sam(x, output_hidden_states=True).hidden_states
        loss = sum(hs[i].float().mean() for i in (*cfg.sam.connector_layers, cfg.sam.select_layer))
        loss.backward()
    except (RuntimeError, MemoryError) as e:  # the address-space limit: allocation fails
        return {"fit": False, "error": str(e).splitlines()[0][:160], "peak_rss_mb": peak_rss_mb()}
    return {"fit": True, "s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "weights_rss_mb": base}


def _subprocess(worker: str, extra: list[str], limit_gb: float | None) -> dict:
    """Run this script as ``--worker``; returns its RESULT json (or the exit status when it died)."""
    cmd = [sys.executable, __file__, "--worker", worker, *extra]

    def limit():
        if limit_gb:
            n = int(limit_gb * GB)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"fit": False, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def bench_smoke(args) -> None:
    r = _subprocess("smoke", [], None)
    if "error" in r:
        print(f"cpu  full-width smoke: failed ({r['error']})")
        return
    print(
        f"cpu  full-width smoke ({r['params'] / 1e9:.2f} B params, {r['tokens']} LLM tokens, fp32): build "
        f"{r['build_s']:.0f} s; stage-1 genseg fwd+bwd {r['stage1_genseg_s']:.0f} s (CPU {r['stage1_genseg_cpu_s']:.0f} s); "
        f"stage-3 refseg (3 <SEG>) fwd+bwd {r['stage3_refseg_s']:.0f} s (CPU {r['stage3_refseg_cpu_s']:.0f} s); "
        f"peak RSS {r['peak_rss_mb'] / 1024:.1f} GB; threads {torch.get_num_threads()}"
    )


def sam_saved_gb(ckpt: bool) -> float:
    """GB of tensors SAM ViT-L at 1024² keeps for backward (one image), counted on the meta device (no memory;
    a view is counted each time it is saved, so an upper bound)."""
    from torch import nn
    from transformers import SamVisionModel

    from xsam_model.builder import sam_hf_config
    from xsam_model.config import XSamConfig
    from xsam_model.modeling.activation_checkpointing import enable_hf_checkpointing

    cfg = XSamConfig()
    with torch.device("meta"):
        sam = SamVisionModel(sam_hf_config(cfg)).train()
    sam.vision_encoder.neck = nn.Identity()
    if ckpt:
        enable_hf_checkpointing(sam)
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sam(
            torch.randn(1, 3, cfg.sam.image_size, cfg.sam.image_size, device="meta"),
            output_hidden_states=True,
        )
    return total[0] / GB


def bench_sam(args) -> None:
    for ckpt in (True, False):
        print(
            f"cpu  SAM ViT-L @1024, 1 image: tensors saved for backward with checkpointing {'on ' if ckpt else 'off'}: "
            f"{sam_saved_gb(ckpt):.1f} GB (meta-device count; weights + grads add 2.3 GB in fp32)"
        )
    limit = min(args.sam_limit_gb, _available_gb() - 6.0)
    if limit < 4:
        print(f"cpu  SAM ViT-L @1024: skipped, only {_available_gb():.1f} GB available (6 GB stay free)")
        return
    for ckpt in (True, False):
        r = _subprocess("sam", ["--ckpt"] if ckpt else [], limit)
        what = f"cpu  SAM ViT-L @1024, 1 image, fp32 fwd+bwd, activation checkpointing {'on ' if ckpt else 'off'}"
        if r.get("fit"):
            print(
                f"{what}: peak RSS {r['peak_rss_mb'] / 1024:.1f} GB ({r['weights_rss_mb'] / 1024:.1f} GB before the step), {r['s']:.0f} s"
            )
        else:
            print(f"{what}: did not fit in {limit:.0f} GB (address-space limit; {r.get('error', '')})")


# ---------------------------------------------------------------------------------------------- GPU part
def model_flops(model, batch: dict) -> float:
    """Analytic training FLOPs (fwd + bwd = 3 × fwd) of one stage-3 step; see the module docstring."""
    cfg = model.config
    b = batch["input_ids"].shape[0]
    t_llm = batch["input_ids"].shape[1] - 1 + cfg.num_image_tokens

    def params(mod, skip_embed=False):
        return sum(p.numel() for n, p in mod.named_parameters() if not (skip_embed and "embed_tokens" in n))

    c, s, v = cfg.llm, cfg.sam, cfg.siglip
    llm = 6 * params(model.llm, skip_embed=True) * t_llm + 6 * c.num_layers * c.hidden_size * t_llm * t_llm
    t_sig = v.num_tokens
    sig = 6 * params(model.vision_encoder) * t_sig + 12 * v.num_layers * v.hidden_size * t_sig * t_sig
    t_sam, win = s.grid**2, s.window_size**2
    n_glob = len(s.global_attn_indexes)
    sam_attn = 12 * s.hidden_size * t_sam * (n_glob * t_sam + (s.num_layers - n_glob) * win)
    sam = 6 * params(model.sam_encoder) * t_sam + sam_attn
    rest = (
        6 * sum(params(m) for m in (model.visual_projector, model.seg_projector, model.llm_projector)) * t_llm
    )
    return float(b * (llm + sig + sam + rest))


def bench_gpu(args) -> None:
    from xsam_model.config import stage_checkpointing, with_checkpointing

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_xsam("xsam-phi3", device="cuda", dtype=torch.bfloat16)
    stage_view(model, 3)
    print(
        f"gpu  {name}: built xsam-phi3 (random, bf16, {model.config.llm.attn_implementation}) in "
        f"{time.perf_counter() - t0:.1f} s; {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params"
    )
    for ckpt in (False, True):
        model.config = with_checkpointing(model.config, stage_checkpointing(3) if ckpt else ())
        apply_checkpointing(model)
        for bs in (1, 4):
            batch = to_device(synthetic_batch(model, bs, args.phrases), "cuda", torch.bfloat16)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            what = f"gpu  xsam-phi3 stage 3 batch {bs}, checkpointing {'on ' if ckpt else 'off'}"
            try:
                t = run(model, batch, args.steps, args.warmup, torch.cuda.synchronize)
            except torch.OutOfMemoryError:
                print(f"{what}: out of memory")
                model.zero_grad(set_to_none=True)
                continue
            med = statistics.median(t)
            flops = model_flops(model, batch)
            mfu = (
                f"{flops / med / (peak * 1e12) * 100:5.1f} %" if peak else "n/a (unknown peak; --peak-tflops)"
            )
            print(
                f"{what}: step {med * 1e3:7.1f} ms (median of {len(t)}), peak mem "
                f"{torch.cuda.max_memory_allocated() / GB:6.1f} GiB, model {flops / med / 1e12:6.1f} TFLOP/s, MFU {mfu}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--only", choices=("debug", "smoke", "sam"), default=None, help="one CPU part")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="debug refseg batch size")
    ap.add_argument("--turns", type=int, default=3, help="debug refseg turns (<SEG>s) per sample")
    ap.add_argument("--phrases", type=int, default=20, help="GPU genseg phrases (and masks) per sample")
    ap.add_argument("--sam-limit-gb", type=float, default=14.0, help="address-space cap of each SAM run")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="GPU dense bf16 peak for MFU")
    ap.add_argument("--worker", choices=("smoke", "sam"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(
            "RESULT " + json.dumps((_worker_smoke if args.worker == "smoke" else _worker_sam)(args)),
            flush=True,
        )
        return
    if args.device == "cuda":
        bench_gpu(args)
        return
    parts = {"debug": bench_debug, "smoke": bench_smoke, "sam": bench_sam}
    for name, fn in parts.items():
        if args.only in (None, name):
            fn(args)


if __name__ == "__main__":
    main()
