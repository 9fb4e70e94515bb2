"""The per-worker training loop as a small :class:`Trainer`: setup, step, log, checkpoint, export.

Ray Train runs :func:`train_loop_per_worker` on every worker (shaped like Ray's DeepSpeed example). The
trainer builds the model and its stage view, loads the parents' exports (checked key by key), calls
``deepspeed.initialize`` with the generated config, opens this rank's slice of the mixture
(:class:`pipelines.loader.MixtureLoader`), continues from the latest checkpoint if there is one, and
runs the steps. Every ``checkpoint.every_steps`` steps every rank writes its DeepSpeed shard and loader state
and all ranks report them together (:mod:`orchestrate.train_checkpoints`). At the end rank 0 writes the stage
export (:mod:`orchestrate.exports`). Rank 0 tracks (wandb, ``metrics.jsonl``); the others get a null
tracker. Everything else per step is a callback the runner registered (:mod:`orchestrate.callbacks`).

Determinism: the loader's order is a pure function of its state, and the random draws inside a step (the
loss's point sampling) are seeded from ``(seed, step, the micro-batch's sample keys)``, so a run restarted
from a checkpoint, on the same or another world size, computes what an uninterrupted run would have computed
(up to the order of float reductions when the world size changes).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from orchestrate import console, exports, fingerprint, step_efficiency, train_checkpoints
from orchestrate.callbacks import Callback
from orchestrate.deepspeed_config import initialize
from orchestrate.grad_norms import GradNormProbe
from orchestrate.plan import RunPlan, model_config
from orchestrate.stages import with_world_size
from orchestrate.tracking import make_tracker
from orchestrate.train_checkpoints import TrainState
from pipelines.loader import MixtureLoader
from pipelines.mixture_file import load as load_mixture
from xsam_model import build_xsam, export_trainable, stage_view
from xsam_model.export import write_export
from xsam_model.modeling.xsam import LOSS_KEYS
from xsam_model.processor import DATA_COUNTERS as COUNTERS
from xsam_model.trainable import unused_parameters

# Heavy imports (ray) are deferred into the worker side: the driver imports this module without Ray.

logger = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker: the plan the driver checked, the callbacks the runner chose."""
    trainer = Trainer(
        config["plan"], callbacks=config.get("callbacks", ()), verbosity=config.get("verbosity", 0)
    )
    trainer.setup()
    trainer.fit()
    trainer.export()
    trainer.finish()


def _worker_env(use_gpu: bool) -> None:
    """Set before DeepSpeed is imported: the accelerator (no guessing on mixed boxes) and where JIT-built
    ops are cached (the CPU shared-memory op costs ~30 s to build once)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/xsam_torch_extensions"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def optimizer_groups(model, cfg) -> list[dict]:
    """The stage view's parameter groups at ``lr`` × their multiplier (also sets ``requires_grad``)."""
    return [
        {
            "params": g["params"],
            "name": g["name"],
            "lr": cfg.optim.lr * g["lr_mult"],
            "weight_decay": cfg.optim.weight_decay,
        }
        for g in stage_view(model, cfg.stage)
    ]


def to_device(batch: dict, device, float_dtype) -> dict:
    """Move tensors (and lists of tensors) to ``device``; floating tensors to the engine's dtype."""

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype=float_dtype if x.is_floating_point() else None, non_blocking=True)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [move(t) for t in x]
        return x

    return {k: move(v) for k, v in batch.items()}


def llm_tokens(batch: dict, stage: int, image_tokens: int) -> int:
    """Tokens the LLM processed in ``batch``: text (attention mask) plus the image tokens; 0 in stage 1."""
    if stage == 1:
        return 0
    return int(batch["attention_mask"].sum()) + image_tokens * int(batch["attention_mask"].shape[0])


def _seed_micro_batch(seed: int, step: int, keys: Sequence[str]) -> None:
    """Seed the draws inside one micro-batch's forward (the loss's point sampling) from ``(seed, step, its
    sample keys)``: a function of what the micro-batch holds, not of which rank or micro-step ran it, so a run
    resumed on another world size draws the same points for the same micro-batch."""
    text = "\0".join([str(seed), str(step), *keys])
    torch.manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1))


