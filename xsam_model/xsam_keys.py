"""X-SAM's archive checkpoints ↔ this project's stage exports: the key mapping (docs/checkpoints.md).

X-SAM's released ``pytorch_model.bin`` files hold the archive branch's ``XSamModel.state_dict()``: every
module trained in that stage, under X-SAM's module names. The mapping (reference/xsam_fidelity.md, "Checkpoint
compatibility") is a prefix-rename table (:data:`RENAMES`), one reshape (:data:`LEADING_AXIS`: X-SAM keeps a
leading axis of 1 on the phrase head's scale and background embedding) and a drop list (:data:`DROPS`: parts
we do not build). Our connector uses X-SAM's pixel shuffle (which settles fidelity D8), so its convs and the
pixel decoder's input projections load 1:1, with no channel permutation.

:func:`from_xsam` checks a state dict against the flavor's model (built on the meta device: no memory): every
unmapped key, every missing trainable parameter, every shape mismatch, every value that is not a finite tensor
of a dtype the model holds goes into one :class:`ConvertError`. :func:`to_xsam` is the reverse, in a fixed
order. The files and the command (``python -m orchestrate.convert import|export``) are
:mod:`orchestrate.convert`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.errors import XsamError
from xsam_model.trainable import trainable_names, unused_parameters
from xsam_model.weight_fit import check_fit

IMPORT_STAGES = (1, 3)
"""The stages whose weights X-SAM releases (s1 segmentor fine-tune, s3 mixed fine-tune)."""


class ConvertError(XsamError, ValueError):
    """A checkpoint or export that cannot be converted; the message lists every offending key."""


# ---------------------------------------------------------------------------------------------- the mapping
# (X-SAM archive name, our name); ``{rest}`` is any suffix, ``{level}`` a number. First match wins.
RENAMES: tuple[tuple[str, str], ...] = (
    # transformers 4 (X-SAM) nests SiglipVisionModel under .vision_model; transformers 5 flattens it
    ("visual_encoder.vision_model.{rest}", "vision_encoder.{rest}"),
    ("segmentor.encoder.{rest}", "sam_encoder.vision_encoder.{rest}"),
    ("segmentor.pixel_decoder.{rest}", "mask_decoder.pixel_decoder.{rest}"),
    ("segmentor.decoder.{rest}", "mask_decoder.transformer.{rest}"),
    ("segmentor.class_predictor.{rest}", "mask_decoder.linear_head.{rest}"),
    ("segmentor.logit_scale", "mask_decoder.phrase_head.logit_scale"),
    ("bg_embeds.weight", "mask_decoder.phrase_head.bg_embed"),
    ("llm.{rest}", "llm.{rest}"),
    ("visual_projector.model.{rest}", "visual_projector.{rest}"),
    ("seg_projector.model.{rest}", "seg_projector.mlp.{rest}"),
    ("llm_projector.model.{rest}", "llm_projector.{rest}"),
    ("seg_connector.model.{level}.model.{rest}", "seg_connector.levels.{level}.convs.{rest}"),
)

# X-SAM keys with no counterpart here, on purpose (checked before RENAMES)
DROPS: tuple[tuple[str, str], ...] = (
    ("visual_encoder.vision_model.head.{rest}", "SigLIP's pooling head (built with vision_use_head=False)"),
    ("segmentor.encoder.neck.{rest}", "SAM's neck (an Identity here: X-SAM reads SAM's hidden states)"),
    ("segmentor.shared_image_embedding.{rest}", "SAM's prompt positional buffer (no prompt encoder here)"),
    ("segmentor.criterion.{rest}", "loss constants (a buffer, not a weight)"),
)
UNUSED_REASON = "never trained: SigLIP after the selected hidden state (the file keeps its initial value)"

LEADING_AXIS: frozenset[str] = frozenset(
    {"mask_decoder.phrase_head.logit_scale", "mask_decoder.phrase_head.bg_embed"}
)
"""Our parameters that X-SAM stores with a leading axis of 1: ``logit_scale`` [] ↔ [1], ``bg_embed`` [D] ↔
``bg_embeds.weight`` [1, D] (an ``nn.Embedding(1, D)``)."""

# XSamModel.state_dict() collects its modules in this order (archive model/xsam.py); exports follow it
XSAM_ORDER = (
    "visual_encoder.",
    "segmentor.encoder.",
    "segmentor.",
    "llm.",
    "visual_projector.",
    "seg_projector.",
    "llm_projector.",
    "seg_connector.",
    "bg_embeds.",
)


@dataclass(frozen=True)
class _Template:
    text: str
    regex: re.Pattern

    @classmethod
    def of(cls, text: str) -> _Template:
        parts = re.split(r"(\{rest\}|\{level\})", text)
        body = "".join(
            "(?P<rest>.+)" if p == "{rest}" else r"(?P<level>\d+)" if p == "{level}" else re.escape(p)
            for p in parts
        )
        return cls(text, re.compile(body + r"\Z"))

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.match(key)
        return m.groupdict() if m else None


@dataclass(frozen=True)
class KeyMap:
    """Names in both directions for one module layout (see :func:`keymap`)."""

    renames: tuple[tuple[_Template, _Template], ...]
    drops: tuple[tuple[_Template, str], ...]

    def to_ours(self, xsam_key: str) -> str | None:
        """Our name for an X-SAM key; None if no rule matches (dropped keys also give None)."""
        if self.dropped(xsam_key):
            return None
        for xs, ours in self.renames:
            if (groups := xs.match(xsam_key)) is not None:
                return ours.text.format(**groups)
        return None

    def to_xsam(self, our_key: str) -> str | None:
        """X-SAM's name for one of our parameter names; None if no rule covers it."""
        for xs, ours in self.renames:
            if (groups := ours.match(our_key)) is not None:
                return xs.text.format(**groups)
        return None

    def dropped(self, xsam_key: str) -> str | None:
        """Why an X-SAM key has no counterpart here, or None."""
        return next((why for t, why in self.drops if t.match(xsam_key) is not None), None)


