"""Run tracking from rank 0: wandb (offline by default) plus a plain ``metrics.jsonl`` beside the checkpoints.

wandb keeps a run's files together only when all four of its folders are set (it writes to ``~/.cache`` and
``~/.local`` otherwise, reference/stack_notes.md), so :func:`wandb_env` sets ``WANDB_DIR``,
``WANDB_CACHE_DIR``, ``WANDB_DATA_DIR`` and ``WANDB_CONFIG_DIR`` under ``<run-root>/stage<N>/wandb``.
Offline runs are uploaded later with ``wandb sync <run-root>/stage<N>/wandb/wandb/offline-run-*``.

The run id is derived from the run name, stage and run root, so a worker group restarted by Ray Train (or a
job submitted again) continues the same wandb run (``resume="allow"``).

Only rank 0 tracks: :func:`make_tracker` gives it a :class:`Tracker` and every other rank a
:class:`NullTracker` with the same methods, so the training loop calls them without asking for its rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrate.evaluation.wandb_helpers import pad_to, resolve_mode, run_id, wandb_env
from pipelines import storage

if TYPE_CHECKING:
    from orchestrate.plan import RunPlan

# Heavy imports (wandb) are deferred into the tracker: runs with tracking off never import it.


class NullTracker:
    """The tracker of every rank but 0: :class:`Tracker`'s methods, doing nothing."""

    active = False
    """Whether anything logged here is kept (callbacks skip costly work for an inactive tracker)."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_mixture(self, step: int, seen_steps: Mapping[str, int], planned: Mapping[str, float]) -> None:
        pass

    def log_predictions(self, step: int, previews: list[dict]) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self) -> str | None:
        return None


def make_tracker(plan: RunPlan, rank: int, config: Mapping[str, Any]) -> Tracker | NullTracker:
    """Rank 0: wandb (mode from the stage config) and the stage's ``metrics.jsonl`` (a local path or a URI:
    :class:`pipelines.storage.LineLog`); else a :class:`NullTracker`."""
    if rank != 0:
        return NullTracker()
    return Tracker(
        project=plan.cfg.tracking.project,
        run_name=plan.run_name,
        stage=plan.stage,
        config=config,
        mode=plan.cfg.tracking.mode,
        wandb_dir=plan.wandb_dir,
        metrics_file=plan.layout.metrics_jsonl,
        run_root=plan.run_root,
    )


class Tracker:
    """Rank 0's tracker: wandb (unless its mode is ``disabled`` or ``wandb_dir`` is None) and a
    ``metrics.jsonl`` (when ``metrics_file`` is given)."""

    active = True

    def __init__(
        self,
        *,
        project: str,
        run_name: str,
        stage: int,
        config: Mapping[str, Any],
        mode: str,
        wandb_dir: str | Path | None,
        metrics_file: str | Path | None,
        run_root: str = "",
    ):
        self.mode = resolve_mode(mode)
        self.run = None
        self.run_dir: str | None = None
        # a local file appended line by line, or an object rewritten every 30 s (closed in finish)
        self._metrics = storage.LineLog(str(metrics_file)) if metrics_file else None
        if self.mode == "disabled" or wandb_dir is None:
            return
        os.environ.update(wandb_env(wandb_dir, self.mode))
        # a WANDB_SERVICE inherited through Ray's environment would attach this worker to another process's
        # wandb service, where a killed attempt's run still holds this run's id ("run ID … is in use")
        os.environ.pop("WANDB_SERVICE", None)
        for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            Path(os.environ[k]).mkdir(parents=True, exist_ok=True)
        import wandb

        self.run = wandb.init(
            project=project,
            group=run_name,
            job_type=f"stage{stage}",
            name=f"{run_name}/stage{stage}",
            id=run_id(run_name, stage, run_root),
            resume="allow",
            config=dict(config),
            dir=str(wandb_dir),
            mode=self.mode,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_dir = str(Path(self.run.dir).parent)  # …/wandb/offline-run-<time>-<id>
        # per-step charts against the optimizer step, not wandb's internal counter
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, int | float | str)}}
        if self._metrics:
            self._metrics.write(json.dumps(row))
        if self.run is not None:
            self.run.log({"train/step": step, **metrics})

    def log_mixture(self, step: int, seen_steps: Mapping[str, int], planned: Mapping[str, float]) -> None:
        """The share of steps each source got so far next to its planned probability ``p_d``."""
        total = max(1, sum(seen_steps.values()))
        seen = {s: seen_steps.get(s, 0) / total for s in planned}
        metrics: dict[str, Any] = {f"mixture/seen/{s}": v for s, v in seen.items()}
        metrics.update({f"mixture/planned/{s}": p for s, p in planned.items()})
        metrics["mixture/max_abs_gap"] = max((abs(seen[s] - planned[s]) for s in planned), default=0.0)
        if self.run is not None:
            import wandb

            rows = [[s, planned[s], seen[s], seen_steps.get(s, 0)] for s in planned]
            metrics["mixture/table"] = wandb.Table(
                columns=["source", "planned_p", "seen_share", "seen_steps"], data=rows
            )
        self.log(step, metrics)

    def log_predictions(self, step: int, previews: list[dict]) -> None:
        """``previews``: dicts of ``image`` HxWx3 uint8, ``pred``/``truth`` HxW int label maps (0 = none) and
        ``labels`` {int: name}, as made by :func:`orchestrate.previews.render`."""
        if self.run is None or not previews:
            return
        import wandb

        previews = _same_size(previews)  # wandb warns on every panel whose images differ in size
        images = [
            wandb.Image(
                p["image"],
                caption=p.get("caption"),
                masks={
                    "prediction": {"mask_data": p["pred"], "class_labels": p["labels"]},
                    "ground_truth": {"mask_data": p["truth"], "class_labels": p["labels"]},
                },
            )
            for p in previews
        ]
        self.run.log({"train/step": step, "predictions": images})

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(values))

    def finish(self) -> str | None:
        if self._metrics:
            self._metrics.close()
            self._metrics = None
        if self.run is not None:
            self.run.finish()
            self.run = None
        return self.run_dir


def _same_size(previews: list[dict]) -> list[dict]:
    """Each preview's ``image`` HxWx3 and ``pred``/``truth`` HxW (label 0 = none) padded to the largest H and
    W of the list, so one wandb panel holds images of one size."""
    h = max(p["image"].shape[0] for p in previews)
    w = max(p["image"].shape[1] for p in previews)
    return [{**p, **{k: pad_to(p[k], h, w) for k in ("image", "pred", "truth")}} for p in previews]
