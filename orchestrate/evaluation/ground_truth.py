"""Per-set ground truth: the val shards, plus the original annotation files where shards lack what a metric
needs.

A set is one built ``<source>/<split>``. Its samples (keys, image sizes, masks, phrases, turns) come from
its shards, read here and nowhere else (:func:`read_shard`), through the checks the training loader applies
(:func:`pipelines.shard_store.iter_verified_samples`: the member index against the manifest, each sample's
sha256, the manifest's counts): a changed byte, a cut or swapped shard or a missing sample stops scoring with
one line naming the shard and the sample (docs/integrity.md). Two COCO sets also read the files the
build read, under ``--data-root``, because a sample keeps only what training needs:

* ``coco_panoptic``: a sample's ``ignore`` is the union of its crowd regions; PQ needs each crowd region's
  category (an unmatched prediction lying on same-category crowd is not a false positive), so crowd segments
  are read back from the panoptic JSON and PNG (only for the images that have crowd);
* ``coco_instance``: COCOeval counts crowd annotations per category and uses the annotation's ``area``
  (polygon area) for APs/APm/APl, so every annotation of an image is read back from the instances JSON
  (byte spans indexed once; a worker parses only its images').

Each original file's SHA-256 must equal the one the set's manifest recorded: scoring against a file other
than the one the shards were built from is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from orchestrate.evaluation.eval_errors import EvaluationError
from orchestrate.evaluation.metrics import ApTruth, PanopticTruth
from pipelines import masks as mask_ops
from pipelines import shard_store
from pipelines.masks import MaskFormatError
from pipelines.schema import SEG, Sample, SampleError
from pipelines.sources import SOURCES
from pipelines.sources.ade20k import category_table
from pipelines.sources.base import SourceNotFound, relpath
from pipelines.sources.readers.coco_index import RawAnns, iter_coco_records, read_categories, read_spans
from pipelines.sources.vocabulary import category_phrases, naming
from pipelines.storage import join

log = logging.getLogger(__name__)

# which scorer a source's sets get (orchestrate/evaluation/scoring.py)
SOURCE_KINDS = {
    "coco_panoptic": "panoptic",
    "ade20k_panoptic": "panoptic",
    "ade20k_semantic": "semantic",
    "coco_instance": "instance",
    "ade20k_instance": "instance",
    "refcoco": "refer",
    "refcoco+": "refer",
    "refcocog": "refer",
    "grefcoco": "grefer",
    "lisa_reasonseg": "reason",
    "coco_interactive": "interactive",
    "grandf_gcg": "gcg",
    "psg_gcg": "gcg",
    "refcocog_gcg": "gcg",
    "flickr_gcg": "gcg",
    "coco_vgd": "vgd",
}
DENSE_SEMANTIC_SOURCES = ("coco_panoptic",)
"""Panoptic sources whose semantic mIoU X-SAM takes from a dense semantic pass over the same images
(``coco_panoptic_semantic_genseg``), scored against semantic labels derived from the panoptic annotations;
ADE20K has its own semantic set."""
NOT_SCORED = {
    "lvis": "LVIS needs its federated AP (per-image negative / not-exhaustive categories), not implemented; "
    "X-SAM reports no LVIS number",
    "llava_pretrain": "chat: X-SAM scores chat with VLMEvalKit",
    "llava_instruct": "chat: X-SAM scores chat with VLMEvalKit",
}


@dataclass
class EvalSet:
    """One built ``<source>/<split>`` and what scoring it needs besides its shards."""

    name: str
    source: str
    split: str
    task: str
    kind: str
    folder: str  # the split's shard folder (path or URI)
    shards: list[str]  # shard file names, in manifest order
    num_samples: int
    entries: dict[str, shard_store.ShardEntry] = field(default_factory=dict)  # file -> its manifest entry
    categories: dict[int, bool] | None = None  # category id -> isthing; None: the set has no vocabulary
    category_names: dict[int, str] = field(default_factory=dict)
    crowd: dict[str, tuple[str, list[tuple[int, int]]]] = field(
        default_factory=dict
    )  # key -> (png, [(id, cat)])
    annotations: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # key -> byte spans
    annotation_file: str | None = None
    data_root: str = ""
    source_options: dict = field(default_factory=dict)
    """The manifest's ``options.extra`` (the build's source options; the names the set's phrases use)."""

    def shard_path(self, name: str) -> str:
        return join(self.folder, name)


