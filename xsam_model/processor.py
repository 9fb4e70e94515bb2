"""Sample → model inputs, and a collate for a one-task batch. Runs in DataLoader workers (picklable, cheap).

Usage (the loader calls exactly this)::

    proc = XSamProcessor(config.processor, tokenizer)       # or model.processor / build_processor(...)
    item = proc(sample, image_bytes)                         # one Sample → dict of tensors
    batch = proc.collate([item, ...])                        # same task for every item

One item (``T`` text tokens, ``N`` masks, ``R`` regions, ``S`` = siglip_size, ``L`` = sam_size):

==================  =============  =========================================================================
key                 shape / type   meaning
==================  =============  =========================================================================
input_ids           T long         token ids; ``<image>`` = -200, ``<region>`` = -300 (placeholders)
labels              T long         target ids on assistant text (+ its ``<|end|>``), -100 elsewhere
cond_ids            T long         k on the k-th ``<p>…</p>`` span (both tags included), -1 elsewhere
seg_ids             T long         k on the k-th ``<SEG>``, -1 elsewhere
pixel_values        3×S×S float    SigLIP image (plain resize, normalised); zeros for a sample without image
extra_pixel_values  3×L×L float    SAM image: longest side L, normalised, zero-padded bottom/right
mask_labels         N×L×L uint8    target masks in the SAM frame (nearest resize, zero pad)
class_labels        N long         phrase index of each mask (-1 = no phrase)
category_labels     N long         index of the mask's category in ``category_ids`` (-100 = unknown)
ignore_mask         L×L bool       reaseg "ignore" shapes, COCO/VGD crowd (loss: LossConfig.ignore_pixels)
region_masks        R×L×L bool     visual prompt of the r-th ``<region>`` slot, in slot order
scaled_size         2 long         (h, w) of the image inside the padded SAM frame
task, key           str            the Sample's task and key
==================  =============  =========================================================================

The batch from :meth:`XSamProcessor.collate` stacks the fixed-size tensors (``pixel_values`` B×3×S×S,
``extra_pixel_values`` B×3×L×L, ``ignore_mask`` B×L×L, ``scaled_size`` B×2), right-pads the four token
tensors to B×Tmax (ids with the pad id, labels with -100, cond/seg ids with -1) and adds
``attention_mask`` B×Tmax (1 = real token); ``mask_labels``, ``class_labels``, ``category_labels`` and
``region_masks`` stay per-sample lists (ragged); ``task`` is one str, ``keys`` a list of str. A vgdseg batch
adds ``region_image`` (per sample, R long: the batch image whose grid each region's features are read from;
-1 = none, a negative slot the batch had no instance for: an empty mask and zero features, as X-SAM).

vgdseg train samples with a ``prompt_pool`` get their ``<region>`` prompts in :meth:`XSamProcessor.collate`
(:mod:`pipelines.loader.vgd_draw`): each slot's prompt drawn among all instances of its
category in the micro-batch, any image (``ProcessorConfig.vgd_cross_image``), plus the paper's negatives
(``ProcessorConfig.vgd_negatives``: extra slots, re-tokenized, no target); such an item carries ``vgd`` (its
prompt pool as compressed RLEs and its SAM geometry) instead of ``region_masks`` until then, and the batch
carries ``vgd_counts`` (the draw's counters).

Images and masks go through the loader's :mod:`pipelines.loader.decode` (libjpeg-turbo / OpenCV decode, one
OpenCV resize per encoder from the decoded original — a box filter when shrinking, within ~2/255 of PIL's
antialiased resize — single-pass normalisation into the padded frame, and masks scaled in run-length space
with exactly torch's ``nearest-exact`` pixels); the tensors share those numpy buffers (no copies).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from pipelines import templates
from pipelines.errors import XsamError
from pipelines.loader import decode, redraw, transport, vgd_draw
from pipelines.schema import IMAGE, P_CLOSE, P_OPEN, REGION, Sample, Turn
from xsam_model.config import ProcessorConfig

# Phi-3 chat template (recipe §2.1): INSTRUCTION, SUFFIX (= EOS, carries loss), SEP (no loss). SYSTEM is "".
INSTRUCTION = "<|user|>\n{input}<|end|>\n<|assistant|>\n"
SUFFIX = "<|end|>"
SEP = "\n"
_TAG_JITTER = 4  # keeps the jitter draw apart from the loader's other (seed, key, use) streams
_SPLIT = re.compile(f"({re.escape(IMAGE)}|{re.escape(REGION)})")
_SLOT = re.escape(P_OPEN + REGION + P_CLOSE)
_SLOT_LIST = re.compile(f"{_SLOT}(?:, {_SLOT})*")  # a VGD question's "<p><region></p>, <p><region></p>, …"
# the per-step data counters a batch may carry (``vgd_counts``, ``reaseg_counts``), logged as ``data/<name>``
DATA_COUNTERS = vgd_draw.COUNTERS + redraw.COUNTERS


class ProcessorError(XsamError, ValueError):
    """A Sample cannot be turned into model inputs (the loader may skip it and count the reason)."""


@dataclass
class VgdPending:
    """A vgdseg train item whose ``<region>`` prompts are drawn in :meth:`XSamProcessor.collate`: its Sample,
    its image's SAM frame (``size`` inside the padded frame, jitter ``geom``) to decode a chosen prompt into,
    and the planner's view of it (slot categories and prompt pool, compressed RLEs: nothing decoded yet)."""

    sample: Sample
    size: tuple[int, int]
    geom: tuple[int, ...] | None
    entry: vgd_draw.VgdEntry


