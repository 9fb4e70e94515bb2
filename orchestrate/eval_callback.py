"""Evaluation while training, and each step's losses per source: two :class:`~orchestrate.callbacks.Callback`.

:class:`SourceLosses` (every stage, rank 0): every step draws one source (docs/contracts.md#loader-state), so
its losses are logged again as ``loss_by_source/<source>/<part>`` (``total``, ``lm``, ``cls``, ``mask_bce``,
``dice``), one curve per dataset.

:class:`StageEval` (``--eval-every STEPS --eval-sets … --eval-max-samples N``; stage 3, or stage 1 on COCO
sets): a fixed val subset, the first N samples of each set in shard order, is read once at the start; every
``every_steps`` optimizer steps each rank runs inference on its own part of it (``subset[rank::world]``) with
the model being trained (:class:`orchestrate.evaluation.export_inference.ShardPredictor` over the engine's
module, in eval mode and ``torch.inference_mode``; the region draws run on a forked RNG, so training's random
state, weights and checkpoints are untouched), rank 0 gathers the lines, writes them to
``<stage>/eval/step_<step>/predictions.jsonl`` and scores them with the evaluation's scorers
(:func:`~orchestrate.evaluation.export_inference.score_subset`). It logs ``eval/<set>/<metric>`` to wandb and
``metrics.jsonl``, a table per evaluation that puts each set's metrics next to its source's mean training loss
since the previous evaluation (``eval/by_source``), and the latest table in the run summary. The steps are
multiples of ``every_steps``, so a run resumed from a checkpoint evaluates at the same steps.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrate.callbacks import Callback
from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.export_inference import (
    InferenceOptions,
    ShardPredictor,
    plan_sets,
    score_subset,
)

if TYPE_CHECKING:
    from orchestrate.stages import EvalConfig
    from orchestrate.trainer import Trainer

# Heavy imports (torch, transformers, wandb) are deferred into the workers' evaluation (and the model's config
# into its set check): the driver needs none.

logger = logging.getLogger(__name__)


def _source(metrics: Mapping[str, Any]) -> str | None:
    """The step's source (the loader names a dataset ``<source>/<split>``)."""
    name = metrics.get("source")
    return str(name).split("/")[0] if name else None


