"""Driver side of ``orchestrate/train.py``: resolve the stage config, check everything that can be checked
before a worker starts (so bad input fails at once, not after Ray Train's retries), then run the
``TorchTrainer``.

Checked up front: the flavor, ``--init-dir`` (every pretrained folder a full flavor loads), ``--init-from``
(only parents the stage has; stage 3 may also start from a stage-3 export), the batch arithmetic, the shards
folder and ``mixture.json`` (and that the stage has datasets whose shards exist), each parent export (keys and
shapes against the model built on the meta device; a truncated ``model.safetensors`` is refused by its size),
and that an existing checkpoint of this stage was written with the same settings (its global batch, seed,
mixture, stage…; not its world size: a checkpoint of another ``--num-workers`` is converted here, once, to
DeepSpeed's universal format, :mod:`orchestrate.universal`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrate import console, exports, train_checkpoints
from orchestrate.callbacks import Callback, DataTrace, PredictionPreviews, ProgressLine, from_env
from orchestrate.eval_callback import SourceLosses, StageEval, check_evaluation
from orchestrate.plan import RunPlan, param_shapes
from orchestrate.resume_point import resume_point
from orchestrate.run_errors import ParentExportError, RunSetupError, StageConfigError
from orchestrate.run_layout import RunLayout, StageLayout, resolve
from orchestrate.stages import SELF_PARENT_STAGES, EvalConfig, get_stage, with_self_parent, with_world_size
from orchestrate.trainer import train_loop_per_worker
from pipelines import storage
from pipelines.folder_lock import folder_lock
from pipelines.mixture_file import MixtureError, check_generations
from pipelines.mixture_file import load as load_mixture
from xsam_model.builder import resolve_config
from xsam_model.flavors import XSAM_FLAVORS

# Heavy imports (ray) are deferred into fit and the cluster start: planning a run needs no Ray.

RANDOM_INIT_FLAVORS = ("debug",)
"""Flavors that may be built from random weights (no ``--init-dir``): the tiny CPU model."""


@dataclass(kw_only=True)
class RunArgs:
    """What ``train.py`` parses; every field maps to one command-line option."""

    stage: int
    flavor: str = "xsam-phi3"
    shards: str
    run_root: str
    mixture: str | None = None
    init_dir: str | None = None
    init_from: dict[int, str] = dataclasses.field(default_factory=dict)
    num_workers: int | None = None
    min_workers: int | None = None
    """An elastic worker range ``(min_workers, num_workers)`` (:func:`elastic_workers`); None = fixed."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_steps: int | None = None
    zero_stage: int | None = None
    global_batch: int | None = None
    micro_batch: int | None = None
    loader_workers: int | None = None
    precision: str | None = None
    resume: str = "auto"
    run_name: str | None = None
    wandb_mode: str | None = None
    wandb_dir: str | None = None
    checkpoint_every: int | None = None
    max_failures: int | None = None
    trace_data: bool = False
    lr: float | None = None
    grad_clip: float | None = None
    lr_schedule: str | None = None
    eval_every: int | None = None
    eval_sets: str | None = None
    """Comma list of ``<source>/<split>`` val sets for ``--eval-every``."""
    eval_max_samples: int = 16
    eval_data_root: str = ""
    vgd_same_image: bool = False
    stored_categories: bool = False
    vgd_no_negatives: bool = False
    peak_tflops: float | None = None
    """The GPU's bf16 peak for ``mfu`` (``TrackingConfig.peak_tflops``)."""


def check_flavor(flavor: str) -> None:
    """``flavor`` is a key of :data:`xsam_model.XSAM_FLAVORS` (else it fails on the driver, not in a
    worker)."""
    if flavor not in XSAM_FLAVORS:
        raise StageConfigError(
            f"unknown --flavor {flavor!r}; known flavors: {', '.join(sorted(XSAM_FLAVORS))}"
        )


def apply_init_from(cfg, init_from: dict[int, str]):
    """``cfg`` with its parents as ``--init-from`` asks: each named stage must be a parent of this stage,
    except ``--init-from <stage>=EXPORT`` on a stage that may start from its own export
    (:func:`~orchestrate.stages.with_self_parent`), which then replaces every other parent."""
    if cfg.stage in init_from and cfg.stage in SELF_PARENT_STAGES:
        others = sorted(k for k in init_from if k != cfg.stage)
        if others:
            raise StageConfigError(
                f"--init-from {cfg.stage}=… starts stage {cfg.stage} from one export of its own stage; "
                f"drop --init-from {', '.join(map(str, others))}"
            )
        return with_self_parent(cfg)
    have = sorted(p.stage for p in cfg.parents)
    unknown = sorted(k for k in init_from if k not in have)
    if unknown:
        parents = ", ".join(map(str, have)) if have else "none"
        selfp = f" or {cfg.stage}" if cfg.stage in SELF_PARENT_STAGES else ""
        raise StageConfigError(
            f"--init-from {unknown[0]}=…: stage {cfg.stage} has no stage-{unknown[0]} parent "
            f"(its parents: {parents}{selfp})"
        )
    return cfg


