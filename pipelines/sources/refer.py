"""``refcoco``, ``refcoco+``, ``refcocog``, ``grefcoco``: referring segmentation (task refseg) from refer
files.

Layout (docs/contracts.md#data-root, source_formats §3): ``img_refseg/refcocos/<dataset>/{refs(<split_by>).p,
instances.json}`` (``refcoco+`` is also found as X-SAM's ``refcocop``; gRefCOCO's official ``grefs(unc).json``
is read as well as X-SAM's pickle). Images are COCO train2014, found at the first of :data:`IMAGE_LAYOUTS`
that exists; their file names come from ``instances.json`` (a ref's own ``file_name`` carries a decoy ``_N``
suffix). The refs pickle is read with :mod:`pipelines.sources.readers.safe_pickle`, never ``pickle.load``.

Samples (recipe §2.4, §10):

* **train** (paper default, ``AAAI26_Archive``): per image, every referred object in one multi-turn sample,
  one ``<p>sentence</p>`` question and one ``<SEG>`` answer per object, turns in random order. As in X-SAM
  an image gives ``min(prod n_i, sum n_i)`` samples (``n_i`` = unique sentences of object i), each choosing
  one sentence per object; unlike X-SAM's ``islice(product(...))``, which never reaches the later sentences
  of the first objects, every sentence of every object is used at least once (:func:`combinations`; the
  source option ``refseg_combinations=archive``, set by the ``paper`` build preset, gives X-SAM's).
  The source option ``refseg_chunk=8`` splits each of those into samples of at most 8 objects
  (X-SAM main).
* **eval** (every other split): one single-turn sample per (object, unique sentence).
* Sentences are lower-cased and de-duplicated per object; the merged ``sent_ids`` stay in ``meta``.
  Two objects with the same sentence are two turns with distinct labels (X-SAM's ``.index()`` defect of
  giving both the first label is not copied).
* gRefCOCO: ``ann_id`` is a list; an object is a target *set* (its mask the union). A no-target expression
  (``ann_id`` ``[-1]`` / ``no_target``) becomes its own single-turn sample with its ``<SEG>`` and no mask,
  ``meta.no_target: true``, in every split.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines import masks, templates
from pipelines.errors import BuildError
from pipelines.masks import MaskFormatError
from pipelines.schema import ImageRef, MaskTarget, Sample, Turn
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
from pipelines.sources.readers.coco_index import image_sort_id
from pipelines.sources.readers.jsonstream import iter_items
from pipelines.sources.readers.safe_pickle import MalformedPickle, UnsafePickleError, load_file

REFER_ROOTS = ("img_refseg/refcocos", "img_refseg")  # X-SAM main; without the refcocos/ level
# (folder relative to the data root, how a file is named in it); the first folder that exists is used
IMAGE_LAYOUTS = (
    ("img_refseg/refcocos/images/train2014", "file_name"),  # X-SAM: images/train2014 -> coco2014/train2014
    ("img_refseg/refcocos/images/mscoco/images/train2014", "file_name"),  # refer / LISA layout
    ("img_genseg/coco2014/train2014", "file_name"),  # X-SAM's COCO 2014 folder
    (
        "img_genseg/coco2017/train2017",
        "coco2017_id",
    ),  # train2017 holds every train2014 image as <id:012d>.jpg
)
UNC_SPLITS = ("train", "val", "testA", "testB")
UMD_SPLITS = ("train", "val", "test")
ANN_FIELDS = ("id", "image_id", "category_id", "segmentation", "iscrowd")


def _num(v: Any) -> str:
    """Zero-padded id for keys, so string order is numeric order."""
    return f"{v:08d}" if isinstance(v, int) and v >= 0 else key_id(v)


def load_refs(path: str) -> list:
    """The refs list of a ``refs(*).p`` pickle (restricted unpickler) or a gRefCOCO ``grefs(*).json``."""
    if path.endswith(".json"):
        return list(iter_items(path, "item"))
    refs = load_file(path)
    if not isinstance(refs, list):
        raise MalformedPickle(f"{path}: a refs file holds a list, found {type(refs).__name__}")
    return refs


@dataclass
class _Ref:
    """One ref of the requested split, checked and cleaned."""

    ref_id: Any
    image_id: Any
    ann_ids: tuple  # () = no target (gRefCOCO)
    sents: list[tuple[str, Any]]  # (lower-cased text, sent_id), in file order


def _parse_ref(ref: Any, grefcoco: bool) -> _Ref:
    """Raise :class:`SkipRecord` ``bad_ref`` / ``no_sentences`` for a ref that cannot become a target."""
    if not isinstance(ref, dict) or "image_id" not in ref or "ann_id" not in ref:
        raise SkipRecord("bad_ref", f"ref without image_id/ann_id: {str(ref)[:120]}")
    raw = ref["ann_id"]
    ids = raw if isinstance(raw, list | tuple) else [raw]
    if not all(isinstance(a, int) for a in ids) or (not grefcoco and len(ids) != 1):
        raise SkipRecord("bad_ref", f"ref {ref.get('ref_id')}: ann_id {raw!r}")
    # gRefCOCO marks "no target" with ann_id [-1] (X-SAM keeps only ann_id[0] > 0)
    ann_ids = () if ref.get("no_target") else tuple(sorted({a for a in ids if a > 0}))
    if not ann_ids and not grefcoco:
        raise SkipRecord("bad_ref", f"ref {ref.get('ref_id')}: ann_id {raw!r}")
    sents = []
    for k, s in enumerate(ref.get("sentences") or []):
        text = (
            (s.get("sent") or s.get("raw") or " ".join(s.get("tokens") or [])) if isinstance(s, dict) else ""
        )
        text = " ".join(str(text).lower().split())
        if text:
            sid = s.get("sent_id")
            sents.append((text, f"{ref.get('ref_id')}-{k}" if sid is None else sid))
    if not sents:
        raise SkipRecord("no_sentences", f"ref {ref.get('ref_id')} has no non-empty sentence")
    return _Ref(ref.get("ref_id"), ref["image_id"], ann_ids, sents)


@dataclass
class _Object:
    """A referred target (one ann, or a gRefCOCO ann set; () = no target) and its unique sentences."""

    ann_ids: tuple
    sents: dict[str, dict] = field(default_factory=dict)  # text -> {"sent_ids": [...], "ref_ids": [...]}

    def add(self, ref: _Ref) -> None:
        for text, sid in ref.sents:
            s = self.sents.setdefault(text, {"sent_ids": [], "ref_ids": []})
            s["sent_ids"].append(sid)
            if ref.ref_id not in s["ref_ids"]:
                s["ref_ids"].append(ref.ref_id)

    def turn(self, text: str, anns: dict) -> dict:
        """A record's turn: the phrase, its ids and the segmentations of its targets."""
        found = [anns[a] for a in self.ann_ids]
        cats = {a.get("category_id") for a in found}
        return {
            "phrase": text,
            **self.sents[text],
            "ann_ids": list(self.ann_ids),
            "category_id": cats.pop() if len(cats) == 1 else None,
            "segmentations": [a.get("segmentation") for a in found],
        }


