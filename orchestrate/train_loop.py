"""The per-worker training loop (Ray Train ``train_loop_per_worker``), shaped like Ray's DeepSpeed example.

Each worker: build the model and its stage view, load the parents' exports (checked key by key), call
``deepspeed.initialize`` with the generated config, open this rank's slice of the mixture
(:class:`pipelines.loader.stream.MixtureLoader`), continue from the latest checkpoint if there is one, and run the
steps. Every ``checkpoint.every_steps`` steps every rank writes its DeepSpeed shard and loader state into a
temporary folder, and all ranks report it together (:mod:`orchestrate.checkpointing`). At the end rank 0
writes the stage export (:mod:`orchestrate.exports`).

Determinism: the loader's order is a pure function of its state, and the random draws inside a step (the
loss's point sampling) are seeded from ``(seed, micro-step, rank)``, so a run restarted from a checkpoint
computes what an uninterrupted run would have computed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from orchestrate.plan import RunPlan


def _worker_env(use_gpu: bool) -> None:
    """Set before DeepSpeed is imported: the accelerator (no guessing on mixed boxes) and where JIT-built
    ops are cached (the CPU shared-memory op costs ~30 s to build once)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/xsam_torch_extensions"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def optimizer_groups(model, cfg) -> list[dict]:
    """The stage view's parameter groups with the config's lr multipliers (also sets ``requires_grad``)."""
    from xsam_model import stage_view

    mults = dict(cfg.optim.lr_mults)
    groups = []
    for g in stage_view(model, cfg.stage):
        mult = mults.get(g["name"], g["lr_mult"])
        groups.append(
            {
                "params": g["params"],
                "name": g["name"],
                "lr": cfg.optim.lr * mult,
                "weight_decay": cfg.optim.weight_decay,
            }
        )
    return groups


def to_device(batch: dict, device, float_dtype) -> dict:
    """Move tensors (and lists of tensors) to ``device``; floating tensors to the engine's dtype."""
    import torch

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


def _seed_micro_step(seed: int, micro_step: int, rank: int) -> None:
    import torch

    torch.manual_seed((seed * 1_000_003 + micro_step) * 4099 + rank)


