"""Projectors: SigLIP → LLM (visual), SAM → LLM (seg, after pixel shuffle), LLM → decoder (llm)."""

from __future__ import annotations

import torch
from torch import nn

from xsam_model.modeling.activation_checkpointing import maybe_checkpoint


class MLPProjector(nn.Sequential):
    """``depth`` Linear layers with GELU between them: in_dim → out_dim (→ out_dim …). With
    ``gradient_checkpointing`` the whole MLP is recomputed in backward (as X-SAM's projectors)."""

    def __init__(self, *, in_dim: int, out_dim: int, depth: int = 2):
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        super().__init__(*layers)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """...xin_dim → ...xout_dim."""
        return maybe_checkpoint(super().forward, x, enabled=self.gradient_checkpointing and self.training)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """BxHxWxC → Bx(H·r)x(W·r)x(C/r²) (InternVL-style; r = 0.5 merges each 2×2 patch into one token)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, int(w * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(b, int(w * ratio), int(h * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()


class SegProjector(nn.Module):
    """SAM features → LLM tokens: pixel shuffle (``ratio``) then an MLP."""

    def __init__(self, *, in_dim: int, out_dim: int, ratio: float = 0.5, depth: int = 2):
        super().__init__()
        self.ratio = ratio
        self.mlp = MLPProjector(in_dim=int(in_dim / (ratio * ratio)), out_dim=out_dim, depth=depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxGxGxC (SAM grid, channels last) → Bx(G·r)x(G·r)xD."""
        return self.mlp(pixel_shuffle(x, self.ratio))
