"""Grounded conversation generation (gcgseg): ``grandf_gcg``, ``psg_gcg``, ``refcocog_gcg``, ``flickr_gcg``.

Formats: source_formats.md §4; conversation: xsam_recipe.md §1.3, §2.6, §10. Layout
(docs/contracts.md#data-root)::

    img_gcgseg/grand_f/annotations/train/{GranDf_HA_GCG_train, OpenPsgGCG_{train,val},
                                          RefCOCOg_GCG_{train,val}, flickr_mergedGT_GCG_{train,val}}.json
    img_gcgseg/grand_f/annotations/val_test/{val,test}_gcg_coco_{mask,caption}_gt.json
    img_gcgseg/grand_f/images/{GranDf_HA_images/{train,val_test}, coco2014/train2014, coco2017[/train2017],
                               flickr30k/images/train}

Splits: every source has ``train``; ``psg_gcg``, ``refcocog_gcg`` and ``flickr_gcg`` also ``val`` (GLaMM's
``*_val.json`` files, same formats). The GranD-f evaluation sets are ``grandf_gcg`` splits ``val`` and
``test`` (``{val,test}_gcg_coco_{mask,caption}_gt.json``, images in ``GranDf_HA_images/val_test``): they are
GranD-f's own benchmark, and docs/contracts.md#source-names-and-tasks names no separate source for them.

Spans. A caption is cleaned as X-SAM does (surrounding ``"`` stripped, then whitespace, then lower-cased) and
every span moves with the characters it covered: raw offsets map through :class:`Caption`. A kept span's
text always equals its phrase; a phrase that cannot be placed is dropped with a reason (``ctx.drop``), never
tagged at a guessed place. Overlaps follow X-SAM's ``_remove_overlapping_intervals``: spans sorted by start,
a span kept only if it starts after the end of the last kept one; each loser is a counted
``overlapping_span`` drop. Phrases whose mask is unusable are dropped *before* that pass, so they cannot push
out a good phrase. Overlap drops are the recipe at work, not bad data: they do not stop a ``--strict`` build.

Answer (recipe §2.6): ``<p>`` and ``</p> `` around each kept span (right to left; the space after ``</p>`` is
X-SAM's), ``.strip()``, a space and one ``<SEG>`` suffix. The paper (``AAAI26_Archive``) does not force a
trailing period; the source option ``gcg_force_period=true`` adds one as X-SAM main does. Captions
under ``gcg_min_words`` (default 3, GLaMM's rule) words are skipped on ``flickr_gcg`` only, as the paper's
code checks Flickr only; ``gcg_min_words_sources=all`` applies it to all four (this project's earlier
behaviour). ``psg_gcg``'s train split (COCO train2017 images) leaves out the RefCOCO/+/g eval images, as the
COCO sources. Mask k is the union of phrase k's masks, label k = its span's order in the answer.

Val/test samples keep every ground-truth mask: a label that cannot be placed in the caption leaves its mask
with label -1 (the benchmark's targets stay complete); labels pair with mask annotations by position, as
GLaMM's evaluator assumes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from pipelines import masks, templates
from pipelines.images import image_size
from pipelines.masks import MaskFormatError
from pipelines.schema import IMAGE, P_CLOSE, P_OPEN, REGION, SEG, ImageRef, MaskTarget, Sample, Turn
from pipelines.sources.base import (
    BuildOptions,
    ConvertContext,
    Shared,
    Skip,
    SkipRecord,
    SourceFiles,
    SourceNotFound,
    key_id,
    relpath,
)
from pipelines.sources.readers.coco_index import image_sort_id, iter_coco_records
from pipelines.sources.readers.jsonstream import iter_items

GCG_ROOT = "img_gcgseg/grand_f"
ANN_TRAIN = f"{GCG_ROOT}/annotations/train"
ANN_VAL_TEST = f"{GCG_ROOT}/annotations/val_test"
IMAGES = f"{GCG_ROOT}/images"
PROBE_FILES = 16  # records whose image locate() looks for in each candidate folder
_SPECIAL = tuple(t.lower() for t in (P_OPEN, P_CLOSE, SEG, IMAGE, REGION))


# ------------------------------------------------------------------------------------ captions, spans
@dataclass(frozen=True)
class Caption:
    """A cleaned caption and the map from raw character offsets to clean ones.

    X-SAM: ``raw.strip('"').strip().lower()``. ``start``/``stop`` bound the kept part of ``raw``; ``cum`` is
    set only when lower-casing changed the length ('İ' -> 'i̇'): ``cum[j]`` = clean offset of kept char j.
    """

    raw: str
    text: str
    start: int
    stop: int
    cum: tuple[int, ...] | None = None

    @classmethod
    def clean(cls, raw: str) -> Caption:
        a = len(raw) - len(raw.lstrip('"'))
        b = max(a, len(raw.rstrip('"')))
        inner = raw[a:b]
        a2 = a + len(inner) - len(inner.lstrip())
        b2 = max(a2, a + len(inner.rstrip()))
        kept = raw[a2:b2]
        low = kept.lower()
        if len(low) == len(kept):
            return cls(raw, low, a2, b2)
        cum = [0]
        for c in kept:
            cum.append(cum[-1] + len(c.lower()))
        return cls(raw, "".join(c.lower() for c in kept), a2, b2, tuple(cum))

    def to_clean(self, i: int) -> int:
        """Clean offset of raw offset ``i``; offsets in stripped parts clamp to the caption's ends."""
        j = min(max(i - self.start, 0), self.stop - self.start)
        return self.cum[j] if self.cum else j


