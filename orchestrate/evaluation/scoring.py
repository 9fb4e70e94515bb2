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
from pipelines import masks as mask_ops
from pipelines.schema import Sample

log = logging.getLogger(__name__)


PROTOCOLS = ("paper", "standard")
"""``paper``: X-SAM's evaluation code (``AAAI26_Archive``) where it departs from the standard definition;
``standard``: the benchmark's own definition (docs/evaluation.md lists each difference)."""


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else an :class:`EvaluationError` (one line)."""
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"--protocol must be {' or '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


@dataclass(frozen=True)
class ScoreOptions:
    """What scoring needs besides the files."""

    text_sim_model: str | None = None  # local sentence-embedding folder for GCG recall (never downloaded)
    protocol: str = "paper"  # one of PROTOCOLS

    def __post_init__(self):
        check_protocol(self.protocol)


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

    def counts(self) -> dict[str, int]:
        """Counters ``details.json`` records for the set (``{}``: none)."""
        return {}


class PanopticScorer(_Scorer):
    """PQ/SQ/RQ (all, things, stuff); ``mIoU_panoptic``, the semantic mIoU of the ``panoptic`` segments (a
    pixel no segment covers counts as missed); COCO: ``mIoU``, X-SAM's semantic mIoU, from the dense
    ``semantic`` pass against labels derived from the panoptic annotations (crowd labelled with its class)."""

    def __init__(self, evs: gt.EvalSet, options: ScoreOptions):
        super().__init__(evs, options)
        self.pq = PanopticQuality(dict(evs.categories))
        self.miou = SemanticIoU(sorted(evs.categories))
        self.dense = SemanticIoU(sorted(evs.categories)) if evs.source in gt.DENSE_SEMANTIC_SOURCES else None
        self.no_dense = 0  # samples whose prediction has no "semantic" field

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        segs = [
            (r, c) for r, c in _segments(ck, evs, "panoptic") if rle_area(r) > 0
        ]  # empty: no match nor err
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
        if self.dense is not None:
            self._add_dense(evs, ck, truth, gt_map, n_pix)
        self.samples += 1

    def _add_dense(self, evs, ck: _Checker, truth, gt_map: np.ndarray, n_pix: int) -> None:
        if ck.pred.semantic is None:
            self.no_dense += 1
            return
        dense = _segments(ck, evs, "semantic")
        pred_map, overlap = paint([r for r, _ in dense], n_pix)
        if overlap:
            raise ck.fail("'semantic' segments overlap (a semantic prediction gives each pixel one class)")
        labelled = gt.semantic_truth(evs, truth)  # the order gt_map was painted in: segments, then crowd
        gt_lookup = self.dense.class_map([c for _, c in labelled])
        self.dense.add(gt_lookup[gt_map], self.dense.class_map([c for _, c in dense])[pred_map])

    def merge(self, other):
        super().merge(other)
        self.pq.merge(other.pq)
        self.miou.merge(other.miou)
        if self.dense is not None:
            self.dense.merge(other.dense)
            self.no_dense += other.no_dense

    def result(self):
        out = {**self.pq.result(), "mIoU_panoptic": self.miou.result()["mIoU"]}
        notes = []
        if self.dense is not None and self.no_dense:
            notes.append(
                f"mIoU not computed: {self.no_dense} predictions have no 'semantic' field (X-SAM's dense "
                "semantic pass); mIoU_panoptic is the panoptic segments' own"
            )
        elif self.dense is not None:
            out["mIoU"] = self.dense.result()["mIoU"]
        return out, notes


def _segments(ck: _Checker, evs: gt.EvalSet, name: str) -> list[tuple[dict, int]]:
    """The checked ``(RLE, category_id)`` pairs of a prediction's ``panoptic`` or ``semantic`` field."""
    return [
        (ck.rle(r, f"{name}[{i}]"), ck.category(c, evs.categories, f"{name}[{i}]", evs.name))
        for i, (r, c) in enumerate(ck.need(name, evs.name))
    ]


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
        self.protocol = options.protocol

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        dets = [
            (ck.rle(r, f"instances[{i}]"), ck.category(c, evs.categories, f"instances[{i}]", evs.name), s)
            for i, (r, c, s) in enumerate(ck.need("instances", evs.name))
        ]
        self.ap.add(sample.key, gt.instance_truth(evs, sample, self.protocol), dets)
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
    """GCG: METEOR, CIDEr (captions, finalised over the whole set), AP50, mIoU, recall.

    ``paper`` (X-SAM's evaluator): a sample whose answer has no ``<SEG>``, no ``<p>`` span or more than one
    ``<SEG>`` is dropped from every metric (X-SAM's model returns no output for it), counted in
    :meth:`counts`; the phrase masks are painted into one map in label order (a later phrase overwrites an
    earlier one) and re-split, largest first; AP50 and mIoU count only the images left with a predicted mask.
    ``standard``: every sample is scored, with its independent phrase masks."""

    def __init__(self, evs, options):
        super().__init__(evs, options)
        self.grounding = GcgGrounding()
        self.captions: list[tuple[str, str, str]] = []  # (key, reference, generated)
        self.text_model = options.text_sim_model
        self.paper = options.protocol == "paper"
        self.tally = dict.fromkeys(GCG_COUNTS, 0)

    def add(self, evs, sample, pred, path):
        ck = _Checker(path, pred, sample)
        text = pred.text or ""
        spans = phrase_spans(text)
        masks = [
            (ck.rle(r, f"masks[{i}]"), ck.label(lb, len(spans), f"masks[{i}]", "<p> spans in 'text'"))
            for i, (r, lb) in enumerate(ck.need("masks", evs.name))
        ]
        self.samples += 1
        grouped = _grouped_masks(masks, len(spans))
        pairs = [(m, lb) for lb, m in enumerate(grouped) if m is not None]
        if self.paper:
            failed = xsam_gcg_failure(text, spans)
            if failed:
                self.tally[failed] += 1
                return
            pairs = painted_masks(grouped, ck.hw)
        self.captions.append((sample.key, str(sample.meta.get("caption", "")), clean_caption(text)))
        if self.paper and not pairs:
            self.tally["no_mask"] += 1  # X-SAM's mask metrics take only the images with a predicted mask
            return
        pred_rles = [m for m, _ in pairs]
        pred_phrases = [spans[lb] for _, lb in pairs]
        gt_rles = [m.rle for m in sample.masks]
        gt_phrases = [sample.phrases[m.label] if m.label >= 0 else None for m in sample.masks]
        sims = self._similarity(gt_phrases, pred_phrases) if self.text_model else None
        self.grounding.add(sample.key, gt_rles, pred_rles, sims)

    def counts(self) -> dict[str, int]:
        return dict(self.tally) if self.paper else {}

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
        for k, v in other.tally.items():
            self.tally[k] += v

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
        dropped = sum(self.tally[k] for k in GCG_DROPS)
        if self.paper and dropped:
            parts = ", ".join(f"{GCG_COUNTS[k]}: {self.tally[k]}" for k in GCG_DROPS if self.tally[k])
            notes.append(
                f"{dropped} of {self.samples} samples dropped from every metric as X-SAM drops them ({parts})"
            )
        if self.paper and self.tally["no_mask"]:
            notes.append(
                f"{self.tally['no_mask']} samples without a predicted mask: not in AP50, mIoU (X-SAM)"
            )
        return out, notes


