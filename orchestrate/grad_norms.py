"""Per-part gradient norms: the L2 norm of the step's gradient over each part of the model that trains.

The parts are the stage's parameter groups (:data:`xsam_model.trainable.STAGE_GROUPS`: SAM encoder, connector,
pixel decoder, transformer decoder, class/phrase head, projectors, SigLIP, the LLM — whichever the stage
trains), so every trainable parameter is in exactly one part. Logged as ``grad_norm/<part>`` every
``TrackingConfig.grad_norm_every`` optimizer steps, next to DeepSpeed's global ``grad_norm``
(``Σ_part grad_norm/<part>² = grad_norm²``: both are taken before clipping).

Under DeepSpeed the gradient a rank holds is not the step's gradient: without ZeRO ``param.grad`` is
all-reduced only at the accumulation boundary, and ZeRO 1/2 reduce into flat partitions and clear
``param.grad``. :func:`deepspeed.utils.safe_get_full_grad` returns the reduced (rank- and accumulation-
averaged) gradient in every case, after the boundary's ``backward`` and before ``step``; for ZeRO 1/2 it is
one all-reduce per parameter, so every rank must call it, in the same order (:class:`GradNormProbe` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from xsam_model.trainable import STAGE_GROUPS

# Heavy imports (deepspeed) are deferred into full_grad, the one call that needs the engine's gradients: the
# parts and the norms' arithmetic load without it.

Parts = dict[str, list[tuple[str, nn.Parameter]]]


def parameter_parts(named_parameters: Iterable[tuple[str, nn.Parameter]], stage: int) -> Parts:
    """Trainable (``requires_grad``) parameters by the stage's group prefix (the longest that matches), in
    group order. Raises ``ValueError`` naming any trainable parameter outside every group."""
    prefixes = [p for p, _ in STAGE_GROUPS[stage]]
    parts: Parts = {p: [] for p in prefixes}
    stray = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        owners = [p for p in prefixes if name == p or name.startswith(p + ".")]
        if not owners:
            stray.append(name)
            continue
        parts[max(owners, key=len)].append((name, param))
    if stray:
        raise ValueError(f"trainable parameters outside every stage-{stage} group: {stray}")
    return {p: ps for p, ps in parts.items() if ps}


def full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The step's whole gradient of ``param`` (DeepSpeed's ``safe_get_full_grad``; a collective under
    ZeRO)."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def part_grad_norms(
    parts: Parts, get_grad: Callable[[nn.Parameter], torch.Tensor | None] = full_grad
) -> dict[str, float]:
    """``{part: ‖g‖₂}`` over each part's parameters (a parameter without a gradient counts 0), accumulated in
    float64. ``get_grad``: :func:`full_grad` in the trainer; ``lambda p: p.grad`` for a plain module."""
    out = {}
    for part, params in parts.items():
        sq = 0.0
        for _, p in params:
            g = get_grad(p)
            if g is not None:
                sq += float(g.detach().double().pow(2).sum())
        out[part] = math.sqrt(sq)
    return out


class GradNormProbe:
    """The trainer's hook: ``after_backward`` between the last micro-batch's ``backward`` and ``step`` of
    every ``every``-th optimizer step (1-based; 0 = never), ``metrics`` adds them to that step's metrics."""

    def __init__(self, model: nn.Module, stage: int, every: int):
        self.parts = parameter_parts(model.named_parameters(), stage) if every > 0 else {}
        self.every = every
        self.latest: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def after_backward(self, engine, step: int) -> None:
        """``step``: the 1-based number of the optimizer step in progress; measured at its accumulation
        boundary only (every rank runs this: the ZeRO gather is a collective)."""
        if self.due(step) and engine.is_gradient_accumulation_boundary():
            self.latest = part_grad_norms(self.parts)

    def metrics(self) -> dict[str, float]:
        """``grad_norm/<part>`` of the last measured step, once."""
        out, self.latest = {f"grad_norm/{k}": v for k, v in self.latest.items()}, {}
        return out