def clean_phrase(phrase: str) -> str:
    """Phrases get the caption's cleaning (X-SAM ``phrase.strip('"').strip().lower()``)."""
    return phrase.strip('"').strip().lower()


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    """Shrink ``[s, e)`` past surrounding whitespace, so a span's text is never ' a man'."""
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def find_occurrences(text: str, phrase: str) -> list[tuple[int, int]]:
    """Non-overlapping ``[s, e)`` of ``phrase`` in ``text``, whole-word matches preferred.

    X-SAM uses ``caption.find``, which tags 'the man' inside 'the manager'; whole-word matches are taken when
    there are any, plain substring matches otherwise (so X-SAM's choice remains the fallback).
    """
    if not phrase:
        return []
    words = [m.span() for m in re.finditer(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text)]
    if words:
        return words
    out, i = [], text.find(phrase)
    while i != -1:
        out.append((i, i + len(phrase)))
        i = text.find(phrase, i + len(phrase))
    return out


@dataclass
class Grounding:
    """One phrase of a record as read from the file, before placement.

    ``phrase`` None: the span's text is the phrase (Flickr). ``span`` None: find the phrase in the caption
    (RefCOCOg-GCG, val/test labels). ``segm``: anything :func:`pipelines.masks.segmentation_to_rle` reads.
    """

    phrase: str | None
    span: Any
    segm: Any
    ann_id: Any = None


@dataclass
class Placed:
    index: int  # position in the record's grounding list (skip keys, meta)
    phrase: str
    start: int
    end: int
    rle: dict | None = None
    area: int = 0
    how: str = "shifted"  # shifted | unshifted | found


