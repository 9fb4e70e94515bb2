"""Where a run's files go (docs/contracts.md#runs-checkpoints-and-exports): the one place that joins paths
under a run root.

    <run-root>/stage{1,2,3}/          one Ray Train run per stage (RunConfig(name="stage<N>", storage_path))
        .train.lock                   host and pid of the training writing here (runner.stage_lock)
        checkpoint_<time>/            Ray Train checkpoints, complete when every rank's complete_rank<r>.json
                                      is there (orchestrate.train_checkpoints)
        checkpoint_manager_snapshot.json  Ray Train's list of them (orchestrate.resume_point)
        export/                       the stage's export (orchestrate.exports)
        metrics.jsonl                 per-step metrics, written by rank 0
        wandb/                        the wandb run (offline runs under wandb/wandb/offline-run-*)
        trace/rank<r>.jsonl           the data order, with --trace-data

    layout = RunLayout("/shared/runs/a").stage(2)
    layout.export_dir, layout.metrics_jsonl, layout.local_dir()

The run root may be a local folder or an fsspec URI; a remote run root keeps wandb's files in a local
``wandb_runs/stage<N>/`` (wandb writes through the local file system).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines import storage

STAGE_NUMBERS = (1, 2, 3)


def _is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def resolve(url: str) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged."""
    return url if "://" in url else str(Path(url).expanduser().resolve())


@dataclass(frozen=True)
class StageLayout:
    """The folder of one stage under a run root, and what it holds."""

    run_root: str
    stage: int

    @property
    def name(self) -> str:
        """The stage folder's name, also the Ray Train run name (``RunConfig(name=...)``)."""
        return f"stage{self.stage}"

    @property
    def dir(self) -> str:
        return storage.join(str(self.run_root), self.name)

    @property
    def export_dir(self) -> str:
        return storage.join(self.dir, "export")

    @property
    def metrics_jsonl(self) -> str:
        return storage.join(self.dir, "metrics.jsonl")

    @property
    def checkpoint_glob(self) -> str:
        """fsspec glob of this stage's Ray Train checkpoint folders (a path, no protocol)."""
        return f"{storage.fs_and_path(self.dir)[1]}/checkpoint_*"

    def local_dir(self) -> Path | None:
        """The stage folder as a local path, or None for a remote run root."""
        return Path(self.dir.removeprefix("file://")) if _is_local(self.run_root) else None

    def default_wandb_dir(self) -> str:
        """``<stage>/wandb`` for a local run root, else ``./wandb_runs/stage<N>/wandb`` (absolute)."""
        base = self.local_dir() or Path("wandb_runs") / self.name
        return str(Path(base, "wandb").resolve())

    def trace_file(self, rank: int) -> Path | None:
        local = self.local_dir()
        return None if local is None else local / "trace" / f"rank{rank}.jsonl"


@dataclass(frozen=True)
class RunLayout:
    """A run root holding ``stage1/ stage2/ stage3/``."""

    root: str

    def stage(self, n: int) -> StageLayout:
        return StageLayout(self.root, int(n))

    def stages(self) -> list[StageLayout]:
        return [self.stage(n) for n in STAGE_NUMBERS]

    @property
    def name(self) -> str:
        """The run root's folder name (the default wandb group)."""
        return Path(str(self.root).rstrip("/")).name