def _parts(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{"total": loss, "lm": …, …}`` of a step's metrics."""
    out = {"total": float(metrics["loss"])} if "loss" in metrics else {}
    out.update({k.removeprefix("loss/"): float(v) for k, v in metrics.items() if k.startswith("loss/")})
    return out


class SourceLosses(Callback):
    """Rank 0 logs each step's losses under the step's source: ``loss_by_source/<source>/<part>``."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        source = _source(metrics)
        if not trainer.is_main or not source:
            return
        trainer.tracker.log(step, {f"loss_by_source/{source}/{k}": v for k, v in _parts(metrics).items()})


# ---------------------------------------------------------------------------------------------- checks
def check_evaluation(cfg, shards: str) -> None:
    """Driver-side: the sets exist and this stage's model can evaluate them (an EvaluationError otherwise)."""
    plan_sets(shards, cfg.evaluation.data_root, cfg.evaluation.sets, _model_info(cfg), cfg.evaluation.mode)


def _model_info(cfg, model=None):
    """The model in training as an :class:`~xsam_model.export.Export` (config only, nothing on storage), so
    the set checks are the ones ``evaluate.py --export`` makes."""
    from orchestrate.plan import model_config
    from xsam_model.export import Export

    mc = model.config if model is not None else model_config(cfg)
    return Export(
        url=f"the stage-{cfg.stage} model in training",
        stage=cfg.stage,
        config={"stage": cfg.to_dict(), "model": mc.to_dict()},
    )


def _first_samples(evs, n: int) -> list:
    """The first ``n`` (Sample, image bytes) of a set, in shard order (verified as evaluation reads them)."""
    out: list = []
    for shard in evs.shards:
        for pair in gt.read_shard(evs, shard):
            out.append(pair)
            if len(out) >= n:
                return out
    return out


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` on every rank (one object collective; the identity on one worker)."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class StageEval(Callback):
    """Every ``cfg.every_steps`` steps: inference on a fixed val subset, scored and logged by rank 0."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    def on_train_start(self, trainer: Trainer) -> None:
        cfg, plan = self.cfg, trainer.plan
        model = trainer.engine.module
        info = _model_info(trainer.cfg, model)
        self.jobs = plan_sets(plan.shards, cfg.data_root, cfg.sets, info, cfg.mode)
        self.subset = {
            j.evs.name: _first_samples(j.evs, cfg.max_samples)[trainer.rank :: trainer.world]
            for j in self.jobs
        }
        options = InferenceOptions(
            mode=cfg.mode,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            seed=trainer.cfg.data.seed,
            protocol=cfg.protocol,
        )
        self.predictor = ShardPredictor("", options, model=model, info=info)
        self.window: dict[str, list[float]] = {}  # source -> total losses since the last evaluation

    def on_step_end(self, trainer: Trainer, step: int, metrics: Mapping[str, Any]) -> None:
        if _source(metrics) and "loss" in metrics:
            self.window.setdefault(_source(metrics), []).append(float(metrics["loss"]))
        if step % self.cfg.every_steps == 0:
            self.evaluate(trainer, step)

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, dict[str, float]] | None:
        """Every rank predicts its part; rank 0 scores, logs and returns ``{set: {metric: value}}``."""
        t0 = time.perf_counter()
        mine = {}
        for job in self.jobs:
            part = self.predictor.predict_samples(job, self.subset[job.evs.name])
            mine[job.evs.name] = (part.lines, part.no_seg)
        parts = _gather(mine, trainer.world)
        if not trainer.is_main:
            return None
        lines = [line for p in parts for name in p for line in p[name][0]]
        no_seg = {name: sum(p[name][1] for p in parts) for name in mine}
        results = self._score(trainer, step, lines)
        self._log(trainer, step, results, no_seg, time.perf_counter() - t0)
        self.window = {}
        return results

    def _score(self, trainer: Trainer, step: int, lines: list[dict]) -> dict[str, dict[str, float]]:
        local = trainer.plan.layout.local_dir()
        folder = (
            (local / "eval" / f"step_{step:07d}") if local else Path(tempfile.mkdtemp(prefix="xsam-eval-"))
        )
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "predictions.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        names = [j.evs.name for j in self.jobs]
        results, _ = score_subset(
            str(path), trainer.plan.shards, self.cfg.data_root, names, protocol=self.cfg.protocol
        )
        (folder / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        return results

    def _log(self, trainer: Trainer, step: int, results, no_seg: dict[str, int], seconds: float) -> None:
        flat = {
            f"eval/{s}/{m}": v
            for s, ms in results.items()
            for m, v in ms.items()
            if v is not None and math.isfinite(v)
        }
        flat.update({f"eval/{s}/no_seg": n for s, n in no_seg.items()})
        flat["eval/seconds"] = seconds
        trainer.tracker.log(step, flat)
        rows = []
        for s, ms in results.items():
            source = s.split("/")[0]
            window = self.window.get(source, [])
            loss = sum(window) / len(window) if window else None
            rows += [[step, source, s, m, v, loss, len(window)] for m, v in ms.items()]
        run = getattr(trainer.tracker, "run", None)
        if run is not None:
            import wandb

            columns = ["step", "source", "set", "metric", "value", "source_train_loss", "source_steps"]
            table = wandb.Table(columns=columns, data=rows)
            run.log({"train/step": step, "eval/by_source": table})
            trainer.tracker.summary(
                {"eval/latest": wandb.Table(columns=columns, data=rows), "eval/latest_step": step}
            )
        trainer.tracker.summary({f"eval/latest/{k.removeprefix('eval/')}": v for k, v in flat.items()})
        head = ", ".join(
            f"{s} {' '.join(f'{m} {v:.2f}' for m, v in list(ms.items())[:3])}" for s, ms in results.items()
        )
        logger.info("step %d eval (%.1f s): %s", step, seconds, head)
