"""MFU and peak GPU memory of every training step, for ``metrics.jsonl`` and wandb (GPU runs only).

The FLOPs of a step are counted once, on this process's first step, with
``torch.utils.flop_counter.FlopCounterMode`` (the counting the planner uses, :mod:`orchestrate.memory_plan`):
forward and backward as executed on this rank, so activation recomputation counts too. Later steps reuse that
count: exact where every step has the same shapes (stage 1's fixed SAM input), approximate where sequence
lengths vary (stages 2 and 3). ``mfu`` = FLOPs per step ÷ step time ÷ the device's dense bf16 peak
(:data:`PEAK_BF16_FLOPS`, or ``TrackingConfig.peak_tflops`` / ``--peak-tflops``). ``gpu/peak_mem_gib`` is
``torch.cuda.max_memory_allocated`` over the step (reset after each). On CPU nothing is logged: no ``mfu`` is
better than a made-up one. An unknown GPU without an override logs the peak memory only.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 (torch names it "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
"""Dense (no sparsity) bf16 tensor-core peak per GPU from NVIDIA's data sheets, matched in this order as a
substring of ``torch.cuda.get_device_name()`` (so "H100 PCIe" wins over "H100")."""


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The device's peak bf16 FLOP/s: ``override_tflops`` × 1e12 when given, else the table's entry for
    ``device_name`` (case-insensitive substring), else None (unknown device)."""
    if override_tflops is not None:
        if not override_tflops > 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {override_tflops}")
        return override_tflops * 1e12
    name = device_name.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return value
    return None


def efficiency_fields(
    flops_per_step: float | None, step_time_s: float, peak: float | None, peak_mem_bytes: int | None
) -> dict[str, Any]:
    """The per-step record's fields: ``mfu`` (flops ÷ time ÷ peak) when all three are known and positive,
    ``flops_per_step``, and ``gpu/peak_mem_gib``."""
    out: dict[str, Any] = {}
    if flops_per_step and peak and step_time_s > 0:
        out["mfu"] = flops_per_step / step_time_s / peak
        out["flops_per_step"] = flops_per_step
    if peak_mem_bytes is not None:
        out["gpu/peak_mem_gib"] = peak_mem_bytes / 1024**3
    return out


class StepEfficiency:
    """Counts the first step's FLOPs and reads the step's peak memory. GPU only: :meth:`create` returns None
    on any other device, and the trainer then logs neither field."""

    def __init__(self, device, peak: float | None):
        self.device, self.peak = device, peak
        self.flops: float | None = None
        self._counter = None

    @classmethod
    def create(cls, device, override_tflops: float | None = None) -> StepEfficiency | None:
        if getattr(device, "type", str(device)) != "cuda":
            return None
        # GPU only from here
        peak = peak_flops(torch.cuda.get_device_name(device), override_tflops)
        if peak is None:
            logger.warning("unknown GPU %r: no mfu (give --peak-tflops)", torch.cuda.get_device_name(device))
        torch.cuda.reset_peak_memory_stats(device)
        return cls(device, peak)

    def counting(self) -> AbstractContextManager:
        """A ``FlopCounterMode`` around the first step (when there is a peak to divide by), else nothing."""
        if self.flops is not None or self.peak is None:
            return nullcontext()
        self._counter = FlopCounterMode(display=False)
        return self._counter

    def fields(self, step_time_s: float) -> dict[str, Any]:
        """The step's ``mfu``, ``flops_per_step`` and ``gpu/peak_mem_gib``; resets the peak for the next
        step."""
        if self._counter is not None:
            self.flops, self._counter = float(self._counter.get_total_flops()), None
        peak_mem = torch.cuda.max_memory_allocated(self.device)  # GPU only
        torch.cuda.reset_peak_memory_stats(self.device)
        return efficiency_fields(self.flops, step_time_s, self.peak, peak_mem)


def counting(eff: StepEfficiency | None) -> AbstractContextManager:
    """``eff.counting()``, or nothing without a GPU."""
    return eff.counting() if eff is not None else nullcontext()


def step_fields(eff: StepEfficiency | None, step_time_s: float) -> dict[str, Any]:
    """``eff.fields(step_time_s)``, or no fields without a GPU."""
    return eff.fields(step_time_s) if eff is not None else {}