# ---------------------------------------------------------------------------------------------- test hooks
def _fault_hook(plan: RunPlan, step_done: int, rank: int) -> None:
    """``kill:STEP:RANK`` SIGKILLs that worker once (marker file), after making sure Ray Train committed the
    checkpoints reported so far; ``hold:STEP`` parks every worker at that step until ``.release`` exists."""
    if not plan.fault:
        return
    parts = plan.fault.split(":")
    folder = plan.local_stage_dir()
    import ray.train

    def committed():  # what was reported so far is registered: a restart will find it
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    if parts[0] == "kill" and step_done == int(parts[1]) and rank == int(parts[2]):
        marker = folder / ".fault-kill-done"
        if marker.exists():
            return
        committed()
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    if parts[0] == "hold" and step_done == int(parts[1]):
        committed()
        (folder / f".held-rank{rank}").write_text(str(os.getpid()))
        while not (folder / ".release").exists():
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    plan: RunPlan = config["plan"]
    cfg = plan.cfg
    _worker_env(plan.use_gpu)

    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from orchestrate import checkpointing, exports
    from orchestrate.deepspeed_compat import patch_deepspeed
    from orchestrate.deepspeed_config import deepspeed_config
    from orchestrate.plan import model_config
    from orchestrate.tracking import Tracker
    from pipelines.loader.mixture import load as load_mixture
    from pipelines.loader.stream import MixtureLoader
    from xsam_model import build_xsam, export_trainable
    from xsam_model.modeling.xsam import LOSS_KEYS

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != cfg.batch.world_size:
        raise RuntimeError(f"{world} Ray Train workers but the batch config is for {cfg.batch.world_size}")
    device = ray.train.torch.get_device()
    precision = cfg.model.resolved_precision(plan.use_gpu)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    local_dir = plan.local_stage_dir()

    # --- model, parents, DeepSpeed
    torch.manual_seed(cfg.data.seed)  # identical initial weights on every rank (DeepSpeed broadcasts anyway)
    model = build_xsam(model_config(cfg), init_dir=cfg.model.init_dir)
    loaded = {}
    if cfg.parents:
        parents = exports.resolve_parents(plan.run_root, cfg.stage, cfg.parents, plan.init_from)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        from xsam_model.stages import unused_parameters

        load_plan = exports.check_parents(shapes, cfg.parents, parents, skip=unused_parameters(model))
        loaded = exports.load_parent_weights(model, load_plan, parents)
    groups = optimizer_groups(model, cfg)
    group_names = [g["name"] for g in groups]
    ds_config = deepspeed_config(cfg, total_steps=plan.total_steps, use_gpu=plan.use_gpu)
    patch_deepspeed()
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    processor = model.processor
    if processor is None:
        raise RuntimeError(f"flavor {cfg.model.flavor!r} built without a tokenizer; give --init-dir")

    # --- data and state
    stage_mixture = load_mixture(plan.mixture).stage(cfg.data.mixture_stage)
    loader = MixtureLoader(
        plan.shards,
        stage=cfg.data.mixture_stage,
        batch_size=cfg.batch.micro_batch,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.loader_workers,
        seed=cfg.data.seed,
        grad_accum=cfg.batch.grad_accum,
        transform=processor,
        collate=processor.collate,
        mixture=stage_mixture,
        shuffle_window=cfg.data.shuffle_buffer,
        pin_memory=plan.use_gpu,
    )
    state = checkpointing.TrainState(resume_key=cfg.resume_key())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and plan.resume not in ("auto", "never"):
        checkpoint = ray.train.Checkpoint(plan.resume)
    if checkpoint is not None:
        state, loader_state = checkpointing.restore(
            engine, checkpoint, rank=rank, resume_key=cfg.resume_key()
        )
        loader.load_state_dict(loader_state)
        state.attempt += 1
        print(
            f"[rank {rank}] resumed stage {cfg.stage} at step {state.step} from {checkpoint.path}", flush=True
        )

    tracker = (
        Tracker(
            project=cfg.tracking.project,
            run_name=plan.run_name,
            stage=cfg.stage,
            config={**plan.to_dict(), "deepspeed": ds_config},
            mode=cfg.tracking.mode,
            wandb_dir=plan.wandb_dir if rank == 0 else None,
            metrics_file=(local_dir / "metrics.jsonl") if (rank == 0 and local_dir) else None,
            run_root=plan.run_root,
        )
        if rank == 0
        else Tracker(
            project="",
            run_name="",
            stage=cfg.stage,
            config={},
            mode="disabled",
            wandb_dir=None,
            metrics_file=None,
        )
    )
    preview = _preview_batch(plan, stage_mixture, processor, device, dtype) if rank == 0 else None
    trace = None
    if plan.trace_data and local_dir:
        (local_dir / "trace").mkdir(parents=True, exist_ok=True)
        trace = open(local_dir / "trace" / f"rank{rank}.jsonl", "a")  # noqa: SIM115 (closed below)

    # --- steps
    image_tokens = model.config.num_image_tokens
    it = iter(loader)
    last: dict[str, float] = {}
    while state.step < plan.total_steps:
        step = state.step
        t0 = time.perf_counter()
        wait, tokens, keys, source = 0.0, 0, [], None
        sums = torch.zeros(1 + len(LOSS_KEYS), dtype=torch.float64)
        for _ in range(cfg.batch.grad_accum):
            tw = time.perf_counter()
            b = next(it)
            wait += time.perf_counter() - tw
            if b.step != step:
                raise RuntimeError(f"loader at step {b.step}, trainer at step {step}")
            source = b.source
            batch = to_device(b.data, device, dtype)
            _seed_micro_step(cfg.data.seed, b.micro_step, rank)
            out = engine(batch, stage=cfg.stage)
            engine.backward(out.loss)
            engine.step()
            sums += torch.tensor(
                [out.loss.item(), *(float(out.losses[k]) for k in LOSS_KEYS)], dtype=torch.float64
            )
            tokens += llm_tokens(b.data, cfg.stage, image_tokens)
            keys += list(b.data["keys"])
        # one small all-reduce: losses averaged over ranks and micro-batches, tokens and data wait summed
        red = torch.cat([sums, torch.tensor([tokens, wait], dtype=torch.float64)]).to(device)
        dist.all_reduce(red)
        red = red.cpu().tolist()
        step_time = time.perf_counter() - t0
        n_micro = cfg.batch.grad_accum * world
        state.step += 1
        state.samples += cfg.batch.global_batch
        state.tokens += int(red[-2])
        state.source_steps[source] = state.source_steps.get(source, 0) + 1
        grad_norm = engine.get_global_grad_norm()
        last = {
            "loss": red[0] / n_micro,
            **{f"loss/{k}": red[1 + i] / n_micro for i, k in enumerate(LOSS_KEYS)},
        }
        metrics = {
            **last,
            **{f"lr/{n}": lr for n, lr in zip(group_names, scheduler.get_last_lr(), strict=True)},
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": cfg.batch.global_batch / step_time,
            "tokens_per_s": red[-2] / step_time,
            "step_time_s": step_time,
            "data_wait_s": red[-1] / world,
            "data_wait_share": red[-1] / world / step_time,
            "source": source,
            "samples": state.samples,
        }
        tracker.log(state.step, metrics)
        if trace is not None:
            trace.write(
                json.dumps(
                    {"step": step, "rank": rank, "source": source, "keys": keys, "attempt": state.attempt}
                )
                + "\n"
            )
            trace.flush()
        if rank == 0 and (state.step % cfg.tracking.mixture_every == 0 or state.step == plan.total_steps):
            tracker.log_mixture(state.step, state.source_steps, loader.planned)
        if (
            preview is not None
            and cfg.tracking.predictions_every
            and (state.step % cfg.tracking.predictions_every == 0 or state.step == plan.total_steps)
        ):
            tracker.log_predictions(state.step, _render(engine.module, preview, cfg, dtype))
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == plan.total_steps:
            checkpointing.save(
                engine,
                rank=rank,
                loader_state=loader.state_dict(),
                train_state=state,
                metrics={"step": state.step, **last},
            )
        _fault_hook(plan, state.step, rank)

    if trace is not None:
        trace.close()
    loader_stats = loader.stats()
    # --- export (rank 0): trainable weights, resolved config, lineage
    if rank == 0:
        lineage = _lineage(plan, stage_mixture, state, loaded, last, loader_stats)
        config_out = {
            "stage": cfg.to_dict(),
            "model": model.config.to_dict(),
            "deepspeed": ds_config,
            "plan": plan.to_dict(),
        }
        exports.write_export(plan.export_dir, export_trainable(engine.module, cfg.stage), config_out, lineage)
        tracker.summary({"export": plan.export_dir, **{f"final/{k}": v for k, v in last.items()}})
        run_dir = tracker.finish()
        print(
            f"[rank 0] stage {cfg.stage} done at step {state.step}; export {plan.export_dir}; wandb {run_dir}",
            flush=True,
        )


