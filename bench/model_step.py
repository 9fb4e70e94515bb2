"""Model step time: the debug flavor on CPU; with a GPU, the full ``xsam-phi3`` flavor (random weights from
its configs, bf16) forward + backward at batch 1 and 4: step time, peak memory and model-FLOPs utilisation.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/model_step.py            # CPU debug (+ GPU full if CUDA)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/model_step.py --steps 20 --phrases 40

Batches are synthetic stage-3 genseg batches with the real layout: BOS, one ``<image>`` (→ 729 + 1024
tokens), ``--phrases`` ``<p> w w </p>`` spans, an answer with one ``<SEG>``, one target mask per phrase in
the SAM frame. MFU uses analytic model FLOPs (no recomputation counted): 6·N·tokens for every transformer
(LLM, SigLIP, SAM) plus 12·layers·width·context per token for attention (causal halves the LLM's), over the
GPU's dense bf16 peak (``--peak-tflops``; default from the device name).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from xsam_model import build_xsam  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def synthetic_batch(model, batch_size: int, phrases: int, masks_per_phrase: int = 1, seed: int = 0) -> dict:
    """A genseg batch shaped like :func:`xsam_model.processor.collate` output."""
    cfg, ids = model.config, model.special_token_ids
    g = torch.Generator().manual_seed(seed)
    vocab = min(ids.values())  # ordinary ids below the special tokens
    words = lambda n: torch.randint(10, max(11, vocab - 1), (n,), generator=g).tolist()  # noqa: E731
    prompt = [1, cfg.processor.image_token_index, *words(12)]
    cond_spans = []
    for k in range(phrases):
        cond_spans.append((len(prompt), k))
        prompt += [ids["<p>"], *words(2), ids["</p>"]]
        cond_spans.append((len(prompt) - 1, k))
    prompt += words(10)
    answer = [*words(3), ids["<SEG>"], *words(2)]
    seq = torch.tensor(prompt + answer)
    labels = torch.tensor([-100] * len(prompt) + answer)
    cond = torch.full_like(seq, -1)
    for (a, k), (b, _) in zip(cond_spans[::2], cond_spans[1::2], strict=True):
        cond[a : b + 1] = k
    seg = torch.full_like(seq, -1)
    seg[seq == ids["<SEG>"]] = 0
    L, S, n = cfg.processor.sam_size, cfg.processor.siglip_size, phrases * masks_per_phrase
    masks = []
    for _ in range(batch_size):
        m = torch.zeros(n, L, L, dtype=torch.uint8)
        for j in range(n):
            y, x = torch.randint(0, L // 2, (2,), generator=g).tolist()
            m[j, y : y + L // 3, x : x + L // 3] = 1
        masks.append(m)
    rep = lambda t: t.unsqueeze(0).repeat(batch_size, 1)  # noqa: E731
    return {
        "input_ids": rep(seq),
        "attention_mask": torch.ones(batch_size, len(seq), dtype=torch.long),
        "labels": rep(labels),
        "cond_ids": rep(cond),
        "seg_ids": rep(seg),
        "pixel_values": torch.randn(batch_size, 3, S, S, generator=g),
        "extra_pixel_values": torch.randn(batch_size, 3, L, L, generator=g),
        "ignore_mask": torch.zeros(batch_size, L, L, dtype=torch.bool),
        "scaled_size": torch.tensor([[L, L]] * batch_size),
        "mask_labels": masks,
        "class_labels": [torch.arange(phrases).repeat_interleave(masks_per_phrase)] * batch_size,
        "category_labels": [torch.zeros(n, dtype=torch.long)] * batch_size,
        "region_masks": [torch.zeros(0, L, L, dtype=torch.bool)] * batch_size,
        "task": "genseg",
        "keys": [],
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


def run(model, batch: dict, steps: int, warmup: int, sync) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(batch, stage=3)
        out.loss.backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return times


def bench_cpu(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build_xsam("debug")
    for bs in (1, 2, 4):
        batch = synthetic_batch(model, bs, args.phrases)
        t = run(model, batch, args.steps, args.warmup, lambda: None)
        med = statistics.median(t)
        print(
            f"cpu  debug  batch {bs}: step {med * 1e3:7.1f} ms (median of {len(t)}; min {min(t) * 1e3:.1f}, "
            f"max {max(t) * 1e3:.1f}) threads={torch.get_num_threads()} "
            f"llm_tokens={batch['input_ids'].shape[1] - 1 + model.config.num_image_tokens}"
        )


def bench_gpu(args) -> None:
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_xsam("xsam-phi3", device="cuda", dtype=torch.bfloat16)
    if args.grad_ckpt:
        model.llm.gradient_checkpointing_enable()
    print(
        f"gpu  {name}: built xsam-phi3 (random, bf16) in {time.perf_counter() - t0:.1f} s; "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params; "
        f"LLM activation checkpointing {'on' if args.grad_ckpt else 'off'}"
    )
    for bs in (1, 4):
        batch = to_device(synthetic_batch(model, bs, args.phrases), "cuda", torch.bfloat16)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            t = run(model, batch, args.steps, args.warmup, torch.cuda.synchronize)
        except torch.OutOfMemoryError:
            print(f"gpu  xsam-phi3 batch {bs}: out of memory (try --grad-ckpt)")
            model.zero_grad(set_to_none=True)
            continue
        med = statistics.median(t)
        flops = model_flops(model, batch)
        mfu = f"{flops / med / (peak * 1e12) * 100:5.1f} %" if peak else "n/a (unknown peak; --peak-tflops)"
        print(
            f"gpu  xsam-phi3 batch {bs}: step {med * 1e3:7.1f} ms (median of {len(t)}), "
            f"peak mem {torch.cuda.max_memory_allocated() / 2**30:6.1f} GiB, "
            f"model {flops / med / 1e12:6.1f} TFLOP/s, MFU {mfu}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--phrases", type=int, default=20, help="<p> spans (and target masks) per sample")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="GPU dense bf16 peak for MFU")
    ap.add_argument(
        "--grad-ckpt", action="store_true", help="LLM activation checkpointing (X-SAM s3 default)"
    )
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    if not args.skip_cpu:
        bench_cpu(args)
    if torch.cuda.is_available():
        bench_gpu(args)
    else:
        print("gpu  skipped: no CUDA device")


if __name__ == "__main__":
    main()
