"""Region sampler: each ``<region>`` prompt mask → ``num_points / pool`` LLM tokens (X-SAM's naive sampler)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RegionSampler(nn.Module):
    """Sample ``num_points`` points uniformly (with repetition) inside a prompt mask, read the seg-projector
    feature grid there bilinearly, and average-pool groups of ``pool`` points. No parameters."""

    def __init__(self, *, num_points: int = 256, pool: int = 4):
        super().__init__()
        self.num_points = num_points
        self.pool = pool

    def forward(self, grid: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """grid: GxGxD features covering the padded SAM frame; masks: RxLxL bool → Rx(P/pool)xD."""
        r, size = masks.shape[0], masks.shape[-1]
        if r == 0:
            return grid.new_zeros(0, self.num_points // self.pool, grid.shape[-1])
        coords = []
        for m in masks:
            yx = m.nonzero()
            if len(yx) == 0:  # an empty prompt: sample the whole frame rather than fail
                yx = torch.stack(
                    torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1
                ).view(-1, 2)
                yx = yx.to(m.device)
            pick = torch.randint(len(yx), (self.num_points,), device=m.device)
            coords.append(yx[pick].flip(-1).to(grid.dtype) + 0.5)  # (x, y) pixel centres
        xy = torch.stack(coords) / size * 2 - 1  # RxPx2 in [-1, 1]
        feats = grid.permute(2, 0, 1).unsqueeze(0).expand(r, -1, -1, -1)  # RxDxGxG
        pts = F.grid_sample(feats, xy.unsqueeze(1), mode="bilinear", align_corners=False)  # RxDx1xP
        return F.avg_pool1d(pts.squeeze(2), self.pool).transpose(1, 2)  # Rx(P/pool)xD