def check_init_dir(cfg) -> None:
    """A flavor built from pretrained parts has ``--init-dir`` with every Hugging Face folder it loads;
    without it the full model would train from random weights (until the OOM killer stops it)."""
    mc = resolve_config(cfg.model.flavor)
    folders = (mc.siglip.folder, mc.sam.folder, mc.llm.folder, mc.decoder.folder)
    if cfg.model.init_dir is None:
        if cfg.model.flavor in RANDOM_INIT_FLAVORS:
            return
        raise RunSetupError(
            f"--flavor {cfg.model.flavor} needs --init-dir (X-SAM's inits/ folder with {', '.join(folders)})"
        )
    absent = [f for f in folders if not os.path.isfile(os.path.join(cfg.model.init_dir, f, "config.json"))]
    if absent:
        raise RunSetupError(
            f"--init-dir {cfg.model.init_dir}: missing {', '.join(absent)} (Hugging Face folders with "
            f"config.json, X-SAM's inits/ layout)"
        )


def build_config(a: RunArgs):
    """The stage's recipe config (or its debug variant) with the command line's overrides applied."""
    check_flavor(a.flavor)
    cfg = apply_init_from(get_stage(a.stage, flavor=a.flavor), a.init_from)
    world = a.num_workers or cfg.batch.world_size
    cfg = with_world_size(cfg, world, global_batch=a.global_batch, micro_batch=a.micro_batch)
    rep = dataclasses.replace
    if a.max_steps is not None:
        cfg = rep(cfg, schedule=rep(cfg.schedule, max_steps=a.max_steps))
    if a.zero_stage is not None:
        cfg = rep(cfg, zero_stage=a.zero_stage)
    if a.init_dir is not None:
        cfg = rep(cfg, model=rep(cfg.model, init_dir=a.init_dir))
    if a.precision is not None:
        cfg = rep(cfg, model=rep(cfg.model, precision=a.precision))
    if a.loader_workers is not None:
        cfg = rep(cfg, data=rep(cfg.data, loader_workers=a.loader_workers))
    if a.stored_categories:
        cfg = rep(cfg, data=rep(cfg.data, variant_categories=False))
    if a.vgd_same_image or a.vgd_no_negatives:
        vgd = {"vgd_cross_image": False} if a.vgd_same_image else {}
        vgd |= {"vgd_negatives": False} if a.vgd_no_negatives else {}
        cfg = rep(cfg, data=rep(cfg.data, **vgd))
    if a.wandb_mode is not None:
        cfg = rep(cfg, tracking=rep(cfg.tracking, mode=a.wandb_mode))
    if a.peak_tflops is not None:
        cfg = rep(cfg, tracking=rep(cfg.tracking, peak_tflops=a.peak_tflops))
    if a.checkpoint_every is not None:
        cfg = rep(cfg, checkpoint=rep(cfg.checkpoint, every_steps=a.checkpoint_every))
    if a.max_failures is not None:
        cfg = rep(cfg, checkpoint=rep(cfg.checkpoint, max_failures=a.max_failures))
    if a.lr is not None or a.grad_clip is not None:
        lr = cfg.optim.lr if a.lr is None else a.lr  # 0 is a value (refused by OptimConfig), not "unset"
        grad_clip = cfg.optim.grad_clip if a.grad_clip is None else a.grad_clip  # 0: no clipping
        optim = rep(cfg.optim, lr=lr, grad_clip=grad_clip)
        cfg = rep(cfg, optim=optim)
    if a.lr_schedule is not None:
        cfg = rep(cfg, schedule=rep(cfg.schedule, lr=rep(cfg.schedule.lr, kind=a.lr_schedule)))
    if a.eval_every is not None:
        sets = tuple(s.strip() for s in (a.eval_sets or "").split(",") if s.strip())
        evaluation = EvalConfig(
            every_steps=a.eval_every, sets=sets, max_samples=a.eval_max_samples, data_root=a.eval_data_root
        )
        cfg = rep(cfg, evaluation=evaluation)
    cfg.model.resolved_precision(a.use_gpu)  # bf16 without GPUs is refused here
    return cfg


