"""Conversion throughput of ``grandf_gcg`` per Ray worker (target >= 200 samples/s per worker).

    python bench/gcg.py                 # 5,000 captions over 64 drawn 320x240 images, 2 Ray workers
    python bench/gcg.py --small         # 500 captions, a quick check
    python bench/gcg.py --captions 20000 --workers 4

The corpus is the demo GranD-f file scaled up (pipelines.demo.gcg.write_grandf_train: quoted, title-cased and
nested-overlap captions, split RLEs, records without a size), written under a temp dir. Figures:

- baseline: what the reference loaders do per sample, measured here on the same file: ``json.load`` of the
  whole list, then per record X-SAM's caption/phrase cleaning, every RLE decoded to a dense mask and OR-ed,
  and the image opened and decoded with PIL (X-SAM ``_decode_mask`` / GLaMM ``_parse_annotations``).
- to_sample only: our pure conversion function over indexed records (no image check, no tar writing).
- build, inline: ``pipelines.build.driver.build`` with Ray not initialised (one worker, everything included).
- build, Ray: the same under ``ray.init(num_cpus=W)``; per worker = samples / seconds that worker spent
  converting (from the shard completion markers), and samples / (wall x W) end to end (indexing included).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from pipelines.build.driver import build  # noqa: E402
from pipelines.demo.gcg import GRANDF_IMAGES, write_grandf_train  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402
from pipelines.sources.base import BuildOptions, ConvertContext, Shared, Skip  # noqa: E402

TARGET = 200.0  # samples/s per worker


def baseline(root: Path, ann: Path) -> tuple[int, float]:
    """Reference-style per-sample parsing of every record; returns (samples, seconds)."""
    t0 = time.perf_counter()
    with open(ann) as f:
        data = json.load(f)
    n = 0
    for rec in data:
        caption = rec["caption"].strip('"').strip().lower()
        img = Image.open(root / GRANDF_IMAGES / rec["file_name"])
        img.load()  # the reference decodes the image for every sample
        h, w = img.height, img.width
        for phrase, g in rec["groundings"].items():
            if phrase.strip('"').strip().lower() not in caption:
                continue
            m = np.zeros((h, w), np.uint8)
            for r in g["rle_masks"]:
                m |= mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
        n += 1
    return n, time.perf_counter() - t0


def to_sample_only(root: Path) -> tuple[int, float]:
    src = SOURCES["grandf_gcg"]
    options = BuildOptions()
    files = src.locate(str(root), "train")
    items = list(src.index(files, "train", options))
    shared = {k: v for it in items if isinstance(it, Shared) for k, v in it.data.items()}
    records = [it for it in items if not isinstance(it, Skip | Shared)]
    ctx = ConvertContext(data_root=str(root), split="train", options=options, files=files, shared=shared)
    t0 = time.perf_counter()
    for r in records:
        ctx.drops = []
        src.to_sample(r, ctx)
    return len(records), time.perf_counter() - t0


def part_seconds(out: Path) -> tuple[int, float]:
    parts = [json.loads(p.read_text()) for p in (out / "grandf_gcg/train/_parts").glob("*.json")]
    return sum(p["samples"] for p in parts), sum(p["seconds"] for p in parts)


def timed_build(root: Path, out: Path, per_shard: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    (res,) = build(
        str(root),
        str(out),
        sources=["grandf_gcg"],
        splits=["train"],
        options=BuildOptions(samples_per_shard=per_shard),
    )
    return res.samples, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--small", action="store_true", help="500 captions over 16 images")
    args = p.parse_args()
    if args.small:
        args.captions, args.images = 500, 16

    with tempfile.TemporaryDirectory(prefix="xsam-bench-gcg-") as tmp:
        root = Path(tmp) / "datas"
        t0 = time.perf_counter()
        write_grandf_train(root, random.Random(0), args.images, args.captions)
        ann = root / "img_gcgseg/grand_f/annotations/train/GranDf_HA_GCG_train.json"
        print(
            f"corpus: {args.captions} captions over {args.images} images (320x240), "
            f"{ann.stat().st_size / 1e6:.1f} MB JSON, written in {time.perf_counter() - t0:.1f} s"
        )

        rows = []
        n, s = baseline(root, ann)
        base = n / s
        rows.append(("baseline (reference-style parse)", n, s, base))
        n, s = to_sample_only(root)
        rows.append(("to_sample only, 1 process", n, s, n / s))
        n, s = timed_build(root, Path(tmp) / "inline", args.samples_per_shard)
        rows.append(("build inline, 1 worker (end to end)", n, s, n / s))
        cn, cs = part_seconds(Path(tmp) / "inline")
        rows.append(("  of which shard conversion", cn, cs, cn / cs))

        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            n, wall = timed_build(root, Path(tmp) / "ray", args.samples_per_shard)
        finally:
            ray.shutdown()
        cn, cs = part_seconds(Path(tmp) / "ray")
        per_worker = cn / cs
        rows.append((f"build Ray, {args.workers} workers (end to end)", n, wall, n / wall))
        rows.append(
            ("  per worker, end to end (n / wall / W)", n, wall * args.workers, n / wall / args.workers)
        )
        rows.append(("  per worker, converting (n / worker-s)", cn, cs, per_worker))

        print(f"\n{'what':<44} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'x baseline':>10}")
        for what, n, s, rate in rows:
            print(f"{what:<44} {n:>8} {s:>8.2f} {rate:>10.1f} {rate / base:>10.2f}")
        ok = per_worker >= TARGET
        print(
            f"\nper-worker conversion {per_worker:.0f} samples/s vs target {TARGET:.0f}: {'PASS' if ok else 'BELOW TARGET'}"
            f" (cpus: {os.cpu_count()})"
        )


if __name__ == "__main__":
    main()