class XSamProcessor:
    """Callable ``(sample, image_bytes) -> dict[str, Tensor]``; see the module docstring for the keys."""

    def __init__(
        self, config: ProcessorConfig, tokenizer, special_tokens: Sequence[str] = ("<SEG>", "<p>", "</p>")
    ):
        self.config = config
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in special_tokens if t not in vocab]
        if missing:
            raise ProcessorError(
                f"tokenizer lacks {missing}; run xsam_model.tokenizer.prepare_tokenizer first"
            )
        self.seg_id, self.p_open_id, self.p_close_id = (vocab[t] for t in special_tokens[:3])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cat_index = {c: i for i, c in enumerate(config.category_ids)}
        self.vgd_counts: Counter = Counter()
        """Batch-time VGD draw counters summed over this processor's collates (``pipelines.loader.vgd_draw``
        COUNTERS); each batch also carries its own as ``batch["vgd_counts"]``."""

    # ------------------------------------------------------------------ text
    def _encode(self, text: str) -> list[int]:
        """Text with ``<image>``/``<region>`` placeholders → ids; chunks tokenized separately (as X-SAM)."""
        ids: list[int] = []
        for chunk in _SPLIT.split(text):
            if chunk == IMAGE:
                ids.append(self.config.image_token_index)
            elif chunk == REGION:
                ids.append(self.config.region_token_index)
            elif chunk:
                ids.extend(self.tokenizer(chunk, add_special_tokens=False).input_ids)
        return ids

    def _sep_ids(self) -> list[int]:
        """``SEP`` tokenized once per processor (lazily, so pickling to workers is unchanged)."""
        sep = self.__dict__.get("_sep")
        if sep is None:
            sep = self.__dict__["_sep"] = self._encode(SEP)
        return sep

    def tokenize(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Chat template + tokenization → ``input_ids``, ``labels``, ``cond_ids``, ``seg_ids`` (all T
        long)."""
        turns = sample.conversation
        ids: list[int] = []
        labels: list[int] = []
        bos = self.tokenizer.bos_token_id
        if bos is not None:  # BOS once, before the first turn
            ids.append(bos)
            labels.append(-100)
        i = 0
        while i < len(turns):
            if turns[i].role != "user":
                raise ProcessorError(f"{sample.key}: turn {i} is {turns[i].role!r}, expected 'user'")
            q = self._encode(INSTRUCTION.format(input=turns[i].text))
            ids += q
            labels += [-100] * len(q)
            if i + 1 < len(turns) and turns[i + 1].role == "assistant":
                a = self._encode(turns[i + 1].text + SUFFIX)
                if any(t < 0 for t in a):
                    raise ProcessorError(f"{sample.key}: placeholder inside an assistant turn")
                sep = self._sep_ids()
                ids += a + sep
                labels += a + [-100] * len(sep)
                i += 2
            else:
                i += 1
        n_seg_full = ids.count(self.seg_id)
        n_close_full = ids.count(self.p_close_id)
        max_len = self.config.max_length
        if max_len is not None and len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            if ids.count(self.seg_id) != n_seg_full or ids.count(self.p_close_id) != n_close_full:
                raise ProcessorError(f"{sample.key}: max_length {max_len} cuts a <p>…</p> span or <SEG>")
        # plain lists, one tensor each at the end (per-element tensor writes cost ~µs a token)
        cond_ids, seg_ids = [-1] * len(ids), [-1] * len(ids)
        k, inside, n_seg = -1, False, 0
        for t, tok in enumerate(ids):
            if tok == self.p_open_id:
                if inside:
                    raise ProcessorError(f"{sample.key}: nested <p>")
                k, inside = k + 1, True
            if inside:
                cond_ids[t] = k
            if tok == self.p_close_id:
                if not inside:
                    raise ProcessorError(f"{sample.key}: </p> without <p>")
                inside = False
            elif tok == self.seg_id:
                seg_ids[t], n_seg = n_seg, n_seg + 1
        if k + 1 != len(sample.phrases):
            raise ProcessorError(
                f"{sample.key}: {k + 1} <p> spans in tokens but {len(sample.phrases)} phrases"
            )
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "cond_ids": torch.tensor(cond_ids, dtype=torch.long),
            "seg_ids": torch.tensor(seg_ids, dtype=torch.long),
        }

    # ------------------------------------------------------------------ image and masks
    def sam_scaled_size(self, h: int, w: int) -> tuple[int, int]:
        """Size inside the padded SAM frame: longest side = sam_size (rounded like HF's SAM processor)."""
        return decode.scaled_size(h, w, self.config.sam_size)

    def jitter_scale(self, sample: Sample) -> float | None:
        """This use's large-scale-jitter scale ~ U(lo, hi) (``config.sam_scale_jitter``), a pure function of
        ``(seed, key, use)`` — the loader puts ``[seed, use]`` in ``meta["draw"]``; [0, 0] without it. Only
        training samples are jittered: evaluation sees the plain longest-side frame."""
        if self.config.sam_scale_jitter is None or sample.split != "train":
            return None
        seed, use = (int(v) for v in sample.meta.get("draw", (0, 0)))
        key = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, zlib.crc32(sample.key.encode()), use, _TAG_JITTER]
        lo, hi = self.config.sam_scale_jitter
        return float(np.random.default_rng(key).uniform(lo, hi))

    def images(
        self, image_bytes: bytes, expect_hw: tuple[int, int] | None, sam_scale: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, ...] | None]:
        """Image bytes → SigLIP 3×S×S float, SAM 3×L×L float (zero-padded), (h, w) inside the SAM frame, and
        the jitter geometry (None without ``sam_scale``) for the masks."""
        c = self.config
        x = decode.image_inputs(
            image_bytes,
            siglip_size=c.siglip_size,
            sam_size=c.sam_size,
            siglip_mean=c.siglip_mean,
            siglip_std=c.siglip_std,
            sam_mean=c.sam_mean,
            sam_std=c.sam_std,
            sam_scale=sam_scale,
            siglip_pad_square=c.siglip_pad_square,
        )
        if expect_hw is not None and tuple(x["image_hw"]) != tuple(expect_hw):
            h, w = x["image_hw"]
            raise ProcessorError(f"image is {h}x{w}, the Sample says {expect_hw[0]}x{expect_hw[1]}")
        return (
            torch.from_numpy(x["pixel_values"]),
            torch.from_numpy(x["extra_pixel_values"]),
            tuple(x["scaled_size"]),
            x["sam_geometry"],
        )

    def _to_sam_frame(
        self, rles: list[dict], size: tuple[int, int], geom: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """N RLEs → N×L×L uint8: nearest-exact resize to ``size``, zero pad bottom/right. In a DataLoader
        worker the masks are written straight into shared memory (they travel as a per-sample list, and a
        tensor that is already shared crosses to the main process without another copy)."""
        L = self.config.sam_size
        out = _empty((len(rles), L, L), torch.uint8)
        if geom is None:
            decode.masks_to_frame(rles, size, pad_to=L, out=out.numpy())
        else:  # the image's large-scale jitter, same geometry
            decode.jitter_masks(rles, geom, pad_to=L, out=out.numpy())
        return out

    # ------------------------------------------------------------------ the call
    def __call__(self, sample: Sample, image_bytes: bytes | None) -> dict[str, Any]:
        item: dict[str, Any] = self.tokenize(sample)
        c = self.config
        if image_bytes is None:
            return self._text_only(item, sample)
        hw = (sample.image.height, sample.image.width) if sample.image else None
        item["pixel_values"], item["extra_pixel_values"], size, geom = self.images(
            image_bytes, hw, self.jitter_scale(sample)
        )
        item["mask_labels"] = self._to_sam_frame([m.rle for m in sample.masks], size, geom)
        item["class_labels"] = torch.tensor([m.label for m in sample.masks], dtype=torch.long)
        item["category_labels"] = torch.tensor(
            [self._cat_index.get(m.category_id, -100) for m in sample.masks], dtype=torch.long
        )
        if sample.ignore is not None:
            item["ignore_mask"] = self._to_sam_frame([sample.ignore], size, geom)[0].view(torch.bool)
        else:
            item["ignore_mask"] = torch.zeros(c.sam_size, c.sam_size, dtype=torch.bool)
        pending = self._vgd_pending(sample, size, geom)
        if pending is None:  # 0/1 uint8 → bool is a reinterpretation, not a copy
            item["region_masks"] = self._to_sam_frame([r.rle for r in sample.regions], size, geom).view(
                torch.bool
            )
        else:  # drawn and decoded in collate, among the micro-batch's prompts
            item["vgd"] = pending
        # the r-th <region> slot must sit inside the span of its region's phrase
        slots = (item["input_ids"] == c.region_token_index).nonzero().flatten()
        if len(slots) != len(sample.regions):
            raise ProcessorError(
                f"{sample.key}: {len(slots)} <region> slots but {len(sample.regions)} regions"
            )
        for r, pos in zip(sample.regions, slots.tolist(), strict=True):
            if item["cond_ids"][pos].item() != r.label:
                raise ProcessorError(
                    f"{sample.key}: region with label {r.label} fills a slot of span {item['cond_ids'][pos].item()}"
                )
        item["scaled_size"] = torch.tensor(size, dtype=torch.long)
        item["task"], item["key"] = sample.task, sample.key
        if sample.task == "reaseg" and sample.split == "train":  # this use's explanation coins, counted
            item["reaseg_counts"] = redraw.reaseg_counts(sample)
        return item

    def _text_only(self, item: dict[str, Any], sample: Sample) -> dict[str, Any]:
        """A sample without an image (LLaVA's text-only conversations, kept as the paper trained on them):
        zero encoder inputs, as X-SAM's ``ImgConvDataset`` gives them, and no ``<image>`` token, so the model
        inserts no image features; no masks or regions."""
        c = self.config
        if sample.image is not None:
            raise ProcessorError(f"{sample.key}: no image bytes for {sample.image.path}")
        if (item["input_ids"] == c.image_token_index).any() or sample.masks or sample.regions:
            raise ProcessorError(f"{sample.key}: a sample without an image has an <image>, masks or regions")
        L, S = c.sam_size, c.siglip_size
        item["pixel_values"] = torch.zeros(3, S, S)
        item["extra_pixel_values"] = torch.zeros(3, L, L)
        item["mask_labels"] = torch.zeros(0, L, L, dtype=torch.uint8)
        item["class_labels"] = torch.zeros(0, dtype=torch.long)
        item["category_labels"] = torch.zeros(0, dtype=torch.long)
        item["ignore_mask"] = torch.zeros(L, L, dtype=torch.bool)
        item["region_masks"] = torch.zeros(0, L, L, dtype=torch.bool)
        item["scaled_size"] = torch.tensor((L, L), dtype=torch.long)  # X-SAM: the whole (empty) frame
        item["task"], item["key"] = sample.task, sample.key
        return item

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """:func:`collate`, after drawing the prompts of vgdseg train items
        (:mod:`pipelines.loader.vgd_draw`): their ``region_masks`` (in the source image's SAM frame),
        ``region_image`` (R long: the batch image each region comes from), and, for negatives, re-tokenized
        text and re-numbered ``class_labels``. The batch then carries the draw's counters as ``vgd_counts`` (a
        dict of ints); a reaseg train batch carries ``reaseg_counts``
        (:data:`pipelines.loader.redraw.COUNTERS`, summed over its items)."""
        reaseg = [it["reaseg_counts"] for it in items if "reaseg_counts" in it]
        if not any("vgd" in it for it in items):
            batch = collate(items, pad_token_id=self.pad_id)
        else:
            items, counts = self._draw_vgd(items)
            batch = collate(items, pad_token_id=self.pad_id)
            batch["vgd_counts"] = dict(counts)
            self.vgd_counts.update(counts)
        if reaseg:
            batch["reaseg_counts"] = {k: sum(c[k] for c in reaseg) for k in redraw.COUNTERS}
        return batch

    # ------------------------------------------------------------------ VGD prompts at batch time
    def draw_options(self) -> vgd_draw.DrawOptions:
        return vgd_draw.DrawOptions(
            cross_image=self.config.vgd_cross_image, negatives=self.config.vgd_negatives
        )

    def _vgd_pending(
        self, sample: Sample, size: tuple[int, int], geom: tuple[int, ...] | None
    ) -> VgdPending | None:
        """The collate-time draw's view of a vgdseg train sample with a prompt pool, or None (today's stored
        regions): no pool (an older shard, val), both options off, or regions not one per slot in order."""
        c = self.config
        if (
            sample.task != "vgdseg"
            or sample.split != "train"
            or not sample.prompt_pool
            or not (c.vgd_cross_image or c.vgd_negatives)
            or [r.label for r in sample.regions] != list(range(len(sample.phrases)))
        ):
            return None
        slots = sample.meta.get("slot_category_ids")
        if not isinstance(slots, list) or len(slots) != len(sample.phrases):
            raise ProcessorError(f"{sample.key}: meta slot_category_ids does not name one category per slot")
        seed, use = (int(v) for v in sample.meta.get("draw", (0, 0)))
        extendable = _slot_list(sample) is not None
        entry = vgd_draw.VgdEntry(sample.key, use, seed, list(slots), sample.prompt_pool, extendable)
        return VgdPending(sample, size, geom, entry)

    def _draw_vgd(self, items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
        """Plan the batch's draws, then give each pending item its drawn regions (and text, for negatives)."""
        pos = [b for b, it in enumerate(items) if "vgd" in it]
        plans, counts = vgd_draw.plan_batch([items[b]["vgd"].entry for b in pos], self.draw_options())
        out = list(items)
        for b, plan in zip(pos, plans, strict=True):
            out[b] = self._apply_plan(items, pos, b, plan, counts)
        return out, counts

    def _apply_plan(
        self,
        items: Sequence[dict[str, Any]],
        pos: list[int],
        b: int,
        plan: vgd_draw.SamplePlan,
        counts: Counter,
    ) -> dict[str, Any]:
        it = dict(items[b])
        v: VgdPending = it.pop("vgd")
        if plan.negatives:
            tok = self._with_slots(v.sample, plan)
            if tok is None:  # the longer question does not fit max_length: this sample keeps its positives
                counts.subtract(plan.negative_counts(pos.index(b)))
                counts["vgd_negative_too_long"] += 1
                plan = plan.without_negatives()
            else:
                it.update(tok)
        new = plan.label_map
        it["class_labels"] = torch.tensor([new[int(x)] for x in it["class_labels"]], dtype=torch.long)
        src = [b if p.stored is not None else -1 if p.image < 0 else pos[p.image] for p in plan.slots]
        rles = [v.sample.regions[p.stored].rle if p.stored is not None else p.rle for p in plan.slots]
        it["region_masks"] = self._regions_in_frames(items, src, rles)
        it["region_image"] = torch.tensor(src, dtype=torch.long)
        slots = (it["input_ids"] == self.config.region_token_index).nonzero().flatten()
        if len(slots) != len(plan.slots) or it["cond_ids"][slots].tolist() != list(range(len(slots))):
            raise ProcessorError(f"{v.sample.key}: drawn regions do not fill the <region> slots in order")
        return it

    def _regions_in_frames(
        self, items: Sequence[dict[str, Any]], src: list[int], rles: list[dict]
    ) -> torch.Tensor:
        """R prompts → R×L×L bool, prompt r decoded in the SAM frame of batch image ``src[r]`` (its size and
        jitter); only the chosen prompts are ever decoded. ``src[r]`` -1 (a negative with no instance to
        show): an empty mask, and the model gives that region zero features."""
        L = self.config.sam_size
        out = _empty((len(rles), L, L), torch.uint8)
        out[[r for r, s in enumerate(src) if s < 0]] = 0
        for j in sorted(set(src) - {-1}):
            rows = [r for r, s in enumerate(src) if s == j]
            v: VgdPending = items[j]["vgd"]
            out[rows] = self._to_sam_frame([rles[r] for r in rows], v.size, v.geom)
        return out.view(torch.bool)

    def _with_slots(self, sample: Sample, plan: vgd_draw.SamplePlan) -> dict[str, torch.Tensor] | None:
        """The sample's tokens with its question's slot list re-written for the plan's slots (negatives
        included; the wording and the answer stay), or None if that no longer fits ``max_length``."""
        m = _slot_list(sample)
        text = sample.conversation[0].text
        text = text[: m.start()] + templates.join_tags([REGION] * len(plan.slots)) + text[m.end() :]
        old_of_new = {n: o for o, n in plan.label_map.items()}
        phrases = [
            sample.phrases[old_of_new[i]] if i in old_of_new else REGION for i in range(len(plan.slots))
        ]
        conversation = [Turn("user", text), *sample.conversation[1:]]
        try:
            return self.tokenize(replace(sample, conversation=conversation, phrases=phrases))
        except ProcessorError:
            return None


def _slot_list(sample: Sample) -> re.Match | None:
    """The first user turn's one ``<p><region></p>`` list holding every slot, or None (negatives need it)."""
    if not sample.conversation or sample.conversation[0].role != "user":
        return None
    found = list(_SLOT_LIST.finditer(sample.conversation[0].text))
    if len(found) != 1 or found[0].group().count(REGION) != len(sample.phrases):
        return None
    return found[0]


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor. Inside a loader worker lane, in the worker's reused shared-memory arena
    (:mod:`pipelines.loader.transport`: the batch crosses to the main process without a copy or fresh pages);
    in another DataLoader worker, in new shared memory (as ``default_collate`` does). Elsewhere numpy
    allocates
    it: torch's allocator advises huge pages for big blocks, and first writes into them measured ~2x slower
    than into numpy's memory on the bench box."""
    if not _in_worker():
        return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
    arena = transport.current()
    if arena is not None:
        return arena.empty(shape, dtype)
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(int(np.prod(shape)))).view(shape)


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of same-shape CPU tensors into :func:`_empty` (shared memory inside a DataLoader
    worker, so the hand-off to the main process is not a second copy)."""
    out = _empty((len(ts), *ts[0].shape), ts[0].dtype)
    np.stack([t.numpy() for t in ts], out=out.numpy())
    return out


def _pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


def collate(items: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Items of one task → a batch (keys and shapes in the module docstring). Mixed tasks are an error."""
    if not items:
        raise ValueError("collate of an empty list")
    tasks = {it["task"] for it in items}
    if len(tasks) != 1:
        raise ValueError(f"a batch must hold one task (X-SAM requirement), got {sorted(tasks)}")
    pending = [it["key"] for it in items if "vgd" in it]
    if pending:
        raise ValueError(f"{pending[0]}: vgdseg prompts are drawn by XSamProcessor.collate, not collate")
    task = tasks.pop()
    ids = [it["input_ids"] for it in items]
    batch = {
        "input_ids": _pad(ids, pad_token_id),
        "attention_mask": _pad([torch.ones_like(x) for x in ids], 0),
        "labels": _pad([it["labels"] for it in items], -100),
        "cond_ids": _pad([it["cond_ids"] for it in items], -1),
        "seg_ids": _pad([it["seg_ids"] for it in items], -1),
        "pixel_values": _stack([it["pixel_values"] for it in items]),
        "extra_pixel_values": _stack([it["extra_pixel_values"] for it in items]),
        "ignore_mask": _stack([it["ignore_mask"] for it in items]),
        "scaled_size": _stack([it["scaled_size"] for it in items]),
        "mask_labels": [it["mask_labels"] for it in items],
        "class_labels": [it["class_labels"] for it in items],
        "category_labels": [it["category_labels"] for it in items],
        "region_masks": [it["region_masks"] for it in items],
        "task": task,
        "keys": [it["key"] for it in items],
    }
    if task == "vgdseg":  # which batch image each region's prompt (and features) comes from
        batch["region_image"] = [
            it.get("region_image", torch.full((len(it["region_masks"]),), b, dtype=torch.long))
            for b, it in enumerate(items)
        ]
    return batch