def combinations(counts: list[int], mode: str = "covering") -> list[list[int]]:
    """Which sentence each object uses in each train sample: ``min(prod n, sum n)`` samples (X-SAM's count).

    ``covering``: the first ``max(n)`` samples give object ``i`` sentence ``j mod n_i``, so every sentence is
    used; the rest follow X-SAM's ``itertools.product`` order, skipping combinations already taken (all
    distinct). ``archive`` (the ``paper`` preset): X-SAM's first ``sum n`` combinations of that product, which
    vary the last object fastest and may never reach the first object's later sentences.
    """
    if not counts:
        return []
    total = min(math.prod(counts), sum(counts))  # >= max(counts), so the covering block always fits
    if mode == "archive":
        return [list(c) for c in itertools.islice(itertools.product(*(range(n) for n in counts)), total)]
    out = [[j % n for n in counts] for j in range(max(counts))]
    seen = {tuple(c) for c in out}
    for c in itertools.product(*(range(n) for n in counts)):
        if len(out) >= total:
            break
        if c not in seen:
            out.append(list(c))
            seen.add(c)
    return out


class ReferSource:
    """One refer-format dataset (refcoco, refcoco+, refcocog or grefcoco) -> refseg Samples."""

    task = "refseg"
    version = 1
    path_roles = ("refs", "instances", "images", "image_naming")

    def __init__(
        self,
        name: str,
        folders: tuple[str, ...],
        split_by: str,
        splits: tuple[str, ...],
        grefcoco: bool = False,
    ):
        self.name = name
        self.folders = folders  # dataset folder names, first preferred (refcoco+ is also X-SAM's refcocop)
        self.split_by = split_by
        self.splits = splits
        self.grefcoco = grefcoco

    # ------------------------------------------------------------------ locate
    def refs_names(self) -> list[str]:
        names = [f"refs({self.split_by}).p"]
        return names + [f"grefs({self.split_by}).json"] if self.grefcoco else names

    def dataset_dirs(self, data_root: str) -> list[str]:
        """Every existing dataset folder of this source under the data root (absolute)."""
        return [
            d for r in REFER_ROOTS for f in self.folders if os.path.isdir(d := os.path.join(data_root, r, f))
        ]

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        o = overrides or {}
        looked: list[str] = []
        refs = inst = folder = None
        for r in REFER_ROOTS:
            for f in self.folders:
                d = os.path.join(data_root, r, f)
                for name in self.refs_names():
                    cand = (
                        o.get("refs") or os.path.join(d, name),
                        o.get("instances") or os.path.join(d, "instances.json"),
                    )
                    looked.extend(p for p in cand if p not in looked)
                    if refs is None and all(os.path.isfile(p) for p in cand):
                        refs, inst, folder = *cand, f"{r}/{f}"
        images, naming = o.get("images"), o.get("image_naming", "file_name")
        if images is None:
            for rel, how in IMAGE_LAYOUTS:
                looked.append(os.path.join(data_root, rel))
                if os.path.isdir(os.path.join(data_root, rel)):
                    images, naming = rel, how
                    break
        elif os.path.isabs(images):
            images = os.path.relpath(images, data_root)
        if refs is None or images is None:
            raise SourceNotFound(self.name, looked)
        info = {
            "dataset_dir": folder,
            "images_layout": images,
            "image_naming": naming,
            "refs_format": "json" if refs.endswith(".json") else "pickle",
        }
        return SourceFiles(
            data_root=data_root, inputs={"refs": refs, "instances": inst}, dirs={"images": images}, info=info
        )

    # ------------------------------------------------------------------ index
    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        prefix = f"{self.name}/{split}"
        path = files.inputs["refs"]
        try:
            all_refs = load_refs(path)
        except (UnsafePickleError, MalformedPickle) as e:
            # every record of the split is in this file: it is the split that fails, not one record of it
            raise BuildError(f"{prefix}: refs file {path} cannot be loaded: {e}") from None
        train = split == "train"
        refs: list[_Ref] = []
        for ref in all_refs:
            if not isinstance(ref, dict) or ref.get("split") != split:
                if not isinstance(ref, dict):  # of no known split, so not a record of this one
                    yield Skip(
                        f"{prefix}/ref",
                        "bad_ref",
                        f"a ref is a {type(ref).__name__}, not a dict",
                        level="annotation",
                    )
                continue
            try:
                refs.append(_parse_ref(ref, self.grefcoco))
            except SkipRecord as e:
                yield self._ref_skip(prefix, ref.get("image_id"), ref.get("ref_id"), e, train)
        del all_refs
        images, anns = self._read_instances(files.inputs["instances"], refs)
        by_image: dict[Any, dict[tuple, _Object]] = {}
        for ref in refs:
            problem = self._check_ref(ref, images, anns)
            if problem:
                yield self._ref_skip(prefix, ref.image_id, ref.ref_id, problem, train)
                continue
            objs = by_image.setdefault(ref.image_id, {})
            objs.setdefault(ref.ann_ids, _Object(ref.ann_ids)).add(ref)
        chunk = options.extra.refseg_chunk if train else None  # validated by SourceOptions
        mode = options.extra.refseg_combinations
        last = ""
        for iid in sorted(by_image, key=image_sort_id):
            objs = [by_image[iid][k] for k in sorted(by_image[iid])]
            stem = f"{prefix}/{image_sort_id(iid)}"
            if train:
                made = self._train_records(stem, objs, anns, chunk, mode)
            else:
                made = self._eval_records(stem, objs, anns, chunk)
            for r in sorted(made, key=lambda r: r["key"]):
                if r["key"] == last:  # only when sent_ids repeat inside one ref
                    yield Skip(r["key"], "duplicate_key", "two sentences share ref_id and sent_id")
                    continue
                last = r["key"]
                r["image"] = images[iid]
                yield r

    def _ref_skip(self, prefix: str, image_id: Any, ref_id: Any, e: SkipRecord, train: bool) -> Skip:
        # eval: the ref's sentences would have been records; train: one object less in its image's samples
        # (an image left with no object at all simply yields no record)
        return Skip(
            f"{prefix}/{image_sort_id(image_id)}_{_num(ref_id)}",
            e.reason,
            e.detail,
            level="annotation" if train else "record",
        )

    def _read_instances(self, path: str, refs: list[_Ref]) -> tuple[dict, dict]:
        """The images and annotations the refs need, streamed from ``instances.json`` (two passes)."""
        need_images = {r.image_id for r in refs}
        need_anns = {a for r in refs for a in r.ann_ids}
        images = {}
        for img in iter_items(path, "images.item"):
            if img.get("id") in need_images and img["id"] not in images:
                images[img["id"]] = {k: img.get(k) for k in ("id", "file_name", "height", "width")}
        anns = {}
        for ann in iter_items(path, "annotations.item"):
            if ann.get("id") in need_anns and ann["id"] not in anns:
                anns[ann["id"]] = {k: ann.get(k) for k in ANN_FIELDS}
        return images, anns

    @staticmethod
    def _check_ref(ref: _Ref, images: dict, anns: dict) -> SkipRecord | None:
        if ref.image_id not in images:
            return SkipRecord(
                "unknown_image_id", f"ref {ref.ref_id}: image {ref.image_id} not in instances.json"
            )
        for a in ref.ann_ids:
            if a not in anns:
                return SkipRecord("unknown_ann_id", f"ref {ref.ref_id}: ann_id {a} not in instances.json")
            if anns[a].get("image_id") != ref.image_id:
                return SkipRecord(
                    "ann_image_mismatch",
                    f"ref {ref.ref_id}: ann {a} is on image {anns[a].get('image_id')}, ref on {ref.image_id}",
                )
        return None

    def _train_records(
        self, stem: str, objs: list[_Object], anns: dict, chunk: int | None, mode: str = "covering"
    ) -> list[dict]:
        targets = [o for o in objs if o.ann_ids]
        recs = []
        texts = [sorted(o.sents) for o in targets]
        for j, pick in enumerate(combinations([len(t) for t in texts], mode)):
            turns = [o.turn(t[k], anns) for o, t, k in zip(targets, texts, pick, strict=True)]
            size = chunk or len(turns)
            for c in range(0, len(turns), size):
                suffix = f"_{c // size:03d}" if chunk else ""
                recs.append(
                    {"key": f"{stem}_{j:05d}{suffix}", "turns": turns[c : c + size], "no_target": False}
                )
        recs.extend(self._no_target_records(stem, objs, anns))
        return recs

    def _eval_records(self, stem: str, objs: list[_Object], anns: dict, chunk: int | None) -> list[dict]:
        recs = []
        for o in objs:
            if not o.ann_ids:
                continue
            for text, ids in o.sents.items():
                recs.append(
                    {
                        "key": f"{stem}_{_num(ids['ref_ids'][0])}_{_num(ids['sent_ids'][0])}",
                        "turns": [o.turn(text, anns)],
                        "no_target": False,
                    }
                )
        return recs + self._no_target_records(stem, objs, anns)

    @staticmethod
    def _no_target_records(stem: str, objs: list[_Object], anns: dict) -> list[dict]:
        return [
            {
                "key": f"{stem}_nt_{_num(ids['ref_ids'][0])}_{_num(ids['sent_ids'][0])}",
                "turns": [o.turn(text, anns)],
                "no_target": True,
            }
            for o in objs
            if not o.ann_ids
            for text, ids in o.sents.items()
        ]

    # ------------------------------------------------------------------ convert
    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        key, img = record["key"], record["image"]
        h, w = img.get("height"), img.get("width")
        if not h or not w:
            raise SkipRecord("missing_image_size", f"image {img['id']} has no height/width in instances.json")
        name = (
            f"{img['id']:012d}.jpg"
            if ctx.files.info.get("image_naming") == "coco2017_id"
            else img["file_name"]
        )
        rng = ctx.rng(key)
        turns = list(record["turns"])
        rng.shuffle(turns)  # archive: objects in random order
        phrases, targets, kept = self._targets(key, turns, h, w, ctx)
        conversation = []
        for i, p in enumerate(phrases):
            q = templates.pick(rng, templates.REFSEG_QUESTIONS).format(phrase=templates.tag(p))
            conversation.append(
                Turn("user", templates.with_image(q, ctx.options.image_token) if i == 0 else q)
            )
            conversation.append(Turn("assistant", templates.pick(rng, templates.REFSEG_ANSWERS)))
        one = (lambda ids: ids) if self.grefcoco else (lambda ids: ids[0] if ids else None)
        meta = {
            "image_id": img["id"],
            "ann_ids": [one(t["ann_ids"]) for t in kept],
            "ref_ids": [t["ref_ids"] for t in kept],
            "sent_ids": [t["sent_ids"] for t in kept],
            "no_target": record["no_target"],
        }
        return Sample(
            key=key,
            source=self.name,
            task=self.task,
            split=ctx.split,
            image=ImageRef(path=relpath(ctx.files.dirs["images"], name), width=w, height=h),
            conversation=conversation,
            phrases=phrases,
            masks=targets,
            meta=meta,
        )

    def _targets(
        self, key: str, turns: list[dict], h: int, w: int, ctx: ConvertContext
    ) -> tuple[list[str], list[MaskTarget], list[dict]]:
        """(phrases, mask targets, kept turns): a turn whose target is unusable is a dropped annotation,
        unless it is the only one (then the record is skipped), or none is left."""
        phrases, targets, kept, first_error = [], [], [], None
        for t in turns:
            try:
                rle = self._target_rle(t, h, w)
            except SkipRecord as e:
                if len(turns) == 1:
                    raise
                ctx.drop(f"{key}/ann_{key_id(*t['ann_ids'])}", e.reason, e.detail)
                first_error = first_error or e
                continue
            if rle is not None:
                targets.append(
                    MaskTarget(
                        rle=rle,
                        label=len(phrases),
                        category_id=t["category_id"],
                        iscrowd=0,
                        bbox=masks.bbox(rle),
                        area=float(masks.area(rle)),
                    )
                )
            phrases.append(t["phrase"])
            kept.append(t)
        if not kept:
            raise SkipRecord(first_error.reason, f"no usable object: {first_error.detail}")
        return phrases, targets, kept

    @staticmethod
    def _target_rle(turn: dict, h: int, w: int) -> dict | None:
        """The union mask of a turn's targets (``None`` for a no-target turn); :class:`SkipRecord` if
        unusable."""
        if not turn["ann_ids"]:
            return None
        try:
            rles = [masks.segmentation_to_rle(s, h, w) for s in turn["segmentations"]]
        except MaskFormatError as e:
            raise SkipRecord(e.reason, f"ann {turn['ann_ids']}: {e.detail}") from None
        rle = masks.merge_rles(rles)
        if masks.area(rle) == 0:
            raise SkipRecord("empty_mask", f"ann {turn['ann_ids']}: segmentation covers no pixel")
        return rle

    # ------------------------------------------------------------------ eval-leakage guard
    def eval_image_ids(self, data_root: str, overrides: dict | None = None) -> tuple[dict, list[str]]:
        """COCO image ids of every non-train split in every refs file of this source under the data root.

        Returns ``({"<file rel. to data root>": {split: [image ids]}}, [errors])``; a file that cannot be read
        safely is an error entry, not an exception.
        """
        paths = [
            p
            for d in self.dataset_dirs(data_root)
            for pat in ("refs(*).p", "grefs(*).json")
            for p in sorted(glob.glob(os.path.join(glob.escape(d), pat)))
        ]
        if (overrides or {}).get("refs"):
            paths.append(overrides["refs"])
        found, errors, seen = {}, [], set()
        for p in paths:
            if os.path.realpath(p) in seen or not os.path.isfile(p):
                continue
            seen.add(os.path.realpath(p))
            rel = os.path.relpath(p, data_root)
            try:
                refs = load_refs(p)
            except (UnsafePickleError, MalformedPickle, ValueError) as e:
                errors.append(
                    f"{self.name}: {str(e).replace(p, rel)}"
                )  # no mount path: the file's hash is stable
                continue
            splits: dict[str, set] = {}
            for r in refs:
                if (
                    isinstance(r, dict)
                    and r.get("split") not in (None, "train")
                    and r.get("image_id") is not None
                ):
                    splits.setdefault(str(r["split"]), set()).add(r.get("image_id"))
            found[rel] = {s: sorted(ids, key=image_sort_id) for s, ids in sorted(splits.items())}
        return found, errors


SOURCES = (
    ReferSource("refcoco", ("refcoco",), "unc", UNC_SPLITS),
    ReferSource("refcoco+", ("refcoco+", "refcocop"), "unc", UNC_SPLITS),
    ReferSource("refcocog", ("refcocog",), "umd", UMD_SPLITS),
    ReferSource("grefcoco", ("grefcoco",), "unc", UNC_SPLITS, grefcoco=True),
)
