"""Decoder queries → masks at the original image size, per task, as X-SAM post-processes them.

The decoder predicts ``Q`` queries per run: class logits ``Qx(K+1)`` (K phrase columns or the stage-1 linear
head's classes, then "no object") and mask logits ``Qxhxw`` on a grid covering the padded SAM frame. Every
function here first maps mask logits straight to the original image (:func:`to_original`: one bilinear
resampling whose pixel centres go through the SAM scaling, so the zero padding is never part of a mask), then
applies the task's rule (X-SAM ``dataset/process_fns/postprocess_fns/*``, Mask2Former's rules):

- :func:`panoptic` — best real class per query (score = its softmax probability), queries above
  ``object_threshold`` kept, then transformers' Mask2Former ``compute_segments``: each pixel goes to the query
  with the highest score × mask probability, a query's segment survives when it keeps more than
  ``overlap_threshold`` of its own mask, stuff classes are fused into one segment per class;
- :func:`semantic` — per class Σ_q softmax(class) · sigmoid(mask), argmax per pixel;
- :func:`instances` — top-k of the flattened query × class scores (k = Q), binary mask = logit > 0, score =
  class probability × mean mask probability inside the mask;
- :func:`best_query_mask` — refseg/reaseg/GCG: the query with the highest probability for one phrase column,
  its mask probability > ``mask_threshold`` (an empty result is "no target");
- :func:`interactive` — intseg: candidates above ``interactive_threshold`` (or the best one), the candidate
  whose box overlaps the visual prompt's box most.

:func:`encode` turns boolean masks into the compressed RLEs of the predictions contract
(docs/contracts.md#predictions-and-results). Every function takes one run's tensors; none keeps state. Masks
come back as ``HxW`` bool tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

# the PIL processor module holds the same torch functions without importing torchvision
from transformers.models.mask2former.image_processing_pil_mask2former import (
    compute_segments,
    remove_low_and_no_objects,
)

from pipelines import masks as mask_ops


@dataclass(frozen=True)
class Geometry:
    """Where an image sits in the SAM frame: ``frame`` = the padded side L, ``scaled`` = (h', w') of the
    resized image in its top-left corner, ``image`` = (H, W) of the original."""

    frame: int
    scaled: tuple[int, int]
    image: tuple[int, int]


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds (defaults: X-SAM's evaluation configs, ``AAAI26_Archive`` stage-3 ``val_datasets``)."""

    object_threshold: float = 0.0
    """Panoptic: a query is kept when its best class probability exceeds this (X-SAM: 0.0; Mask2Former's
    own default 0.8)."""
    mask_threshold: float = 0.5
    """Mask probability at which a pixel belongs to a query's mask (panoptic, refseg, GCG)."""
    overlap_threshold: float = 0.8
    """Panoptic: share of its own mask a query must keep after the per-pixel argmax."""
    instance_threshold: float = 0.0
    """Instances (genseg/ovseg instance sets, VGD): minimum class × mask score (X-SAM: 0.0 for AP)."""
    interactive_threshold: float = 0.5
    """Intseg: candidate masks score at least this (the best query is always a candidate)."""