GCG_COUNTS = {
    "no_seg": "no <SEG>",
    "no_phrase": "no <p> span",
    "multi_seg": "more than one <SEG>",
    "no_mask": "no predicted mask",
}
"""GCG counters under ``paper`` (``details.json`` ``counts``): the first three are X-SAM's dropped samples."""
GCG_DROPS = ("no_seg", "no_phrase", "multi_seg")


def xsam_gcg_failure(text: str, spans: Sequence[str]) -> str | None:
    """Why X-SAM's model gives a GCG answer no segmentation output (a :data:`GCG_DROPS` key), or ``None``:
    no ``<SEG>`` or no ``<p>`` span (nothing to condition the decoder on), or more than one ``<SEG>``."""
    n_seg = text.count("<SEG>")  # tags in a prediction's text are the emitted tokens (docs/evaluation.md)
    if n_seg == 0:
        return "no_seg"
    if not spans:
        return "no_phrase"
    return "multi_seg" if n_seg > 1 else None


def painted_masks(grouped: Sequence[dict | None], hw: tuple[int, int]) -> list[tuple[dict, int]]:
    """X-SAM's GCG masks: each phrase's mask painted into one map in label order (a later phrase overwrites an
    earlier one), then one mask per label still present, largest first (ties: label order), as
    ``(RLE, label)``."""
    seg = np.full(hw, -1, np.int32)
    for label, rle in enumerate(grouped):
        if rle is not None:
            seg[mask_ops.decode(rle).astype(bool)] = label
    labels, areas = np.unique(seg[seg >= 0], return_counts=True)
    order = np.argsort(-areas, kind="stable")
    return [(mask_ops.encode(seg == labels[i])[0], int(labels[i])) for i in order]


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
