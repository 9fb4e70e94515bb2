"""The X-SAM network: dual encoders → projectors → LLM → ``<SEG>``/phrase conditioning → Mask2Former decoder.

``XSam`` only wires built parts together (segment-anything style); :func:`xsam_model.builder.build_xsam`
builds them. One forward serves the three training stages (recipe §4):

- stage 1: SAM encoder → connector → decoder with the linear 133-class head; no LLM, no text.
- stage 2: both encoders → projectors → LLM; LM loss only (the decoder is not run).
- stage 3: everything; LM loss plus, for segmentation tasks, the phrase-head segmentation losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xsam_model.config import XSamConfig
from xsam_model.modeling.connector import SegConnector
from xsam_model.modeling.decoder import MaskDecoder
from xsam_model.modeling.loss import SegLoss
from xsam_model.modeling.projector import MLPProjector, SegProjector
from xsam_model.modeling.region_sampler import RegionSampler

LOSS_KEYS = ("lm", "cls", "mask_bce", "dice")


@dataclass
class XSamOutput:
    loss: torch.Tensor
    """Total: lm_weight·lm + seg_weight·(cls + mask_bce + dice)."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """``lm``, ``cls``, ``mask_bce``, ``dice`` (weighted, summed over decoder layers; 0 when not computed),
    detached: for logging."""
    predictions: list[dict[str, torch.Tensor]] | None = None
    """Per decoder layer ``masks_queries_logits`` BxQxH0xW0 and ``class_queries_logits`` BxQxC (last = final)."""
    lm_logits: torch.Tensor | None = None


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
        """Replace each ``<image>`` (-200) by its image tokens and each ``<region>`` (-300) by its region tokens;
        labels/cond_ids/seg_ids follow (region tokens keep their span's cond id). Right-padded to the batch max."""
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
                regions = self.region_sampler(grid[b], batch["region_masks"][b].to(grid.device))  # RxKxD
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

    # ------------------------------------------------------------------ conditioning
    def _conditions(self, hidden: torch.Tensor, cond_ids: torch.Tensor, seg_ids: torch.Tensor):
        """hidden BxTxC (projected) → seg_embeds BxC, cond BxKxC (mean over each span), valid BxK, has_seg B."""
        k = max(int(cond_ids.max()) + 1, 1)
        onehot = (cond_ids.unsqueeze(1) == torch.arange(k, device=cond_ids.device)[None, :, None]).to(
            hidden.dtype
        )
        counts = onehot.sum(-1)  # BxK
        cond = torch.bmm(onehot, hidden) / counts.clamp(min=1).unsqueeze(-1)
        has_seg = (seg_ids >= 0).any(1)
        if self.config.decoder.seg_reduce == "last":
            # X-SAM conditions the queries with one <SEG> per image: the last one
            w = (seg_ids == seg_ids.max(1, keepdim=True).values) & (seg_ids >= 0)
        else:
            w = seg_ids >= 0
        w = w.to(hidden.dtype)
        seg = torch.bmm(w.unsqueeze(1), hidden).squeeze(1) / w.sum(1, keepdim=True).clamp(min=1)
        return seg, cond, counts > 0, has_seg

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any], *, stage: int = 3, compute_loss: bool = True) -> XSamOutput:
        """batch: :func:`xsam_model.processor.collate` output (keys and shapes documented there).

        stage 1: ``extra_pixel_values`` Bx3xLxL + targets → linear-head predictions and seg losses.
        stage 2: + ``pixel_values`` Bx3xSxS, tokens BxT → LM loss.
        stage 3: + phrase-head seg losses when the batch has ``<SEG>`` tokens (not for chat).
        """
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        dev = batch["extra_pixel_values"].device
        zero = torch.zeros((), device=dev)
        losses = {k: zero for k in LOSS_KEYS}
        sam_feats, pyramid = self.encode_sam(batch["extra_pixel_values"])
        predictions, lm_logits = None, None

        if stage == 1:
            predictions = self.mask_decoder(self.seg_connector(pyramid))
            if compute_loss:
                masks, labels = self._targets(batch, batch["category_labels"], limit=None)
                losses.update(self._seg_losses(predictions, masks, labels, batch))
        else:
            image_tokens, grid = self.encode_images(batch["pixel_values"], sam_feats)
            x = self._expand(batch, image_tokens, grid)
            out = self.llm.model(inputs_embeds=x["embeds"], attention_mask=x["attention_mask"])
            hidden = out.last_hidden_state  # BxT'xD
            lm_logits = self.llm.lm_head(hidden)  # BxT'xV
            if compute_loss:
                losses["lm"] = self.config.loss.lm_weight * F.cross_entropy(
                    lm_logits[:, :-1].flatten(0, 1).float(), x["labels"][:, 1:].flatten(), ignore_index=-100
                )
            if stage == 3 and bool((x["seg_ids"] >= 0).any()):
                proj = self.llm_projector(hidden)  # BxT'xC
                seg, cond, valid, _ = self._conditions(proj, x["cond_ids"], x["seg_ids"])
                predictions = self.mask_decoder(
                    self.seg_connector(pyramid), seg_embeds=seg, cond=cond, cond_valid=valid
                )
                if compute_loss:
                    masks, labels = self._targets(batch, batch["class_labels"], limit=valid.sum(1))
                    losses.update(self._seg_losses(predictions, masks, labels, batch))
        total = sum(losses.values())
        # the per-component values are for logging: detached, so logging never holds the graph
        return XSamOutput(
            loss=total,
            losses={k: v.detach() for k, v in losses.items()},
            predictions=predictions,
            lm_logits=lm_logits,
        )

    def _targets(self, batch, labels: list[torch.Tensor], limit):
        """Keep masks whose label is valid for the head in use (≥ 0, and < #phrases for the phrase head)."""
        masks_out, labels_out = [], []
        for i, (m, lab) in enumerate(zip(batch["mask_labels"], labels, strict=True)):
            keep = lab >= 0
            if limit is not None:
                keep &= lab < int(limit[i])
            masks_out.append(m[keep])
            labels_out.append(lab[keep])
        return masks_out, labels_out

    def _seg_losses(self, predictions, masks, labels, batch) -> dict[str, torch.Tensor]:
        dev = predictions[-1]["masks_queries_logits"].device
        preds = predictions if self.config.loss.use_auxiliary_loss else predictions[-1:]
        ignore = batch.get("ignore_mask")
        seg = self.criterion(
            preds,
            [m.to(dev) for m in masks],
            [lab.to(dev) for lab in labels],
            ignore.to(dev) if ignore is not None else None,
        )
        return {k: self.config.loss.seg_weight * v for k, v in seg.items()}