# ------------------------------------------------------------------------------------------ geometry
def to_original(mask_logits: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """NxhxW logits on the padded SAM frame's grid → NxHxW float32 logits at the original size.

    Original pixel centre ``y + 0.5`` lies at ``(y + 0.5)·h'/H`` in the frame and at ``(y + 0.5)·h'/H·h/L``
    on the grid; one bilinear resampling with exactly that scale (``align_corners=False``) maps it. X-SAM
    upsamples to the frame, crops ``h'xw'`` and resizes again (two resamplings); this is the same mapping
    with one interpolation and memory ``NxHxW``.
    """
    n, h, w = mask_logits.shape
    H, W = geo.image
    sh, sw = geo.scaled
    if n == 0:
        return mask_logits.new_zeros((0, H, W), dtype=torch.float32)
    scale_h = H * geo.frame / (sh * h)  # output pixels per grid cell
    scale_w = W * geo.frame / (sw * w)
    x = mask_logits.float().unsqueeze(0)
    return torch.ops.aten.upsample_bilinear2d(x, [H, W], False, scale_h, scale_w)[0]


def encode(masks: torch.Tensor) -> list[dict]:
    """NxHxW bool → N compressed RLEs (``{"size": [H, W], "counts": str}``)."""
    if masks.shape[0] == 0:
        return []
    arr = masks.to("cpu", torch.uint8).numpy().transpose(1, 2, 0)  # HxWxN for pycocotools
    return mask_ops.encode(np.ascontiguousarray(arr))


def _probs(class_logits: torch.Tensor) -> torch.Tensor:
    """Qx(K+1) logits → QxK class probabilities (softmax over all columns, "no object" dropped)."""
    return class_logits.float().softmax(-1)[:, :-1]


# ------------------------------------------------------------------------------------------ genseg / ovseg
def panoptic(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    geo: Geometry,
    stuff_columns: set[int],
    cfg: PostprocessConfig = PostprocessConfig(),
) -> list[tuple[torch.Tensor, int]]:
    """One run → non-overlapping ``(HxW bool mask, class column)`` segments; ``stuff_columns`` are fused
    into one segment per class (X-SAM's ``label_ids_to_fuse``)."""
    probs = _probs(class_logits)
    if probs.shape[1] == 0:
        return []
    score, label = probs.max(-1)
    kept, score, label = remove_low_and_no_objects(
        mask_logits, score, label, cfg.object_threshold, probs.shape[1]
    )
    if len(kept) == 0:
        return []
    mask_probs = to_original(kept, geo).sigmoid()  # only the kept queries are resampled
    seg_map, segments = compute_segments(
        mask_probs,
        score,
        label,
        mask_threshold=cfg.mask_threshold,
        overlap_mask_area_threshold=cfg.overlap_threshold,
        label_ids_to_fuse=stuff_columns,
    )
    out, seen = [], set()
    for s in segments:
        if s["id"] in seen:  # a fused stuff class lists its segment once per query
            continue
        seen.add(s["id"])
        out.append((seg_map == s["id"], int(s["label_id"])))
    return out


def semantic(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, geo: Geometry
) -> list[tuple[torch.Tensor, int]]:
    """One run → one ``(HxW bool mask, class column)`` per class that wins a pixel (every pixel gets one)."""
    probs = _probs(class_logits)  # QxK
    if probs.shape[1] == 0:
        return []
    mask_probs = to_original(mask_logits, geo).sigmoid()  # QxHxW
    winner = torch.einsum("qk,qhw->khw", probs, mask_probs).argmax(0)  # HxW
    return [(winner == k, int(k)) for k in torch.unique(winner).tolist()]


def instances(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    geo: Geometry,
    cfg: PostprocessConfig = PostprocessConfig(),
    top_k: int | None = None,
) -> list[tuple[torch.Tensor, int, float]]:
    """One run → scored ``(HxW bool mask, class column, score)`` instances (they may overlap), best first.

    Mask2Former's instance rule: the ``top_k`` (default Q) best (query, class) pairs of the flattened
    probabilities; a query may appear with several classes. Empty masks and scores below
    ``instance_threshold`` are dropped."""
    probs = _probs(class_logits)
    q, k = probs.shape
    if k == 0 or q == 0:
        return []
    top, flat = probs.flatten().topk(min(top_k or q, q * k))
    query, column = flat // k, flat % k
    uniq, inverse = torch.unique(query, return_inverse=True)
    logits = to_original(mask_logits[uniq], geo)  # UxHxW, each query resampled once
    binary = logits > 0
    area = binary.flatten(1).sum(1)
    mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / (area + 1e-6)
    score = top * mask_score[inverse]
    out = []
    for i in score.argsort(descending=True).tolist():
        u = int(inverse[i])
        if int(area[u]) > 0 and float(score[i]) >= cfg.instance_threshold:
            out.append((binary[u], int(column[i]), float(score[i])))
    return out


# ------------------------------------------------------------------------------------------ one mask per
# phrase
def best_query_mask(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    column: int,
    geo: Geometry,
    cfg: PostprocessConfig = PostprocessConfig(),
) -> tuple[torch.Tensor, float]:
    """The mask of the query most confident in class ``column``: ``(HxW bool, its probability)``. X-SAM's
    refseg and GCG rule (``scores.max(dim=0)`` per phrase, sigmoid > ``mask_threshold``)."""
    probs = _probs(class_logits)[:, column]
    score, q = probs.max(0)
    mask = to_original(mask_logits[q : q + 1], geo)[0].sigmoid() > cfg.mask_threshold
    return mask, float(score)


def _box(mask: torch.Tensor) -> torch.Tensor | None:
    """HxW bool → (x0, y0, x1, y1) of its extent (exclusive end), or None when empty."""
    ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if len(ys) == 0:
        return None
    return torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float64)