def _lineage(plan: RunPlan, stage_mixture, state, loaded: dict, last: dict, loader_stats: dict) -> dict:
    from orchestrate import exports

    parents = []
    for stage, url in sorted(plan.init_from.items()):
        info = exports.find_export(url, stage)
        parents.append(
            {
                "stage": stage,
                "export": url,
                "model_sha256": info.lineage.get("model_sha256"),
                "tensors_loaded": loaded.get(stage, 0),
                "code": info.lineage.get("code"),
            }
        )
    return {
        "stage": plan.stage,
        "name": plan.cfg.name,
        "run_root": plan.run_root,
        "run_name": plan.run_name,
        "shards": {
            "root": plan.shards,
            "datasets": [
                {
                    "name": d.name,
                    "samples": d.samples,
                    "probability": d.probability,
                    "fingerprint": d.fingerprint,
                    "shards": [{"file": s.file, "sha256": s.sha256} for s in d.shards],
                }
                for d in stage_mixture.datasets
            ],
        },
        "mixture": {
            "path": plan.mixture,
            "stage": stage_mixture.stage,
            "digest": stage_mixture.digest(),
            "t": stage_mixture.t,
        },
        "parents": parents,
        "code": plan.code,
        "steps": state.step,
        "samples": state.samples,
        "tokens": state.tokens,
        "source_steps": state.source_steps,
        "restarts": state.attempt,
        "final_losses": last,
        "loader_skipped": loader_stats.get("skipped", {}),
        "world_size": plan.cfg.batch.world_size,
    }


def _preview_batch(plan: RunPlan, stage_mixture, processor, device, dtype):
    if plan.stage == 2 or not plan.cfg.tracking.predictions_every:
        return None
    from orchestrate.previews import fixed_batch

    batch, samples = fixed_batch(plan.shards, stage_mixture, processor, plan.cfg.tracking.num_predictions)
    return None if batch is None else (to_device(batch, device, dtype), samples)


def _render(model, preview, cfg, dtype) -> list[dict]:
    from orchestrate.previews import render

    batch, samples = preview
    p = model.config.processor
    return render(model, batch, samples, stage=cfg.stage, mean=p.sam_mean, std=p.sam_std)


def read_trace(stage_dir: str | Path) -> dict[tuple[int, int], dict]:
    """``{(step, rank): row}`` from a stage's data trace; a step run twice (before and after a restart)
    keeps its last row — the one that counts for the final weights."""
    out = {}
    for f in sorted(Path(stage_dir, "trace").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out[(row["step"], row["rank"])] = row
    return out


__all__ = ["read_trace", "train_loop_per_worker"]
