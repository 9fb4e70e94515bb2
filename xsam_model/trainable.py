"""Stage views: which parameters train in stages 1/2/3, their parameter groups with learning-rate
multipliers (recipe §4), and the export/import of trainable weights between stages.

For the training orchestrator::

    groups = param_groups(model, stage=3, lr=4e-5, weight_decay=0.05)   # also sets requires_grad
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))           # or DeepSpeed's
    ...
    save_file(export_trainable(model, stage=3), "export/model.safetensors")
    # next stage
    load_exported(model, load_file(".../stage1/export/model.safetensors"), stage=1)  # strict by default

X-SAM loads with ``strict=False`` after dropping keys whose shape differs, so mismatches pass silently;
here any missing, unexpected or shape-mismatched key is an error that lists all of them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pipelines.errors import XsamError
from xsam_model.weight_fit import check_fit

# transformers 5 flattens SiglipVisionModel (no .vision_model); accept both layouts
_SIGLIP_LAYER = re.compile(r"^vision_encoder\.(?:vision_model\.)?encoder\.layers\.(\d+)\.")

# stage → (module prefix, lr multiplier); order is the order of the parameter groups
STAGE_GROUPS: dict[int, tuple[tuple[str, float], ...]] = {
    # s1 segmentor fine-tune: SAM encoder ×0.1, connector, re-initialised M2F decoder, linear 133-class head
    1: (
        ("sam_encoder", 0.1),
        ("seg_connector", 1.0),
        ("mask_decoder.pixel_decoder", 1.0),
        ("mask_decoder.transformer", 1.0),
        ("mask_decoder.linear_head", 1.0),
    ),
    # s2 alignment pre-train: only the two projectors into the LLM
    2: (("visual_projector", 1.0), ("seg_projector", 1.0)),
    # s3 mixed fine-tune: everything, SigLIP and SAM ×0.1, phrase (cosine) head with its bg embedding
    3: (
        ("vision_encoder", 0.1),
        ("sam_encoder", 0.1),
        ("llm", 1.0),
        ("visual_projector", 1.0),
        ("seg_projector", 1.0),
        ("llm_projector", 1.0),
        ("seg_connector", 1.0),
        ("mask_decoder.pixel_decoder", 1.0),
        ("mask_decoder.transformer", 1.0),
        ("mask_decoder.phrase_head", 1.0),
    ),
}


class WeightMismatchError(XsamError, ValueError):
    """Exported weights do not fit the model; the message lists every offending key."""


def _check_stage(stage: int) -> None:
    if stage not in STAGE_GROUPS:
        raise ValueError(f"stage must be one of {sorted(STAGE_GROUPS)}, got {stage!r}")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def unused_parameters(model: nn.Module) -> set[str]:
    """Parameters that never receive a gradient: SigLIP layers after the selected hidden state, its final
    norm. They stay frozen in every stage (DDP/ZeRO would otherwise wait for their gradients)."""
    cfg = model.config.siglip
    first_unused = cfg.num_layers + 1 + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer
    out = set()
    for name, _ in model.named_parameters():
        m = _SIGLIP_LAYER.match(name)
        if (m and int(m.group(1)) >= first_unused) or (
            "post_layernorm" in name and name.startswith("vision_encoder.")
        ):
            out.add(name)
    return out


def trainable_names(model: nn.Module, stage: int) -> list[str]:
    """Names of the parameters trained in ``stage`` (model order)."""
    _check_stage(stage)
    prefixes = [p for p, _ in STAGE_GROUPS[stage]]
    skip = unused_parameters(model)
    return [n for n, _ in model.named_parameters() if n not in skip and any(_under(n, p) for p in prefixes)]


def stage_view(model: nn.Module, stage: int) -> list[dict]:
    """Set ``requires_grad`` for ``stage`` and return its groups ``{"name", "params", "lr_mult"}``."""
    keep = set(trainable_names(model, stage))
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in keep)
    groups = []
    for prefix, mult in STAGE_GROUPS[stage]:
        ps = [params[n] for n in params if n in keep and _under(n, prefix)]
        if ps:
            groups.append({"name": prefix, "params": ps, "lr_mult": mult})
    return groups


def param_groups(model: nn.Module, stage: int, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Torch-optimizer groups for ``stage``: ``lr`` × the group's multiplier (calls :func:`stage_view`)."""
    return [
        {
            "params": g["params"],
            "lr": lr * g["lr_mult"],
            "weight_decay": weight_decay,
            "name": g["name"],
            "lr_mult": g["lr_mult"],
        }
        for g in stage_view(model, stage)
    ]


def export_trainable(model: nn.Module, stage: int | None = None) -> dict[str, torch.Tensor]:
    """State dict of the trainable parameters (of ``stage``, else those with ``requires_grad``), on CPU."""
    params = dict(model.named_parameters())
    names = (
        trainable_names(model, stage)
        if stage is not None
        else [n for n, p in params.items() if p.requires_grad]
    )
    return {n: params[n].detach().to("cpu", copy=True).contiguous() for n in names}


def load_exported(
    model: nn.Module, state: dict[str, torch.Tensor], *, stage: int | None = None, strict: bool = True
) -> dict[str, list[str]]:
    """Copy ``state`` into ``model``'s parameters (dtype cast, device kept).

    Missing keys: the parameters of ``stage`` (if given), otherwise every parameter of each stage group that
    ``state`` touches (a partial module is an error). ``strict`` raises :class:`WeightMismatchError` listing
    all missing, unexpected and shape-mismatched keys; otherwise only matching keys load and the report says
    what was skipped. Returns ``{"loaded", "missing", "unexpected", "mismatched"}``.
    """
    params = dict(model.named_parameters())
    if stage is not None:
        expected = set(trainable_names(model, stage))
    else:
        prefixes = {
            p for groups in STAGE_GROUPS.values() for p, _ in groups if any(_under(k, p) for k in state)
        }
        skip = unused_parameters(model)
        expected = {n for n in params if n not in skip and any(_under(n, p) for p in prefixes)}

    # every parameter is a known name; only those of `expected` must be present
    report = check_fit(
        {n: p.shape for n, p in params.items()},
        {k: v.shape for k, v in state.items()},
        optional=set(params) - expected,
    )
    if strict:
        report.raise_if_bad(error=WeightMismatchError)
    bad = set(report.unexpected) | {k for k, _, _ in report.mismatched}
    loaded = []
    with torch.no_grad():
        for k, v in state.items():
            if k not in bad:
                params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))
                loaded.append(k)
    return {
        "loaded": loaded,
        "missing": list(report.missing),
        "unexpected": list(report.unexpected),
        "mismatched": report.mismatch_lines("file"),
    }
