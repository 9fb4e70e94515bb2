"""Which metrics each set gets, and scoring a predictions file over shards (inline or as Ray tasks).

One scorer class per kind of set (:data:`SCORERS`, keyed by ``ground_truth.SOURCE_KINDS``). A scorer takes
one ``(Sample, Prediction)`` at a time, checks the prediction against the sample (image size, labels,
categories, overlaps) and feeds the metric accumulators of :mod:`orchestrate.evaluation.metrics`; scorers of
different shards merge exactly. :func:`score_predictions` is the entry point for the CLI and for inference
that wants to score what it just wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.captions import caption_scores, clean_caption, text_embedder
from orchestrate.evaluation.eval_errors import EvaluationError, where
from orchestrate.evaluation.metrics import (
    GcgGrounding,
    MaskAP,
    PanopticQuality,
    ReferIoU,
    SemanticIoU,
    check_rle,
    cosine_matrix,
    paint,
    rle_area,
    rle_union,
)
from orchestrate.evaluation.predictions import Prediction, PredictionReader, phrase_spans
from pipelines.schema import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreOptions:
    """What scoring needs besides the files."""

    text_sim_model: str | None = None  # local sentence-embedding folder for GCG recall (never downloaded)


# ------------------------------------------------------------------------------------------ checks
class _Checker:
    """Checks of one prediction against its sample; every error names the file, line and key."""

    def __init__(self, path: str, pred: Prediction, sample: Sample):
        self.loc = where(path, pred.line, pred.key)
        self.pred = pred
        self.hw = gt.image_hw(sample)

    def fail(self, msg: str) -> EvaluationError:
        return EvaluationError(f"{self.loc}: {msg}")

    def need(self, name: str, set_name: str) -> list:
        value = getattr(self.pred, name)
        if value is None:
            raise self.fail(f"no '{name}' field, which {set_name} is scored from")
        return value

    def rle(self, rle: dict, what: str) -> dict:
        problem = check_rle(rle, self.hw)
        if problem:
            raise self.fail(f"{what}: {problem}")
        return rle

    def category(self, cat: int, categories: dict[int, bool] | None, what: str, set_name: str) -> int:
        if categories is not None and cat not in categories:
            raise self.fail(f"{what}: category_id {cat} is not a category of {set_name}")
        return cat

    def label(self, label: int, n: int, what: str, unit: str) -> int:
        if not 0 <= label < n:
            raise self.fail(f"{what}: label {label} outside [0, {n}) ({n} {unit})")
        return label


def _grouped_masks(masks: Sequence[tuple[dict, int]], n: int) -> list[dict | None]:
    """Per label 0..n-1, the union of the predicted masks with that label (``None``: none, or all empty)."""
    by_label: dict[int, list[dict]] = {}
    for rle, label in masks:
        by_label.setdefault(label, []).append(rle)
    out = []
    for t in range(n):
        u = rle_union(by_label[t]) if t in by_label else None
        out.append(u if u is not None and rle_area(u) > 0 else None)
    return out


# ------------------------------------------------------------------------------------------ scorers
class _Scorer:
    """Base: ``add`` one sample, ``merge`` another shard's scorer, ``result`` -> (metrics, notes)."""

    def __init__(self, evs: gt.EvalSet, options: ScoreOptions):
        self.set_name = evs.name
        self.samples = 0

    def add(self, evs: gt.EvalSet, sample: Sample, pred: Prediction, path: str) -> None:
        raise NotImplementedError

    def merge(self, other: _Scorer) -> None:
        self.samples += other.samples

    def result(self) -> tuple[dict[str, float], list[str]]:
        raise NotImplementedError


