"""Region sampler: each ``<region>`` prompt mask → ``num_tokens`` LLM tokens (X-SAM's naive sampler).

Geometry as X-SAM (both branches, ``model/utils/point_sample.py``): ``num_points`` pixels of the mask, drawn
without replacement when the mask has at least that many (else all of them plus random repeats); pixel
``(y, x)`` of the L×L frame maps to ``(y / L, x / L)`` and is read bilinearly with ``align_corners=True``, so
every point lies inside the grid of cell centres and never reads padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sample_pixels(
    mask: torch.Tensor, num_points: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LxL bool → num_points×2 long (y, x) pixels of the mask: a random subset when it has ≥ num_points
    pixels, else every pixel then random repeats. An empty mask samples the whole frame (X-SAM would fail)."""
    yx = mask.nonzero()
    if len(yx) == 0:
        size = mask.shape[-1]
        yx = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).view(
            -1, 2
        )
        yx = yx.to(mask.device)
    n = len(yx)
    if n >= num_points:
        pick = torch.randperm(n, generator=generator, device="cpu")[:num_points].to(yx.device)
        return yx[pick]
    extra = torch.randint(n, (num_points - n,), generator=generator, device="cpu").to(yx.device)
    return torch.cat([yx, yx[extra]])


class RegionSampler(nn.Module):
    """Read the seg-projector feature grid at ``num_points`` points of each prompt mask and pool them to
    ``num_tokens`` tokens: ``max`` (adaptive max pooling; 1 token = the paper) or ``mean`` (means of
    consecutive groups; 64 tokens = ``main``). No parameters."""

    def __init__(self, *, num_points: int = 256, pool: str = "max", num_tokens: int = 1):
        super().__init__()
        if pool not in ("max", "mean") or num_points % num_tokens:
            raise ValueError(f"pool must be max or mean and num_points % num_tokens == 0; got {pool}")
        self.num_points, self.pool, self.num_tokens = num_points, pool, num_tokens

    def forward(
        self,
        grid: torch.Tensor,
        masks: torch.Tensor,
        generator: torch.Generator | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """grid: GxGxD features covering the padded SAM frame, or BxGxGxD with ``image`` (R long: region r is
        read from ``grid[image[r]]``, its source image's; -1: zero tokens, X-SAM's fill for a VGD negative
        the batch has no instance for); masks: RxLxL bool → R×num_tokens×D."""
        r, size = masks.shape[0], masks.shape[-1]
        if r == 0:
            return grid.new_zeros(0, self.num_tokens, grid.shape[-1])
        if grid.dim() == 3:
            grid, image = grid.unsqueeze(0), torch.zeros(r, dtype=torch.long, device=grid.device)
        elif image is None or image.shape != (r,):
            raise ValueError(f"a batch of grids needs one image index per region ({r} masks)")
        if bool((image < 0).any()):  # no point is drawn for them: the other regions' draws are unchanged
            live = (image >= 0).nonzero().flatten()
            out = grid.new_zeros(r, self.num_tokens, grid.shape[-1])
            if len(live):
                out[live] = self(grid, masks[live], generator, image[live])
            return out
        yx = torch.stack([sample_pixels(m, self.num_points, generator) for m in masks])  # RxPx2
        xy = yx.flip(-1).float() / size * 2 - 1  # RxPx2 in [-1, 1), x first for grid_sample
        parts, order = [], []
        for j in torch.unique(image).tolist():  # one read per source grid: no per-region copy of a grid
            rows = (image == j).nonzero().flatten()
            feats = grid[j].permute(2, 0, 1).unsqueeze(0).float()  # 1xDxGxG
            pts = F.grid_sample(feats, xy[rows].unsqueeze(0), mode="bilinear", align_corners=True)  # 1xDxRjxP
            parts.append(pts[0].transpose(0, 1))  # RjxDxP
            order.append(rows)
        pts = torch.cat(parts)[torch.argsort(torch.cat(order))]  # RxDxP, regions in their order
        if self.pool == "max":
            pooled = F.adaptive_max_pool1d(pts, self.num_tokens)
        else:
            pooled = F.avg_pool1d(pts, self.num_points // self.num_tokens)
        return pooled.transpose(1, 2).to(grid.dtype)  # Rx(num_tokens)xD
