"""Stage exports of the debug model with seeded random weights, for the inference tests."""

from __future__ import annotations

import torch


def write_debug_export(path, stage: int, seed: int = 0) -> str:
    """A stage export of the debug model with seeded random weights, shaped like a trained one."""
    from xsam_model import build_xsam, export_trainable
    from xsam_model.export import write_export

    torch.manual_seed(seed)
    model = build_xsam("debug")
    write_export(
        str(path),
        export_trainable(model, stage),
        stage=stage,
        config={"stage": {"model": {"flavor": "debug", "init_dir": None}}, "model": model.config.to_dict()},
        lineage={"run_name": "demo", "run_root": str(path.parent)},
    )
    return str(path)