class PanopticScorer(_Scorer):
    """PQ/SQ/RQ (all, things, stuff) and semantic mIoU from the ``panoptic`` segments."""

    def __init__(self, evs: gt.EvalSet, options: ScoreOptions):
        super().__init__(evs, options)
        self.pq = PanopticQuality(dict(evs.categories))
        self.miou = SemanticIoU(sorted(evs.categories))

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        segs = [
            (ck.rle(r, f"panoptic[{i}]"), ck.category(c, evs.categories, f"panoptic[{i}]", evs.name))
            for i, (r, c) in enumerate(ck.need("panoptic", evs.name))
        ]
        segs = [(r, c) for r, c in segs if rle_area(r) > 0]  # an empty segment can neither match nor err
        n_pix = ck.hw[0] * ck.hw[1]
        pred_map, overlap = paint([r for r, _ in segs], n_pix)
        if overlap:
            raise ck.fail("'panoptic' segments overlap (a panoptic prediction gives each pixel one segment)")
        truth = gt.panoptic_truth(evs, sample)
        for _, c in truth.segments:
            if c not in evs.categories:
                raise EvaluationError(
                    f"{sample.key}: ground-truth category {c} is not in {evs.name}'s categories"
                )
        crowd = list(truth.crowd.values())
        gt_map, gt_overlap = paint([r for r, _ in truth.segments] + crowd, n_pix)
        if gt_overlap:
            raise EvaluationError(f"{sample.key}: ground-truth segments overlap")
        self.pq.add(truth, segs, gt_map, pred_map)
        gt_lookup = np.concatenate(
            [self.miou.class_map([c for _, c in truth.segments]), np.zeros(len(crowd), np.int32)]
        )
        self.miou.add(gt_lookup[gt_map], self.miou.class_map([c for _, c in segs])[pred_map])
        self.samples += 1

    def merge(self, other):
        super().merge(other)
        self.pq.merge(other.pq)
        self.miou.merge(other.miou)

    def result(self):
        return {**self.pq.result(), **self.miou.result()}, []


class SemanticScorer(_Scorer):
    """Semantic mIoU from the ``panoptic`` segments (one per class is enough)."""

    def __init__(self, evs, options):
        super().__init__(evs, options)
        self.miou = SemanticIoU(sorted(evs.categories))

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        segs = [
            (ck.rle(r, f"panoptic[{i}]"), ck.category(c, evs.categories, f"panoptic[{i}]", evs.name))
            for i, (r, c) in enumerate(ck.need("panoptic", evs.name))
        ]
        n_pix = ck.hw[0] * ck.hw[1]
        pred_map, overlap = paint([r for r, _ in segs], n_pix)
        if overlap:
            raise ck.fail("'panoptic' segments overlap (a semantic prediction gives each pixel one class)")
        truth = [(m.rle, int(m.category_id)) for m in sample.masks if not m.iscrowd]
        gt_map, _ = paint([r for r, _ in truth], n_pix)
        self.miou.add(
            self.miou.class_map([c for _, c in truth])[gt_map],
            self.miou.class_map([c for _, c in segs])[pred_map],
        )
        self.samples += 1

    def merge(self, other):
        super().merge(other)
        self.miou.merge(other.miou)

    def result(self):
        return self.miou.result(), []


class InstanceScorer(_Scorer):
    """Mask AP (COCOeval, segm) from the scored ``instances``; VGD: one set per prompt type."""

    def __init__(self, evs, options):
        super().__init__(evs, options)
        self.ap = MaskAP(sorted(evs.categories) if evs.categories is not None else None)

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        dets = [
            (ck.rle(r, f"instances[{i}]"), ck.category(c, evs.categories, f"instances[{i}]", evs.name), s)
            for i, (r, c, s) in enumerate(ck.need("instances", evs.name))
        ]
        self.ap.add(sample.key, gt.instance_truth(evs, sample), dets)
        self.samples += 1

    def merge(self, other):
        super().merge(other)
        self.ap.merge(other.ap)

    def result(self):
        return self.ap.result(), []


class ReferScorer(_Scorer):
    """cIoU/gIoU over every ``<SEG>`` turn (refseg, reaseg, intseg), by group."""

    def __init__(self, evs, options):
        super().__init__(evs, options)
        self.kind = evs.kind
        self.iou = ReferIoU()

    def groups(self, sample: Sample, target: dict | None) -> list[str]:
        if self.kind == "grefer":
            return ["all", "targeted"] if target is not None else ["all"]
        if self.kind == "reason":
            return ["all", "long" if sample.meta.get("is_sentence") else "short"]
        if self.kind == "interactive" and sample.regions:
            return ["all", sample.regions[0].type]
        return ["all"]

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        targets = gt.turn_targets(sample)
        masks = [
            (ck.rle(r, f"masks[{i}]"), ck.label(lb, len(targets), f"masks[{i}]", "<SEG> turns"))
            for i, (r, lb) in enumerate(ck.need("masks", evs.name))
        ]
        for target, mask in zip(targets, _grouped_masks(masks, len(targets)), strict=True):
            self.iou.add(self.groups(sample, target), mask, target, sample.ignore)
        self.samples += 1

    def merge(self, other):
        super().merge(other)
        self.iou.merge(other.iou)

    def result(self):
        g = self.iou.groups
        if self.kind == "grefer":
            out = {}
            if "targeted" in g:
                out.update({"cIoU": g["targeted"].ciou(), "gIoU": g["targeted"].giou()})
            a = g.get("all")
            if a is not None:
                out.update({"cIoU_ReLA": a.ciou(), "gIoU_ReLA": a.giou()})
                nt, t = a.nt_tp + a.nt_fn, a.t_tn + a.t_fp
                out["N-acc"] = 100 * a.nt_tp / nt if nt else float("nan")
                out["T-acc"] = 100 * a.t_tn / t if t else float("nan")
            notes = [] if a is None or a.nt_tp + a.nt_fn else ["no no-target sample: N-acc undefined"]
            return out, notes
        out = {}
        for name, stat in sorted(g.items(), key=lambda kv: (kv[0] != "all", kv[0])):
            suffix = "" if name == "all" else f"_{name}"
            out[f"cIoU{suffix}"], out[f"gIoU{suffix}"] = stat.ciou(), stat.giou()
        return out, []


