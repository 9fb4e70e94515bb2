"""Each metric against hand-computed values and against an independent computation on random cases."""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from orchestrate.evaluation.metrics import (
    ApTruth,
    ExactSum,
    GcgGrounding,
    MaskAP,
    PanopticQuality,
    PanopticTruth,
    ReferIoU,
    SemanticIoU,
    greedy_miou,
    greedy_recall_hits,
    paint,
)
from orchestrate.evaluation.predictions import rle_problem


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


def rows(h: int, w: int, *spans: tuple[int, int, int, int]) -> np.ndarray:
    """A mask of ``h x w`` with the rectangles ``(r0, r1, c0, c1)`` set."""
    m = np.zeros((h, w), bool)
    for r0, r1, c0, c1 in spans:
        m[r0:r1, c0:c1] = True
    return m


# ------------------------------------------------------------------------------------------ PQ / mIoU
def _panoptic(pq: PanopticQuality, miou: SemanticIoU, truth: PanopticTruth, pred: list[tuple[dict, int]]):
    n = truth.hw[0] * truth.hw[1]
    gt_map, _ = paint([r for r, _ in truth.segments] + list(truth.crowd.values()), n)
    pred_map, overlap = paint([r for r, _ in pred], n)
    assert not overlap
    pq.add(truth, pred, gt_map, pred_map)
    lookup = np.concatenate(
        [miou.class_map([c for _, c in truth.segments]), np.zeros(len(truth.crowd), np.int32)]
    )
    miou.add(lookup[gt_map], miou.class_map([c for _, c in pred])[pred_map])


def _hand_images():
    """Two 10x10 images (see test_pq_hand_computed for the arithmetic)."""
    h = w = 10
    a_truth = PanopticTruth(
        segments=[(rle(rows(h, w, (0, 4, 0, 10))), 1), (rle(rows(h, w, (4, 8, 0, 10))), 2)],
        crowd={1: rle(rows(h, w, (8, 9, 0, 10)))},  # row 9 is VOID
        hw=(h, w),
    )
    a_pred = [
        (rle(rows(h, w, (0, 3, 0, 10), (9, 10, 0, 10))), 1),  # 30 on seg 1 + 10 VOID: IoU 30/40
        (rle(rows(h, w, (4, 6, 0, 10), (6, 7, 0, 1))), 2),  # 21 on seg 2: IoU 21/40 = 0.525, just above
        (rle(rows(h, w, (8, 9, 0, 10), (3, 4, 0, 5))), 1),  # 10 of 15 on cat-1 crowd: not a FP
        (rle(rows(h, w, (6, 7, 1, 10), (7, 8, 0, 10))), 2),  # 19 on seg 2, unmatched: a FP
    ]
    b_truth = PanopticTruth(
        segments=[(rle(rows(h, w, (0, 4, 0, 10))), 1), (rle(rows(h, w, (4, 5, 0, 10))), 2)],
        crowd={},
        hw=(h, w),  # rows 5-9 VOID
    )
    b_pred = [
        (rle(rows(h, w, (0, 2, 0, 10))), 1),  # IoU 20/40 = 0.5 exactly: no match (FN + FP)
        (rle(rows(h, w, (4, 6, 0, 10))), 2),  # 10 on seg 2 + 10 VOID: union 20 - 10 VOID -> IoU 1
        (rle(rows(h, w, (6, 10, 0, 10))), 2),  # all VOID: not a FP
    ]
    return [(a_truth, a_pred), (b_truth, b_pred)]


def test_pq_and_miou_hand_computed():
    pq, miou = PanopticQuality({1: True, 2: False, 3: False}), SemanticIoU([1, 2, 3])
    for truth, pred in _hand_images():
        _panoptic(pq, miou, truth, pred)
    per = pq.per_class()
    # cat 1: TP (IoU .75), FP (image b), FN (image b); the crowd is never a FN
    assert (per[1]["TP"], per[1]["FP"], per[1]["FN"]) == (1, 1, 1)
    assert per[1]["PQ"] == pytest.approx(0.75 / (1 + 0.5 + 0.5))
    # cat 2: TP .525 and TP 1.0, one FP
    assert (per[2]["TP"], per[2]["FP"], per[2]["FN"]) == (2, 1, 0)
    assert per[2]["SQ"] == pytest.approx((0.525 + 1.0) / 2) and per[2]["RQ"] == pytest.approx(2 / 2.5)
    assert 3 not in per  # no TP, FP or FN: not averaged
    r = pq.result()
    assert r["PQ"] == pytest.approx(100 * (0.375 + 1.525 / 2.5) / 2)
    assert r["PQ_th"] == pytest.approx(37.5) and r["PQ_st"] == pytest.approx(100 * 1.525 / 2.5)
    # mIoU over pixels with a GT class: cat 1 = 55 / 80 (5 pixels of row 3 predicted as nothing), cat 2 = 1
    assert miou.per_class() == {1: pytest.approx(55 / 80), 2: 1.0}
    assert miou.result()["mIoU"] == pytest.approx(100 * (55 / 80 + 1) / 2)