# ------------------------------------------------------------------------------------------ shards
def read_shard(evs: EvalSet, shard: str) -> Iterator[tuple[Sample, bytes | None]]:
    """``(Sample, image bytes or None)`` of one shard of ``evs`` in key order, every sample verified against
    what the build recorded; the one place evaluation reads shards."""
    entry = evs.entries.get(shard)
    if entry is None:
        raise EvaluationError(f"{evs.shard_path(shard)}: not a shard of {evs.name}'s manifest")
    try:
        yield from shard_store.iter_verified_samples(evs.folder, entry)
    except shard_store.ShardStoreError as e:
        raise EvaluationError(f"{e}; rebuild {evs.name} or restore its shards") from None
    except (SampleError, ValueError, KeyError, OSError) as e:
        raise EvaluationError(f"{evs.shard_path(shard)}: cannot read the shard: {e}") from None


def iter_shard_samples(evs: EvalSet, shard: str) -> Iterator[Sample]:
    """The Samples of one shard (image bytes dropped), verified as :func:`read_shard` reads them."""
    for sample, _ in read_shard(evs, shard):
        yield sample


def built_sets(shards: str) -> list[str]:
    """Every ``<source>/<split>`` with a manifest under ``shards``."""
    return [m.name for m in shard_store.list_manifests(shards)]


def open_set(shards: str, data_root: str, name: str) -> EvalSet:
    """The :class:`EvalSet` of ``name`` (``<source>/<split>``); an error when it was not built, has no metric,
    or needs original files that are missing or changed."""
    source, sep, split = name.partition("/")
    if not sep or not split or "/" in split:
        raise EvaluationError(f"--sets: {name!r} is not <source>/<split>")
    try:
        manifest = shard_store.Manifest.read(shards, source, split)
    except shard_store.MissingManifestError:
        built = ", ".join(built_sets(shards)) or "nothing"
        raise EvaluationError(f"--sets: {name} was not built under {shards} (built: {built})") from None
    except shard_store.ShardStoreError as e:
        raise EvaluationError(f"--sets: {name}: {e}") from None
    try:
        shard_store.check_counts(manifest)
    except shard_store.ShardStoreError as e:
        raise EvaluationError(f"--sets: {name}: {e}") from None
    if source not in SOURCE_KINDS:
        reason = NOT_SCORED.get(source, "no metric is defined for this source")
        raise EvaluationError(f"--sets: {name} cannot be scored: {reason}")
    evs = EvalSet(
        name=name,
        source=source,
        split=split,
        task=manifest.task,
        kind=SOURCE_KINDS[source],
        folder=shard_store.split_dir(shards, source, split),
        shards=[s.file for s in manifest.shards],
        num_samples=manifest.samples,
        entries={s.file: s for s in manifest.shards},
        data_root=data_root,
        source_options=dict((manifest.options or {}).get("extra") or {}),
    )
    if any(s.index_sha256 is None for s in manifest.shards):
        log.warning("%s: built before member indexes: its samples are not digest-checked; rebuild it", name)
    _add_originals(evs, manifest.inputs)
    return evs


# ------------------------------------------------------------------------------------------ original files
def _add_originals(evs: EvalSet, inputs: list[dict]) -> None:
    if evs.source.startswith("ade20k_"):
        table = _ade_table(evs.source, evs.source_options)
        evs.categories = {int(c): bool(v) for c, v in table["isthing"].items()}
        evs.category_names = {int(c): n for c, n in table["category_names"].items()}
        return
    if evs.source not in ("coco_panoptic", "coco_instance", "coco_vgd"):
        return
    files = _locate(evs)
    role = (
        "annotations"
        if evs.source != "coco_vgd"
        else next((r for r in ("instances", "categories") if r in files.inputs), None)
    )
    if role is None:  # VGD from X-SAM's released prompts without the instances file: no vocabulary
        return
    path = files.inputs[role]
    _check_hash(evs, inputs, role, path)
    evs.annotation_file = path
    if evs.source == "coco_vgd":
        cats = read_categories(path)
        evs.categories = {int(c["id"]): True for c in cats}
        evs.category_names = {int(c["id"]): str(c.get("name")) for c in cats}
        return
    _index_coco(evs, path, files.dirs.get("panoptic"))


