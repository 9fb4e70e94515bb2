"""Streaming metric accumulators: one image in at a time, partial states merged exactly, then finalised.

Every accumulator has ``merge(other)`` (states of different shards add up) and ``result() -> dict`` (values
in percent, names as the papers print them). Sums of floats go through :class:`ExactSum`, so a result does
not depend on the order images or shards were added: the parallel path equals the inline one bit for bit.

Definitions (``shared/reference/evaluation.md``):

* :class:`PanopticQuality` — panopticapi's PQ/SQ/RQ: a match is the same category with IoU > 0.5, the union
  less the prediction's VOID pixels; crowd ground truth is never matched nor a false negative; an unmatched
  prediction more than half on VOID + same-category crowd is not a false positive; PQ averages over the
  categories with TP+FP+FN > 0; things and stuff apart.
* :class:`SemanticIoU` — over the pixels that have a ground-truth class (VOID and crowd ignored),
  IoU_c = |GT_c ∩ P_c| / |GT_c ∪ P_c| summed over the split; mIoU = mean over classes with GT pixels.
* :class:`MaskAP` — COCOeval (segm): faster-coco-eval's C++ ``evaluateImg`` run one image at a time, its C++
  ``accumulate`` and pycocotools' ``summarize`` on the merged per-image results, so AP is COCOeval's number.
* :class:`ReferIoU` — cIoU = ΣI/ΣU, gIoU = mean I/U with an empty prediction on an empty target scoring 1;
  gRefCOCO's N-acc/T-acc (ReLA, "no target" = an empty predicted mask).
* :class:`GcgGrounding` — GLaMM's GCG mIoU (greedy one-to-one max-IoU pairs, mean IoU of the pairs with
  IoU > 0 per image, 0 for an image without a pair, mean over images) and recall (greedy pairs with
  IoU ≥ 0.5 and text similarity ≥ 0.5, over the ground-truth phrases).

Masks are painted into label maps straight from their RLE runs in RLE (column-major) pixel order: the joint
histograms that PQ and mIoU need do not care about pixel order, so nothing is transposed or decoded to a
dense ``HxWxN`` stack.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import faster_coco_eval.faster_eval_api_cpp as _fce  # faster-coco-eval's C++ evaluateImg/accumulate
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from orchestrate.evaluation.predictions import decode_counts, rle_problem

IOU_MATCH = 0.5  # PQ: a match has IoU strictly above this
GCG_IOU, GCG_TEXT = 0.5, 0.5  # GLaMM recall thresholds (at least)


# ------------------------------------------------------------------------------------------ exact sums
class ExactSum:
    """A float sum kept exact (Shewchuk's non-overlapping partials, as ``math.fsum``), so it can be split
    over shards and merged in any order with the same correctly rounded result."""

    __slots__ = ("partials",)

    def __init__(self) -> None:
        self.partials: list[float] = []

    def add(self, x: float) -> None:
        partials, i = self.partials, 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def merge(self, other: ExactSum) -> None:
        for x in other.partials:
            self.add(x)

    def value(self) -> float:
        return math.fsum(self.partials)


# ------------------------------------------------------------------------------------------ RLE painting
def rle_runs(rle: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the foreground runs of a compressed RLE, in column-major pixel order."""
    bounds = np.cumsum(decode_counts(rle["counts"]))
    return bounds[0:-1:2], bounds[1::2]


def paint(rles: Sequence[dict], num_pixels: int) -> tuple[np.ndarray, bool]:
    """Label map ``(num_pixels,)`` int32 in RLE pixel order: pixel = 1 + index of the RLE covering it, 0 =
    none; and whether any two RLEs overlap (then the map is all 0). Built from the runs: sorted run starts,
    one ``np.repeat`` over runs and the gaps between them."""
    if not rles:
        return np.zeros(num_pixels, np.int32), False
    runs = [rle_runs(r) for r in rles]
    s = np.concatenate([a for a, _ in runs])
    e = np.concatenate([b for _, b in runs])
    v = np.concatenate([np.full(len(a), i, np.int32) for i, (a, _) in enumerate(runs, start=1)])
    keep = e > s
    order = np.argsort(s[keep], kind="stable")
    s, e, v = s[keep][order], e[keep][order], v[keep][order]
    if (s[1:] < e[:-1]).any():
        return np.zeros(num_pixels, np.int32), True
    values = np.zeros(2 * len(s) + 1, np.int32)
    values[1::2] = v  # gap, run, gap, run, …, gap
    bounds = np.empty(2 * len(s) + 2, np.int64)
    bounds[0], bounds[-1] = 0, num_pixels
    bounds[1:-1:2], bounds[2:-1:2] = s, e
    return np.repeat(values, np.diff(bounds)), False


def check_rle(rle: dict, hw: tuple[int, int]) -> str | None:
    """Why ``rle`` is not a compressed RLE of an ``hw`` image, or ``None``."""
    if list(rle["size"]) != list(hw):
        return f"RLE size {list(rle['size'])} != image size {list(hw)}"
    return rle_problem(rle["counts"], hw[0] * hw[1])  # cheap again: decode_counts is cached


def rle_area(rle: dict) -> int:
    return int(mask_utils.area(rle))


def rle_and_area(a: dict, b: dict) -> int:
    return int(mask_utils.area(mask_utils.merge([a, b], intersect=True)))


def rle_union(rles: Sequence[dict]) -> dict:
    return rles[0] if len(rles) == 1 else mask_utils.merge(list(rles), intersect=False)


# ------------------------------------------------------------------------------------------ PQ
@dataclass
class PanopticTruth:
    """One image's panoptic ground truth: non-crowd segments, crowd regions per category, size.
    Pixels covered by neither are VOID."""

    segments: list[tuple[dict, int]]  # (rle, category_id)
    crowd: dict[int, dict]  # category_id -> RLE of its crowd region(s)
    hw: tuple[int, int]


@dataclass
class PanopticQuality:
    """panopticapi's PQ/SQ/RQ over ``categories`` (id -> isthing), one image per :meth:`add`."""

    categories: dict[int, bool]
    iou: dict[int, ExactSum] = field(default_factory=dict)
    tp: dict[int, int] = field(default_factory=dict)
    fp: dict[int, int] = field(default_factory=dict)
    fn: dict[int, int] = field(default_factory=dict)

    def add(
        self, truth: PanopticTruth, pred: Sequence[tuple[dict, int]], gt_map: np.ndarray, pred_map: np.ndarray
    ) -> None:
        """``gt_map``: 0 = VOID, 1..n = ``truth.segments``, n+1.. = crowd in ``truth.crowd`` order;
        ``pred_map``: 0 = none, 1..k = ``pred`` (both from :func:`paint`)."""
        n, k = len(truth.segments), len(pred)
        crowd_cats = list(truth.crowd)
        inter = np.bincount(
            gt_map.astype(np.int64) * (k + 1) + pred_map, minlength=(n + len(crowd_cats) + 1) * (k + 1)
        )
        inter = inter.reshape(-1, k + 1)
        gt_area, pred_area = inter[1 : n + 1].sum(1), inter.sum(0)[1:]
        void = inter[0, 1:]
        gt_cat = np.asarray([c for _, c in truth.segments], np.int64)
        pred_cat = np.asarray([c for _, c in pred], np.int64)
        i = inter[1 : n + 1, 1:]
        union = pred_area[None, :] + gt_area[:, None] - i - void[None, :]
        iou = np.where((gt_cat[:, None] == pred_cat[None, :]) & (i > 0), i / np.maximum(union, 1), 0.0)
        gt_hit, pred_hit = np.nonzero(iou > IOU_MATCH)  # non-overlapping segments: at most one each
        for g, p in zip(gt_hit.tolist(), pred_hit.tolist(), strict=True):
            self._count(self.tp, int(gt_cat[g]))
            self.iou.setdefault(int(gt_cat[g]), ExactSum()).add(float(iou[g, p]))
        for g in sorted(set(range(n)) - set(gt_hit.tolist())):
            self._count(self.fn, int(gt_cat[g]))
        crowd_row = {c: n + 1 + j for j, c in enumerate(crowd_cats)}
        for p in sorted(set(range(k)) - set(pred_hit.tolist())):
            c = int(pred_cat[p])
            ignored = int(void[p]) + (int(inter[crowd_row[c], p + 1]) if c in crowd_row else 0)
            if pred_area[p] and ignored / pred_area[p] <= 0.5:
                self._count(self.fp, c)

    @staticmethod
    def _count(table: dict[int, int], c: int) -> None:
        table[c] = table.get(c, 0) + 1

    def merge(self, other: PanopticQuality) -> None:
        for mine, theirs in ((self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn)):
            for c, v in theirs.items():
                mine[c] = mine.get(c, 0) + v
        for c, s in other.iou.items():
            self.iou.setdefault(c, ExactSum()).merge(s)

    def per_class(self) -> dict[int, dict[str, float]]:
        """``{category: {PQ, SQ, RQ, TP, FP, FN}}`` (fractions) for categories with TP+FP+FN > 0."""
        out = {}
        for c in self.categories:
            tp, fp, fn = self.tp.get(c, 0), self.fp.get(c, 0), self.fn.get(c, 0)
            if tp + fp + fn == 0:
                continue
            iou = self.iou[c].value() if c in self.iou else 0.0
            sq = iou / tp if tp else 0.0
            rq = tp / (tp + 0.5 * fp + 0.5 * fn)
            out[c] = {"PQ": sq * rq, "SQ": sq, "RQ": rq, "TP": tp, "FP": fp, "FN": fn}
        return out

    def result(self) -> dict[str, float]:
        per = self.per_class()
        out = {}
        for suffix, keep in (("", None), ("_th", True), ("_st", False)):
            rows = [v for c, v in per.items() if keep is None or self.categories[c] == keep]
            for m in ("PQ", "SQ", "RQ"):
                out[m + suffix] = 100 * math.fsum(r[m] for r in rows) / len(rows) if rows else float("nan")
        return out


# ------------------------------------------------------------------------------------------ semantic mIoU
@dataclass
class SemanticIoU:
    """Confusion counts over pixels with a ground-truth class; ``categories`` fixes the class order."""

    categories: Sequence[int]
    conf: np.ndarray | None = None  # (K, K+1): row = GT class, column 0 = no prediction, c+1 = class c

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.categories)}
        if self.conf is None:
            self.conf = np.zeros((len(self.categories), len(self.categories) + 1), np.int64)

    def add(self, gt_cls: np.ndarray, pred_cls: np.ndarray) -> None:
        """Per-pixel class maps in the same pixel order: ``gt_cls`` 0 = ignored, c+1 = class index c;
        ``pred_cls`` 0 = no prediction, c+1 = class index c."""
        keep = gt_cls > 0
        k = len(self.categories)
        idx = (gt_cls[keep].astype(np.int64) - 1) * (k + 1) + pred_cls[keep]
        self.conf = self.conf + np.bincount(idx, minlength=k * (k + 1)).reshape(k, k + 1)

    def class_map(self, cats: Sequence[int]) -> np.ndarray:
        """Lookup ``segment index + 1 -> class index + 1`` (0 stays 0) for segments of categories ``cats``."""
        return np.asarray([0] + [self._index[c] + 1 for c in cats], np.int32)

    def merge(self, other: SemanticIoU) -> None:
        self.conf = self.conf + other.conf  # not in place: an array from Ray's object store is read-only

    def per_class(self) -> dict[int, float]:
        inter = np.diag(self.conf[:, 1:])
        gt = self.conf.sum(1)
        pred = self.conf[:, 1:].sum(0)
        return {
            c: float(inter[i] / (gt[i] + pred[i] - inter[i]))
            for i, c in enumerate(self.categories)
            if gt[i] > 0
        }

    def result(self) -> dict[str, float]:
        ious = list(self.per_class().values())
        return {"mIoU": 100 * math.fsum(ious) / len(ious) if ious else float("nan")}


