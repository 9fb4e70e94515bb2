"""The X-SAM network: dual encoders → projectors → LLM → ``<SEG>``/phrase conditioning → Mask2Former decoder.

``XSam`` only wires built parts together (segment-anything style); :func:`xsam_model.builder.build_xsam`
builds them. One forward serves the three training stages (recipe §4):

- stage 1: SAM encoder → connector → decoder with the linear 133-class head; no LLM, no text.
- stage 2: both encoders → projectors → LLM; LM loss only (the decoder is not run).
- stage 3: everything; LM loss plus, for segmentation tasks, the phrase-head segmentation losses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import XsamError
from xsam_model.config import XSamConfig
from xsam_model.modeling.connector import SegConnector
from xsam_model.modeling.decoder import MaskDecoder
from xsam_model.modeling.loss import SegLoss
from xsam_model.modeling.projector import MLPProjector, SegProjector
from xsam_model.modeling.region_sampler import RegionSampler
from xsam_model.modeling.seg_plan import DecodePlan, count_targets, plan_decoding

logger = logging.getLogger(__name__)

LOSS_KEYS = ("lm", "cls", "mask_bce", "dice")


@dataclass
class XSamOutput:
    loss: torch.Tensor
    """Total: lm_weight·lm + seg_weight·(cls + mask_bce + dice)."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """``lm``, ``cls``, ``mask_bce``, ``dice`` (weighted, summed over decoder layers; 0 when not computed),
    detached: for logging."""
    predictions: list[dict[str, torch.Tensor]] | None = None
    """Per decoder layer ``masks_queries_logits`` RxQxH0xW0 and ``class_queries_logits`` RxQxC (last = final),
    one row per decoder run: R = B, except per-``<SEG>`` decoding (see ``runs``)."""
    lm_logits: torch.Tensor | None = None
    runs: torch.Tensor | None = None
    """Rx2 long: (image, ``<SEG>`` index) of each prediction row; the index is -1 when a run is a whole
    image."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-step counters for logging: ``dropped_targets`` (stage 1's masks with an unknown category)."""


