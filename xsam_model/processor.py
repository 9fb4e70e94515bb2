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
pixel_values        3×S×S float    SigLIP image (plain resize, normalised)
extra_pixel_values  3×L×L float    SAM image: longest side L, normalised, zero-padded bottom/right
mask_labels         N×L×L uint8    target masks in the SAM frame (nearest resize, zero pad)
class_labels        N long         phrase index of each mask (-1 = no phrase)
category_labels     N long         index of the mask's category in ``category_ids`` (-100 = unknown)
ignore_mask         L×L bool       pixels excluded from the mask losses (reaseg "ignore" shapes)
region_masks        R×L×L bool     visual prompt of the r-th ``<region>`` slot, in slot order
scaled_size         2 long         (h, w) of the image inside the padded SAM frame
task, key           str            the Sample's task and key
==================  =============  =========================================================================

The batch from :meth:`XSamProcessor.collate` stacks the fixed-size tensors (``pixel_values`` B×3×S×S,
``extra_pixel_values`` B×3×L×L, ``ignore_mask`` B×L×L, ``scaled_size`` B×2), right-pads the four token
tensors to B×Tmax (ids with the pad id, labels with -100, cond/seg ids with -1) and adds
``attention_mask`` B×Tmax (1 = real token); ``mask_labels``, ``class_labels``, ``category_labels`` and
``region_masks`` stay per-sample lists (ragged); ``task`` is one str, ``keys`` a list of str.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.masks import decode as decode_rle
from pipelines.schema import IMAGE, REGION, Sample
from xsam_model.config import ProcessorConfig

# Phi-3 chat template (recipe §2.1): INSTRUCTION, SUFFIX (= EOS, carries loss), SEP (no loss). SYSTEM is "".
INSTRUCTION = "<|user|>\n{input}<|end|>\n<|assistant|>\n"
SUFFIX = "<|end|>"
SEP = "\n"
_SPLIT = re.compile(f"({re.escape(IMAGE)}|{re.escape(REGION)})")


class ProcessorError(ValueError):
    """A Sample cannot be turned into model inputs (the loader may skip it and count the reason)."""