def _reference_pq(images, isthing: dict[int, bool]) -> dict[str, float]:
    """panopticapi's pq_compute written out on dense id maps (an independent computation)."""
    stats = {c: [0.0, 0, 0, 0] for c in isthing}  # iou, tp, fp, fn
    for gt_ids, gt_info, pred_ids, pred_info in images:
        pred_area = {i: int((pred_ids == i).sum()) for i in pred_info}
        gt_area = {i: int((gt_ids == i).sum()) for i in gt_info}
        pairs = {}
        for g, p in zip(gt_ids.ravel().tolist(), pred_ids.ravel().tolist(), strict=True):
            pairs[(g, p)] = pairs.get((g, p), 0) + 1
        gt_hit, pred_hit = set(), set()
        for (g, p), inter in pairs.items():
            if g not in gt_info or p not in pred_info or gt_info[g][1] or gt_info[g][0] != pred_info[p]:
                continue
            union = pred_area[p] + gt_area[g] - inter - pairs.get((0, p), 0)
            if inter / union > 0.5:
                stats[gt_info[g][0]][0] += inter / union
                stats[gt_info[g][0]][1] += 1
                gt_hit.add(g)
                pred_hit.add(p)
        crowd = {}
        for g, (c, iscrowd) in gt_info.items():
            if g in gt_hit:
                continue
            if iscrowd:
                crowd[c] = g
            else:
                stats[c][3] += 1
        for p, c in pred_info.items():
            if p in pred_hit or not pred_area[p]:
                continue
            ign = pairs.get((0, p), 0) + (pairs.get((crowd[c], p), 0) if c in crowd else 0)
            if ign / pred_area[p] <= 0.5:
                stats[c][2] += 1
    out = {}
    for suffix, keep in (("", None), ("_th", True), ("_st", False)):
        vals = [
            (
                s[0] / (s[1] + s[2] / 2 + s[3] / 2),
                s[0] / s[1] if s[1] else 0.0,
                s[1] / (s[1] + s[2] / 2 + s[3] / 2),
            )
            for c, s in stats.items()
            if s[1] + s[2] + s[3] and (keep is None or isthing[c] == keep)
        ]
        for j, m in enumerate(("PQ", "SQ", "RQ")):
            out[m + suffix] = 100 * sum(v[j] for v in vals) / len(vals) if vals else float("nan")
    return out


def _random_panoptic(rng: np.random.Generator, cats: list[int]):
    """A random GT id map (blobs, one crowd per category at most, VOID) and a prediction perturbing it."""
    h, w = rng.integers(8, 24, 2)
    gt_ids = np.zeros((h, w), np.int64)
    info: dict[int, tuple[int, int]] = {}
    for i in range(1, rng.integers(2, 8)):
        r0, c0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        gt_ids[r0 : r0 + rng.integers(2, h), c0 : c0 + rng.integers(2, w)] = i
    crowded = set()
    for i in np.unique(gt_ids)[1:].tolist():
        c = int(rng.choice(cats))
        crowd = c not in crowded and rng.random() < 0.25
        crowded |= {c} if crowd else set()
        info[i] = (c, int(crowd))
    pred_ids = gt_ids.copy()
    shift = rng.integers(-2, 3, 2)
    pred_ids = np.roll(pred_ids, tuple(shift), axis=(0, 1))
    pred_ids[rng.random((h, w)) < 0.1] = 0
    pred_info = {
        i: (info[i][0] if rng.random() < 0.8 else int(rng.choice(cats)))
        for i in np.unique(pred_ids)[1:].tolist()
    }
    return gt_ids, info, pred_ids, pred_info