def keymap(our_names: Iterable[str]) -> KeyMap:
    """The key map for a model (or export) whose parameter names are ``our_names``: SigLIP's prefix follows
    the layout transformers gave it (flat in transformers 5, under ``.vision_model`` before)."""
    nested = any(n.startswith("vision_encoder.vision_model.") for n in our_names)
    renames = []
    for xs, ours in RENAMES:
        if nested and ours == "vision_encoder.{rest}":
            ours = "vision_encoder.vision_model.{rest}"
        renames.append((_Template.of(xs), _Template.of(ours)))
    return KeyMap(tuple(renames), tuple((_Template.of(t), why) for t, why in DROPS))


def xsam_shape(our_key: str, shape: Iterable[int]) -> tuple[int, ...]:
    """The shape X-SAM stores for our parameter ``our_key`` of ``shape``."""
    return (1, *shape) if our_key in LEADING_AXIS else tuple(shape)


def _xsam_rank(key: str) -> int:
    return next((i for i, p in enumerate(XSAM_ORDER) if key.startswith(p)), len(XSAM_ORDER))


# ---------------------------------------------------------------------------------------------- X-SAM → ours
@dataclass
class Mapped:
    """An X-SAM state dict in our names: the stage's trainable tensors, and what was left out and why."""

    state: dict[str, torch.Tensor]
    """Our parameter name → tensor (the file's dtype), in model order."""
    dropped: dict[str, list[str]] = field(default_factory=dict)
    """Reason → X-SAM keys not taken (:data:`DROPS`, and parameters that never train)."""


def _why_unexpected(ours: str | None, params: Mapping[str, tuple[int, ...]], stage: int) -> str:
    if ours is None:
        return "no rule maps it"
    if ours not in params:
        return f"→ {ours}: no such parameter"
    return f"→ {ours}: not trained in stage {stage}"


