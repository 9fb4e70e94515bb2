"""What a run root holds, stage by stage: steps, final losses, export, parents, wandb run folders.

    python -m orchestrate.summary --run-root demo_out/runs/demo

A run root that does not exist, or an unreadable ``lineage.json``, exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestrate.errors import RunSetupError
from orchestrate.exports import LINEAGE_FILE
from orchestrate.run_layout import RunLayout, StageLayout
from pipelines.errors import run_cli
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity


def _lineage(path: Path) -> dict:
    try:
        lin = json.loads(path.read_text())
        _ = lin["steps"], lin["samples"], lin["restarts"], lin["tensors"], lin["model_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunSetupError(f"{path}: not a readable stage lineage ({type(e).__name__}: {e})") from e
    return lin


def _stage_lines(layout: StageLayout) -> list[str]:
    sdir, stage = Path(layout.dir), layout.stage
    if not sdir.is_dir():
        return [f"stage {stage}: not run"]
    lineage_file = Path(layout.export_dir) / LINEAGE_FILE
    if not lineage_file.is_file():
        ckpts = sorted(sdir.glob("checkpoint_*"))
        return [f"stage {stage}: no export yet ({len(ckpts)} checkpoints; submit it again to continue)"]
    lin = _lineage(lineage_file)
    losses = ", ".join(
        f"{k.removeprefix('loss/')} {v:.3f}"
        for k, v in lin.get("final_losses", {}).items()
        if v or k == "loss"
    )  # components a stage does not compute are 0
    lines = [
        f"stage {stage}: {lin['steps']} steps, {lin['samples']} samples, restarts {lin['restarts']}",
        f"  final losses   {losses}",
        f"  export         {layout.export_dir} ({lin['tensors']} tensors, sha256 {lin['model_sha256'][:12]})",
    ]
    for p in lin.get("parents", []):
        lines.append(f"  from stage {p['stage']}   {p['export']} ({p['tensors_loaded']} tensors loaded)")
    seen = ", ".join(f"{k} {v}" for k, v in sorted(lin.get("source_steps", {}).items()))
    lines.append(f"  steps/source   {seen}")
    runs = Path(layout.default_wandb_dir(), "wandb")
    lines += [
        f"  wandb          {r}" for r in sorted(runs.glob("offline-run-*")) + sorted(runs.glob("run-*"))
    ]
    return lines


def summarize(run_root: str | Path) -> str:
    """The summary of a local run root (raises :class:`RunSetupError` for a missing one)."""
    root = Path(run_root)
    if not root.is_dir():
        raise RunSetupError(f"run root not found: {root}")
    run = RunLayout(str(root))
    lines = [f"run root {root}"]
    for layout in run.stages():
        lines += _stage_lines(layout)
    if sorted(root.glob("stage*/wandb/wandb/offline-run-*")):
        lines.append(
            f"upload the offline wandb runs with: wandb sync {root}/stage*/wandb/wandb/offline-run-*"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-root", required=True)
    add_verbosity_flags(p)
    a = p.parse_args(argv)
    configure_logging(verbosity(a))
    print(summarize(a.run_root))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