def test_pq_and_miou_equal_independent_computation_on_random_images():
    rng = np.random.default_rng(0)
    isthing = {1: True, 2: True, 3: False, 4: False}
    pq, miou = PanopticQuality(isthing), SemanticIoU(sorted(isthing))
    images = [_random_panoptic(rng, list(isthing)) for _ in range(60)]
    conf = {c: [0, 0, 0] for c in isthing}  # inter, gt, pred over pixels with a GT class
    for gt_ids, info, pred_ids, pred_info in images:
        segs = [(rle(gt_ids == i), c) for i, (c, crowd) in info.items() if not crowd]
        crowd = {}
        for i, (c, cr) in info.items():
            if cr:
                crowd[c] = rle(gt_ids == i)
        pred = [(rle(pred_ids == i), c) for i, c in pred_info.items()]
        _panoptic(pq, miou, PanopticTruth(segs, crowd, gt_ids.shape), pred)
        gt_cls = np.zeros_like(gt_ids)
        for i, (c, cr) in info.items():
            gt_cls[gt_ids == i] = 0 if cr else c
        pred_cls = np.zeros_like(pred_ids)
        for i, c in pred_info.items():
            pred_cls[pred_ids == i] = c
        valid = gt_cls > 0
        for c in isthing:
            conf[c][0] += int(((gt_cls == c) & (pred_cls == c) & valid).sum())
            conf[c][1] += int((gt_cls == c).sum())
            conf[c][2] += int(((pred_cls == c) & valid).sum())
    ref = _reference_pq(images, isthing)
    got = pq.result()
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    ious = [i / (g + p - i) for i, g, p in conf.values() if g]
    assert miou.result()["mIoU"] == pytest.approx(100 * sum(ious) / len(ious), rel=1e-12)


def test_pq_of_ground_truth_against_itself_is_100():
    rng = np.random.default_rng(1)
    isthing = {1: True, 2: False}
    pq = PanopticQuality(isthing)
    miou = SemanticIoU([1, 2])
    for _ in range(10):
        gt_ids, info, _, _ = _random_panoptic(rng, [1, 2])
        segs = [(rle(gt_ids == i), c) for i, (c, cr) in info.items() if not cr]
        crowd = {c: rle(gt_ids == i) for i, (c, cr) in info.items() if cr}
        _panoptic(pq, miou, PanopticTruth(segs, crowd, gt_ids.shape), list(segs))
    assert pq.result()["PQ"] == 100.0 and miou.result()["mIoU"] == 100.0


def test_paint_reports_overlap():
    a, b = rle(rows(4, 4, (0, 2, 0, 4))), rle(rows(4, 4, (1, 3, 0, 4)))
    assert paint([a, b], 16)[1] and not paint([a], 16)[1]
    ids, _ = paint([a, rle(rows(4, 4, (3, 4, 0, 4)))], 16)
    assert ids.reshape(4, 4, order="F").tolist() == [[1] * 4, [1] * 4, [0] * 4, [2] * 4]


# ------------------------------------------------------------------------------------------ mask AP
def _random_instances(rng: random.Random, n_images: int, cats: list[int]):
    images, gts, dts = [], [], []
    for img in range(1, n_images + 1):
        h, w = rng.randint(12, 30), rng.randint(12, 30)
        images.append({"id": img, "height": h, "width": w})
        for _ in range(rng.randint(0, 5)):
            r0, c0 = rng.randint(0, h - 3), rng.randint(0, w - 3)
            box = (r0, rng.randint(r0 + 2, h), c0, rng.randint(c0 + 2, w))
            crowd = int(rng.random() < 0.15)
            m = rows(h, w, box)
            gts.append(
                {
                    "image_id": img,
                    "category_id": rng.choice(cats),
                    "segmentation": rle(m),
                    "iscrowd": crowd,
                    "area": float(m.sum()) * rng.uniform(0.8, 1.2),
                }
            )  # an annotation's own area
            for _ in range(rng.randint(0, 3)):
                jitter = rows(
                    h,
                    w,
                    (
                        max(0, box[0] + rng.randint(-2, 2)),
                        box[1],
                        box[2],
                        min(w, box[3] + rng.randint(-2, 2)),
                    ),
                )
                cat = gts[-1]["category_id"] if rng.random() < 0.8 else rng.choice(cats)
                dts.append(
                    {
                        "image_id": img,
                        "category_id": cat,
                        "segmentation": rle(jitter),
                        "score": round(rng.random(), 1),
                    }
                )  # rounded: ties across images
        for _ in range(rng.randint(0, 2)):
            dts.append(
                {
                    "image_id": img,
                    "category_id": rng.choice(cats),
                    "segmentation": rle(rows(h, w, (0, 3, 0, 3))),
                    "score": rng.random(),
                }
            )
    return images, gts, dts