def _ade_table(source: str, extra: dict) -> dict:
    """The set's ADE table with the names its build used (:mod:`pipelines.sources.vocabulary`)."""
    return category_table(SOURCES[source].vocabulary(), naming(source, extra))


def _locate(evs: EvalSet):
    if not evs.data_root:
        raise EvaluationError(f"{evs.name}: --data-root is needed (the original annotation file is read)")
    try:
        return SOURCES[evs.source].locate(evs.data_root, evs.split)
    except SourceNotFound as e:
        raise EvaluationError(
            f"{evs.name}: original annotation files not found under --data-root: {e}"
        ) from None


def _check_hash(evs: EvalSet, inputs: list[dict], role: str, path: str) -> None:
    recorded = {i.get("role"): i.get("sha256") for i in inputs}
    want = recorded.get(role)
    if want is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise EvaluationError(
            f"{path}: not the file {evs.name} was built from (sha256 {h.hexdigest()[:12]}…, manifest {want[:12]}…)"
        )


def _index_coco(evs: EvalSet, path: str, panoptic_dir: str | None) -> None:
    """Categories, plus per image key: crowd segments (panoptic) or annotation byte spans (instances)."""
    panoptic = evs.source == "coco_panoptic"
    fields = (
        (lambda a: {"file_name": a.get("file_name"), "segments_info": a.get("segments_info") or []})
        if panoptic
        else None
    )
    for item in iter_coco_records(
        path,
        evs.name,
        lambda img: {"id": img.get("id")},
        fields,
        categories=lambda c: {"cats": c},
        raw=not panoptic,
    ):
        if not isinstance(item, dict):
            if hasattr(item, "data") and "cats" in item.data:
                cats = item.data["cats"]
                evs.categories = {int(c["id"]): bool(c.get("isthing", 1)) for c in cats}
                evs.category_names = {int(c["id"]): str(c.get("name")) for c in cats}
            continue
        if panoptic:
            anns = item["anns"]
            crowd = [
                (s["id"], s["category_id"]) for a in anns for s in a["segments_info"] if s.get("iscrowd")
            ]
            if crowd and len(anns) == 1:
                evs.crowd[item["key"]] = (relpath(panoptic_dir, anns[0]["file_name"]), crowd)
        else:
            raw: RawAnns = item["anns"]
            evs.annotations[item["key"]] = list(zip(raw.offsets, raw.lengths, strict=True))


def crowd_regions(evs: EvalSet, key: str, hw: tuple[int, int]) -> dict[int, dict]:
    """COCO panoptic: ``{category_id: RLE}`` of an image's crowd segments (same-category ones merged)."""
    if key not in evs.crowd:
        return {}
    png_rel, segments = evs.crowd[key]
    png = os.path.join(evs.data_root, png_rel)
    try:
        with open(png, "rb") as f:
            id_map = mask_ops.read_panoptic_png(f.read())
    except OSError as e:
        raise EvaluationError(f"{png}: cannot read the panoptic PNG of {key}: {e}") from None
    if id_map.shape != tuple(hw):
        raise EvaluationError(f"{png}: {id_map.shape[0]}x{id_map.shape[1]}, but {key} is {hw[0]}x{hw[1]}")
    rles = mask_ops.id_map_to_rles(id_map, [s for s, _ in segments])
    by_cat: dict[int, list[dict]] = {}
    for (_, cat), rle in zip(segments, rles, strict=True):
        by_cat.setdefault(int(cat), []).append(rle)
    return {c: mask_ops.merge_rles(r) for c, r in by_cat.items()}


