"""Mask decoder: transformers' Mask2Former pixel decoder and masked-attention transformer decoder, with
``<SEG>`` conditioning added to the queries, and the two class heads (phrase cosine head, linear head)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerPixelDecoderEncoderOnly,
    Mask2FormerPixelLevelModule,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)

# Logit of a padding phrase column: never predicted, never matched (X-SAM archive: -1e9; main: -1e6). It is
# representable in bf16 (max ≈ 3.4e38); in fp16 it becomes the dtype's lowest finite value.
PAD_LOGIT = -1e9


class ConditionedTransformerModule(Mask2FormerTransformerModule):
    """Mask2Former's transformer module whose query features get the projected ``<SEG>`` embedding added
    (X-SAM: ``query_features + seg_embeds``). Parameter names stay those of transformers' module."""

    def forward(
        self,
        multi_scale_features,
        mask_features,
        seg_embeds: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ):
        """multi_scale_features: 3 × BxCxHlxWl (low res first); mask_features: BxMxH0xW0.

        ``rows`` (S long, values in 0..B-1) runs the decoder S times in one batched call, run s on image
        ``rows[s]`` (X-SAM's per-``<SEG>`` repeat: features are projected once per image, then gathered);
        ``seg_embeds`` then is SxC, else BxC. None = one run per image.
        """
        feats, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            x = multi_scale_features[i]
            sizes.append(x.shape[-2:])
            proj = (
                self.input_projections[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            )  # BxCxHW
            if rows is not None:
                proj = proj[rows]  # SxCxHW
            shape = (proj.shape[0], *x.shape[1:])
            pos.append(self.position_embedder(shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
            feats.append(proj.permute(2, 0, 1))  # HWxBxC
        if rows is not None:
            mask_features = mask_features[rows]
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

    def __init__(
        self,
        *,
        dim: int,
        logit_scale_init: float = math.log(1 / 0.07),
        clamp: float = 500.0,
        bg_init_std: float = 1.0,
    ):
        super().__init__()
        # shapes: logit_scale [] and bg_embed [C]; X-SAM's are [1] and [1, C] (a reshape when converting)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.bg_embed = nn.Parameter(torch.randn(dim) * bg_init_std)
        self.clamp = clamp

    def forward(self, queries: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """queries BxQxC, cond BxKxC, valid BxK bool → BxQx(K+1) (last column = no-object)."""
        cond = torch.cat([cond, self.bg_embed.to(cond.dtype).expand(cond.shape[0], 1, -1)], 1)
        logits = torch.einsum("bqc,bkc->bqk", F.normalize(queries, dim=-1), F.normalize(cond, dim=-1))
        logits = (logits * self.logit_scale.exp()).clamp(-self.clamp, self.clamp)
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], 1)
        pad = max(PAD_LOGIT, torch.finfo(logits.dtype).min)
        return logits.masked_fill(~valid[:, None, :], pad)


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
        rows: torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """features: 3 × BxCixHixWi (high res first, strides 8/16/32); seg_embeds RxC; cond RxKxC, cond_valid
        RxK, where R = B, or R = S decoder runs with ``rows`` (S long: the image of each run; see
        :meth:`ConditionedTransformerModule.forward`). The pixel decoder always runs once per image.

        Returns one dict per decoder prediction (first = learnable queries only, last = final):
        ``masks_queries_logits`` RxQxH0xW0 (H0 = stride-8 grid) and ``class_queries_logits`` RxQx(K+1) with
        the phrase head (``cond`` given) or RxQx(133+1) with the linear head (``cond`` None).
        """
        pix = self.pixel_decoder(features)
        out = self.transformer(pix.multi_scale_features, pix.mask_features, seg_embeds, rows)
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
    """transformers' Mask2Former init (``DecoderConfig.init="transformers"``)."""
    _Mask2FormerInit(config, module)
    return module


def _xavier_all(module: nn.Module, gain: float = 1.0) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p, gain=gain)


def _deformable_init(m: Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention) -> None:
    nn.init.zeros_(m.sampling_offsets.weight)
    thetas = torch.arange(m.n_heads, dtype=torch.float32) * (2.0 * math.pi / m.n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(m.n_heads, 1, 1, 2)
    grid = grid.repeat(1, m.n_levels, m.n_points, 1) * torch.arange(1, m.n_points + 1).view(1, 1, -1, 1)
    with torch.no_grad():
        m.sampling_offsets.bias.copy_(grid.reshape(-1))
    nn.init.zeros_(m.attention_weights.weight)
    nn.init.zeros_(m.attention_weights.bias)
    for lin in (m.value_proj, m.output_proj):
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)


def _xsam_init_one(module: nn.Module, xavier_std: float, std: float) -> None:
    """X-SAM's ``XSegmentor._init_weights`` (archive ``model/segmentors/x_segmentor.py``) for one module."""
    if isinstance(module, Mask2FormerTransformerModule):
        for proj in module.input_projections:
            if not isinstance(proj, nn.Sequential):
                nn.init.xavier_uniform_(proj.weight, gain=xavier_std)
                nn.init.zeros_(proj.bias)
    elif isinstance(module, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
        _deformable_init(module)
    elif isinstance(module, Mask2FormerMaskedAttentionDecoderLayer):
        _xavier_all(module, xavier_std)
    elif isinstance(module, Mask2FormerPixelLevelModule):
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d | nn.Linear | nn.ConvTranspose2d):
                nn.init.normal_(sub.weight, std=std)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
    elif isinstance(module, Mask2FormerPixelDecoder):
        _xavier_all(module)
        nn.init.zeros_(module.level_embed)  # X-SAM: normal_(std=0)
    elif isinstance(module, Mask2FormerPixelDecoderEncoderOnly):
        _xavier_all(module)
    elif isinstance(module, nn.Linear | nn.Conv2d | nn.BatchNorm2d):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    if hasattr(module, "reference_points"):
        nn.init.xavier_uniform_(module.reference_points.weight, gain=1.0)
        nn.init.zeros_(module.reference_points.bias)


def init_xsam_decoder_weights(module: nn.Module, config: Mask2FormerConfig) -> nn.Module:
    """X-SAM's re-initialisation of its Mask2Former pixel and transformer decoders (``reinit_decoder=True``):
    ``module.apply`` of its ``_init_weights``, children before parents, so a parent's rule (e.g. xavier on
    every matrix of the pixel decoder) overrides its children's. ``DecoderConfig.init="xsam"``."""
    xavier_std = getattr(config, "init_xavier_std", 1.0)
    std = getattr(config, "init_std", 0.02)
    return module.apply(lambda m: _xsam_init_one(m, xavier_std, std))
