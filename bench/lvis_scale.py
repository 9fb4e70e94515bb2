"""LVIS-v1-scale indexing against ``lvis.LVIS()``, and ADE20K panoptic conversion throughput per worker.

    python bench/lvis_scale.py            # 100k images, 1.27M annotations, 1203 categories (≈450 MB JSON)
    python bench/lvis_scale.py --small    # 5k images, 63.5k annotations: a quick check

Writes a synthetic LVIS v1 file in the real schema (``images`` after ``annotations``, as in the v0.5 sample;
polygons, ``neg_category_ids``, ``not_exhaustive_category_ids``, ``coco_url`` paths, one small JPEG
hard-linked for every image) under a temp dir, then runs each side in its own subprocess so that peak RSS
(the child's own ``ru_maxrss``) and CPU time are its alone:

- baseline: ``lvis.LVIS(path)``, what detectron2 / lvis-api users run in every process;
- driver:   ``Lvis.index()`` streamed into ``chunks.spill()`` (exactly what ``build_split`` runs before
            converting), plus the sha256 of the input it hashes for the manifest, reported apart;
- worker:   ``shards.convert_chunk()`` of one chunk (polygons -> RLE, image checks, tar writing).

Targets: driver peak RSS <= 0.1x and indexing time <= 0.6x of ``lvis.LVIS()``; ADE20K panoptic
conversion >= 60 samples/s per worker (raw ADE-sized JPEG + label PNG + instance PNG per sample). Wall times
depend on what else the machine runs; CPU times (user + system of the child) are the steadier comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pipelines.demo.draw import jpeg_bytes, make_scene, png_bytes  # noqa: E402

W, H = 640, 480


# ---------------------------------------------------------------------------------------------- synthetic
# data
def write_lvis(root: Path, n_images: int, n_anns: int, n_cats: int, seed: int = 0) -> Path:
    """``root/img_ovseg/lvis/lvis_v1_train.json`` + one JPEG hard-linked as every image; returns the JSON."""
    rng = random.Random(seed)
    polys = []
    for _ in range(512):  # polygon shapes reused across annotations; the parser still reads every number
        cx, cy, r = rng.uniform(60, W - 60), rng.uniform(60, H - 60), rng.uniform(10, 55)
        pts = []
        for k in range(16):
            a = 2 * np.pi * k / 16
            rr = r * rng.uniform(0.6, 1.0)
            pts += [round(cx + rr * np.cos(a), 2), round(cy + rr * np.sin(a), 2)]
        polys.append(json.dumps([pts], separators=(",", ":")))
    path = root / "img_ovseg/lvis/lvis_v1_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    per = n_anns / n_images
    folder = lambda i: "val2017" if i % 5 == 0 else "train2017"  # noqa: E731  (LVIS train mixes both)
    with open(path, "w") as f:
        f.write('{"categories":[')
        f.write(
            ",".join(
                json.dumps(
                    {
                        "id": i,
                        "name": f"category_{i}",
                        "synonyms": [f"category_{i}", f"alias_{i}"],
                        "synset": f"c{i}.n.01",
                        "def": "a synthetic category",
                        "frequency": "rcf"[i % 3],
                        "image_count": 10,
                        "instance_count": 20,
                    }
                )
                for i in range(1, n_cats + 1)
            )
        )
        f.write('],"annotations":[')
        for a in range(n_anns):
            iid = int(a / per) + 1
            f.write(
                ("," if a else "") + f'{{"area":{rng.uniform(100, 9000):.2f},"id":{a + 1},'
                f'"segmentation":{polys[a % 512]},"image_id":{iid},"bbox":[10.5,20.25,80.0,60.5],'
                f'"category_id":{rng.randint(1, n_cats)}}}'
            )
        f.write(
            '],"info":{"year":2020,"version":"1.0","description":"synthetic LVIS-scale file"},"licenses":[],'
        )
        f.write('"images":[')
        for i in range(1, n_images + 1):
            f.write(
                ("," if i > 1 else "")
                + json.dumps(
                    {
                        "date_captured": "2013-11-19 20:30:17",
                        "neg_category_ids": rng.sample(range(1, n_cats + 1), 8),
                        "id": i,
                        "license": 1,
                        "height": H,
                        "width": W,
                        "flickr_url": "http://farm9.staticflickr.com/x.jpg",
                        "coco_url": f"http://images.cocodataset.org/{folder(i)}/{i:012d}.jpg",
                        "not_exhaustive_category_ids": rng.sample(range(1, n_cats + 1), 2),
                    }
                )
            )
        f.write("]}")
    jpg = jpeg_bytes(np.full((H, W, 3), 127, np.uint8))
    for sub in ("train2017", "val2017"):
        (root / "img_genseg/coco2017" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(1, n_images + 1):
        src = root / f"one-{i // 50_000}.jpg"  # ext4 allows 65000 links per inode: a fresh copy every 50k
        if not src.exists():
            src.write_bytes(jpg)
        os.link(src, root / "img_genseg/coco2017" / folder(i) / f"{i:012d}.jpg")
    return path


def write_ade(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (683, 512)) -> None:
    """Raw ADE20K-style images + label PNGs + instance PNGs at ADE's typical size, ~15 segments each."""
    from pipelines.demo.ade20k import _instance_class, _value

    rng = random.Random(seed)
    base = root / "img_ovseg/ade20k"
    for sub in ("images", "annotations", "annotations_instance"):
        (base / sub / "training").mkdir(parents=True, exist_ok=True)
    stuff_names = ["wall", "sky", "floor", "grass", "road"]
    thing_names = ["person", "car", "chair", "table", "bed", "sofa", "lamp"]
    w, h = size
    for i in range(n):
        stem = f"ADE_train_{i + 1:08d}"
        arr, objects = make_scene(
            rng, w, h, [rng.choice(thing_names) for _ in range(10)], rng.sample(stuff_names, 5)
        )
        sem = np.zeros((h, w), np.uint8)
        inst = np.zeros((h, w, 3), np.uint8)
        g = 0
        for obj in objects:
            sem[obj.mask] = _value(obj.category)
            if obj.kind != "stuff" and obj.mask.any():
                g += 1
                inst[obj.mask] = (_instance_class(obj.category), g, 0)
        (base / "images/training" / f"{stem}.jpg").write_bytes(jpeg_bytes(arr))
        (base / "annotations/training" / f"{stem}.png").write_bytes(png_bytes(sem))
        (base / "annotations_instance/training" / f"{stem}.png").write_bytes(png_bytes(inst))


