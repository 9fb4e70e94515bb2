"""Mask decoder: transformers' Mask2Former pixel decoder and masked-attention transformer decoder, with
``<SEG>`` conditioning added to the queries, and the two class heads (phrase cosine head, linear head)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)

PAD_LOGIT = -1e6  # logit of a padding phrase column: never predicted, never matched


class ConditionedTransformerModule(Mask2FormerTransformerModule):
    """Mask2Former's transformer module whose query features get the projected ``<SEG>`` embedding added
    (X-SAM: ``query_features + seg_embeds``). Parameter names stay those of transformers' module."""

    def forward(self, multi_scale_features, mask_features, seg_embeds: torch.Tensor | None = None):
        """multi_scale_features: 3 × BxCxHlxWl (low res first); mask_features: BxMxH0xW0; seg_embeds: BxC."""
        feats, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            x = multi_scale_features[i]
            sizes.append(x.shape[-2:])
            pos.append(self.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
            proj = self.input_projections[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            feats.append(proj.permute(2, 0, 1))  # HWxBxC
        batch = feats[0].shape[1]
        query_pos = self.queries_embedder.weight.unsqueeze(1).repeat(1, batch, 1)  # QxBxC
        query = self.queries_features.weight.unsqueeze(1).repeat(1, batch, 1)  # QxBxC
        if seg_embeds is not None:
            query = query + seg_embeds.unsqueeze(0).to(query.dtype)
        return self.decoder(
            inputs_embeds=query,
            multi_stage_positional_embeddings=pos,
            pixel_embeddings=mask_features,
            encoder_hidden_states=feats,
            query_position_embeddings=query_pos,
            feature_size_list=sizes,
            return_dict=True,
        )


class PhraseClassifier(nn.Module):
    """logits = exp(scale)·cos(query, phrase) over the phrases plus a learnable background ("no-object")."""

    def __init__(self, *, dim: int, logit_scale_init: float = math.log(1 / 0.07), clamp: float = 50.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.bg_embed = nn.Parameter(torch.randn(dim) * 0.02)
        self.clamp = clamp

    def forward(self, queries: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """queries BxQxC, cond BxKxC, valid BxK bool → BxQx(K+1) (last column = no-object)."""
        cond = torch.cat([cond, self.bg_embed.to(cond.dtype).expand(cond.shape[0], 1, -1)], 1)
        logits = torch.einsum("bqc,bkc->bqk", F.normalize(queries, dim=-1), F.normalize(cond, dim=-1))
        logits = (logits * self.logit_scale.exp()).clamp(-self.clamp, self.clamp)
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], 1)
        return logits.masked_fill(~valid[:, None, :], PAD_LOGIT)


class MaskDecoder(nn.Module):
    """Pixel decoder + conditioned transformer decoder + heads. Built parts in, predictions per layer out."""

    def __init__(
        self,
        *,
        pixel_decoder: Mask2FormerPixelDecoder,
        transformer: ConditionedTransformerModule,
        phrase_head: PhraseClassifier,
        linear_head: nn.Linear,
    ):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.transformer = transformer
        self.phrase_head = phrase_head
        self.linear_head = linear_head

    def forward(
        self,
        features: list[torch.Tensor],
        *,
        seg_embeds: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        cond_valid: torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """features: 3 × BxCixHixWi (high res first, strides 8/16/32); seg_embeds BxC; cond BxKxC, cond_valid BxK.

        Returns one dict per decoder prediction (first = learnable queries only, last = final):
        ``masks_queries_logits`` BxQxH0xW0 (H0 = stride-8 grid) and ``class_queries_logits`` BxQx(K+1) with the
        phrase head (``cond`` given) or BxQx(133+1) with the linear head (``cond`` None).
        """
        pix = self.pixel_decoder(features)
        out = self.transformer(pix.multi_scale_features, pix.mask_features, seg_embeds)
        preds = []
        for hidden, masks in zip(out.intermediate_hidden_states, out.masks_queries_logits, strict=True):
            queries = hidden.transpose(0, 1)  # QxBxC → BxQxC
            logits = (
                self.linear_head(queries) if cond is None else self.phrase_head(queries, cond, cond_valid)
            )
            preds.append({"masks_queries_logits": masks, "class_queries_logits": logits})
        return preds


class _Mask2FormerInit(Mask2FormerPreTrainedModel):
    """Runs transformers' Mask2Former weight init on modules built outside a Mask2Former model (their
    ``nn.Parameter(torch.Tensor(...))`` fields are otherwise uninitialised memory)."""

    @classmethod
    def is_custom_code(cls) -> bool:
        # as "custom code", modules without direct parameters (the deformable attention) would be skipped
        return False

    def __init__(self, config: Mask2FormerConfig, module: nn.Module):
        super().__init__(config)
        self.module = module
        self.post_init()


def init_mask2former_weights(module: nn.Module, config: Mask2FormerConfig) -> nn.Module:
    _Mask2FormerInit(config, module)
    return module