class XSam(nn.Module):
    def __init__(
        self,
        *,
        config: XSamConfig,
        vision_encoder: nn.Module,
        sam_encoder: nn.Module,
        llm: nn.Module,
        visual_projector: MLPProjector,
        seg_projector: SegProjector,
        llm_projector: MLPProjector,
        seg_connector: SegConnector,
        mask_decoder: MaskDecoder,
        region_sampler: RegionSampler,
        criterion: SegLoss,
        special_token_ids: dict[str, int],
    ):
        super().__init__()
        self.config = config
        self.vision_encoder = vision_encoder  # SiglipVisionModel
        self.sam_encoder = sam_encoder  # SamVisionModel (neck removed)
        self.llm = llm  # *ForCausalLM
        self.visual_projector = visual_projector
        self.seg_projector = seg_projector
        self.llm_projector = llm_projector
        self.seg_connector = seg_connector
        self.mask_decoder = mask_decoder
        self.region_sampler = region_sampler
        self.criterion = criterion
        self.special_token_ids = dict(special_token_ids)
        self.processor = None  # set by the builder when a tokenizer is available

    # ------------------------------------------------------------------ encoders
    def encode_sam(self, extra_pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bx3xLxL → (BxGxGxC features for the seg projector, 3 × BxGxGxC connector inputs)."""
        hs = self.sam_encoder(
            extra_pixel_values, output_hidden_states=True
        ).hidden_states  # (layers+1) × BxGxGxC
        c = self.config.sam
        return hs[c.select_layer], [hs[i] for i in c.connector_layers]

    def encode_images(
        self, pixel_values: torch.Tensor, sam_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP Bx3xSxS + SAM BxGxGxC → (image tokens Bx(Ns+Ng)xD, seg grid Bx(G/2)x(G/2)xD)."""
        hs = self.vision_encoder(pixel_values, output_hidden_states=True).hidden_states
        vis = self.visual_projector(hs[self.config.siglip.select_layer])  # BxNsxD
        grid = self.seg_projector(sam_feats)  # Bxgxgxd
        return torch.cat([vis, grid.flatten(1, 2)], 1), grid

    # ------------------------------------------------------------------ token expansion
    def _expand(
        self, batch: dict[str, Any], image_tokens: torch.Tensor, grid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Replace each ``<image>`` (-200) by its image tokens and each ``<region>`` (-300) by its region
        tokens; labels/cond_ids/seg_ids follow (region tokens keep their span's cond id). Right-padded to the
        batch max.

        Region r of sample b is read from the grid of batch image ``batch["region_image"][b][r]`` (VGD prompts
        drawn from another image of the batch, as X-SAM; -1: zero features); without that key, from sample b's
        own grid."""
        p = self.config.processor
        ids, attn = batch["input_ids"], batch["attention_mask"]
        embed = self.llm.get_input_embeddings()(ids.clamp(min=0))  # BxTxD
        rows: list[dict[str, torch.Tensor]] = []
        for b in range(ids.shape[0]):
            n = int(attn[b].sum())
            cols = {
                "embeds": embed[b, :n],
                "labels": batch["labels"][b, :n],
                "cond_ids": batch["cond_ids"][b, :n],
                "seg_ids": batch["seg_ids"][b, :n],
            }
            holes = (
                ((ids[b, :n] == p.image_token_index) | (ids[b, :n] == p.region_token_index))
                .nonzero()
                .flatten()
                .tolist()
            )
            regions = None
            if (ids[b, :n] == p.region_token_index).any():
                regions = self._region_tokens(batch, b, grid)  # RxKxD
            pieces: dict[str, list[torch.Tensor]] = {k: [] for k in cols}
            start, r = 0, 0
            for pos in holes:
                for k, v in cols.items():
                    pieces[k].append(v[start:pos])
                if ids[b, pos] == p.image_token_index:
                    new = image_tokens[b]
                    cond = -1
                else:
                    new = regions[r]
                    cond, r = int(cols["cond_ids"][pos]), r + 1
                m = new.shape[0]
                pieces["embeds"].append(new.to(embed.dtype))
                pieces["labels"].append(cols["labels"].new_full((m,), -100))
                pieces["cond_ids"].append(cols["cond_ids"].new_full((m,), cond))
                pieces["seg_ids"].append(cols["seg_ids"].new_full((m,), -1))
                start = pos + 1
            rows.append({k: torch.cat([*pieces[k], v[start:]]) for k, v in cols.items()})
        pad = {"embeds": 0.0, "labels": -100, "cond_ids": -1, "seg_ids": -1}
        out = {
            k: nn.utils.rnn.pad_sequence([r[k] for r in rows], batch_first=True, padding_value=pad[k])
            for k in pad
        }
        out["attention_mask"] = nn.utils.rnn.pad_sequence(
            [torch.ones(len(r["labels"]), dtype=torch.long, device=ids.device) for r in rows],
            batch_first=True,
        )
        return out

    def _region_tokens(self, batch: dict[str, Any], b: int, grid: torch.Tensor) -> torch.Tensor:
        """Sample b's R region masks (LxL, each in its source image's SAM frame) → RxKxD tokens sampled from
        their source images' grids (grid: Bxgxgxd)."""
        masks = batch["region_masks"][b].to(grid.device)
        src = batch.get("region_image")
        if src is None:
            return self.region_sampler(grid[b], masks)
        src = src[b].to(grid.device)
        if len(src) != len(masks) or bool(((src < -1) | (src >= grid.shape[0])).any()):
            key = (batch.get("keys") or [f"sample {b}"] * (b + 1))[b]
            raise ValueError(f"{key}: region_image {src.tolist()} does not name a batch image per region")
        return self.region_sampler(grid, masks, image=src)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any], *, stage: int = 3, compute_loss: bool = True) -> XSamOutput:
        """batch: :func:`xsam_model.processor.collate` output (keys and shapes documented there).

        stage 1: ``extra_pixel_values`` Bx3xLxL + targets → linear-head predictions and seg losses.
        stage 2: + ``pixel_values`` Bx3xSxS, tokens BxT → LM loss.
        stage 3: + phrase-head seg losses when the batch has ``<SEG>`` tokens (not for chat); a batch of a
        task in ``DecoderConfig.seg_reduce_tasks`` is decoded as ``seg_reduce`` says (:mod:`.seg_plan`).
        """
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        dev = batch["extra_pixel_values"].device
        zero = torch.zeros((), device=dev)
        losses = {k: zero for k in LOSS_KEYS}
        metrics = {"dropped_targets": zero}
        sam_feats, pyramid = self.encode_sam(batch["extra_pixel_values"])
        out = XSamOutput(loss=zero, losses=losses, metrics=metrics)
        if stage == 1:
            out.predictions = self.mask_decoder(self.seg_connector(pyramid))
            b = batch["extra_pixel_values"].shape[0]
            out.runs = _image_runs(b, dev)
            if compute_loss:
                n = self.config.decoder.num_linear_classes
                masks, labels, dropped = self._targets(batch, batch["category_labels"], [n] * b, -100)
                metrics["dropped_targets"] = torch.tensor(float(dropped), device=dev)
                losses.update(self._seg_losses(out.predictions, masks, labels, batch, None))
        else:
            self._stage23(batch, stage, compute_loss, sam_feats, pyramid, out)
        out.loss = sum(losses.values())
        # the per-component values are for logging: detached, so logging never holds the graph
        out.losses = {k: v.detach() for k, v in losses.items()}
        return out

    def count_loss_targets(self, batch: dict[str, Any], *, stage: int = 3) -> int:
        """The target masks :meth:`forward` gives the mask losses for ``batch`` (same filtering, same decoding
        plan), counted from the batch alone (no model pass): the trainer sums it over an optimizer step's
        micro-batches and ranks for the ``global_batch`` normaliser (``LossConfig.num_masks_reduce``)."""
        b = len(batch["mask_labels"])
        if stage == 1:
            n = self.config.decoder.num_linear_classes
            return sum(len(m) for m in self._targets(batch, batch["category_labels"], [n] * b, -100)[1])
        if stage != 3 or not bool((batch["seg_ids"] >= 0).any()):
            return 0
        _, labels = self._phrase_targets(batch, batch["cond_ids"])
        return count_targets(self._decode_mode(batch.get("task")), batch["seg_ids"], labels)

    def _decode_mode(self, task: str | None) -> str:
        """The task's stage-3 decoding plan (``DecoderConfig.seg_reduce`` for its tasks, else ``last``)."""
        d = self.config.decoder
        return d.seg_reduce if task in d.seg_reduce_tasks else "last"

    def _phrase_targets(self, batch, cond_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stage-3 targets: per sample its masks and phrase labels, checked against its phrase count (spans
        of ``cond_ids`` BxT are numbered 0..K-1 per sample)."""
        masks, labels, _ = self._targets(batch, batch["class_labels"], (cond_ids.amax(1) + 1).tolist(), None)
        return masks, labels

    def _stage23(self, batch, stage: int, compute_loss: bool, sam_feats, pyramid, out: XSamOutput) -> None:
        image_tokens, grid = self.encode_images(batch["pixel_values"], sam_feats)
        x = self._expand(batch, image_tokens, grid)
        # one full pass: no KV cache to build (transformers warns when it meets gradient checkpointing)
        hidden = self.llm.model(
            inputs_embeds=x["embeds"], attention_mask=x["attention_mask"], use_cache=False
        ).last_hidden_state
        out.lm_logits = self.llm.lm_head(hidden)  # BxT'xV
        if compute_loss:
            out.losses["lm"] = self.config.loss.lm_weight * F.cross_entropy(
                out.lm_logits[:, :-1].flatten(0, 1).float(), x["labels"][:, 1:].flatten(), ignore_index=-100
            )
        if stage != 3 or not bool((x["seg_ids"] >= 0).any()):
            return
        masks = labels = None
        if compute_loss:
            masks, labels = self._phrase_targets(batch, x["cond_ids"])
        proj = self.llm_projector(hidden)  # BxT'xC
        plan = plan_decoding(
            self._decode_mode(batch.get("task")), proj, x["cond_ids"], x["seg_ids"], masks, labels
        )
        out.predictions = self.mask_decoder(
            self.seg_connector(pyramid),
            seg_embeds=plan.seg_embeds,
            cond=plan.cond,
            cond_valid=plan.valid,
            rows=plan.rows,
        )
        out.runs = plan.runs
        if compute_loss:
            out.losses.update(self._seg_losses(out.predictions, plan.masks, plan.labels, batch, plan.rows))

    def decode_states(
        self, pyramid: list[torch.Tensor], hidden: torch.Tensor, cond_ids, seg_ids, task: str | None
    ) -> tuple[list[dict[str, torch.Tensor]], DecodePlan]:
        """Stage-3 decoding of final LLM states without targets (inference: :mod:`xsam_model.inferencer`):
        hidden BxTxD with cond_ids/seg_ids BxT, pyramid = the connector inputs from :meth:`encode_sam`. The
        task's ``seg_reduce`` mode, as in :meth:`forward`. Returns the decoder's per-layer predictions (R
        runs) and the plan (``runs``: each run's image and ``<SEG>``)."""
        plan = plan_decoding(self._decode_mode(task), self.llm_projector(hidden), cond_ids, seg_ids)
        preds = self.mask_decoder(
            self.seg_connector(pyramid),
            seg_embeds=plan.seg_embeds,
            cond=plan.cond,
            cond_valid=plan.valid,
            rows=plan.rows,
        )
        return preds, plan

    def _targets(self, batch, labels: list[torch.Tensor], n_classes: list[int], unknown: int | None):
        """Per sample: the masks and labels for the head in use, checked. A label outside ``[0,
        n_classes[b])`` is an error naming the sample (a pipeline off-by-one must not silently remove
        supervision), except ``unknown`` (stage 1's -100 = a category outside the head), which is dropped and
        counted."""
        masks_out, labels_out, dropped = [], [], 0
        keys = batch.get("keys") or []
        for i, (m, lab) in enumerate(zip(batch["mask_labels"], labels, strict=True)):
            skip = lab == unknown if unknown is not None else torch.zeros_like(lab, dtype=torch.bool)
            bad = ((lab < 0) | (lab >= int(n_classes[i]))) & ~skip
            if bool(bad.any()):
                key = keys[i] if i < len(keys) else f"sample {i}"
                raise TargetLabelError(
                    f"{key}: mask label(s) {lab[bad].tolist()} outside [0, {int(n_classes[i])})"
                    + (f" (and not the unknown label {unknown})" if unknown is not None else "")
                )
            dropped += int(skip.sum())
            masks_out.append(m[~skip.to(m.device)])
            labels_out.append(lab[~skip])
        if dropped:
            logger.debug("dropped %d target masks with the unknown label %s", dropped, unknown)
        return masks_out, labels_out, dropped

    def _seg_losses(self, predictions, masks, labels, batch, rows) -> dict[str, torch.Tensor]:
        dev = predictions[-1]["masks_queries_logits"].device
        preds = predictions if self.config.loss.use_auxiliary_loss else predictions[-1:]
        ignore = None
        if self.config.loss.ignore_pixels == "exclude" and batch.get("ignore_mask") is not None:
            ignore = batch["ignore_mask"].to(dev)
            ignore = ignore[rows.to(dev)] if rows is not None else ignore
        seg = self.criterion(preds, [m.to(dev) for m in masks], [lab.to(dev) for lab in labels], ignore)
        return {k: self.config.loss.seg_weight * v for k, v in seg.items()}


class TargetLabelError(XsamError, ValueError):
    """A target mask's label does not index the head's classes (the message names the sample)."""


def _image_runs(b: int, device) -> torch.Tensor:
    return torch.stack([torch.arange(b, device=device), torch.full((b,), -1, device=device)], 1)