def from_xsam(
    xsam_state: Mapping[str, object], model: nn.Module, stage: int, *, source: str = "checkpoint"
) -> Mapped:
    """Rename, reshape and check X-SAM's ``xsam_state`` against ``model`` (any device, meta included).

    Every key must map to a parameter trained in ``stage``, with X-SAM's shape of it, or be dropped on
    purpose; every parameter trained in ``stage`` must be there. The fit is checked in X-SAM's names and
    shapes (:func:`xsam_model.weight_fit.check_fit`, the project's one weight-fit check), so one
    :class:`ConvertError` lists the file's missing, unexpected (with why) and mismatched keys and any value
    that is not a tensor.
    """
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    kmap, unused = keymap(params), unused_parameters(model)
    expected = {kmap.to_xsam(n) or n: (n, xsam_shape(n, params[n])) for n in trainable_names(model, stage)}
    provided: dict[str, torch.Tensor] = {}
    notes: dict[str, str] = {}
    non_tensor: list[str] = []
    dropped: dict[str, list[str]] = {}
    for key, value in xsam_state.items():
        ours = kmap.to_ours(key)
        why = kmap.dropped(key) or (UNUSED_REASON if ours in unused else None)
        if not isinstance(value, torch.Tensor):
            non_tensor.append(f"    non-tensor  {key} ({type(value).__name__})")
            continue
        if why:
            dropped.setdefault(why, []).append(key)
            continue
        provided[key] = value
        if key not in expected:
            notes[key] = _why_unexpected(ours, params, stage)
    report = check_fit(
        {k: shape for k, (_, shape) in expected.items()}, {k: v.shape for k, v in provided.items()}
    )
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    bad_values = [
        line
        for k, v in provided.items()
        if k in expected
        for line in _bad_value(k, v, dtypes[expected[k][0]])
    ]
    name = getattr(getattr(model, "config", None), "name", "?")
    if not report.ok or non_tensor:
        msg = report.message(f"{source}: does not fit stage {stage} of the {name} model", notes=notes)
        raise ConvertError("\n".join([msg, *non_tensor, *bad_values]))
    if bad_values:
        head = f"{source}: {len(bad_values)} tensors that the {name} model cannot take"
        raise ConvertError("\n".join([head, *bad_values]))
    state = {}
    for key, (ours, _) in expected.items():
        state[ours] = provided[key].reshape(params[ours]) if ours in LEADING_AXIS else provided[key]
    return Mapped(state=state, dropped=dropped)


HOLDS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""File dtypes a floating-point parameter takes (cast on load); anything else is refused."""


def _bad_value(key: str, value: torch.Tensor, dtype: torch.dtype) -> list[str]:
    """The problem lines of one tensor: a dtype the parameter (of ``dtype``) cannot hold, or NaN/Inf (also
    after the cast to ``dtype``: a float64 beyond float32's range)."""
    if value.dtype not in HOLDS or not dtype.is_floating_point:
        return [f"    bad dtype   {key}: {value.dtype} (the model holds {dtype})"]
    if value.is_meta:  # shapes only (a layout check): no values to look at
        return []
    finite = torch.isfinite(value.to(dtype) if value.dtype == torch.float64 else value)
    if not bool(finite.all()):
        return [f"    not finite  {key}: {int((~finite).sum())} NaN/Inf values"]
    return []


# ---------------------------------------------------------------------------------------------- ours → X-SAM
def to_xsam(state: Mapping[str, torch.Tensor], *, source: str = "export") -> dict[str, torch.Tensor]:
    """Our state dict (e.g. a stage export) in X-SAM's archive names and shapes, in the module order of
    ``XSamModel.state_dict()`` (names sorted within a module). A key no rule covers is a :class:`ConvertError`
    (all of them listed)."""
    kmap = keymap(state)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        name = kmap.to_xsam(key)
        if name is None:
            unmapped.append(key)
        else:
            out[name] = value.reshape(xsam_shape(key, value.shape))
    if unmapped:
        lines = [
            f"{source}: {len(unmapped)} keys with no X-SAM name",
            *(f"    unmapped    {k}" for k in unmapped),
        ]
        raise ConvertError("\n".join(lines))
    # module order, then name: the same file for the same weights, whatever order ``state`` came in
    return {k: out[k] for k in sorted(out, key=lambda k: (_xsam_rank(k), k))}
