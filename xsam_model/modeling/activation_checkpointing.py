"""Activation checkpointing for the parts of X-SAM that are not Hugging Face ``PreTrainedModel`` s.

The encoders and the LLM use transformers' own switch (``activation_checkpointing_enable``, non-reentrant);
the projectors and the connector wrap their forward in :func:`maybe_checkpoint`; the Mask2Former layers are
transformers ``GradientCheckpointingLayer`` s outside any ``PreTrainedModel``, switched by
:func:`enable_layer_checkpointing`. Non-reentrant checkpointing needs no input that requires grad, so frozen
encoders (stage 2) and integer inputs are fine, and it restores the RNG state for the recompute.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer


def maybe_checkpoint(fn: Callable[..., torch.Tensor], *args, enabled: bool) -> torch.Tensor:
    """``fn(*args)``, recomputed in backward when ``enabled`` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def enable_layer_checkpointing(module: nn.Module, enable: bool = True) -> int:
    """Switch every transformers ``GradientCheckpointingLayer`` under ``module``; returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.gradient_checkpointing = enable
            m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            n += 1
    return n


def enable_hf_checkpointing(model: nn.Module) -> None:
    """transformers' non-reentrant activation checkpointing on a ``PreTrainedModel`` (SigLIP, SAM, the
    LLM)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
