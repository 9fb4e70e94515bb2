"""Per-step extras of the :class:`~orchestrate.trainer.Trainer`, as callbacks the runner registers.

A callback is a plain object with any of four hooks; every rank runs every callback (a callback that only
makes sense on rank 0 asks ``trainer.is_main`` or ``trainer.tracker.active``):

    on_train_start(trainer)                 after setup (model, engine, loader, resume, tracker)
    on_step_end(trainer, step, metrics)     after optimizer step ``step`` (1-based) was logged and, when
                                            due, checkpointed: what the step wrote is on storage
    on_checkpoint(trainer, step)            right after every rank reported the step's checkpoint
    on_train_end(trainer)                   after the export

The runner's list (:func:`orchestrate.runner.default_callbacks`): the console progress line, prediction
previews for wandb, and the data trace with ``--trace-data``. Evaluation will be one more. More can be added
without touching the loop: :func:`from_env` imports ``XSAM_TRAIN_CALLBACKS`` (``module:factory`` entries,
like Ray's ``RAY_TRAIN_CALLBACKS``), which is how the tests inject worker faults into a submitted job.

Callbacks are built on the driver and pickled to the workers: open files and batches in
``on_train_start``, never in ``__init__``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrate.run_errors import RunSetupError

if TYPE_CHECKING:
    from orchestrate.trainer import Trainer

# Heavy imports (torch, transformers) are deferred into the preview callback: callbacks load without torch.

logger = logging.getLogger(__name__)

CALLBACKS_ENV = "XSAM_TRAIN_CALLBACKS"


class Callback:
    """No-op hooks; subclass and override the ones you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, step: int) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass


# ---------------------------------------------------------------------------------------------- progress
def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(
    *, stage: int, step: int, total: int, loss: float, samples_per_s: float, eta_s: float, restarts: int
) -> str:
    """``stage 1  step 40/3600  loss 12.345  31.2 samples/s  ETA 1:02:03  restarts 0``."""
    width = len(str(total))
    return (
        f"stage {stage}  step {step:>{width}}/{total}  loss {loss:.4g}  {samples_per_s:.1f} samples/s  "
        f"ETA {_duration(eta_s)}  restarts {restarts}"
    )


class ProgressLine(Callback):
    """One console line per stage every ``every_s`` seconds (and at the first and last step), from rank 0:
    step/total, loss, samples/s since the previous line, ETA from this attempt's mean step time, restarts."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s

    def on_train_start(self, trainer: Trainer) -> None:
        self.start = self.last = (time.monotonic(), trainer.state.step)

    def on_step_end(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        now, total = time.monotonic(), trainer.plan.total_steps
        if not trainer.is_main or not (
            step == self.start[1] + 1 or step == total or now - self.last[0] >= self.every_s
        ):
            return
        per_step = (now - self.start[0]) / max(1, step - self.start[1])
        samples = (step - self.last[1]) * trainer.cfg.batch.global_batch
        line = progress_line(
            stage=trainer.cfg.stage,
            step=step,
            total=total,
            loss=metrics["loss"],
            samples_per_s=samples / max(now - self.last[0], 1e-9),
            eta_s=per_step * (total - step),
            restarts=trainer.state.attempt,
        )
        logger.info(line)
        self.last = (now, step)


# ---------------------------------------------------------------------------------------------- data trace
class DataTrace(Callback):
    """``--trace-data``: every rank appends ``{step, rank, source, keys, attempt}`` per step (its
    micro-batches' sample keys) to ``<stage>/trace/rank<r>.jsonl``; :func:`read_trace` reads them back. Local
    run roots only."""

    def on_train_start(self, trainer: Trainer) -> None:
        path = trainer.plan.layout.trace_file(trainer.rank)
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")  # noqa: SIM115 (closed in on_train_end)

    def on_step_end(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        if self.file is None:
            return
        row = {
            "step": step - 1,  # the global step's index, as the loader counts
            "rank": trainer.rank,
            "source": metrics["source"],
            "keys": trainer.step_keys,
            "attempt": trainer.state.attempt,
        }
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_trace(stage_dir: str | Path) -> dict[tuple[int, int], dict]:
    """``{(step, rank): row}`` from a stage's data trace; a step run twice (before and after a restart)
    keeps its last row — the one that counts for the final weights."""
    out = {}
    for f in sorted(Path(stage_dir, "trace").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out[(row["step"], row["rank"])] = row
    return out


# ---------------------------------------------------------------------------------------------- previews
class PredictionPreviews(Callback):
    """Every ``tracking.predictions_every`` steps (and at the end), rank 0 logs the model's predictions on
    a fixed batch to wandb (:mod:`orchestrate.previews`). Stage 2 has no masks to show."""

    def on_train_start(self, trainer: Trainer) -> None:
        self.batch = None
        tracking = trainer.cfg.tracking
        if not trainer.tracker.active or trainer.cfg.stage == 2 or not tracking.predictions_every:
            return
        from orchestrate.previews import fixed_batch
        from orchestrate.trainer import to_device

        plan = trainer.plan
        batch, samples = fixed_batch(
            plan.shards, trainer.stage_mixture, trainer.processor, tracking.num_predictions
        )
        if batch is not None:
            self.batch = (to_device(batch, trainer.device, trainer.dtype), samples)

    def on_step_end(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        every = trainer.cfg.tracking.predictions_every
        if self.batch is None or not (step % every == 0 or step == trainer.plan.total_steps):
            return
        from orchestrate.previews import render

        model = trainer.engine.module
        batch, samples = self.batch
        p = model.config.processor
        previews = render(model, batch, samples, stage=trainer.cfg.stage, mean=p.sam_mean, std=p.sam_std)
        trainer.tracker.log_predictions(step, previews)


# ---------------------------------------------------------------------------------------------- extra ones
def from_env(environ: Mapping[str, str] | None = None) -> list[Callback]:
    """The callbacks named in ``XSAM_TRAIN_CALLBACKS``: comma-separated ``module:factory``, each factory
    called without arguments and returning a callback or a list of them."""
    spec = (environ if environ is not None else os.environ).get(CALLBACKS_ENV, "")
    out: list[Callback] = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        module, sep, name = entry.partition(":")
        if not sep:
            raise RunSetupError(f"{CALLBACKS_ENV}: {entry!r} is not module:factory")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise RunSetupError(f"{CALLBACKS_ENV}: cannot load {entry!r}: {e}") from e
        made = factory()
        out += list(made) if isinstance(made, list | tuple) else [made]
    return out
