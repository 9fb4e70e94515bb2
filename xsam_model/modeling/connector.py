"""The segmentation connector: three SAM layers → a conv pyramid at strides ½p, p, 2p (8/16/32 for ViT-L/16)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamLayerNorm


def _ln(c: int) -> SamLayerNorm:
    return SamLayerNorm(c, eps=1e-6, data_format="channels_first")


class ConnectorLevel(nn.Module):
    """Conv1×1 → LN → Conv3×3 → LN → Conv1×1(→ C·s) → LN → pixel (un)shuffle by s; channels become C / s."""

    def __init__(self, *, in_dim: int, hidden_dim: int, scale: float):
        super().__init__()
        out = int(in_dim * scale)
        self.convs = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1, bias=False),
            _ln(hidden_dim),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
            _ln(hidden_dim),
            nn.Conv2d(hidden_dim, out, 1, bias=False),
            _ln(out),
        )
        if scale > 1:
            self.resample: nn.Module = nn.PixelShuffle(int(scale))
        elif scale < 1:
            self.resample = nn.PixelUnshuffle(int(round(1 / scale)))
        else:
            self.resample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxCxGxG → Bx(C/s)x(G·s)x(G·s)."""
        return self.resample(self.convs(x))


class SegConnector(nn.Module):
    def __init__(self, *, in_dim: int, hidden_dim: int, scale_factors: tuple[float, ...] = (2.0, 1.0, 0.5)):
        super().__init__()
        self.levels = nn.ModuleList(
            ConnectorLevel(in_dim=in_dim, hidden_dim=hidden_dim, scale=s) for s in scale_factors
        )
        self.out_channels = [int(in_dim / s) for s in scale_factors]

    def forward(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """3 × BxGxGxC (SAM layers, channels last) → [Bx(C/2)x2Gx2G, BxCxGxG, Bx2CxG/2xG/2] (high res first)."""
        return [level(h.permute(0, 3, 1, 2)) for level, h in zip(self.levels, hidden_states, strict=True)]