def coco_instances(evs: EvalSet, key: str, hw: tuple[int, int], paper: bool = False) -> list[ApTruth]:
    """COCO instances: every annotation of an image (crowd included) with its own ``area`` (COCOeval on the
    original file); ``paper``: X-SAM's ground truth, crowd annotations removed and each area the polygon area
    its ``convert_to_coco_dict`` computes (:func:`pipelines.masks.polygon_area`), invalid polygon parts left
    out and an instance without a valid part dropped (docs/evaluation.md)."""
    spans = evs.annotations.get(key, [])
    out = []
    for (off, _), text in zip(spans, read_spans(evs.annotation_file, spans), strict=True):
        ann = json.loads(text)
        cat = ann.get("category_id")
        if evs.categories is not None and cat not in evs.categories:
            continue  # COCOeval evaluates only the file's categories
        segm, crowd = ann.get("segmentation"), int(bool(ann.get("iscrowd")))
        if paper and crowd:
            continue
        if paper and isinstance(segm, list):
            segm = [p for p in segm if isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6]
            if not segm:
                continue
        try:
            rle = mask_ops.segmentation_to_rle(segm, *hw)
        except MaskFormatError as e:
            raise EvaluationError(f"{evs.annotation_file}: annotation at byte {off} ({key}): {e}") from None
        if paper:
            area = mask_ops.polygon_area(segm) if isinstance(segm, list) else float(mask_ops.area(rle))
        else:
            area = ann.get("area")
        out.append(ApTruth(rle, int(cat), crowd, float(area) if area is not None else None))
    return out


def prompt_vocabulary(evs: EvalSet) -> list[tuple[int, str]]:
    """X-SAM's evaluation prompt for a genseg/ovseg set: every category of the set in id order, as
    ``(category_id, phrase)``, the phrases named as the set's build named them
    (:func:`pipelines.sources.vocabulary.category_phrases`: by default X-SAM's eval names, COCO 'wall', 'sky',
    ADE20K's synonym lists). Inference lists these, so a predicted phrase index maps back to its
    ``category_id``."""
    if evs.categories is None:
        raise EvaluationError(f"{evs.name}: the set has no category vocabulary")
    ids = sorted(evs.categories)
    try:
        phrases = category_phrases(evs.source, evs.source_options, ids, evs.category_names)
    except (KeyError, ValueError) as e:
        raise EvaluationError(f"{evs.name}: no phrase for category {e}") from None
    return [(c, phrases[c]) for c in ids]


# ------------------------------------------------------------------------------------------ per sample
def image_hw(sample: Sample) -> tuple[int, int]:
    if sample.image is None:
        raise EvaluationError(f"{sample.key}: a sample without an image cannot be scored")
    return sample.image.height, sample.image.width


def seg_turns(sample: Sample) -> int:
    """How many ``<SEG>`` the reference answers hold (refseg/reaseg: one per assistant turn)."""
    return sum(t.text.count(SEG) for t in sample.conversation if t.role == "assistant")


def panoptic_truth(evs: EvalSet, sample: Sample) -> PanopticTruth:
    hw = image_hw(sample)
    segments = [(m.rle, int(m.category_id)) for m in sample.masks if not m.iscrowd]
    crowd = crowd_regions(evs, sample.key, hw) if evs.source == "coco_panoptic" else {}
    return PanopticTruth(segments=segments, crowd=crowd, hw=hw)


def semantic_truth(evs: EvalSet, truth: PanopticTruth) -> list[tuple[dict, int]]:
    """Semantic ground truth derived from a panoptic one as X-SAM's ``panoptic_semseg_val2017`` labels it
    (Mask2Former's converter): every segment, crowd included, labelled with its category; pixels of no
    segment ignored. ``(RLE, category_id)`` pairs, which never overlap."""
    return [*truth.segments, *((rle, int(c)) for c, rle in truth.crowd.items())]


def instance_truth(evs: EvalSet, sample: Sample, protocol: str = "paper") -> list[ApTruth]:
    """The AP ground truth of a sample under ``protocol`` (docs/evaluation.md)."""
    if evs.source == "coco_instance":
        return coco_instances(evs, sample.key, image_hw(sample), paper=protocol == "paper")
    # VGD under paper: the build's area, X-SAM's polygon area (its COCOeval area ranges); else the mask's
    paper_area = protocol == "paper" and evs.kind == "vgd"
    return [
        ApTruth(m.rle, int(m.category_id), int(m.iscrowd), m.area if paper_area else None)
        for m in sample.masks
    ]


def turn_targets(sample: Sample) -> list[dict | None]:
    """Per ``<SEG>`` turn, the union of its target masks (``None``: no target)."""
    by_label: dict[int, list[dict]] = {}
    for m in sample.masks:
        by_label.setdefault(m.label, []).append(m.rle)
    return [mask_ops.merge_rles(by_label[t]) if t in by_label else None for t in range(seg_turns(sample))]