def _int_pair(span: Any) -> tuple[int, int]:
    if isinstance(span, list | tuple) and len(span) == 1 and isinstance(span[0], list | tuple):
        span = span[0]  # a one-span list ([[s, e]], Flickr's shape): the text check still guards it

    def integral(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer()

    if isinstance(span, list | tuple) and len(span) == 2 and all(integral(v) for v in span):
        return int(span[0]), int(span[1])
    raise SkipRecord("bad_span", f"span {span!r} is not a [start, end] pair of integers")


def place(cap: Caption, g: Grounding, index: int, seen: dict[str, int]) -> Placed:
    """Where grounding ``g`` sits in the clean caption, or :class:`SkipRecord` saying why it cannot be placed.

    ``seen`` counts earlier find-placed phrases, so the k-th identical phrase takes the k-th occurrence.
    """
    text = cap.text
    phrase = None
    if g.phrase is not None:
        if not isinstance(g.phrase, str):
            raise SkipRecord("bad_phrase", f"phrase {g.phrase!r} is not a string")
        phrase = clean_phrase(g.phrase)
        if not phrase:
            raise SkipRecord("empty_phrase", f"phrase {g.phrase!r} is empty after cleaning")
        if phrase not in text:
            raise SkipRecord("phrase_not_in_caption", f"{phrase!r} not in {text!r}")
    if g.span is None:  # find it (phrase is set: the readers guarantee one of the two)
        occ = find_occurrences(text, phrase)
        k = seen.get(phrase, 0)
        seen[phrase] = k + 1
        s, e = occ[min(k, len(occ) - 1)]  # past the last occurrence: a repeat, dropped as an overlap
        return Placed(index, phrase, s, e, how="found")
    s, e = _int_pair(g.span)
    n = len(cap.raw)
    if not (0 <= s <= n and 0 <= e <= n):
        raise SkipRecord("span_outside_caption", f"span [{s}, {e}) outside a caption of {n} characters")
    if s >= e:
        raise SkipRecord("empty_span", f"span [{s}, {e}) is empty")
    cs, ce = _trim(text, cap.to_clean(s), cap.to_clean(e))
    if phrase is None:
        if cs >= ce:
            raise SkipRecord("empty_span", f"span [{s}, {e}) covers no caption text")
        return Placed(index, text[cs:ce], cs, ce)
    if text[cs:ce] == phrase:
        return Placed(index, phrase, cs, ce)
    # Offsets may count from the already-stripped caption (recipe §9: X-SAM strips before using them);
    # accept that reading only where it gives exactly the phrase.
    us, ue = _trim(text, min(s, len(text)), min(e, len(text)))
    if text[us:ue] == phrase:
        return Placed(index, phrase, us, ue, how="unshifted")
    raise SkipRecord("span_text_mismatch", f"span [{s}, {e}) reads {text[cs:ce]!r}, phrase is {phrase!r}")


def remove_overlaps(placed: list[Placed]) -> tuple[list[Placed], list[Placed]]:
    """X-SAM's greedy rule: sort by start (stable), keep a span only if it starts after the last kept end."""
    kept: list[Placed] = []
    dropped: list[Placed] = []
    for p in sorted(placed, key=lambda p: p.start):
        if kept and p.start <= kept[-1].end:
            dropped.append(p)
        else:
            kept.append(p)
    return kept, dropped


def tag_caption(text: str, spans: list[tuple[int, int]], force_period: bool = False) -> str:
    """``<p>…</p> `` around each span (right to left, X-SAM's ``tag_caption``), then ``.strip()``.

    ``force_period``: X-SAM main's trailing '.', added before tagging; the paper's archive code adds none.
    """
    if force_period and not text.endswith("."):
        text += "."
    for s, e in sorted(spans, reverse=True):
        text = f"{text[:s]}{P_OPEN}{text[s:e]}{P_CLOSE} {text[e:]}"
    return text.strip()


def gcg_conversation(rng, tagged: str, image_token: str) -> list[Turn]:
    question = templates.with_image(templates.pick(rng, templates.GCG_QUESTIONS), image_token)
    suffix = templates.pick(rng, templates.GCG_ANSWER_SUFFIXES)
    return [Turn("user", question), Turn("assistant", f"{tagged} {suffix}")]


# ------------------------------------------------------------------------------------ records -> Samples
def _image_hw(ctx: ConvertContext, rel: str, height: Any, width: Any) -> tuple[int, int]:
    """The annotation's size, or the image header's when the record has none (X-SAM opens the image too)."""
    if height is None or width is None:
        data = ctx.read_bytes(rel, missing_reason="missing_image", max_bytes=ctx.options.max_image_bytes)
        try:
            return image_size(data)
        except Exception as e:  # any undecodable header is the same bad input
            detail = f"{rel}: no readable image header ({type(e).__name__}: {e})"
            raise SkipRecord("corrupt_image", detail) from None
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise SkipRecord("bad_image_size", f"height/width {height!r}/{width!r} are not integers") from None
    if h <= 0 or w <= 0:
        raise SkipRecord("bad_image_size", f"height/width {h}/{w}")
    return h, w


def _mask(g: Grounding, h: int, w: int) -> dict:
    segm = g.segm
    if segm is None or segm == [] or segm == {}:
        raise SkipRecord("no_mask", "the phrase has no mask")
    try:
        rle = masks.segmentation_to_rle(segm, h, w)
    except MaskFormatError:
        raise  # already a SkipRecord with its reason
    except (TypeError, ValueError, KeyError) as e:  # malformed counts / sizes inside pycocotools
        raise SkipRecord("bad_segmentation", f"{type(e).__name__}: {e}") from None
    return rle


@dataclass
class GcgInput:
    """What a reader hands to :func:`gcg_sample`: one caption, its groundings, its image."""

    caption: Any
    groundings: list[Grounding]
    file_name: Any
    height: Any = None
    width: Any = None
    meta: dict = field(default_factory=dict)


def _checked_caption(inp: GcgInput, min_words: int) -> Caption:
    """The cleaned caption, or a record skip: missing, too short, holding a special token, no grounding."""
    if not isinstance(inp.caption, str) or not inp.caption.strip('"').strip():
        raise SkipRecord("missing_caption", f"caption {inp.caption!r}")
    cap = Caption.clean(inp.caption)
    if len(cap.text.split()) < min_words:
        raise SkipRecord("short_caption", f"{cap.text!r} has fewer than {min_words} words")
    if any(t in cap.text for t in _SPECIAL):
        raise SkipRecord("special_token_in_caption", f"{cap.text!r}")
    if not inp.groundings:
        raise SkipRecord("empty_groundings", "the caption has no grounded phrase")
    if not isinstance(inp.file_name, str) or not inp.file_name:
        raise SkipRecord("missing_file_name", f"file name {inp.file_name!r}")
    return cap


def _place_all(
    key: str, cap: Caption, inp: GcgInput, hw: tuple[int, int], ctx: ConvertContext, keep_all_masks: bool
) -> tuple[list[Placed], list[tuple[dict, int]]]:
    """Each grounding placed in the caption with its checked mask; a phrase that cannot be placed or whose
    mask is unusable is a dropped annotation. Returns (placed, untagged (rle, area) kept for val/test)."""
    placed: list[Placed] = []
    untagged: list[tuple[dict, int]] = []
    seen: dict[str, int] = {}
    for i, g in enumerate(inp.groundings):
        akey = f"{key}/phrase_{i}"
        try:
            p = place(cap, g, i, seen)
        except SkipRecord as d:
            ctx.drop(akey, d.reason, d.detail)
            p = None
        if p is None and not keep_all_masks:
            continue
        try:
            rle = _mask(g, *hw)
            area = masks.area(rle)
            if area == 0:
                raise SkipRecord("empty_mask", "the mask covers no pixel")
        except SkipRecord as d:
            ctx.drop(akey, d.reason, f"{p.phrase!r}: {d.detail}" if p else d.detail)
            continue
        if p is None:
            untagged.append((rle, area))  # val/test: the ground-truth mask stays, untagged
            continue
        p.rle, p.area = rle, area
        placed.append(p)
    return placed, untagged


def _keep_apart(key: str, placed: list[Placed], ctx: ConvertContext, untagged: list | None) -> list[Placed]:
    """:func:`remove_overlaps`, each loser a counted drop (its mask joins ``untagged`` when that is kept)."""
    kept, overlapping = remove_overlaps(placed)
    for p in overlapping:
        # Trimming overlaps is the recipe working as designed, not bad data: counted in the manifest's
        # ``dropped`` and listed in skipped.jsonl like any drop; a filter of the error policy, so never an
        # error under --strict.
        ctx.drop(
            f"{key}/phrase_{p.index}",
            "overlapping_span",
            f"{p.phrase!r} [{p.start}, {p.end}) overlaps a kept span",
        )
        if untagged is not None:
            untagged.append((p.rle, p.area))
    return kept


def gcg_sample(
    source: str, record: dict, ctx: ConvertContext, inp: GcgInput, keep_all_masks: bool = False
) -> Sample:
    """Clean, place, check masks, remove overlaps, render. ``keep_all_masks`` (val/test): masks of phrases
    that cannot be tagged stay, with label -1."""
    key = record["key"]
    opts = ctx.options.extra
    min_words = opts.gcg_min_words if source == "flickr_gcg" or opts.gcg_min_words_sources == "all" else 0
    cap = _checked_caption(inp, min_words)
    rel = relpath(ctx.files.dirs["images"], inp.file_name)
    h, w = _image_hw(ctx, rel, inp.height, inp.width)
    placed, untagged = _place_all(key, cap, inp, (h, w), ctx, keep_all_masks)
    kept = _keep_apart(key, placed, ctx, untagged if keep_all_masks else None)
    if not kept:
        n = len(inp.groundings)
        raise SkipRecord("no_grounded_phrase", f"none of {n} phrases could be placed with a mask")

    rng = ctx.rng(key)
    tagged = tag_caption(cap.text, [(p.start, p.end) for p in kept], opts.gcg_force_period)
    labelled = [(k, p.rle, p.area) for k, p in enumerate(kept)] + [(-1, rle, area) for rle, area in untagged]
    targets = [MaskTarget(rle=r, label=k, bbox=masks.bbox(r), area=float(a)) for k, r, a in labelled]
    how = [p.how for p in kept]
    meta = {
        **inp.meta,
        "file_name": inp.file_name,
        "caption": cap.text,
        "spans": [[p.start, p.end] for p in kept],
        "grounding_index": [p.index for p in kept],
        "num_groundings": len(inp.groundings),
    }
    if "unshifted" in how:
        meta["unshifted_spans"] = how.count("unshifted")
    return Sample(
        key=key,
        source=source,
        task="gcgseg",
        split=ctx.split,
        image=ImageRef(path=rel, width=w, height=h),
        conversation=gcg_conversation(rng, tagged, ctx.options.image_token),
        phrases=[p.phrase for p in kept],
        masks=targets,
        meta=meta,
    )


# ------------------------------------------------------------------------------------ locating files
@dataclass(frozen=True)
class Layout:
    annotations: str  # relative to the data root
    image_dirs: tuple[str, ...]  # candidate image folders, probed in this order
    captions: str | None = None  # val/test caption GT


def _first_file_names(path: str, kind: str, n: int) -> list[str]:
    """File names of the first ``n`` records (a short streamed read, whatever the file's size)."""
    items = iter_items(path, "images.item" if kind in ("coco", "val") else "item")
    pick = {
        "list": lambda it: it.get("file_name"),
        "refcocog": lambda it: _unwrap(it).get("img_file_name"),
        "coco": lambda it: it.get("file_name"),
        "val": lambda it: _val_file_name(it.get("id")),  # val/test: file = id + ".jpg"
    }[kind]
    try:
        names = (pick(it) for it in items if isinstance(it, dict))
        return [f for f in islice(names, n) if isinstance(f, str) and f]
    except ValueError:  # malformed JSON: index() reports it with the position
        return []
    finally:
        items.close()  # stop reading (and close the file) after the first n records


def locate_gcg(name: str, data_root: str, layout: Layout, kind: str, overrides: dict | None) -> SourceFiles:
    """Find the annotation file(s) and pick the image folder that holds the first records' images.

    The pick and the hit counts land in the manifest (``dirs.images`` and ``info``): PSG images sit under
    ``images/coco2017/<file_name>`` in X-SAM's layout and under a ``train2017/`` sub-folder in GLaMM's.
    """
    overrides = overrides or {}
    ann = overrides.get("annotations") or os.path.join(data_root, layout.annotations)
    inputs = {"annotations": ann}
    if layout.captions:
        inputs["captions"] = overrides.get("captions") or os.path.join(data_root, layout.captions)
    candidates = (overrides["images"],) if overrides.get("images") else layout.image_dirs
    looked = [*inputs.values(), *(os.path.join(data_root, d) for d in candidates)]
    present = [d for d in candidates if os.path.isdir(os.path.join(data_root, d))]
    if not all(os.path.isfile(p) for p in inputs.values()) or not present:
        raise SourceNotFound(name, looked)
    names = _first_file_names(ann, kind, PROBE_FILES)
    hits = {}
    for d in present:
        n = 0
        for f in names:
            try:
                n += os.path.isfile(os.path.join(data_root, relpath(d, f)))
            except SkipRecord:
                pass
        hits[d] = n
    chosen = max(present, key=lambda d: (hits[d], -present.index(d)))  # most hits; ties: first candidate
    info = {
        "image_dir": chosen,
        "image_dir_candidates": list(candidates),
        "image_dir_probe": {"files": len(names), "hits": hits},
    }
    return SourceFiles(data_root=data_root, inputs=inputs, dirs={"images": chosen}, info=info)


# ------------------------------------------------------------------------------------ readers
def _unwrap(item: Any) -> dict:
    """RefCOCOg-GCG wraps each record in a single-key dict; accept the bare record too."""
    if isinstance(item, dict) and len(item) == 1:
        inner = next(iter(item.values()))
        if isinstance(inner, dict):
            return inner
    return item if isinstance(item, dict) else {}


def _coco_id(image_id: Any, file_name: Any) -> int | None:
    """A COCO image id from an int ``image_id`` or a ``<digits>.jpg`` file name, else None."""
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return image_id
    stem = os.path.splitext(os.path.basename(file_name))[0] if isinstance(file_name, str) else ""
    return int(stem) if stem.isdigit() else None


def _val_file_name(image_id: Any) -> str | None:
    return f"{image_id}.jpg" if isinstance(image_id, str | int) and not isinstance(image_id, bool) else None


def _list_key(prefix: str, i: int, file_name: Any) -> str:
    """List-format records are keyed by position (several captions may share an image) plus the file stem."""
    stem = os.path.splitext(os.path.basename(file_name))[0] if isinstance(file_name, str) else ""
    return f"{prefix}/{i:09d}_{key_id(stem)}" if stem else f"{prefix}/{i:09d}"


class _GcgBase:
    task = "gcgseg"
    path_roles = ("annotations", "captions", "images")
    version = 1
    kind = "list"
    files: dict[str, str] = {}  # split -> annotation file name under annotations/train
    image_dirs: tuple[str, ...] = ()

    def layout(self, split: str) -> Layout:
        return Layout(f"{ANN_TRAIN}/{self.files[split]}", self.image_dirs)

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        if split not in self.splits:
            raise SourceNotFound(self.name, [f"{self.name} has no split {split!r}"])
        layout = self.layout(split)
        return locate_gcg(self.name, data_root, layout, "val" if layout.captions else self.kind, overrides)


class GrandfGcg(_GcgBase):
    """GranD-f human-annotated GCG (train) and the GranD-f GCG benchmark (val, test)."""

    name = "grandf_gcg"
    splits = ("train", "val", "test")
    files = {"train": "GranDf_HA_GCG_train.json"}
    image_dirs = (f"{IMAGES}/GranDf_HA_images/train",)

    def layout(self, split: str) -> Layout:
        if split == "train":
            return super().layout(split)
        return Layout(
            f"{ANN_VAL_TEST}/{split}_gcg_coco_mask_gt.json",
            (f"{IMAGES}/GranDf_HA_images/val_test",),
            captions=f"{ANN_VAL_TEST}/{split}_gcg_coco_caption_gt.json",
        )

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        if "captions" in files.inputs:
            yield from index_val(files, f"{self.name}/{split}")
        else:
            yield from index_grandf(files.inputs["annotations"], f"{self.name}/{split}")

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        if "labels" in record:
            return gcg_sample(self.name, record, ctx, val_input(record), keep_all_masks=True)
        return gcg_sample(self.name, record, ctx, grandf_input(record))


class PsgGcg(_GcgBase):
    """OpenPSG GCG: GranD-f's schema over COCO 2017 images."""

    name = "psg_gcg"
    splits = ("train", "val")
    files = {"train": "OpenPsgGCG_train.json", "val": "OpenPsgGCG_val.json"}
    image_dirs = (f"{IMAGES}/coco2017", f"{IMAGES}/coco2017/train2017")  # X-SAM's layout, then GLaMM's
    eval_image_guard_splits = ("train",)  # COCO train2017 images: RefCOCO/+/g eval images left out

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        for rec in index_grandf(files.inputs["annotations"], f"{self.name}/{split}"):
            if isinstance(rec, dict):  # the eval-leakage guard reads record["image"]["id"] (COCO ids)
                rec["image"]["id"] = _coco_id(rec["image"].get("image_id"), rec["image"].get("file_name"))
            yield rec

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        return gcg_sample(self.name, record, ctx, grandf_input(record))


class RefcocogGcg(_GcgBase):
    """RefCOCOg GCG: single-key dicts, refs ``{sentence, segmentation}`` found in the caption."""

    name = "refcocog_gcg"
    splits = ("train", "val")
    kind = "refcocog"
    files = {"train": "RefCOCOg_GCG_train.json", "val": "RefCOCOg_GCG_val.json"}
    image_dirs = (f"{IMAGES}/coco2014/train2014",)

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        prefix = f"{self.name}/{split}"
        for i, item in enumerate(iter_items(files.inputs["annotations"], "item")):
            rec = _unwrap(item)
            if not rec:
                yield Skip(f"{prefix}/{i:09d}", "bad_record", f"list item {i} is not a (single-key) dict")
                continue
            yield {
                "key": _list_key(prefix, i, rec.get("img_file_name")),
                "image": {k: rec.get(k) for k in ("image_id", "img_file_name", "height", "width")},
                "caption": rec.get("caption"),
                "refs": rec.get("refs"),
            }

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        refs = record["refs"]
        if refs is not None and not isinstance(refs, list):
            raise SkipRecord("bad_groundings", f"refs is a {type(refs).__name__}, not a list")
        groundings = [
            Grounding(r.get("sentence"), None, r.get("segmentation"))
            if isinstance(r, dict)
            else Grounding(r, None, None)  # not a ref dict: placed if it is a phrase, then dropped as no_mask
            for r in refs or []
        ]
        img = record["image"]
        return gcg_sample(
            self.name,
            record,
            ctx,
            GcgInput(
                record["caption"],
                groundings,
                img["img_file_name"],
                img["height"],
                img["width"],
                meta={"image_id": img["image_id"]},
            ),
        )


class FlickrGcg(_GcgBase):
    """Flickr30k GCG (``flickr_mergedGT``): COCO format, ``tokens_positive[0]`` spans, ``sam_mask`` RLEs."""

    name = "flickr_gcg"
    splits = ("train", "val")
    kind = "coco"
    files = {"train": "flickr_mergedGT_GCG_train.json", "val": "flickr_mergedGT_GCG_val.json"}
    image_dirs = (f"{IMAGES}/flickr30k/images/train",)

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        keep = ("id", "tokens_positive", "sam_mask")  # 'ignore' unread: X-SAM keeps those, GLaMM skips them
        yield from iter_coco_records(
            files.inputs["annotations"],
            f"{self.name}/{split}",
            lambda im: {k: im.get(k) for k in ("id", "file_name", "caption", "height", "width")},
            lambda a: {k: a.get(k) for k in keep},
        )

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        img = record["image"]
        groundings = []
        for a in record["anns"]:  # file order; overlaps are resolved by span start, ties by this order
            tp = a.get("tokens_positive")
            span = tp[0] if isinstance(tp, list) and tp else tp  # X-SAM and GLaMM use the first span only
            groundings.append(Grounding(None, span, a.get("sam_mask"), a.get("id")))
        return gcg_sample(
            self.name,
            record,
            ctx,
            GcgInput(
                img["caption"],
                groundings,
                img["file_name"],
                img["height"],
                img["width"],
                meta={"image_id": img["id"], "ann_ids": [g.ann_id for g in groundings]},
            ),
        )


# ------------------------------------------------------------------------------------ shared readers
def index_grandf(path: str, prefix: str) -> Iterator[dict | Skip]:
    """GranD-f / OpenPSG list: one record per list item, keyed by position (so streamed in key order)."""
    for i, item in enumerate(iter_items(path, "item")):
        if not isinstance(item, dict):
            yield Skip(f"{prefix}/{i:09d}", "bad_record", f"list item {i} is a {type(item).__name__}")
            continue
        g = item.get("groundings")
        rec = {
            "key": _list_key(prefix, i, item.get("file_name")),
            "image": {k: item.get(k) for k in ("image_id", "file_name", "height", "width")},
            "caption": item.get("caption"),
            # pairs keep the file's phrase order (chunk files are written with sorted keys)
            "groundings": [[k, v] for k, v in g.items()] if isinstance(g, dict) else [],
        }
        if g is not None and not isinstance(g, dict):
            rec["groundings_error"] = f"groundings is a {type(g).__name__}, not a dict"
        yield rec


def grandf_input(record: dict) -> GcgInput:
    if "groundings_error" in record:
        raise SkipRecord("bad_groundings", record["groundings_error"])
    groundings = []
    for phrase, v in record["groundings"]:
        v = v if isinstance(v, dict) else {}
        groundings.append(Grounding(phrase, v.get("token_positives"), v.get("rle_masks")))
    img = record["image"]
    return GcgInput(
        record["caption"],
        groundings,
        img["file_name"],
        img["height"],
        img["width"],
        meta={"image_id": img["image_id"]},
    )


def index_val(files: SourceFiles, prefix: str) -> Iterator[dict | Skip]:
    """GranD-f val/test: images and masks from the mask GT (COCO, string ids), caption + labels from the
    caption GT. An image with a caption but no mask entry can become no Sample: skipped here."""
    captions: dict[Any, dict] = {}
    for ann in iter_items(files.inputs["captions"], "annotations.item"):
        iid = ann.get("image_id")
        if iid in captions:
            key = f"{prefix}/{image_sort_id(iid)}"
            yield Skip(key, "duplicate_caption", "second caption ignored", level="annotation")
            continue
        captions[iid] = {"caption": ann.get("caption"), "labels": ann.get("labels")}
    in_masks = set()
    for rec in iter_coco_records(
        files.inputs["annotations"],
        prefix,
        lambda im: {k: im.get(k) for k in ("id", "height", "width")},
        lambda a: {"id": a.get("id"), "segmentation": a.get("segmentation")},
    ):
        if isinstance(rec, dict):
            iid = rec["image"]["id"]
            in_masks.add(iid)
            rec.update(captions.get(iid) or {"caption": None, "labels": None})
        yield rec
    caption_only = sorted((i for i in captions if i not in in_masks), key=image_sort_id)
    for iid in caption_only:  # record-level skips may come in any order
        detail = f"image {iid!r} has a caption but no mask entry"
        yield Skip(f"{prefix}/{image_sort_id(iid)}", "image_not_in_mask_gt", detail)


def val_input(record: dict) -> GcgInput:
    img, labels, anns = record["image"], record["labels"], record["anns"]
    if record["caption"] is None and labels is None:
        raise SkipRecord("missing_caption", f"image {img['id']!r} has no entry in the caption GT")
    if not isinstance(labels, list):
        raise SkipRecord("bad_groundings", f"labels is {labels!r}, not a list")
    if len(labels) != len(anns):
        detail = f"{len(labels)} labels but {len(anns)} mask annotations"
        raise SkipRecord("label_mask_count_mismatch", detail)
    # GLaMM's evaluator pairs the i-th label with the i-th mask annotation of the image
    groundings = [
        Grounding(lab, None, a["segmentation"], a["id"]) for lab, a in zip(labels, anns, strict=True)
    ]
    return GcgInput(
        record["caption"],
        groundings,
        _val_file_name(img["id"]),
        img["height"],
        img["width"],
        meta={"image_id": img["id"], "ann_ids": [a["id"] for a in anns], "labels": labels},
    )
