"""The untrained baseline: an export of the weights a stage starts from, to evaluate next to the trained one.

    python -m orchestrate.baseline --stage 1 --flavor debug --out demo_out/runs/untrained/stage1/export

Every training worker seeds torch with the stage's data seed and builds the model (:class:`orchestrate.trainer
.Trainer`), so the weights written here are exactly the ones stage ``--stage`` of a run with that seed starts
from when it has no parent (stage 1), or its own random parts before the parents' weights load (stage 3).
The lineage says ``untrained: true``. Bad options exit with code 2 and one line.
"""

from __future__ import annotations

import argparse

from orchestrate.run_errors import StageConfigError
from pipelines.errors import run_cli
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity

# Heavy imports (torch, transformers) are deferred into write_initial_export: `--help` stays light.


def write_initial_export(stage: int, flavor: str, out: str, init_dir: str | None = None) -> str:
    """Build stage ``stage``'s model as a training worker does (same seed) and export its trainable
    weights."""
    import torch

    from orchestrate.plan import model_config
    from orchestrate.stages import get_stage
    from xsam_model import XSAM_FLAVORS, build_xsam, export_trainable
    from xsam_model.export import write_export

    if flavor not in XSAM_FLAVORS:
        raise StageConfigError(f"--flavor {flavor!r}: expected one of {sorted(XSAM_FLAVORS)}")
    cfg = get_stage(stage, flavor=flavor)
    torch.manual_seed(cfg.data.seed)  # the trainer's seed before build_xsam
    model = build_xsam(model_config(cfg), init_dir=init_dir or cfg.model.init_dir)
    config = {
        "stage": {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "init_dir": init_dir}},
        "model": model.config.to_dict(),
    }
    lineage = {"untrained": True, "seed": cfg.data.seed, "steps": 0}
    return write_export(out, export_trainable(model, stage), stage=stage, config=config, lineage=lineage)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, required=True, choices=(1, 3))
    p.add_argument("--flavor", default="debug")
    p.add_argument("--init-dir", help="X-SAM's inits/ folder (the full flavors)")
    p.add_argument("--out", required=True, help="the export folder to write")
    add_verbosity_flags(p)
    args = p.parse_args(argv)
    configure_logging(verbosity(args))
    print(write_initial_export(args.stage, args.flavor, args.out, args.init_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
