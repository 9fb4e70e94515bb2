"""What a run root holds, stage by stage: steps, final losses, export, parents, wandb run folders.

python -m orchestrate.summary --run-root demo_out/runs/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarize(run_root: str | Path) -> str:
    root = Path(run_root)
    lines = [f"run root {root}"]
    for stage in (1, 2, 3):
        sdir = root / f"stage{stage}"
        if not sdir.is_dir():
            lines.append(f"stage {stage}: not run")
            continue
        lineage_file = sdir / "export" / "lineage.json"
        if not lineage_file.is_file():
            ckpts = sorted(sdir.glob("checkpoint_*"))
            lines.append(
                f"stage {stage}: no export yet ({len(ckpts)} checkpoints; submit it again to continue)"
            )
            continue
        lin = json.loads(lineage_file.read_text())
        losses = ", ".join(
            f"{k.removeprefix('loss/')} {v:.3f}"
            for k, v in lin.get("final_losses", {}).items()
            if v or k == "loss"
        )  # components a stage does not compute are 0
        lines.append(
            f"stage {stage}: {lin['steps']} steps, {lin['samples']} samples, restarts {lin['restarts']}"
        )
        lines.append(f"  final losses   {losses}")
        lines.append(
            f"  export         {sdir / 'export'} ({lin['tensors']} tensors, sha256 {lin['model_sha256'][:12]})"
        )
        for p in lin.get("parents", []):
            lines.append(f"  from stage {p['stage']}   {p['export']} ({p['tensors_loaded']} tensors loaded)")
        seen = ", ".join(f"{k} {v}" for k, v in sorted(lin.get("source_steps", {}).items()))
        lines.append(f"  steps/source   {seen}")
        runs = sorted((sdir / "wandb" / "wandb").glob("offline-run-*")) + sorted(
            (sdir / "wandb" / "wandb").glob("run-*")
        )
        for r in runs:
            lines.append(f"  wandb          {r}")
    offline = sorted(root.glob("stage*/wandb/wandb/offline-run-*"))
    if offline:
        lines.append(
            f"upload the offline wandb runs with: wandb sync {root}/stage*/wandb/wandb/offline-run-*"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-root", required=True)
    print(summarize(p.parse_args(argv).run_root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