def _cocoeval_stats(images, gts, dts, cats) -> np.ndarray:
    ds = {
        "images": images,
        "categories": [{"id": c} for c in cats],
        "annotations": [
            dict(g, id=i, bbox=list(mask_utils.toBbox(g["segmentation"]))) for i, g in enumerate(gts, start=1)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ds
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dts]), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_ap_equals_pycocotools_cocoeval(seed):
    rng = random.Random(seed)
    cats = [1, 3, 7]
    images, gts, dts = _random_instances(rng, 25, cats)
    ref = _cocoeval_stats(images, gts, dts, cats)
    ap = MaskAP(cats)
    halves = (MaskAP(cats), MaskAP(cats))  # two "shards" merged must give the same
    for img in images:
        t = [
            ApTruth(g["segmentation"], g["category_id"], g["iscrowd"], g["area"])
            for g in gts
            if g["image_id"] == img["id"]
        ]
        d = [(x["segmentation"], x["category_id"], x["score"]) for x in dts if x["image_id"] == img["id"]]
        ap.add(img["id"], t, d)
        halves[img["id"] % 2].add(img["id"], t, d)
    halves[1].merge(halves[0])
    expected = {
        n: (100 * v if v > -1 else None)
        for n, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ref, strict=True)
    }
    for got in (ap.result(), halves[1].result()):
        assert {k: (None if math.isnan(v) else v) for k, v in got.items()} == expected


def test_mask_ap_of_ground_truth_against_itself_is_100():
    rng = random.Random(5)
    images, gts, _ = _random_instances(rng, 10, [1, 2])
    ap = MaskAP([1, 2])
    for img in images:
        t = [
            ApTruth(g["segmentation"], g["category_id"], g["iscrowd"], g["area"])
            for g in gts
            if g["image_id"] == img["id"]
        ]
        ap.add(img["id"], t, [(x.rle, x.category_id, 1.0) for x in t if not x.iscrowd])
    assert ap.result()["AP"] == 100.0 and ap.result()["AP50"] == 100.0


# ------------------------------------------------------------------------------------------ cIoU / gIoU
def test_refer_iou_empty_targets_and_predictions():
    h = w = 10
    gt = rle(rows(h, w, (0, 4, 0, 10)))  # 40 px
    pred = rle(rows(h, w, (2, 6, 0, 10)))  # 40 px, 20 shared
    iou = ReferIoU()
    iou.add(["all", "targeted"], pred, gt, None)  # I 20, U 60
    iou.add(["all", "targeted"], None, gt, None)  # empty prediction on a target: I 0, U 40 (T-acc miss)
    iou.add(["all"], None, None, None)  # no target, nothing predicted: IoU 1, nothing added to I, U
    iou.add(["all"], pred, None, None)  # no target, a mask predicted: IoU 0, U += 40
    a, t = iou.groups["all"], iou.groups["targeted"]
    assert (a.inter, a.union, a.count) == (20, 140, 4)
    assert a.ciou() == pytest.approx(100 * 20 / 140)
    assert a.giou() == pytest.approx(100 * (20 / 60 + 0 + 1 + 0) / 4)
    assert (a.nt_tp, a.nt_fn, a.t_tn, a.t_fp) == (1, 1, 1, 1)
    assert t.ciou() == pytest.approx(100 * 20 / 100) and t.giou() == pytest.approx(100 * (20 / 60) / 2)


def test_refer_iou_ignore_region_counts_in_neither():
    h = w = 10
    gt, pred = rle(rows(h, w, (0, 4, 0, 10))), rle(rows(h, w, (2, 6, 0, 10)))
    ignore = rle(rows(h, w, (3, 5, 0, 10)))  # 10 px of the intersection, 10 of the prediction only
    iou = ReferIoU()
    iou.add(["all"], pred, gt, ignore)
    s = iou.groups["all"]
    assert (s.inter, s.union) == (10, 40)


