"""The small wandb helpers that training's tracker and evaluation's runs share: the mode, the run's folders,
the run id of a training stage, and images padded to one size per panel.

Evaluation owns this leaf module (it imports nothing from the rest of :mod:`orchestrate`), so
``orchestrate.tracking`` uses it from here; docs/architecture.md has the layer rule.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

__all__ = ["pad_to", "resolve_mode", "run_id", "same_size", "wandb_env"]


def resolve_mode(mode: str) -> str:
    """``auto`` → ``online`` when a wandb key is configured, else ``offline`` (never a hang on a prompt)."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "online", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_env(folder: str | Path, mode: str) -> dict[str, str]:
    folder = Path(folder)
    return {
        "WANDB_MODE": mode,
        "WANDB_DIR": str(folder),
        "WANDB_CACHE_DIR": str(folder / ".cache"),
        "WANDB_DATA_DIR": str(folder / ".data"),
        "WANDB_CONFIG_DIR": str(folder / ".config"),
        "WANDB_SILENT": "true",
    }


def run_id(run_name: str, stage: int, run_root: str = "") -> str:
    """A wandb-safe id, the same for every attempt of this stage of this run root (and different for two
    run roots that happen to share a folder name)."""
    tag = hashlib.sha1(str(run_root).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{run_name}-stage{stage}-{tag}")[:120]


def pad_to(a, h: int, w: int):
    """HxW[xC] array padded with zeros at the bottom and right to h×w."""
    return np.pad(a, [(0, h - a.shape[0]), (0, w - a.shape[1])] + [(0, 0)] * (a.ndim - 2))


def same_size(images: list) -> list:
    """HxW[xC] arrays padded (zeros: black, label 0) to the largest H and W of the list: wandb warns on every
    panel whose images differ in size."""
    h, w = max(a.shape[0] for a in images), max(a.shape[1] for a in images)
    return [pad_to(a, h, w) for a in images]
