"""What a run root holds, stage by stage: steps, final losses, export, parents, wandb run folders.

    python -m orchestrate.summary --run-root demo_out/runs/demo
    python -m orchestrate.summary --run-root runs/a --compare runs/b [--stage 1]

``--compare R2`` says, stage by stage, whether the two runs trained on the same data: it lines up the
per-step fingerprints of the two ``metrics.jsonl`` (:mod:`orchestrate.fingerprint`) on the steps both
logged and names the first step that differs, with the source and fingerprint on each side. Exit code 0
when every compared step is the same, 1 when one differs. Without ``--stage`` it compares every stage both
runs logged fingerprints for (a stage only one of them has is listed, not compared).

A run root that does not exist, an unreadable ``lineage.json`` or ``metrics.jsonl``, or nothing to compare
exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestrate import fingerprint
from orchestrate.run_errors import RunSetupError
from orchestrate.run_layout import STAGE_NUMBERS, RunLayout, StageLayout
from pipelines import storage
from pipelines.errors import run_cli
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity
from xsam_model.export import LINEAGE_FILE


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


def _stage_fingerprints(run_root: str, stage: int) -> dict[int, tuple[str, str]] | None:
    """A stage's fingerprints, or None when it has no ``metrics.jsonl`` or none of its records has one."""
    url = RunLayout(run_root).stage(stage).metrics_jsonl
    fs, path = storage.fs_and_path(url)
    if not fs.exists(path):
        return None
    return fingerprint.read_fingerprints(url) or None


def _compare_lines(stage: int, c: fingerprint.Comparison) -> list[str]:
    lines = [
        f"stage {stage}: " + ("same data" if c.same else "DIFFERENT data") + f" ({len(c.common)} "
        f"common steps, {len(c.differing)} differ; only in a: {len(c.only_a)}, only in b: {len(c.only_b)})"
    ]
    if c.first is not None:
        (sa, fa), (sb, fb) = c.first.a, c.first.b
        lines.append(f"  first difference at step {c.first.step}: a {sa} {fa}  b {sb} {fb}")
    return lines


def compare_runs(run_a: str, run_b: str, stage: int | None = None) -> tuple[bool, str]:
    """Whether runs ``a`` and ``b`` saw the same data at every step both logged, and the report. Raises
    :class:`RunSetupError` when a run root is missing or there is nothing to compare."""
    for root in (run_a, run_b):
        fs, path = storage.fs_and_path(root)
        if not fs.isdir(path):
            raise RunSetupError(f"run root not found: {root}")
    lines, same, compared = [f"a: {run_a}", f"b: {run_b}"], True, 0
    for n in [stage] if stage is not None else STAGE_NUMBERS:
        fa, fb = _stage_fingerprints(run_a, n), _stage_fingerprints(run_b, n)
        if fa is None or fb is None:
            if stage is not None:
                missing = run_a if fa is None else run_b
                raise RunSetupError(
                    f"{RunLayout(missing).stage(n).metrics_jsonl}: no data/fingerprint records"
                )
            if fa or fb:
                lines.append(f"stage {n}: only in {'a' if fa else 'b'}, not compared")
            continue
        c = fingerprint.compare(fa, fb)
        if not c.common:
            raise RunSetupError(f"stage {n}: the two runs have no step in common")
        compared += 1
        same &= c.same
        lines += _compare_lines(n, c)
    if not compared:
        raise RunSetupError(f"no stage of {run_a} and {run_b} both has data/fingerprint records to compare")
    lines.append("result: " + ("same data" if same else "different data"))
    return same, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-root", required=True)
    p.add_argument("--compare", metavar="RUN_ROOT", help="another run root: did both see the same data?")
    p.add_argument("--stage", type=int, choices=STAGE_NUMBERS, help="with --compare: only this stage")
    add_verbosity_flags(p)
    a = p.parse_args(argv)
    configure_logging(verbosity(a))
    if a.compare is None:
        if a.stage is not None:
            p.error("--stage needs --compare")
        print(summarize(a.run_root))
        return 0
    same, report = compare_runs(a.run_root, a.compare, a.stage)
    print(report)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
