"""The segmentation connector: three SAM layers → a conv pyramid at strides ½p, p, 2p (8/16/32 for ViT-L/16).

Each level is X-SAM's ``ConvConnectorLayer`` (``bias=False``): Conv1×1 → LN → Conv3×3 → LN → Conv1×1 → LN,
then X-SAM's InternVL-style :func:`~xsam_model.modeling.projector.pixel_shuffle` by the level's scale. Using
the same shuffle (not ``nn.PixelShuffle``, which orders sub-pixels differently) keeps the channel ↔ sub-pixel
mapping equal, so X-SAM's ``seg_connector.model.{i}.model.{j}`` weights load here as ``levels.{i}.convs.{j}``
with no permutation, and the pixel decoder's input projections see channels in X-SAM's order. For scale 2
output ``[c, 2y+i, 2x+j] = conv[j·C/2 + i·C/4 + c, y, x]``; for scale ½ output ``[i·2C + j·C + c, y, x] =
conv[c, 2y+i, 2x+j]`` (C = the conv's output channels).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamLayerNorm

from xsam_model.modeling.activation_checkpointing import maybe_checkpoint
from xsam_model.modeling.projector import pixel_shuffle


def _ln(c: int) -> SamLayerNorm:
    return SamLayerNorm(c, eps=1e-6, data_format="channels_first")


class ConnectorLevel(nn.Module):
    """Conv1×1 → LN → Conv3×3 → LN → Conv1×1(→ C·s) → LN → pixel shuffle by s; channels become C / s."""

    def __init__(self, *, in_dim: int, hidden_dim: int, scale: float):
        super().__init__()
        out = int(in_dim * scale)
        self.scale = float(scale)
        self.convs = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1, bias=False),
            _ln(hidden_dim),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
            _ln(hidden_dim),
            nn.Conv2d(hidden_dim, out, 1, bias=False),
            _ln(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxGxGxC (channels last, as SAM's hidden states) → Bx(C/s)x(G·s)x(G·s)."""
        y = self.convs(x.permute(0, 3, 1, 2))  # Bx(C·s)xGxG
        if self.scale == 1.0:
            return y
        y = pixel_shuffle(y.permute(0, 2, 3, 1), self.scale)  # Bx(G·s)x(G·s)x(C/s)
        return y.permute(0, 3, 1, 2).contiguous()


class SegConnector(nn.Module):
    def __init__(self, *, in_dim: int, hidden_dim: int, scale_factors: tuple[float, ...] = (2.0, 1.0, 0.5)):
        super().__init__()
        self.levels = nn.ModuleList(
            ConnectorLevel(in_dim=in_dim, hidden_dim=hidden_dim, scale=s) for s in scale_factors
        )
        self.out_channels = [int(in_dim / s) for s in scale_factors]
        self.gradient_checkpointing = False

    def forward(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """3 × BxGxGxC (SAM layers, channels last) → [Bx(C/2)x2Gx2G, BxCxGxG, Bx2CxG/2xG/2] (high res first).
        With ``gradient_checkpointing`` each level is recomputed in backward (as X-SAM)."""
        return [
            maybe_checkpoint(level, h, enabled=self.gradient_checkpointing and self.training)
            for level, h in zip(self.levels, hidden_states, strict=True)
        ]


def init_connector_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """X-SAM's ``ConnectorModel._init_weights``: convs N(0, std) (no biases here), layer norms 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, SamLayerNorm | nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