class GcgScorer(_Scorer):
    """GCG: METEOR, CIDEr (captions, finalised over the whole set), AP50, mIoU, recall."""

    def __init__(self, evs, options):
        super().__init__(evs, options)
        self.grounding = GcgGrounding()
        self.captions: list[tuple[str, str, str]] = []  # (key, reference, generated)
        self.text_model = options.text_sim_model

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        text = pred.text or ""
        spans = phrase_spans(text)
        masks = [
            (ck.rle(r, f"masks[{i}]"), ck.label(lb, len(spans), f"masks[{i}]", "<p> spans in 'text'"))
            for i, (r, lb) in enumerate(ck.need("masks", evs.name))
        ]
        grouped = _grouped_masks(masks, len(spans))
        pred_rles = [m for m in grouped if m is not None]
        pred_phrases = [p for p, m in zip(spans, grouped, strict=True) if m is not None]
        gt_rles = [m.rle for m in sample.masks]
        gt_phrases = [sample.phrases[m.label] if m.label >= 0 else None for m in sample.masks]
        sims = self._similarity(gt_phrases, pred_phrases) if self.text_model else None
        self.grounding.add(sample.key, gt_rles, pred_rles, sims)
        self.captions.append((sample.key, str(sample.meta.get("caption", "")), clean_caption(text)))
        self.samples += 1

    def _similarity(self, gt_phrases: list[str | None], pred_phrases: list[str]) -> np.ndarray:
        embed = text_embedder(self.text_model)
        known = [p for p in gt_phrases if p is not None]
        sims = np.zeros((len(gt_phrases), len(pred_phrases)))
        if known and pred_phrases:
            block = cosine_matrix(embed(known), embed(pred_phrases))
            rows = [i for i, p in enumerate(gt_phrases) if p is not None]
            sims[rows] = block
        return sims

    def merge(self, other):
        super().merge(other)
        self.grounding.merge(other.grounding)
        self.captions.extend(other.captions)

    def result(self):
        notes: list[str] = []
        out: dict[str, float] = {}
        caps = sorted(self.captions)
        scores, why = caption_scores([c[1] for c in caps], [c[2] for c in caps])
        if why:
            notes.append(f"METEOR, CIDEr not computed: {why}")
        out.update(scores)
        out.update(self.grounding.result(with_recall=self.text_model is not None))
        if self.text_model is None:
            notes.append("recall omitted: no --text-sim-model (a local sentence-embedding folder) given")
        return out, notes


SCORERS: dict[str, type[_Scorer]] = {
    "panoptic": PanopticScorer,
    "semantic": SemanticScorer,
    "instance": InstanceScorer,
    "vgd": InstanceScorer,
    "refer": ReferScorer,
    "grefer": ReferScorer,
    "reason": ReferScorer,
    "interactive": ReferScorer,
    "gcg": GcgScorer,
}


# ------------------------------------------------------------------------------------------ one shard
@dataclass
class ShardResult:
    """What scoring one shard returns to the driver."""

    set_name: str
    scorer: Any
    keys: list[str] = field(default_factory=list)  # every sample key of the shard
    missing: list[str] = field(default_factory=list)  # keys without a prediction


def score_shard(
    evs: gt.EvalSet, shard: str, pred_path: str, refs: dict, options: ScoreOptions
) -> ShardResult:
    """Score the samples of one shard against their predictions (``refs``: key -> PredRef of the set),
    one sample and one prediction line in memory at a time."""
    scorer = SCORERS[evs.kind](evs, options)
    out = ShardResult(evs.name, scorer)
    with PredictionReader(pred_path) as reader:
        for sample in gt.iter_shard_samples(evs, shard):
            out.keys.append(sample.key)
            ref = refs.get(sample.key)
            if ref is None:
                out.missing.append(sample.key)
            elif not out.missing:  # once a key is missing the run fails: only the keys are still collected
                scorer.add(evs, sample, reader.read(ref), pred_path)
    return out
