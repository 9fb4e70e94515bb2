"""The Sample: the one contract between shard building and training (docs/contracts.md#sample, ``schema: 1``).

A Sample is one conversation about one image plus its segmentation targets. Masks are COCO *compressed*
RLE at the original image size (``{"size": [h, w], "counts": str}``), never dense arrays, so a shard stays
small and any tool with pycocotools can read it.

In a tar shard a Sample is two members sharing its key: ``<key>.<ext>`` holding the original image bytes
(never re-encoded) and ``<key>.json`` holding everything else (:func:`to_wds` / :func:`from_wds`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.errors import SampleError

SCHEMA_VERSION = 1

TASKS = ("genseg", "refseg", "reaseg", "gcgseg", "ovseg", "vgdseg", "intseg", "chat")
# How many <SEG> tokens a task's conversation carries. "per_turn": one per assistant turn.
SEG_COUNT_RULE = {
    "genseg": "one",
    "ovseg": "one",
    "gcgseg": "one",
    "vgdseg": "one",
    "intseg": "one",
    "refseg": "per_turn",
    "reaseg": "per_turn",
    "chat": "none",
}
REGION_TYPES = ("point", "scribble", "box", "mask")
ROLES = ("user", "assistant")
IMAGE_EXTS = ("jpg", "png")

SEG, P_OPEN, P_CLOSE, IMAGE, REGION = "<SEG>", "<p>", "</p>", "<image>", "<region>"
_KEY_RE = re.compile(r"^[A-Za-z0-9_+\-]+/[A-Za-z0-9_\-]+/[A-Za-z0-9_\-/]+$")


@dataclass
class ImageRef:
    path: str  # relative to the data root, '/'-separated
    width: int
    height: int


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str


@dataclass
class MaskTarget:
    rle: dict  # compressed RLE {"size": [h, w], "counts": str}
    label: int  # index into Sample.phrases; -1 = no phrase
    category_id: int | None = None
    iscrowd: int = 0
    bbox: list[float] | None = None  # [x, y, w, h]
    area: float | None = None


@dataclass
class Region:
    label: int  # the phrase slot this visual prompt fills
    type: str  # point | scribble | box | mask
    rle: dict


@dataclass
class PoolPrompt:
    """Every visual prompt of one instance, for prompts drawn at batch time (vgdseg train: X-SAM picks each
    ``<region>``'s prompt among all same-category instances of the batch, of any prompt type)."""

    category_id: int
    ann_id: int | None
    prompts: dict[str, dict]  # prompt type (point | scribble | box | mask) -> compressed RLE, non-empty only


@dataclass
class Sample:
    key: str  # "<source>/<split>/<id>"; no '.' so tar member names split cleanly
    source: str
    task: str
    split: str
    image: ImageRef | None
    conversation: list[Turn]
    phrases: list[str] = field(default_factory=list)
    masks: list[MaskTarget] = field(default_factory=list)
    ignore: dict | None = None
    regions: list[Region] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    prompt_pool: list[PoolPrompt] = field(default_factory=list)
    """vgdseg train: the prompts of every instance of the slot categories (the stored ``regions`` are use 0's
    pick among them); written to JSON only when non-empty, so every other Sample's bytes are unchanged."""

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        # hand-written rather than dataclasses.asdict: asdict deep-copies every RLE and dominated the
        # writer's profile; key order does not matter because to_json sorts keys
        d = {
            "schema": self.schema,
            "key": self.key,
            "source": self.source,
            "task": self.task,
            "split": self.split,
            "image": asdict(self.image) if self.image else None,
            "conversation": [{"role": t.role, "text": t.text} for t in self.conversation],
            "phrases": list(self.phrases),
            "masks": [dict(m.__dict__) for m in self.masks],
            "ignore": self.ignore,
            "regions": [dict(r.__dict__) for r in self.regions],
            "meta": self.meta,
        }
        if self.prompt_pool:
            d["prompt_pool"] = [dict(p.__dict__) for p in self.prompt_pool]
        return d

    def to_json(self) -> bytes:
        """Canonical JSON bytes: sorted keys, no spaces, so equal Samples give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        if d.get("schema") != SCHEMA_VERSION:
            raise SampleError(f"schema version {d.get('schema')!r} is not {SCHEMA_VERSION}")
        img = d.get("image")
        return cls(
            key=d["key"],
            source=d["source"],
            task=d["task"],
            split=d["split"],
            image=ImageRef(**img) if img else None,
            conversation=[Turn(**t) for t in d["conversation"]],
            phrases=list(d.get("phrases", [])),
            masks=[MaskTarget(**m) for m in d.get("masks", [])],
            ignore=d.get("ignore"),
            regions=[Region(**r) for r in d.get("regions", [])],
            meta=dict(d.get("meta", {})),
            schema=d["schema"],
            prompt_pool=[PoolPrompt(**p) for p in d.get("prompt_pool", [])],
        )


def _check_rle(rle: Any, hw: tuple[int, int] | None, what: str) -> None:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise SampleError(f"{what}: not an RLE dict")
    if not isinstance(rle["counts"], str):
        raise SampleError(f"{what}: RLE counts must be a compressed str")
    if hw is not None and tuple(rle["size"]) != hw:
        raise SampleError(f"{what}: RLE size {list(rle['size'])} != image size {list(hw)}")


def validate(s: Sample) -> None:
    """Check every invariant of docs/contracts.md#sample; raise :class:`SampleError` naming the first broken
    one."""
    if not _KEY_RE.match(s.key) or "." in s.key:
        raise SampleError(f"key {s.key!r} must be '<source>/<split>/<id>' without '.'")
    if not s.key.startswith(f"{s.source}/{s.split}/"):
        raise SampleError(f"key {s.key!r} does not start with '{s.source}/{s.split}/'")
    if s.task not in TASKS:
        raise SampleError(f"unknown task {s.task!r}")
    if not s.conversation:
        raise SampleError("empty conversation")
    for t in s.conversation:
        if t.role not in ROLES:
            raise SampleError(f"unknown role {t.role!r}")
        if not t.text.strip():
            raise SampleError("empty turn")
    text = "".join(t.text for t in s.conversation)
    n_open, n_close = text.count(P_OPEN), text.count(P_CLOSE)
    if n_open != n_close:
        raise SampleError(f"{n_open} <p> but {n_close} </p>")
    # spans must be properly paired and not nested: <p> … </p> <p> … </p>
    depth = 0
    for tok in re.findall(r"</?p>", text):
        depth += 1 if tok == P_OPEN else -1
        if depth not in (0, 1):
            raise SampleError("<p>/</p> spans are nested or unbalanced")
    if n_open != len(s.phrases):
        raise SampleError(f"{n_open} <p> spans but {len(s.phrases)} phrases")
    n_image = text.count(IMAGE)
    if s.image is None and n_image:
        raise SampleError("<image> in the conversation but no image")
    if s.image is not None and n_image != 1:
        raise SampleError(f"{n_image} <image> tokens; expected exactly 1")
    n_seg = text.count(SEG)
    rule = SEG_COUNT_RULE[s.task]
    n_assist = sum(t.role == "assistant" for t in s.conversation)
    expected = {"one": 1, "none": 0, "per_turn": n_assist}[rule]
    if n_seg != expected:
        raise SampleError(f"task {s.task}: {n_seg} <SEG> tokens, expected {expected} ({rule})")
    if text.count(REGION) != len(s.regions):
        raise SampleError(f"{text.count(REGION)} <region> slots but {len(s.regions)} regions")
    hw = (s.image.height, s.image.width) if s.image else None
    for i, m in enumerate(s.masks):
        if not -1 <= m.label < len(s.phrases):
            raise SampleError(f"mask {i}: label {m.label} outside [-1, {len(s.phrases)})")
        _check_rle(m.rle, hw, f"mask {i}")
    for i, r in enumerate(s.regions):
        if r.type not in REGION_TYPES:
            raise SampleError(f"region {i}: unknown type {r.type!r}")
        if not 0 <= r.label < len(s.phrases):
            raise SampleError(f"region {i}: label {r.label} outside [0, {len(s.phrases)})")
        _check_rle(r.rle, hw, f"region {i}")
    if s.ignore is not None:
        _check_rle(s.ignore, hw, "ignore")
    _check_pool(s, hw)
    if s.task == "chat" and s.masks:
        raise SampleError("chat samples carry no masks")


def _check_pool(s: Sample, hw: tuple[int, int] | None) -> None:
    """``prompt_pool``: vgdseg only; each entry an int category with known prompt types at the image size."""
    if s.prompt_pool and s.task != "vgdseg":
        raise SampleError(f"task {s.task}: prompt_pool is for vgdseg samples only")
    for i, p in enumerate(s.prompt_pool):
        if not isinstance(p.category_id, int) or isinstance(p.category_id, bool):
            raise SampleError(f"prompt_pool {i}: category_id {p.category_id!r} is not an int")
        if not isinstance(p.prompts, dict) or not p.prompts:
            raise SampleError(f"prompt_pool {i}: no prompt")
        for kind, rle in p.prompts.items():
            if kind not in REGION_TYPES:
                raise SampleError(f"prompt_pool {i}: unknown prompt type {kind!r}")
            _check_rle(rle, hw, f"prompt_pool {i} {kind}")


# ---------------------------------------------------------------- webdataset members
def to_wds(sample: Sample, image_bytes: bytes | None, image_ext: str = "jpg") -> dict[str, Any]:
    """The dict webdataset's TarWriter writes: ``{"__key__", "json", image_ext}``; image bytes as given."""
    validate(sample)
    item: dict[str, Any] = {"__key__": sample.key, "json": sample.to_json()}
    if image_bytes is not None:
        if image_ext not in IMAGE_EXTS:
            raise SampleError(f"image extension {image_ext!r} not in {IMAGE_EXTS}")
        item[image_ext] = image_bytes
    return item


def from_wds(item: dict[str, Any]) -> tuple[Sample, bytes | None]:
    """Inverse of :func:`to_wds` on an undecoded webdataset item (values are bytes)."""
    raw = item["json"]
    d = json.loads(raw if isinstance(raw, str | bytes) else bytes(raw))
    sample = Sample.from_dict(d)
    image = next((item[e] for e in IMAGE_EXTS if e in item), None)
    return sample, image