# ------------------------------------------------------------------------------------------ GCG
def test_greedy_gcg_pairing_by_hand():
    ious = np.array([[0.9, 0.2, 0.0], [0.8, 0.6, 0.0]])  # pred x gt
    assert greedy_miou(ious) == pytest.approx((0.9 + 0.6) / 2)  # the third GT is not penalised
    assert greedy_miou(np.zeros((2, 2))) == 0.0
    g = ious.T  # gt x pred
    sims = np.ones_like(g)
    assert greedy_recall_hits(g, sims) == 2
    sims[1, 1] = 0.4  # the second pair fails on text: the search ends there
    assert greedy_recall_hits(g, sims) == 1
    g2 = g.copy()
    g2[1, 1] = 0.5  # IoU 0.5 counts (>=)
    assert greedy_recall_hits(g2, np.ones_like(g2)) == 2


def test_gcg_grounding_perfect_and_empty():
    h = w = 8
    masks = [rle(rows(h, w, (0, 4, 0, 8))), rle(rows(h, w, (4, 8, 0, 4)))]
    g = GcgGrounding()
    g.add("a", masks, masks, np.eye(2))
    g.add("b", masks, [], np.zeros((2, 0)))  # no prediction: mIoU 0 for the image, AP misses
    r = g.result(with_recall=True)
    assert r["mIoU"] == 50.0 and r["recall"] == 50.0
    assert 0 < r["AP50"] < 100


# ------------------------------------------------------------------------------------------ helpers
def test_exact_sum_does_not_depend_on_order():
    rng = random.Random(3)
    xs = [rng.uniform(0, 1) * 10 ** rng.randint(-8, 8) for _ in range(2000)]
    a, b, c = ExactSum(), ExactSum(), ExactSum()
    for x in xs:
        a.add(x)
    for x in reversed(xs[:1000]):
        b.add(x)
    for x in xs[1000:]:
        c.add(x)
    b.merge(c)
    assert a.value() == b.value() == math.fsum(xs)


def test_rle_problem_accepts_every_pycocotools_rle_and_rejects_bad_ones():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        r = rle(m)
        assert rle_problem(r["counts"], h * w) is None
        assert rle_problem(r["counts"], h * w + 1) is not None
    assert "truncated" in rle_problem("0j", 4)  # 'j' carries the continuation bit
    assert rle_problem("0 1", 4) is not None and rle_problem(b"01", 4) is not None


def test_mask_ap_equals_pycocotools_past_max_dets_and_after_pickling():
    """faster-coco-eval's C++ path (the per-image entries cross Ray as pickles) keeps COCOeval's numbers on
    images with more than maxDets (100) detections, many tied scores and crowd regions."""
    rng = random.Random(11)
    cats = [1, 2]
    images, gts, dts = _random_instances(rng, 8, cats)
    for img in images[:2]:  # 130 small detections on each of two images: COCOeval keeps the 100 best
        h, w = img["height"], img["width"]
        for k in range(130):
            r0, c0 = rng.randint(0, h - 3), rng.randint(0, w - 3)
            dts.append(
                {
                    "image_id": img["id"],
                    "category_id": cats[k % 2],
                    "segmentation": rle(rows(h, w, (r0, r0 + 3, c0, c0 + 3))),
                    "score": round(rng.random(), 2),
                }
            )
    ref = _cocoeval_stats(images, gts, dts, cats)
    shards = [MaskAP(cats), MaskAP(cats)]
    for img in images:
        t = [
            ApTruth(g["segmentation"], g["category_id"], g["iscrowd"], g["area"])
            for g in gts
            if g["image_id"] == img["id"]
        ]
        d = [(x["segmentation"], x["category_id"], x["score"]) for x in dts if x["image_id"] == img["id"]]
        shards[img["id"] % 2].add(img["id"], t, d)
    merged = pickle.loads(pickle.dumps(shards[0]))
    merged.merge(pickle.loads(pickle.dumps(shards[1])))
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    expected = {n: (100 * v if v > -1 else None) for n, v in zip(names, ref, strict=True)}
    # to the last bits only: pycocotools' precision is tp / (tp + fp + 2.2e-16), the C++ one tp / (tp + fp)
    got = {k: (None if math.isnan(v) else v) for k, v in merged.result().items()}
    assert got == {k: (v if v is None else pytest.approx(v, rel=1e-12)) for k, v in expected.items()}
    assert 0 < expected["AP"] < 100