def check_data(shards: str, mixture_url: str, mixture_stage: int):
    """The stage's :class:`~pipelines.mixture_file.StageMixture`, after checking that its shards exist."""
    fs, root = storage.fs_and_path(shards)
    if not fs.isdir(root):
        raise RunSetupError(f"shards folder not found: {shards} (build it with orchestrate/build_shards.py)")
    mfs, mpath = storage.fs_and_path(mixture_url)
    if not mfs.exists(mpath):
        raise RunSetupError(
            f"mixture not found: expected {mixture_url} (build_shards writes it; "
            f"`python -m pipelines.build.mixture_weights --out {shards}` rewrites it)"
        )
    try:
        stage = load_mixture(mixture_url).stage(mixture_stage)
        check_generations(shards, stage)  # no shard of a newer (or unfinished) build under an old mixture
    except (KeyError, MixtureError) as e:
        raise RunSetupError(f"{mixture_url}: {e}") from e
    if not stage.datasets:
        missing = ", ".join(f"{m['dataset']} ({m['reason']})" for m in stage.missing) or "none listed"
        raise RunSetupError(f"{mixture_url}: stage {mixture_stage} has no datasets; missing: {missing}")
    absent = [s.file for d in stage.datasets for s in d.shards if not fs.exists(storage.join(root, s.file))]
    if absent:
        raise RunSetupError(
            f"{len(absent)} shards listed in {mixture_url} are not under {shards}: "
            + ", ".join(absent[:10])
            + (" …" if len(absent) > 10 else "")
        )
    return stage


def check_resume(cfg, layout: StageLayout, resume: str) -> str | None:
    """An existing complete checkpoint of this stage (or ``--resume PATH``) was written with this run's
    settings. Returns the checkpoint the workers must be given by path (``--resume PATH``, or the newest
    complete one where Ray Train's own checkpoint list does not name it: :mod:`orchestrate.resume_point`),
    else None."""
    stage_url = layout.dir
    found, resume_from = (
        resume_point(layout) if resume == "auto" else (train_checkpoints.list_checkpoints(layout), None)
    )
    if resume == "never" and found:
        raise RunSetupError(
            f"{stage_url} already holds {len(found)} checkpoints (latest at step {found[-1][0]}); "
            f"use --resume auto to continue, or another --run-root"
        )
    if resume not in ("auto", "never"):
        if found:
            raise RunSetupError(
                f"--resume {resume}: {stage_url} already has checkpoints of its own; "
                f"start from a checkpoint path only in a fresh run root"
            )
        fs, path = storage.fs_and_path(resume)
        if not fs.exists(f"{path}/{train_checkpoints.TRAIN_STATE}"):
            raise RunSetupError(
                f"--resume {resume}: expected a checkpoint folder with {train_checkpoints.TRAIN_STATE}"
            )
        found, resume_from = [(0, resume)], resume
    if found:
        saved = train_checkpoints.latest_train_state(found[-1][1])
        try:  # the loader layout first: its message names the world sizes and worker counts
            lanes = max(1, cfg.data.loader_workers)
            train_checkpoints.check_loader_layout(found[-1][1], cfg.batch.world_size, lanes)
            train_checkpoints.check_resume_key(saved.resume_key, cfg.resume_key(), found[-1][1])
            # another world size: DeepSpeed's universal conversion, here once, before any worker starts
            train_checkpoints.prepare_deepspeed_state(found[-1][1], cfg.batch.world_size, cfg.zero_stage)
        except train_checkpoints.ResumeError as e:
            raise RunSetupError(str(e)) from e
    return resume_from


def _checked_parents(cfg, run_root: str, init_from: dict[int, str]) -> dict[int, str]:
    """Each parent export's folder, after checking it against the model built on the meta device."""
    if not cfg.parents:
        return {}
    try:
        found = exports.resolve_parents(run_root, cfg.stage, cfg.parents, init_from)
        shapes, skip = param_shapes(cfg)
        exports.check_parents(shapes, cfg.parents, found, skip=skip)
    except ParentExportError as e:
        raise RunSetupError(str(e)) from e
    return {k: v.url for k, v in found.items()}