# ------------------------------------------------------------------------------------------ mask AP
@dataclass
class ApTruth:
    """One ground-truth instance for AP: ``area`` is the annotation's (COCO's polygon area), not the RLE's."""

    rle: dict
    category_id: int
    iscrowd: int = 0
    area: float | None = None


class MaskAP:
    """COCOeval (segm, default parameters) one image at a time, through faster-coco-eval's C++ core.

    ``add(order_key, truths, dets)`` computes that image's IoUs (pycocotools' RLE ``iou``, detections in
    COCOeval's score order, cut at ``maxDets``) and runs faster-coco-eval's ``evaluateImg`` (C++
    ``COCOevalEvaluateImages``) on it, keeping one ``ImageEvaluation`` per category and area range (they
    pickle, so Ray tasks return them). :meth:`evaluate` runs faster-coco-eval's ``accumulate`` (C++) per
    category on the merged entries and :meth:`result` pycocotools' ``summarize``. Images are ordered by
    ``order_key`` (COCOeval's order is its sorted image ids): only the order of detections with equal scores
    depends on it. The numbers equal pycocotools' COCOeval on the whole set (tests/evaluation/test_metrics.py
    checks it).
    """

    def __init__(self, category_ids: Sequence[int] | None):
        """``category_ids``: COCOeval's ``catIds`` (detections of other categories are not evaluated);
        ``None``: every category that occurs."""
        self.fixed = category_ids is not None
        self.category_ids = sorted(set(category_ids or ()))
        self.entries: dict[int, list[tuple[object, list]]] = {}  # category -> [(order key, per-area evals)]
        self._allowed = set(self.category_ids)

    def add(
        self, order_key: object, truths: Sequence[ApTruth], dets: Sequence[tuple[dict, int, float]]
    ) -> None:
        p = _PARAMS
        gts: dict[int, list[tuple[dict, dict]]] = {}
        for j, t in enumerate(truths, start=1):
            area = float(t.area) if t.area is not None else float(rle_area(t.rle))
            ann = {"id": j, "area": area, "iscrowd": int(t.iscrowd), "ignore": int(t.iscrowd)}
            gts.setdefault(t.category_id, []).append((t.rle, ann))
        dts: dict[int, list[tuple[dict, dict]]] = {}
        for j, (rle, cat, score) in enumerate(dets, start=1):
            dts.setdefault(cat, []).append((rle, {"id": j, "area": float(rle_area(rle)), "score": score}))
        cats = sorted(c for c in set(gts) | set(dts) if not self.fixed or c in self._allowed)
        if not cats:
            return
        gt_set, dt_set, ious = _fce.Dataset(), _fce.Dataset(), []
        for c in cats:
            g = gts.get(c, [])
            d = sorted(dts.get(c, []), key=lambda x: -x[1]["score"])[: p.maxDets[-1]]  # stable, as COCOeval
            for _, ann in g:
                gt_set.append(0, c, ann)
            for _, ann in d:
                dt_set.append(0, c, ann)
            crowd = [ann["iscrowd"] for _, ann in g]
            ious.append(mask_utils.iou([r for r, _ in d], [r for r, _ in g], crowd) if g and d else [])
        evals = _fce.COCOevalEvaluateImages(
            p.areaRng, p.maxDets[-1], p.iouThrs, [ious], gt_set, dt_set, [0], cats, True
        )
        a = len(p.areaRng)
        for k, c in enumerate(cats):  # C++ order: category, area range, image
            self.entries.setdefault(c, []).append((order_key, evals[k * a : (k + 1) * a]))

    def merge(self, other: MaskAP) -> None:
        for c, rows in other.entries.items():
            self.entries.setdefault(c, []).extend(rows)

    def evaluate(self) -> COCOeval:
        """A COCOeval whose ``eval`` holds the accumulated precision/recall of every category."""
        p = _PARAMS
        if not self.fixed:
            self.category_ids = sorted(self.entries)
        T, R, A, M = len(p.iouThrs), len(p.recThrs), len(p.areaRng), len(p.maxDets)
        precision = -np.ones((T, R, len(self.category_ids), A, M))
        recall = -np.ones((T, len(self.category_ids), A, M))
        scores = -np.ones((T, R, len(self.category_ids), A, M))
        for k, c in enumerate(self.category_ids):
            rows = sorted(self.entries.get(c, []), key=lambda r: r[0])
            if not rows:
                continue
            one = copy.copy(p)  # the fields C++ accumulate reads, for this category over its images
            one.catIds, one.imgIds, one.useCats = [c], list(range(len(rows))), 1
            acc = _fce.COCOevalAccumulate(one, [e[a] for a in range(A) for _, e in rows])
            precision[:, :, k] = acc["precision"][:, :, 0]
            recall[:, k] = acc["recall"][:, 0]
            scores[:, :, k] = acc["scores"][:, :, 0]
        out = COCOeval(iouType="segm")
        out.params.catIds = self.category_ids
        out.eval = {
            "params": out.params,
            "counts": [T, R, len(self.category_ids), A, M],
            "precision": precision,
            "recall": recall,
            "scores": scores,
        }
        return out

    def result(self) -> dict[str, float]:
        ev = self.evaluate()
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        return {
            n: (100 * float(v) if v > -1 else float("nan")) for n, v in zip(names, ev.stats[:6], strict=True)
        }