def _box_iou(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = float(w * h)
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def interactive(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    geo: Geometry,
    prompt: torch.Tensor,
    cfg: PostprocessConfig = PostprocessConfig(),
) -> torch.Tensor:
    """Intseg (X-SAM ``intseg_postprocess_fn``): scored instances of the prompt's one class; candidates score
    at least ``interactive_threshold`` or are the best; the candidate whose box has the highest IoU with the
    prompt mask's box (``prompt``: HxW bool at the original size). Returns HxW bool (empty = no target)."""
    found = instances(class_logits[:, [0, -1]], mask_logits, geo, PostprocessConfig(instance_threshold=0.0))
    if not found:
        return torch.zeros(geo.image, dtype=torch.bool)
    best = found[0][2]
    cands = [m for m, _, s in found if s >= cfg.interactive_threshold or s == best]
    target = _box(prompt)
    ious = [_box_iou(_box(m), target) for m in cands]
    return cands[int(np.argmax(ious))]


# ------------------------------------------------------------------------------------------ one prediction
# line
OUTPUT_KINDS = ("panoptic", "semantic", "instances", "per_turn", "phrases", "interactive")
"""What a set is scored from: ``panoptic`` / ``semantic`` → ``panoptic`` segments; ``instances`` (genseg and
ovseg instance sets, VGD) → scored ``instances``; ``per_turn`` (refseg, reaseg) → one mask per ``<SEG>`` turn;
``phrases`` (GCG) → one mask per ``<p>`` span of the answer; ``interactive`` (intseg) → one mask."""


@dataclass(frozen=True)
class OutputSpec:
    """How one sample's decoder output becomes its line of ``predictions.jsonl``
    (docs/contracts.md#predictions-and-results)."""

    kind: str
    categories: tuple[int, ...] | None = None
    """Category id of each kept class column (panoptic, semantic, instances)."""
    stuff: frozenset[int] = frozenset()
    """Kept columns whose category is stuff (panoptic fuses each into one segment)."""
    columns: tuple[int, ...] | None = None
    """Class columns kept before the softmax (e.g. the set's categories out of the stage-1 linear head's
    133); None keeps all."""
    prompt: dict | None = None
    """Intseg: the visual prompt's RLE at the original size."""
    semantic_too: bool = False
    """Panoptic: also the dense semantic post-process of the same output (``semantic`` field: X-SAM's COCO
    semantic mIoU, every pixel a class)."""

    def __post_init__(self):
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {self.kind!r}")


def prediction_line(dec, spec: OutputSpec, cfg: PostprocessConfig = PostprocessConfig()) -> dict:
    """One :class:`~xsam_model.inferencer.Decoded` → ``{"key", "text", <field>: [...]}``. A sample without a
    ``<SEG>`` (or without decoder output) gets the field empty: an empty prediction."""
    field = {"panoptic": "panoptic", "semantic": "panoptic", "instances": "instances"}.get(spec.kind, "masks")
    line: dict = {"key": dec.key, "text": dec.text, field: []}
    if spec.kind == "panoptic" and spec.semantic_too:
        line["semantic"] = []
    if dec.class_logits is None or dec.num_seg == 0:
        return line
    cls, masks = dec.class_logits, dec.mask_logits
    if spec.columns is not None:
        cls = cls[..., [*spec.columns, cls.shape[-1] - 1]]
    geo = dec.geometry
    if spec.kind in ("panoptic", "semantic", "instances"):
        line[field] = _category_entries(spec, cls[0], masks[0], geo, cfg)
        if spec.kind == "panoptic" and spec.semantic_too:
            dense = dataclasses.replace(spec, kind="semantic", semantic_too=False)
            line["semantic"] = _category_entries(dense, cls[0], masks[0], geo, cfg)
    elif spec.kind == "per_turn":
        line[field] = _per_turn(dec, cls, masks, cfg)
    elif spec.kind == "phrases":
        found = []
        for col in range(dec.prompt_spans, cls.shape[-1] - 1):
            mask, _ = best_query_mask(cls[0], masks[0], col, geo, cfg)
            found.append((mask, col - dec.prompt_spans))  # label = the span's index in the answer text
        line[field] = _mask_entries(found)
    else:
        prompt = torch.from_numpy(mask_ops.decode(spec.prompt).astype(bool)) if spec.prompt else None
        if prompt is None:
            raise ValueError(f"{dec.key}: an interactive sample needs its visual prompt")
        line[field] = _mask_entries([(interactive(cls[0], masks[0], geo, prompt.to(cls.device), cfg), 0)])
    return line


def _category_entries(spec: OutputSpec, cls, masks, geo: Geometry, cfg: PostprocessConfig) -> list[dict]:
    cats = spec.categories
    if cats is None or len(cats) != cls.shape[-1] - 1:
        raise ValueError(f"{len(cats or ())} categories for {cls.shape[-1] - 1} class columns")
    if spec.kind == "instances":
        found = instances(cls, masks, geo, cfg)
        rles = encode(torch.stack([m for m, _, _ in found])) if found else []
        return [
            {"rle": r, "category_id": int(cats[c]), "score": round(s, 6)}
            for r, (_, c, s) in zip(rles, found, strict=True)
        ]
    segs = (
        panoptic(cls, masks, geo, set(spec.stuff), cfg)
        if spec.kind == "panoptic"
        else semantic(cls, masks, geo)
    )
    rles = encode(torch.stack([m for m, _ in segs])) if segs else []
    return [{"rle": r, "category_id": int(cats[c])} for r, (_, c) in zip(rles, segs, strict=True)]


def _per_turn(dec, cls, masks, cfg: PostprocessConfig) -> list[dict]:
    """Refseg/reaseg: turn j's mask is the best query for phrase j in the run conditioned on that turn's
    ``<SEG>`` (per-``<SEG>`` decoding) or in the image's one run."""
    found = []
    for j, seg in enumerate(dec.turn_seg):
        if seg is None or j >= cls.shape[-1] - 1:
            continue  # the turn's answer has no <SEG>, or no phrase conditions it: no target
        runs = [r for r, s in enumerate(dec.run_seg) if s == seg] or [
            r for r, s in enumerate(dec.run_seg) if s == -1
        ]
        if runs:
            mask, _ = best_query_mask(cls[runs[0]], masks[runs[0]], j, dec.geometry, cfg)
            found.append((mask, j))
    return _mask_entries(found)


def _mask_entries(found: list[tuple[torch.Tensor, int]]) -> list[dict]:
    """``(HxW bool, label)`` pairs → ``{"rle", "label"}`` entries; an empty mask is left out (no target)."""
    kept = [(m, lab) for m, lab in found if bool(m.any())]
    rles = encode(torch.stack([m for m, _ in kept])) if kept else []
    return [{"rle": r, "label": int(lab)} for r, (_, lab) in zip(rles, kept, strict=True)]