def prepare(a: RunArgs) -> RunPlan:
    """Everything checked and resolved; raises :class:`RunSetupError` at once."""
    try:
        cfg = build_config(a)
    except StageConfigError as e:
        raise RunSetupError(f"stage {a.stage}: {e}") from e
    check_init_dir(cfg)
    run_root, shards = resolve(a.run_root), resolve(a.shards)
    mixture_url = a.mixture or storage.join(shards, "mixture.json")
    stage_mixture = check_data(shards, mixture_url, cfg.data.mixture_stage)
    steps_per_epoch = stage_mixture.steps_per_epoch(cfg.batch.global_batch)
    init_from = _checked_parents(cfg, run_root, a.init_from)
    if cfg.evaluation is not None:
        check_evaluation(cfg, shards)
    layout = RunLayout(run_root).stage(cfg.stage)
    resume_from = check_resume(cfg, layout, a.resume)
    return RunPlan(
        cfg=cfg,
        run_root=run_root,
        run_name=a.run_name or RunLayout(run_root).name or "xsam",
        shards=shards,
        mixture=mixture_url,
        init_from=init_from,
        total_steps=cfg.schedule.total_steps(steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        use_gpu=a.use_gpu,
        resume=a.resume,
        resume_from=resume_from,
        trace_data=a.trace_data,
        wandb_dir=a.wandb_dir or layout.default_wandb_dir(),
        code=exports.code_version(),
    )


TRAIN_LOCK = ".train.lock"
"""``<run-root>/stage<N>/.train.lock``: the stage folder's one training (:mod:`pipelines.folder_lock`)."""


def stage_lock(a: RunArgs):
    """A context manager holding the stage folder for one training: the driver takes it before it checks,
    converts or writes anything and before Ray starts, so a second submission into the same stage folder
    is one line naming the first one's host and pid (two would interleave their metrics and exports). The
    folder is probe-written first: a read-only or full run root fails here, in one line."""
    layout = RunLayout(resolve(a.run_root)).stage(a.stage)
    storage.check_writable(layout.dir, "--run-root")
    return folder_lock(layout.dir, TRAIN_LOCK, what="training", error=RunSetupError)


def default_callbacks(plan: RunPlan) -> list[Callback]:
    """What every worker runs besides the loop: the progress line, prediction previews, the data trace
    (``--trace-data``), then any named in ``XSAM_TRAIN_CALLBACKS``
    (:func:`orchestrate.callbacks.from_env`)."""
    callbacks: list[Callback] = [ProgressLine(plan.cfg.tracking.progress_every_s), PredictionPreviews()]
    callbacks.append(SourceLosses())
    if plan.cfg.evaluation is not None:
        callbacks.append(StageEval(plan.cfg.evaluation))
    if plan.trace_data:
        callbacks.append(DataTrace())
    return callbacks + from_env()


def elastic_workers(cfg, min_workers: int | None) -> int | tuple[int, int]:
    """``ScalingConfig.num_workers``: the plan's worker count, or with ``min_workers`` the range
    ``(min_workers, plan's count)`` — Ray Train v2 then starts, and restarts after a lost node, with as many
    workers as the cluster fits in that range. Every count of the range must keep the global batch with the
    plan's micro batch; else :class:`RunSetupError` naming the numbers."""
    top = cfg.batch.world_size
    if min_workers is None or min_workers == top:
        return top
    if not 1 <= min_workers < top:
        raise RunSetupError(f"min_workers {min_workers}: expected 1 ≤ min_workers ≤ --num-workers {top}")
    for world in range(min_workers, top):
        try:
            cfg.batch.resized(world, micro_batch=cfg.batch.micro_batch)
        except StageConfigError as e:
            raise RunSetupError(f"min_workers {min_workers}: on {world} workers the {e}") from e
    return (min_workers, top)


def fit(
    plan: RunPlan,
    *,
    cpus_per_worker: float = 1.0,
    callbacks: Sequence[Callback] | None = None,
    verbosity: int = 0,
    min_workers: int | None = None,
):
    """Run the stage with Ray Train (re-running with the same run root continues from its latest checkpoint).
    ``callbacks``: default :func:`default_callbacks`. ``min_workers``: an elastic worker range
    (:func:`elastic_workers`); the workers then recompute accumulation for the count Ray gives them and, for
    a checkpoint of another count, convert its DeepSpeed state themselves
    (:func:`orchestrate.train_checkpoints.loads_universal`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    num_workers = elastic_workers(plan.cfg, min_workers)
    fs, path = storage.fs_and_path(plan.layout.dir)
    fs.makedirs(path, exist_ok=True)
    callbacks = default_callbacks(plan) if callbacks is None else list(callbacks)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "callbacks": callbacks, "verbosity": verbosity},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=plan.layout.name,
            storage_path=plan.run_root,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=plan.cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=plan.cfg.checkpoint.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=console.ray_train_log_level(verbosity)),
        ),
    )
    return trainer.fit()


def ray_init(num_cpus: int | None = None, verbosity: int = 0) -> None:
    """Join the cluster of a submitted job (or ``RAY_ADDRESS``); else start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        num_cpus=None if address else num_cpus,
        log_to_driver=True,
        logging_level=console.framework_level(verbosity),
    )