_PARAMS = COCOeval(iouType="segm").params
"""COCOeval's default segm parameters (IoU and recall thresholds, area ranges, maxDets), read only."""


# ------------------------------------------------------------------------------------------ cIoU / gIoU
@dataclass
class IouStat:
    """cIoU / gIoU of one group of samples (plus gRefCOCO's no-target counters)."""

    inter: int = 0
    union: int = 0
    count: int = 0
    iou_sum: ExactSum = field(default_factory=ExactSum)
    nt_tp: int = 0  # no-target GT, empty prediction
    nt_fn: int = 0  # no-target GT, a mask predicted
    t_tn: int = 0  # target GT, a mask predicted
    t_fp: int = 0  # target GT, empty prediction

    def add(self, inter: int, union: int, gt_empty: bool, pred_empty: bool) -> None:
        self.inter += inter
        self.union += union
        self.count += 1
        self.iou_sum.add(inter / union if union else 1.0)  # empty on empty scores 1
        if gt_empty:
            self.nt_tp += pred_empty
            self.nt_fn += not pred_empty
        else:
            self.t_tn += not pred_empty
            self.t_fp += pred_empty

    def merge(self, other: IouStat) -> None:
        for name in ("inter", "union", "count", "nt_tp", "nt_fn", "t_tn", "t_fp"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.iou_sum.merge(other.iou_sum)

    def ciou(self) -> float:
        return 100 * self.inter / self.union if self.union else 100.0

    def giou(self) -> float:
        return 100 * self.iou_sum.value() / self.count if self.count else float("nan")


class ReferIoU:
    """cIoU/gIoU per named group (``"all"``, ``"targeted"``, ``"short"``, ``"point"``, …)."""

    def __init__(self) -> None:
        self.groups: dict[str, IouStat] = {}

    def add(self, groups: Sequence[str], pred: dict | None, gt: dict | None, ignore: dict | None) -> None:
        """One turn: ``pred``/``gt`` RLEs (``None`` = empty); ``ignore`` pixels count in neither I nor U."""
        inter = rle_and_area(pred, gt) if pred is not None and gt is not None else 0
        parts = [r for r in (pred, gt) if r is not None]
        union_rle = rle_union(parts) if parts else None
        union = rle_area(union_rle) if union_rle is not None else 0
        if ignore is not None and union_rle is not None:
            union -= rle_and_area(union_rle, ignore)
            if inter:
                inter -= rle_and_area(mask_utils.merge([pred, gt], intersect=True), ignore)
        pred_empty = pred is None or rle_area(pred) == 0
        gt_empty = gt is None or rle_area(gt) == 0
        for g in groups:
            self.groups.setdefault(g, IouStat()).add(inter, union, gt_empty, pred_empty)

    def merge(self, other: ReferIoU) -> None:
        for g, s in other.groups.items():
            self.groups.setdefault(g, IouStat()).merge(s)


# ------------------------------------------------------------------------------------------ GCG
def iou_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """``len(a) x len(b)`` IoU of RLEs (0 where both are empty)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou(list(a), list(b), [0] * len(b)), np.float64).reshape(len(a), len(b))


def greedy_miou(ious: np.ndarray) -> float:
    """GLaMM's ``compute_miou`` on a ``pred x gt`` IoU matrix: repeatedly take the largest IoU (first in
    row-major order), drop its row and column; mean of the taken IoUs > 0, or 0 if none."""
    m, taken = ious.copy(), []
    while m.size and m.max() > 0:
        r, c = np.unravel_index(np.argmax(m), m.shape)
        taken.append(float(m[r, c]))
        m = np.delete(np.delete(m, r, axis=0), c, axis=1)
    return math.fsum(taken) / len(taken) if taken else 0.0


def greedy_recall_hits(ious: np.ndarray, sims: np.ndarray) -> int:
    """GLaMM's ``find_best_matches`` on ``gt x pred`` IoU and text-similarity matrices: take the largest IoU
    pair while it has IoU ≥ 0.5 and similarity ≥ 0.5 (the first pair failing either ends the search)."""
    ious, sims, hits = ious.copy(), sims.copy(), 0
    while ious.size:
        r, c = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[r, c] < GCG_IOU or sims[r, c] < GCG_TEXT:
            break
        hits += 1
        ious[r, :] = ious[:, c] = 0
        sims[r, :] = sims[:, c] = 0
    return hits


@dataclass
class GcgGrounding:
    """GCG mask metrics: class-agnostic AP50 (COCOeval, every mask category 1 and score 1), mIoU, recall."""

    ap: MaskAP = field(default_factory=lambda: MaskAP([1]))
    miou_sum: ExactSum = field(default_factory=ExactSum)
    images: int = 0
    recall_hits: int = 0
    recall_total: int = 0

    def add(
        self, order_key: object, gt: Sequence[dict], pred: Sequence[dict], sims: np.ndarray | None
    ) -> None:
        """``gt``/``pred``: one RLE per ground-truth mask / predicted span; ``sims``: ``gt x pred`` text
        similarity of their phrases, or ``None`` when recall is not computed."""
        self.ap.add(order_key, [ApTruth(r, 1) for r in gt], [(r, 1, 1.0) for r in pred])
        gp = iou_matrix(list(gt), list(pred))
        self.miou_sum.add(greedy_miou(gp.T))
        self.images += 1
        if sims is not None:
            self.recall_hits += greedy_recall_hits(gp, sims)
            self.recall_total += len(gt)

    def merge(self, other: GcgGrounding) -> None:
        self.ap.merge(other.ap)
        self.miou_sum.merge(other.miou_sum)
        self.images += other.images
        self.recall_hits += other.recall_hits
        self.recall_total += other.recall_total

    def result(self, with_recall: bool) -> dict[str, float]:
        out = {
            "AP50": self.ap.result()["AP50"],
            "mIoU": 100 * self.miou_sum.value() / self.images if self.images else float("nan"),
        }
        if with_recall:
            out["recall"] = 100 * self.recall_hits / self.recall_total if self.recall_total else float("nan")
        return out


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of ``a`` (N x D) and ``b`` (M x D): N x M (0 for a zero row)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.where(na == 0, 1, na)) @ (b / np.where(nb == 0, 1, nb)).T


TextEmbedder = Callable[[Sequence[str]], np.ndarray]
