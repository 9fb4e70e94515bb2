"""Scoring benchmark. Prints figures and ratios against baselines measured in the same run; asserts
nothing.

    python bench/evaluate.py                 # 5,000 images 640x480, ~20 segments each (COCO val scale)
    python bench/evaluate.py --images 500    # a quick check
    python bench/evaluate.py --images 500 --ap-only   # mask AP only: ours vs pycocotools vs faster-coco-eval

A synthetic panoptic val set is written as real shards (``ade20k_panoptic/val``: no original files needed)
plus a ``predictions.jsonl`` that perturbs the ground truth (shifted masks, swapped categories, dropped
segments). Every measurement runs in its own subprocess (peak RSS = that process's VmHWM):

1. PQ + mIoU: ``score_predictions`` inline (streaming: one shard sample and one prediction line at a time)
   against a straightforward per-image reference loop written here (predictions loaded whole as X-SAM's
   evaluators gather them, dense masks decoded per image, panopticapi-style ``np.unique`` over GT x prediction
   ids, a dense confusion matrix for mIoU); both must print the same PQ and mIoU.
2. Mask AP on the things of the same set (scores drawn per prediction): pycocotools' ``COCOeval`` and
   faster-coco-eval's ``COCOeval_faster`` standalone (load + evaluate + accumulate + summarize), and ours
   (streaming, one image at a time through faster-coco-eval's C++ ``evaluateImg``/``accumulate``); every AP
   value is printed with its largest difference from pycocotools'. ``--ap-only`` runs this part alone.
3. ``score_predictions`` with 2 Ray workers (one task per shard) against inline.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SET, H, W, SEGMENTS, PER_SHARD = "ade20k_panoptic/val", 480, 640, 20, 250
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
JPEG = b"\xff\xd8\xff\xd9"  # a sample's image bytes: scoring never decodes them
ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "RAY_AUTH_MODE": "disabled",
    "PYTHONWARNINGS": "ignore",
    "MALLOC_ARENA_MAX": "2",
}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


# ------------------------------------------------------------------------------------------ data
def _label_maps(i: int, cats: np.ndarray) -> tuple[np.ndarray, dict, np.ndarray, dict]:
    """GT and prediction id maps of image ``i`` (seeded by ``i``): ~20 painted rectangles, a VOID band."""
    rng = np.random.default_rng(i)
    gt = np.zeros((H, W), np.int32)
    for s in range(1, SEGMENTS + 1):
        y, x = rng.integers(0, H - 40), rng.integers(0, W - 40)
        gt[y : y + rng.integers(40, H // 2), x : x + rng.integers(40, W // 2)] = s
    y = rng.integers(0, H - 20)
    gt[y : y + 10] = 0  # VOID
    ids = np.unique(gt)[1:]
    gt_cat = {int(s): int(rng.choice(cats)) for s in ids}
    pred = np.roll(gt, tuple(rng.integers(-8, 9, 2)), axis=(0, 1))
    pred_cat = {}
    for s in ids.tolist():
        r = rng.random()
        if r < 0.1:
            pred[pred == s] = 0
        else:
            pred_cat[s] = gt_cat[s] if r > 0.3 else int(rng.choice(cats))
    return gt, gt_cat, pred, pred_cat


def write_set(work: Path, n: int) -> None:
    """Shards + manifest of ``ade20k_panoptic/val`` and ``predictions.jsonl`` (scores for AP included)."""
    from pipelines.masks import label_map_rles
    from pipelines.schema import ImageRef, MaskTarget, Sample, Turn
    from pipelines.shard_store import sample_digest
    from pipelines.sources.ade20k import NUM_CLASSES

    cats = np.arange(NUM_CLASSES)
    folder = work / "shards" / SET
    folder.mkdir(parents=True, exist_ok=True)
    shards, tar, preds, digests = [], None, open(work / "predictions.jsonl", "w"), []
    for i in range(n):
        if i % PER_SHARD == 0:
            if tar:
                tar.close()
                _seal(folder, shards[-1], digests)
                digests = []
            shards.append(
                {
                    "file": f"{SET.replace('/', '-')}-{len(shards):06d}.tar",
                    "samples": min(PER_SHARD, n - i),
                    "bytes": 0,
                }
            )
            tar = tarfile.open(folder / shards[-1]["file"], "w")
        gt, gt_cat, pred, pred_cat = _label_maps(i, cats)
        g, p = label_map_rles(gt), label_map_rles(pred)
        key = f"{SET}/{i:08d}"
        masks = [MaskTarget(rle=g[s], label=0, category_id=c) for s, c in gt_cat.items()]
        sample = Sample(
            key=key,
            source="ade20k_panoptic",
            task="ovseg",
            split="val",
            image=ImageRef("x.jpg", W, H),
            conversation=[Turn("user", "<image>\n<p>x</p>"), Turn("assistant", "<SEG>")],
            phrases=["x"],
            masks=masks,
        )
        digests.append(sample_digest(sample.to_json(), JPEG))
        for ext, data in (("json", sample.to_json()), ("jpg", JPEG)):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        rng = np.random.default_rng(10**6 + i)
        line = {
            "key": key,
            "panoptic": [{"rle": p[s], "category_id": c} for s, c in pred_cat.items()],
            "instances": [
                {"rle": p[s], "category_id": c, "score": round(float(rng.random()), 3)}
                for s, c in pred_cat.items()
            ],
        }
        preds.write(json.dumps(line) + "\n")
    tar.close()
    _seal(folder, shards[-1], digests)
    preds.close()
    manifest = {
        "schema": 1,
        "source": "ade20k_panoptic",
        "task": "ovseg",
        "split": "val",
        "shards": shards,
        "counts": {"samples": n},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _seal(folder: Path, entry: dict, digests: list[str]) -> None:
    """The shard's size, sha256 and member index (``<tar>.idx.json``), as the build records them: evaluation
    verifies every sample it reads against them."""
    import hashlib

    import fsspec

    from pipelines.shard_store import INDEX_SUFFIX, index_shard, member_index

    path = folder / entry["file"]
    data = path.read_bytes()
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    idx = index_shard(fsspec.filesystem("file"), str(path), entry["samples"])
    raw = member_index(idx, entry["file"], entry["bytes"], entry["sha256"], digests)
    Path(str(path) + INDEX_SUFFIX).write_bytes(raw)
    entry["index_sha256"] = hashlib.sha256(raw).hexdigest()


# ------------------------------------------------------------------------------------------ children
def child_ours(work: Path, workers: int) -> dict:
    from orchestrate.evaluation.run import score_predictions

    if workers > 1:
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    r = score_predictions(
        str(work / "predictions.jsonl"), str(work / "shards"), "", sets=[SET], num_workers=workers
    )[SET]
    return {"s": time.perf_counter() - t, "PQ": r["PQ"], "mIoU": r["mIoU"]}


def child_reference(work: Path) -> dict:
    """Per image: dense masks, id maps, ``np.unique`` of GT x prediction ids (panopticapi), dense
    confusion."""
    from pycocotools import mask as mu

    from orchestrate.evaluation import ground_truth as gt
    from pipelines.sources.ade20k import category_table

    t = time.perf_counter()
    preds = {
        x["key"]: x for x in map(json.loads, open(work / "predictions.jsonl"))
    }  # gathered, as X-SAM does
    isthing = {int(c): bool(v) for c, v in category_table(tuple(range(150)))["isthing"].items()}
    stat = {c: [0.0, 0, 0, 0] for c in isthing}
    conf = np.zeros((150, 151), np.int64)
    evs = gt.open_set(str(work / "shards"), "", SET)
    for shard in evs.shards:
        for s in gt.iter_shard_samples(evs, shard):
            g_ids, g_cat = _dense([m.rle for m in s.masks], [m.category_id for m in s.masks], mu)
            p = preds[s.key]["panoptic"]
            p_ids, p_cat = _dense([x["rle"] for x in p], [x["category_id"] for x in p], mu)
            _reference_image(g_ids, g_cat, p_ids, p_cat, stat)
            valid = g_ids > 0
            gc, pc = np.asarray([0, *g_cat])[g_ids], np.asarray([-1, *p_cat])[p_ids] + 1
            conf += np.bincount(gc[valid] * 151 + pc[valid], minlength=150 * 151).reshape(150, 151)
    pq = [s[0] / (s[1] + s[2] / 2 + s[3] / 2) for s in stat.values() if s[1] + s[2] + s[3]]
    inter, gsum, psum = np.diag(conf[:, 1:]), conf.sum(1), conf[:, 1:].sum(0)
    ious = [inter[c] / (gsum[c] + psum[c] - inter[c]) for c in range(150) if gsum[c]]
    return {"s": time.perf_counter() - t, "PQ": 100 * sum(pq) / len(pq), "mIoU": 100 * sum(ious) / len(ious)}


def _dense(rles: list, cats: list, mu) -> tuple[np.ndarray, list]:
    ids = np.zeros((H, W), np.int64)
    if rles:
        stack = mu.decode(rles)  # H x W x N
        for j in range(stack.shape[2]):
            ids[stack[:, :, j] > 0] = j + 1
    return ids, list(cats)


def _reference_image(g_ids, g_cat, p_ids, p_cat, stat) -> None:
    labels, counts = np.unique(g_ids * 1000 + p_ids, return_counts=True)
    pairs = dict(zip(labels.tolist(), counts.tolist(), strict=True))
    g_area = np.bincount(g_ids.ravel(), minlength=len(g_cat) + 1)
    p_area = np.bincount(p_ids.ravel(), minlength=len(p_cat) + 1)
    gm, pm = set(), set()
    for lab, inter in pairs.items():
        g, p = divmod(lab, 1000)
        if g and p and g_cat[g - 1] == p_cat[p - 1]:
            iou = inter / (p_area[p] + g_area[g] - inter - pairs.get(p, 0))
            if iou > 0.5:
                stat[g_cat[g - 1]][0] += iou
                stat[g_cat[g - 1]][1] += 1
                gm.add(g)
                pm.add(p)
    for g in range(1, len(g_cat) + 1):
        if g not in gm and g_area[g]:
            stat[g_cat[g - 1]][3] += 1
    for p in range(1, len(p_cat) + 1):
        if p not in pm and p_area[p] and pairs.get(p, 0) / p_area[p] <= 0.5:
            stat[p_cat[p - 1]][2] += 1


def _ap_inputs(work: Path) -> tuple[dict, list]:
    from orchestrate.evaluation import ground_truth as gt

    evs = gt.open_set(str(work / "shards"), "", SET)
    things = {c for c, t in evs.categories.items() if t}
    images, anns, dets = [], [], []
    preds = {x["key"]: x for x in map(json.loads, open(work / "predictions.jsonl"))}
    for shard in evs.shards:
        for s in gt.iter_shard_samples(evs, shard):
            iid = len(images) + 1
            images.append({"id": iid, "height": H, "width": W})
            for m in s.masks:
                if m.category_id in things:
                    anns.append(
                        {
                            "id": len(anns) + 1,
                            "image_id": iid,
                            "category_id": m.category_id,
                            "segmentation": m.rle,
                            "area": 0.0,
                            "iscrowd": 0,
                            "bbox": [0, 0, 1, 1],
                        }
                    )
            dets += [
                {
                    "image_id": iid,
                    "category_id": d["category_id"],
                    "segmentation": d["rle"],
                    "score": d["score"],
                }
                for d in preds[s.key]["instances"]
                if d["category_id"] in things
            ]
    from pycocotools import mask as mu

    for a in anns:
        a["area"] = float(mu.area(a["segmentation"]))
    return {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(things)]}, dets


def child_ap(work: Path, impl: str) -> dict:
    gt_json, dets = _ap_inputs(work)
    if impl == "ours":
        from orchestrate.evaluation.metrics import ApTruth, MaskAP

        t = time.perf_counter()
        ap = MaskAP([c["id"] for c in gt_json["categories"]])
        by_img: dict[int, list] = {}
        for d in dets:
            by_img.setdefault(d["image_id"], []).append((d["segmentation"], d["category_id"], d["score"]))
        gts: dict[int, list] = {}
        for a in gt_json["annotations"]:
            gts.setdefault(a["image_id"], []).append(
                ApTruth(a["segmentation"], a["category_id"], 0, a["area"])
            )
        for img in gt_json["images"]:
            ap.add(img["id"], gts.get(img["id"], []), by_img.get(img["id"], []))
        r = ap.result()
        return {"s": time.perf_counter() - t, **{n: r[n] for n in AP_NAMES}}
    if impl == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    t = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt_json
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {
        "s": time.perf_counter() - t,
        **{n: 100 * float(v) for n, v in zip(AP_NAMES, ev.stats[:6], strict=True)},
    }


def run_child(work: Path, mode: str) -> dict:
    env = {**os.environ, **ENV}
    p = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(work)], capture_output=True, text=True, env=env
    )
    if p.returncode:
        sys.exit(f"child {mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--workdir", help="scratch folder (default: a temp dir)")
    p.add_argument("--ap-only", action="store_true", help="only the mask AP comparison (part 2)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        mode, work = a.child[0], Path(a.child[1])
        out = {
            "ours": lambda: child_ours(work, 1),
            "ray2": lambda: child_ours(work, 2),
            "reference": lambda: child_reference(work),
            "ap_ours": lambda: child_ap(work, "ours"),
            "ap_pycocotools": lambda: child_ap(work, "pycocotools"),
            "ap_faster": lambda: child_ap(work, "faster"),
        }[mode]()
        print(json.dumps({**out, "rss_mb": peak_rss_mb()}))
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_eval_"))
    t = time.perf_counter()
    write_set(work, a.images)
    print(
        f"synthetic set: {a.images} images {W}x{H}, ~{SEGMENTS} segments each, written in {time.perf_counter() - t:.0f} s"
    )
    if not a.ap_only:
        print_pq({m: run_child(work, m) for m in ("reference", "ours", "ray2")})
    print_ap({m: run_child(work, m) for m in ("ap_pycocotools", "ap_faster", "ap_ours")})


def print_pq(r: dict) -> None:
    ref, ours = r["reference"], r["ours"]
    print(
        f"PQ + mIoU  reference loop  {ref['s']:7.1f} s  peak RSS {ref['rss_mb']:6.0f} MB  PQ {ref['PQ']:.4f}  mIoU {ref['mIoU']:.4f}"
    )
    print(
        f"PQ + mIoU  ours (inline)   {ours['s']:7.1f} s  peak RSS {ours['rss_mb']:6.0f} MB  PQ {ours['PQ']:.4f}  mIoU {ours['mIoU']:.4f}"
        f"   -> {ref['s'] / ours['s']:.2f}x faster, {ref['rss_mb'] / ours['rss_mb']:.2f}x less memory"
    )
    print(
        f"PQ + mIoU  ours (2 Ray)    {r['ray2']['s']:7.1f} s  -> {ours['s'] / r['ray2']['s']:.2f}x vs inline (same PQ: {r['ray2']['PQ'] == ours['PQ']})"
    )


def print_ap(r: dict) -> None:
    """One line per implementation: time, memory, AP/AP50, the ratios, and the largest difference of its six
    AP values from pycocotools' (0 = identical)."""
    pc, fce = r["ap_pycocotools"], r["ap_faster"]
    labels = {"ap_pycocotools": "pycocotools", "ap_faster": "faster-coco-eval", "ap_ours": "ours (streaming)"}
    for name in ("ap_pycocotools", "ap_faster", "ap_ours"):
        x = r[name]
        diff = max(abs(x[n] - pc[n]) for n in AP_NAMES if pc[n] == pc[n])
        print(
            f"mask AP    {labels[name]:<17} {x['s']:7.2f} s  peak RSS {x['rss_mb']:6.0f} MB  AP {x['AP']:.4f}  "
            f"AP50 {x['AP50']:.4f}  -> {pc['s'] / x['s']:.2f}x vs pycocotools, {fce['s'] / x['s']:.2f}x vs "
            f"faster-coco-eval; max |ΔAP| vs pycocotools {diff:.1e}"
        )


if __name__ == "__main__":
    main()