# ---------------------------------------------------------------------------------------------- the measured
# sides
def _usage(t0: float, c0: float) -> dict:
    """Wall and CPU time since ``t0`` / ``c0``; peak RSS of the whole process (imports included)."""
    return {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _start() -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_lvis_api(args: dict) -> dict:
    import lvis

    t0, c0, rss0 = _start()
    api = lvis.LVIS(args["path"])
    return {
        **_usage(t0, c0),
        "rss_after_imports_mb": rss0,
        "annotations": len(api.anns),
        "images": len(api.imgs),
    }


def child_driver(args: dict) -> dict:
    from pipelines.build.chunks import spill
    from pipelines.sources import SOURCES
    from pipelines.sources.base import BuildOptions

    src = SOURCES["lvis"]
    files = src.locate(args["root"], "train")
    t0, c0, rss0 = _start()
    chunks, skips, shared = spill(
        src.index(files, "train", BuildOptions()), args["out"], args["out"] + "/index", 1000
    )
    out = {
        **_usage(t0, c0),
        "rss_after_imports_mb": rss0,
        "records": sum(c.records for c in chunks),
        "chunks": len(chunks),
        "skips": len(skips),
    }
    Path(args["out"], "driver.json").write_text(json.dumps({"chunk": chunks[0].__dict__, "shared": shared}))
    from pipelines.build import shards

    t1 = time.perf_counter()
    shards.hash_inputs(files)
    out["sha256_s"] = time.perf_counter() - t1
    return out


def child_worker(args: dict) -> dict:
    from pipelines.build import shards
    from pipelines.build.chunks import Chunk
    from pipelines.sources import SOURCES
    from pipelines.sources.base import BuildOptions

    state = json.loads(Path(args["out"], "driver.json").read_text())
    src = SOURCES[args["source"]]
    files = src.locate(args["root"], "train")
    t0, c0, rss0 = _start()
    part = shards.convert_chunk(
        src, files, "train", BuildOptions(), Chunk(**state["chunk"]), args["out"], "bench", state["shared"]
    )
    out = _usage(t0, c0)
    return {
        **out,
        "rss_after_imports_mb": rss0,
        "samples": part.samples,
        "skips": len(part.skips),
        "samples_per_s": part.samples / out["wall_s"],
        "samples_per_cpu_s": part.samples / out["cpu_s"],
    }


def child_ade_index(args: dict) -> dict:
    from pipelines.build.chunks import spill
    from pipelines.sources import SOURCES
    from pipelines.sources.base import BuildOptions

    src = SOURCES["ade20k_panoptic"]
    files = src.locate(args["root"], "train")
    chunks, skips, shared = spill(
        src.index(files, "train", BuildOptions()), args["out"], args["out"] + "/index", 100_000
    )
    Path(args["out"], "driver.json").write_text(json.dumps({"chunk": chunks[0].__dict__, "shared": shared}))
    return {"records": chunks[0].records}


CHILDREN = {
    "lvis_api": child_lvis_api,
    "driver": child_driver,
    "worker": child_worker,
    "ade_index": child_ade_index,
}


def run_child(role: str, **args) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", role, json.dumps(args)], capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"{role} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="5k images / 63.5k annotations / 40 ADE images")
    p.add_argument("--images", type=int)
    p.add_argument("--anns", type=int)
    p.add_argument("--cats", type=int, default=1203)
    p.add_argument(
        "--ade", type=int, help="ADE20K images converted by one worker (default 300; 40 with --small)"
    )
    p.add_argument("--workdir", help="scratch folder (default: a temp dir, removed afterwards)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child[0]](json.loads(a.child[1]))))
        return
    n_images = a.images or (5_000 if a.small else 100_000)
    n_anns = a.anns or int(n_images * 12.7)
    n_ade = a.ade or (40 if a.small else 300)
    scratch = Path(tempfile.mkdtemp(prefix="xsam-bench-lvis-", dir=a.workdir))
    try:
        t = time.perf_counter()
        path = write_lvis(scratch / "datas", n_images, n_anns, a.cats)
        mb = path.stat().st_size / 1e6
        print(
            f"synthetic LVIS v1 file: {n_images:,} images, {n_anns:,} annotations, {a.cats} categories, "
            f"{mb:.0f} MB ({time.perf_counter() - t:.0f} s to write)",
            flush=True,
        )
        base = run_child("lvis_api", path=str(path))
        drv = run_child("driver", root=str(scratch / "datas"), out=str(scratch / "out"))
        wrk = run_child("worker", root=str(scratch / "datas"), out=str(scratch / "out"), source="lvis")
        print(f"\n{'':34}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}")
        print(
            f"{'lvis.LVIS() load':34}{base['wall_s']:>9.1f}{base['cpu_s']:>9.1f}{base['peak_rss_mb']:>13.0f}"
            f"   ({base['annotations']:,} annotations; {base['rss_after_imports_mb']:.0f} MB after imports)"
        )
        print(
            f"{'driver: lvis index + chunk spill':34}{drv['wall_s']:>9.1f}{drv['cpu_s']:>9.1f}{drv['peak_rss_mb']:>13.0f}"
            f"   ({drv['records']:,} records, {drv['chunks']} chunks; {drv['rss_after_imports_mb']:.0f} MB after imports)"
        )
        print(f"{'driver: sha256 of the input':34}{drv['sha256_s']:>9.1f}")
        print(
            f"{'worker: convert 1 chunk':34}{wrk['wall_s']:>9.1f}{wrk['cpu_s']:>9.1f}{wrk['peak_rss_mb']:>13.0f}"
            f"   ({wrk['samples']} samples, {wrk['samples_per_s']:.0f} samples/s; "
            f"{wrk['rss_after_imports_mb']:.0f} MB after imports)"
        )
        print(
            f"\nratios vs lvis.LVIS(): driver peak RSS {drv['peak_rss_mb'] / base['peak_rss_mb']:.3f}x (target <= 0.1), "
            f"worker peak RSS {wrk['peak_rss_mb'] / base['peak_rss_mb']:.3f}x; indexing wall "
            f"{drv['wall_s'] / base['wall_s']:.2f}x, cpu {drv['cpu_s'] / base['cpu_s']:.2f}x (target <= 0.6)"
        )
        shutil.rmtree(scratch / "out")
        shutil.rmtree(scratch / "datas")

        write_ade(scratch / "ade", n_ade)
        run_child("ade_index", root=str(scratch / "ade"), out=str(scratch / "ade_out"))
        ade = run_child(
            "worker", root=str(scratch / "ade"), out=str(scratch / "ade_out"), source="ade20k_panoptic"
        )
        print(
            f"\nade20k_panoptic, one worker, {ade['samples']} samples of 683x512 (raw JPEG + label PNG + instance PNG): "
            f"{ade['samples_per_s']:.0f} samples/s wall, {ade['samples_per_cpu_s']:.0f} samples per CPU-second "
            f"(target >= 60), peak RSS {ade['peak_rss_mb']:.0f} MB"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