class XSamProcessor:
    """Callable ``(sample, image_bytes) -> dict[str, Tensor]``; see the module docstring for the keys."""

    def __init__(self, config: ProcessorConfig, tokenizer, special_tokens: Sequence[str] = ("<SEG>", "<p>", "</p>")):
        self.config = config
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in special_tokens if t not in vocab]
        if missing:
            raise ProcessorError(f"tokenizer lacks {missing}; run xsam_model.tokenizer.prepare_tokenizer first")
        self.seg_id, self.p_open_id, self.p_close_id = (vocab[t] for t in special_tokens[:3])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cat_index = {c: i for i, c in enumerate(config.category_ids)}

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

    def tokenize(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Chat template + tokenization → ``input_ids``, ``labels``, ``cond_ids``, ``seg_ids`` (all T long)."""
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
                sep = self._encode(SEP)
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
        input_ids = torch.tensor(ids, dtype=torch.long)
        cond_ids = torch.full_like(input_ids, -1)
        seg_ids = torch.full_like(input_ids, -1)
        k, inside = -1, False
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
        if k + 1 != len(sample.phrases):
            raise ProcessorError(f"{sample.key}: {k + 1} <p> spans in tokens but {len(sample.phrases)} phrases")
        seg_pos = (input_ids == self.seg_id).nonzero().flatten()
        seg_ids[seg_pos] = torch.arange(len(seg_pos))
        return {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.long),
                "cond_ids": cond_ids, "seg_ids": seg_ids}  # fmt: skip

    # ------------------------------------------------------------------ image and masks
    @staticmethod
    def _normalize(img: np.ndarray, mean, std) -> torch.Tensor:
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)  # 3xHxW
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    def sam_scaled_size(self, h: int, w: int) -> tuple[int, int]:
        """Size inside the padded SAM frame: longest side = sam_size (rounded like HF's SAM processor)."""
        scale = self.config.sam_size / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def _to_sam_frame(self, masks: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """N masks HxW → N×L×L uint8: nearest resize to ``size``, zero pad bottom/right."""
        L = self.config.sam_size
        out = torch.zeros((len(masks), L, L), dtype=torch.uint8)
        if masks:
            stack = torch.from_numpy(np.stack(masks)).unsqueeze(0)  # 1xNxHxW uint8
            out[:, : size[0], : size[1]] = F.interpolate(stack, size=size, mode="nearest-exact")[0]
        return out

    def images(self, image_bytes: bytes, expect_hw: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im = im.convert("RGB")
        if expect_hw is not None and (im.height, im.width) != expect_hw:
            raise ProcessorError(f"image is {im.height}x{im.width}, the Sample says {expect_hw[0]}x{expect_hw[1]}")
        c = self.config
        siglip = self._normalize(np.asarray(im.resize((c.siglip_size, c.siglip_size), Image.BICUBIC)), c.siglip_mean, c.siglip_std)
        sh, sw = self.sam_scaled_size(im.height, im.width)
        sam = torch.zeros(3, c.sam_size, c.sam_size)  # zero pad after normalisation, as HF's SAM processor
        sam[:, :sh, :sw] = self._normalize(np.asarray(im.resize((sw, sh), Image.BILINEAR)), c.sam_mean, c.sam_std)
        return siglip, sam, (sh, sw)

    # ------------------------------------------------------------------ the call
    def __call__(self, sample: Sample, image_bytes: bytes | None) -> dict[str, Any]:
        item: dict[str, Any] = self.tokenize(sample)
        c = self.config
        if image_bytes is None:
            raise ProcessorError(f"{sample.key}: no image bytes (text-only samples are not supported)")
        hw = (sample.image.height, sample.image.width) if sample.image else None
        item["pixel_values"], item["extra_pixel_values"], size = self.images(image_bytes, hw)
        item["mask_labels"] = self._to_sam_frame([decode_rle(m.rle) for m in sample.masks], size)
        item["class_labels"] = torch.tensor([m.label for m in sample.masks], dtype=torch.long)
        item["category_labels"] = torch.tensor(
            [self._cat_index.get(m.category_id, -100) for m in sample.masks], dtype=torch.long
        )
        ignore = [decode_rle(sample.ignore)] if sample.ignore is not None else []
        item["ignore_mask"] = self._to_sam_frame(ignore, size).bool().any(0) if ignore else torch.zeros(c.sam_size, c.sam_size, dtype=torch.bool)
        item["region_masks"] = self._to_sam_frame([decode_rle(r.rle) for r in sample.regions], size).bool()
        # the r-th <region> slot must sit inside the span of its region's phrase
        slots = (item["input_ids"] == c.region_token_index).nonzero().flatten()
        if len(slots) != len(sample.regions):
            raise ProcessorError(f"{sample.key}: {len(slots)} <region> slots but {len(sample.regions)} regions")
        for r, pos in zip(sample.regions, slots.tolist(), strict=True):
            if item["cond_ids"][pos].item() != r.label:
                raise ProcessorError(f"{sample.key}: region with label {r.label} fills a slot of span {item['cond_ids'][pos].item()}")
        item["scaled_size"] = torch.tensor(size, dtype=torch.long)
        item["task"], item["key"] = sample.task, sample.key
        return item

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, pad_token_id=self.pad_id)


def _pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


def collate(items: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Items of one task → a batch (keys and shapes in the module docstring). Mixed tasks are an error."""
    if not items:
        raise ValueError("collate of an empty list")
    tasks = {it["task"] for it in items}
    if len(tasks) != 1:
        raise ValueError(f"a batch must hold one task (X-SAM requirement), got {sorted(tasks)}")
    ids = [it["input_ids"] for it in items]
    return {
        "input_ids": _pad(ids, pad_token_id),
        "attention_mask": _pad([torch.ones_like(x) for x in ids], 0),
        "labels": _pad([it["labels"] for it in items], -100),
        "cond_ids": _pad([it["cond_ids"] for it in items], -1),
        "seg_ids": _pad([it["seg_ids"] for it in items], -1),
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "extra_pixel_values": torch.stack([it["extra_pixel_values"] for it in items]),
        "ignore_mask": torch.stack([it["ignore_mask"] for it in items]),
        "scaled_size": torch.stack([it["scaled_size"] for it in items]),
        "mask_labels": [it["mask_labels"] for it in items],
        "class_labels": [it["class_labels"] for it in items],
        "category_labels": [it["category_labels"] for it in items],
        "region_masks": [it["region_masks"] for it in items],
        "task": tasks.pop(),
        "keys": [it["key"] for it in items],
    }