class Trainer:
    """One worker's part of one stage. ``setup()``, ``fit()``, ``export()``, ``finish()``, in that order."""

    def __init__(self, plan: RunPlan, *, callbacks: Sequence[Callback] = (), verbosity: int = 0):
        self.plan, self.cfg = plan, plan.cfg
        self.callbacks = list(callbacks)
        self.verbosity = verbosity
        self.state = TrainState(resume_key=self.cfg.resume_key())
        self.last_losses: dict[str, float] = {}
        """The latest step's losses (averaged over ranks and micro-batches)."""
        self.step_keys: list[str] = []
        """This rank's sample keys of the latest step."""
        self.loaded: dict[int, int] = {}
        self.parents: dict = {}
        """Stage → the parent :class:`~xsam_model.export.Export` loaded (its bytes verified)."""
        """Tensors loaded from each parent stage's export."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Distributed context, model + parents + DeepSpeed engine, loader, resume, tracker; then
        ``on_train_start`` of every callback."""
        console.quiet_frameworks(self.verbosity)  # before DeepSpeed's import
        _worker_env(self.plan.use_gpu)
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.world != self.cfg.batch.world_size:
            self._resize()
        self.device = ray.train.torch.get_device()
        precision = self.cfg.model.resolved_precision(self.plan.use_gpu)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        checkpoint = self._find_checkpoint()
        # a checkpoint of another world size: DeepSpeed reads its universal conversion, which the engine
        # must know about from its config on
        universal = checkpoint is not None and train_checkpoints.loads_universal(
            checkpoint, self.world, self.cfg.zero_stage, run_root=self.plan.run_root, rank=self.rank
        )
        self._build_engine(load_universal=universal)
        # mfu and peak memory per step, GPU only (None on CPU: neither is logged)
        self.efficiency = step_efficiency.StepEfficiency.create(self.device, self.cfg.tracking.peak_tflops)
        self._build_loader()
        if checkpoint is not None:
            self._resume(checkpoint, universal)
        self.state.layout = {
            "world_size": self.world,
            "micro_batch": self.cfg.batch.micro_batch,
            "grad_accum": self.cfg.batch.grad_accum,
            "loader_workers": self.cfg.data.loader_workers,
        }
        self.tracker = make_tracker(
            self.plan, self.rank, {**self.plan.to_dict(), "deepspeed": self.ds_config}
        )
        for cb in self.callbacks:
            cb.on_train_start(self)

    def _resize(self) -> None:
        """Ray Train started this group with another worker count than the plan's (an elastic range,
        :func:`orchestrate.runner.fit`'s ``min_workers``): the same global batch, accumulation recomputed
        (the driver checked that every count of the range keeps it)."""
        before = self.cfg.batch
        self.cfg = with_world_size(self.cfg, self.world, micro_batch=before.micro_batch)
        logger.log(
            logging.INFO if self.rank == 0 else logging.DEBUG,
            "Ray Train started %d workers (plan: %d): global batch %d = micro batch %d × accumulation %d × %d",
            self.world,
            before.world_size,
            self.cfg.batch.global_batch,
            self.cfg.batch.micro_batch,
            self.cfg.batch.grad_accum,
            self.world,
        )

    def _build_engine(self, *, load_universal: bool = False) -> None:
        cfg = self.cfg
        torch.manual_seed(
            cfg.data.seed
        )  # identical initial weights on every rank (DeepSpeed broadcasts anyway)
        model = build_xsam(model_config(cfg), init_dir=cfg.model.init_dir)
        self.loaded = self._load_parents(model)
        groups = optimizer_groups(model, cfg)
        self.group_names = [g["name"] for g in groups]
        self.grad_probe = GradNormProbe(model, cfg.stage, cfg.tracking.grad_norm_every)  # grad_norm/<group>
        # the stage's lr schedule (cfg.schedule.lr) as DeepSpeed's client scheduler, epochs in the plan's
        # steps
        self.engine, self.scheduler, self.ds_config = initialize(
            model,
            groups,
            cfg,
            total_steps=self.plan.total_steps,
            steps_per_epoch=self.plan.steps_per_epoch,
            use_gpu=self.plan.use_gpu,
            load_universal=load_universal,
        )
        self.processor = model.processor
        if self.processor is None:
            raise RuntimeError(f"flavor {cfg.model.flavor!r} built without a tokenizer; give --init-dir")
        self.image_tokens = model.config.num_image_tokens

    def _load_parents(self, model) -> dict[int, int]:
        """The parents' exports into ``model`` (checked again here: the driver checked on the meta device)."""
        if not self.cfg.parents:
            return {}

        # not hashed here: load_parent_weights checks the bytes it reads against each lineage
        parents = exports.resolve_parents(
            self.plan.run_root, self.cfg.stage, self.cfg.parents, self.plan.init_from, verify=False
        )
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        load_plan = exports.check_parents(shapes, self.cfg.parents, parents, skip=unused_parameters(model))
        self.parents = parents
        return exports.load_parent_weights(model, load_plan, parents)

    def _build_loader(self) -> None:
        cfg, plan = self.cfg, self.plan
        self.stage_mixture = load_mixture(plan.mixture).stage(cfg.data.mixture_stage)
        self.loader = MixtureLoader(
            plan.shards,
            stage=cfg.data.mixture_stage,
            batch_size=cfg.batch.micro_batch,
            rank=self.rank,
            world_size=self.world,
            num_workers=cfg.data.loader_workers,
            seed=cfg.data.seed,
            grad_accum=cfg.batch.grad_accum,
            transform=self.processor,
            collate=self.processor.collate,
            mixture=self.stage_mixture,
            shuffle_window=cfg.data.shuffle_buffer,
            pin_memory=plan.use_gpu,
            variant_categories=cfg.data.variant_categories,
        )

    def _find_checkpoint(self):
        """Ray Train's latest checkpoint of this run, else the one the driver chose (``--resume PATH``, or
        the newest complete one Ray's list did not name: ``plan.resume_from``), else None."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.plan.resume_from:
            checkpoint = ray.train.Checkpoint(self.plan.resume_from)
        return checkpoint

    def _resume(self, checkpoint, universal: bool) -> None:
        """Continue from ``checkpoint``; ``universal``: its DeepSpeed state from the universal conversion."""
        self.state, loader_state, own_stats = train_checkpoints.restore(
            self.engine,
            checkpoint,
            rank=self.rank,
            resume_key=self.cfg.resume_key(),
            universal_state=universal,
        )
        if own_stats:
            self.loader.load_state_dict(loader_state)
        else:  # a rank the writing run did not have: rank 0's order, counters from zero
            self.loader.load_state_dict(loader_state, keep_stats=False)
        self.scheduler.apply()  # this plan's lr at the restored step (the optimizer restored the saved one)
        self.state.attempt += 1
        logger.log(
            logging.INFO if self.is_main else logging.DEBUG,
            "resumed stage %d at step %d from %s (rank %d)%s",
            self.cfg.stage,
            self.state.step,
            checkpoint.path,
            self.rank,
            f" on {self.world} workers through DeepSpeed's universal checkpoint" if universal else "",
        )

    # ------------------------------------------------------------------------------------------ steps
    def fit(self) -> None:
        """Steps until ``plan.total_steps``: step, log, checkpoint when due, then ``on_step_end``."""
        batches = iter(self.loader)
        while self.state.step < self.plan.total_steps:
            with step_efficiency.counting(self.efficiency):  # the first step's FLOPs, counted once
                metrics = self.step(batches)
            metrics.update(step_efficiency.step_fields(self.efficiency, metrics["step_time_s"]))
            self.log(metrics)
            step = self.state.step
            if step % self.cfg.checkpoint.every_steps == 0 or step == self.plan.total_steps:
                self.checkpoint()
            for cb in self.callbacks:
                cb.on_step_end(self, step, metrics)

    def step(self, batches: Iterator) -> dict[str, Any]:
        """One optimizer step: ``grad_accum`` micro-batches (forward, backward, engine step) under the step's
        mask-loss normaliser, one all-reduce of the losses, tokens, data counters and data wait; returns the
        step's metrics, with the global batch's ``data/source`` and ``data/fingerprint``
        (:mod:`orchestrate.fingerprint`)."""
        cfg, step = self.cfg, self.state.step
        t0 = time.perf_counter()
        micro, wait = [], 0.0
        for _ in range(cfg.batch.grad_accum):  # the whole step first: its normaliser counts every micro-batch
            tw = time.perf_counter()
            b = next(batches)
            wait += time.perf_counter() - tw
            if b.step != step:
                raise RuntimeError(f"loader at step {b.step}, trainer at step {step}")
            micro.append(b)
        tokens, keys, source = 0, [], micro[-1].source
        # loss, its parts, stage 1's masks with an unknown category (dropped, counted), VGD/reaseg draw
        # counters
        sums = torch.zeros(2 + len(LOSS_KEYS) + len(COUNTERS), dtype=torch.float64)
        with self._step_normaliser(micro):
            for b in micro:
                batch = to_device(b.data, self.device, self.dtype)
                _seed_micro_batch(cfg.data.seed, step, list(b.data["keys"]))
                out = self.engine(batch, stage=cfg.stage)
                self.engine.backward(out.loss)
                self.grad_probe.after_backward(self.engine, step + 1)  # the step's gradient, before step()
                self.engine.step()
                vgd = {**(b.data.get("vgd_counts") or {}), **(b.data.get("reaseg_counts") or {})}
                sums += torch.tensor(
                    [
                        out.loss.item(),
                        *(float(out.losses[k]) for k in LOSS_KEYS),
                        float(out.metrics.get("dropped_targets", 0.0)),
                        *(float(vgd.get(k, 0)) for k in COUNTERS),
                    ],
                    dtype=torch.float64,
                )
                tokens += llm_tokens(b.data, cfg.stage, self.image_tokens)
                keys += list(b.data["keys"])
        self.step_keys = keys
        metrics = self._advance(sums, tokens, wait, source, time.perf_counter() - t0)
        # a collective on every rank (orchestrate.fingerprint): the global batch's keys, then its digest
        return {**metrics, **fingerprint.step_fields(source, fingerprint.gather_keys(keys))}

    def _step_normaliser(self, micro: list):
        """``LossConfig.num_masks_reduce = global_batch``: the target masks of every micro-batch of the step
        on every rank (one all-reduce) / (world × accumulation), the mask losses' normaliser for the whole
        step — so the step's gradient does not depend on how the global batch is split. Otherwise nothing to
        set."""
        model = self.engine.module
        if model.config.loss.num_masks_reduce != "global_batch":
            return contextlib.nullcontext()
        count = sum(model.count_loss_targets(b.data, stage=self.cfg.stage) for b in micro)
        total = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return model.criterion.step_normaliser(float(total.item()) / (len(micro) * self.world))

    def _advance(self, sums, tokens: int, wait: float, source: str, step_time: float) -> dict[str, Any]:
        """All-reduce the step's sums (losses averaged over ranks and micro-batches, tokens and data wait
        summed), count the step in the train state, and return its metrics."""
        cfg, state = self.cfg, self.state
        red = torch.cat([sums, torch.tensor([tokens, wait], dtype=torch.float64)]).to(self.device)
        dist.all_reduce(red)
        red = red.cpu().tolist()
        n_micro = cfg.batch.grad_accum * self.world
        state.step += 1
        state.samples += cfg.batch.global_batch
        state.tokens += int(red[-2])
        state.source_steps[source] = state.source_steps.get(source, 0) + 1
        grad_norm = self.engine.get_global_grad_norm()
        self.last_losses = {
            "loss": red[0] / n_micro,
            **{f"loss/{k}": red[1 + i] / n_micro for i, k in enumerate(LOSS_KEYS)},
        }
        return {
            **self.last_losses,
            **{f"lr/{n}": lr for n, lr in zip(self.group_names, self.scheduler.get_last_lr(), strict=True)},
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            **self.grad_probe.metrics(),
            "dropped_targets": int(red[1 + len(LOSS_KEYS)]),  # summed over ranks and micro-batches
            **{f"data/{k}": int(red[2 + len(LOSS_KEYS) + i]) for i, k in enumerate(COUNTERS)},
            "samples_per_s": cfg.batch.global_batch / step_time,
            "tokens_per_s": red[-2] / step_time,
            "step_time_s": step_time,
            "data_wait_s": red[-1] / self.world,
            "data_wait_share": red[-1] / self.world / step_time,
            "source": source,
            "samples": state.samples,
        }

    def log(self, metrics: dict[str, Any]) -> None:
        """The step's metrics, and every ``mixture_every`` steps (and at the end) the mixture seen so far."""
        step = self.state.step
        self.tracker.log(step, metrics)
        if step % self.cfg.tracking.mixture_every == 0 or step == self.plan.total_steps:
            self.tracker.log_mixture(step, self.state.source_steps, self.loader.planned)

    def checkpoint(self) -> None:
        """Every rank: DeepSpeed shard + loader state, reported to Ray Train together (a barrier)."""
        train_checkpoints.save(
            self.engine,
            rank=self.rank,
            loader_state=self.loader.state_dict(),
            train_state=self.state,
            metrics={"step": self.state.step, **self.last_losses},
            upload=self.cfg.checkpoint.upload,
        )
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.state.step)

    # ------------------------------------------------------------------------------------------ the end
    def export(self) -> None:
        """Rank 0: the stage's trainable weights, resolved config and lineage under ``<stage>/export``."""
        if not self.is_main:
            return
        lineage = exports.stage_lineage(
            self.plan,
            self.stage_mixture,
            self.state,
            parents=self.parents,
            loaded=self.loaded,
            final_losses=self.last_losses,
            loader_stats=self.loader.stats().to_dict(),
        )
        config = {
            "stage": self.cfg.to_dict(),
            "model": self.engine.module.config.to_dict(),
            "deepspeed": self.ds_config,
            "plan": self.plan.to_dict(),
        }
        export_dir = self.plan.layout.export_dir
        state = export_trainable(self.engine.module, self.cfg.stage)
        write_export(export_dir, state, stage=self.cfg.stage, config=config, lineage=lineage)
        self.tracker.summary({"export": export_dir, **{f"final/{k}": v for k, v in self.last_losses.items()}})

    def finish(self) -> None:
        """``on_train_end`` of every callback, then close the tracker."""
        for cb in self.callbacks:
            cb.on_train_end(self)
        run_dir = self.tracker.finish()
        if self.is_main:  # the driver prints the result table; this line is for -v and the worker logs
            logger.debug(
                "stage %d done at step %d; export %s; wandb %s",
                self.cfg.stage,
                self.state.step,
                self.plan.layout.export_dir,
                run_dir,
            )
