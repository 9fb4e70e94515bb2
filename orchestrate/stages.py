"""The three X-SAM training stages as typed configs: one function per stage, variants by editing a copy.

    cfg = STAGES[3]()                                    # the recipe (reference/xsam_recipe.md §4), 16 GPUs
    cfg = debug(stage3())                                # tiny model, a few steps, CPU-friendly
    cfg = with_world_size(cfg, 8)                        # same global batch on 8 GPUs (accumulation × 2)

Batch sizes are defined once, in :class:`BatchConfig` (global = micro × accumulation × world size, checked);
the DeepSpeed JSON and the learning-rate schedule (:attr:`StageSchedule.lr`, one
:class:`xsam_model.schedule.ScheduleConfig`) are generated from the config by
:mod:`orchestrate.deepspeed_config`, never edited by hand. Each thing is defined once, keyed by the stage
number (an int): hyperparameters here; what trains, its parameter groups and their learning-rate multipliers
in the model's stage view (:data:`xsam_model.trainable.STAGE_GROUPS`, shown in :meth:`StageConfig.to_dict` so
they reach the resolved config and wandb); the datasets of a stage in
:data:`pipelines.build.mixture_weights.STAGE_DATASETS`, read here only through ``mixture.json``
(:attr:`DataConfig.mixture_stage`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrate.run_errors import StageConfigError
from xsam_model.config import ATTN_IMPLEMENTATIONS, CHECKPOINT_PARTS, stage_checkpointing
from xsam_model.schedule import ScheduleConfig
from xsam_model.trainable import STAGE_GROUPS


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """Samples per optimizer step. X-SAM: per-device batch × accumulation × GPUs (16 in its configs)."""

    global_batch: int
    """Samples per optimizer step over all workers (s1 64, s2 256, s3 64)."""
    micro_batch: int
    """Samples per worker per forward/backward (``train_micro_batch_size_per_gpu``)."""
    grad_accum: int
    """Micro-batches per optimizer step on each worker."""
    world_size: int
    """Ray Train workers (one per GPU)."""

    def __post_init__(self):
        for name in ("global_batch", "micro_batch", "grad_accum", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise StageConfigError(f"BatchConfig.{name} must be a positive int, got {v!r}")
        product = self.micro_batch * self.grad_accum * self.world_size
        if product != self.global_batch:
            raise StageConfigError(
                f"global batch {self.global_batch} != micro batch {self.micro_batch} × accumulation "
                f"{self.grad_accum} × world size {self.world_size} = {product}"
            )

    def resized(
        self, world_size: int, *, global_batch: int | None = None, micro_batch: int | None = None
    ) -> BatchConfig:
        """The same global batch (unless given) on ``world_size`` workers; accumulation absorbs the change."""
        g = self.global_batch if global_batch is None else global_batch
        m = self.micro_batch if micro_batch is None else micro_batch
        per_step = m * world_size
        if world_size <= 0 or m <= 0 or g % per_step:
            raise StageConfigError(
                f"global batch {g} is not divisible by micro batch {m} × world size {world_size} = {per_step}; "
                f"choose a global batch that is a multiple of {per_step}, or another micro batch / worker count"
            )
        return BatchConfig(global_batch=g, micro_batch=m, grad_accum=g // per_step, world_size=world_size)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW (β = 0.9/0.999); each parameter group runs at ``lr`` × its multiplier from the model's stage
    view (:data:`xsam_model.trainable.STAGE_GROUPS`)."""

    lr: float
    weight_decay: float
    grad_clip: float
    """Global gradient-norm clip (``gradient_clipping``); stage 1 uses X-SAM's 0.01; 0 turns clipping off (as
    DeepSpeed reads ``gradient_clipping: 0``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if not self.lr > 0 or not self.weight_decay >= 0 or not self.grad_clip >= 0:
            raise StageConfigError(
                f"need lr > 0, weight_decay >= 0, grad_clip >= 0 (0: no clipping); got {self.lr}, "
                f"{self.weight_decay}, {self.grad_clip}"
            )


@dataclass(frozen=True, kw_only=True)
class StageSchedule:
    """How long a stage runs and its learning-rate schedule. The schedule is defined once, by ``lr`` (an
    :class:`xsam_model.schedule.ScheduleConfig`: warm-up then cosine or multistep), and runs as the client
    ``LambdaLR`` handed to ``deepspeed.initialize`` (:func:`orchestrate.deepspeed_config.lr_scheduler`)."""

    epochs: float
    max_steps: int | None = None
    """Stop after this many optimizer steps; None = epochs × the mixture's steps per epoch. With it, the
    schedule's horizon is the run (warm-up 3 % of it, the cosine spans the steps actually run) and the epoch
    milestones stay (a short run never reaches them); without it, mmengine's epochs → iterations
    conversion."""
    lr: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Warm-up (3 % from 1e-5 × lr) then ``cosine`` to 0 (stages 2, 3) or ``multistep`` (stage 1, paper),
    with mmengine's semantics (:mod:`xsam_model.schedule`)."""

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps <= 0:
            raise StageConfigError(f"max_steps must be positive, got {self.max_steps}")
        if not self.epochs > 0:
            raise StageConfigError(f"need epochs > 0; got {self.epochs}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """``steps_per_epoch``: Σ_d ceil(N_d·r_d / global batch) from the mixture (X-SAM's single-source
        batches), so an epoch sees each dataset ``r_d`` times over."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * steps_per_epoch))

    def warmup_steps(self, total: int) -> int:
        return self.lr.num_warmup_steps(total)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which network, where its pretrained parts live, and how it runs."""

    flavor: str = "xsam-phi3"
    """A key of :data:`xsam_model.XSAM_FLAVORS`."""
    init_dir: str | None = None
    """X-SAM's ``inits/`` folder (HF sub-folders); None = random weights (the debug flavor)."""
    checkpointing: tuple[str, ...] = ()
    """Parts recomputed in backward (activation checkpointing), keys of
    :data:`xsam_model.config.CHECKPOINT_PARTS`; the recipe sets :func:`xsam_model.config.stage_checkpointing`
    (stages 2, 3: all parts, as X-SAM; stage 1: the SAM encoder, which trains there). Applied to the flavor's
    config by :func:`orchestrate.plan.model_config` (:func:`xsam_model.config.with_checkpointing`)."""
    attn_implementation: str = "auto"
    """The LLM's attention kernel (``LLMConfig.attn_implementation``): ``auto`` resolves at build time to
    ``flash_attention_2`` when ``flash_attn`` is installed and the model is built for CUDA, else ``sdpa``."""
    precision: str = "auto"
    """``auto`` (bf16 on GPUs, fp32 on CPU), ``bf16`` or ``fp32``."""

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise StageConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        object.__setattr__(self, "checkpointing", tuple(self.checkpointing))
        unknown = sorted(set(self.checkpointing) - set(CHECKPOINT_PARTS))
        if unknown:
            raise StageConfigError(
                f"unknown checkpointing parts {unknown}; known: {', '.join(sorted(CHECKPOINT_PARTS))}"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise StageConfigError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )

    def resolved_precision(self, use_gpu: bool) -> str:
        if self.precision == "auto":
            return "bf16" if use_gpu else "fp32"
        if self.precision == "bf16" and not use_gpu:
            raise StageConfigError("bf16 needs GPUs here (DeepSpeed on CPU runs fp32); use --precision fp32")
        return self.precision


@dataclass(frozen=True, kw_only=True)
class ParentSpec:
    """Weights a stage takes from an earlier stage's export. Every export key must be taken or dropped
    on purpose (``drop``); every model parameter under ``take`` must be in the export with its shape."""

    stage: int
    take: tuple[str, ...]
    """Parameter-name prefixes loaded from that export."""
    drop: tuple[str, ...] = ()
    """Prefixes deliberately not loaded (X-SAM drops them silently; here they are named)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What the loader reads. Datasets and their weights come from ``mixture.json`` (never recomputed)."""

    mixture_stage: int
    """The stage of ``mixture.json`` to read (1, 2, 3): its datasets, probabilities and shards."""
    seed: int = 1024
    """X-SAM's ``--seed 1024``; seeds the per-step source draw and the per-rank shuffles."""
    loader_workers: int = 4
    """DataLoader worker processes per training worker (X-SAM: s1 4, s2 8, s3 4)."""
    shuffle_buffer: int = 1000
    max_length: int | None = 2319
    """Text-token cut (X-SAM's Phi-3 figure); None = the flavor's own."""
    variant_categories: bool = True
    """Stage-3 genseg category prompts re-drawn per use as the archive's ``use_variant_cat`` (paper); False =
    the stored category list (``MixtureLoader(variant_categories=...)``)."""
    vgd_cross_image: bool | None = None
    """VGD ``<region>`` prompts drawn among every same-category instance of the micro-batch (paper); False =
    the stored same-image prompt; None = the flavor's (``ProcessorConfig.vgd_cross_image``)."""
    vgd_negatives: bool | None = None
    """VGD negatives (paper: p=0.5, 0–5 absent-category slots with another image's prompt, no target);
    False = none (X-SAM ``main``); None = the flavor's (``ProcessorConfig.vgd_negatives``)."""


@dataclass(frozen=True, kw_only=True)
class CheckpointPolicy:
    every_steps: int
    """Ray Train checkpoint (DeepSpeed shards + loader state) every N optimizer steps."""
    keep: int = 2
    max_failures: int = 3
    """Worker-group restarts Ray Train attempts from the latest checkpoint before giving up."""
    upload: str = "async"
    """``async``: Ray Train uploads a checkpoint in the background while training goes on; ``sync``: the step
    waits for it (a checkpoint's local copy then never outlives its step)."""

    def __post_init__(self):
        if (
            self.every_steps <= 0
            or self.keep <= 0
            or self.max_failures < -1
            or self.upload not in ("async", "sync")
        ):
            raise StageConfigError(f"bad checkpoint policy {self}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    project: str = "xsam"
    mode: str = "auto"
    """``auto`` (online when WANDB_API_KEY is set, else offline), ``offline``, ``online`` or ``disabled``."""
    log_every: int = 1
    mixture_every: int = 50
    """Every K steps: the mixture seen so far next to the planned one."""
    predictions_every: int = 500
    """Every K steps (and at the end): predictions on a fixed batch as images; 0 = never."""
    num_predictions: int = 4
    progress_every_s: float = 30.0
    """Seconds between the console's progress lines (rank 0; also at the first and the last step)."""
    grad_norm_every: int = 50
    """Every K optimizer steps: the gradient norm of each trained part, ``grad_norm/<group>``
    (:mod:`orchestrate.grad_norms`; one extra all-reduce per parameter under ZeRO); 0 = never."""
    peak_tflops: float | None = None
    """The GPU's dense bf16 peak for ``mfu`` (TFLOP/s); None = by device name from
    :data:`orchestrate.step_efficiency.PEAK_BF16_FLOPS` (an unknown GPU then logs no ``mfu``)."""

    def __post_init__(self):
        if self.mode not in ("auto", "offline", "online", "disabled"):
            raise StageConfigError(
                f"tracking mode must be auto, offline, online or disabled, got {self.mode!r}"
            )
        if not isinstance(self.grad_norm_every, int) or self.grad_norm_every < 0:
            raise StageConfigError(f"grad_norm_every must be an int >= 0, got {self.grad_norm_every!r}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise StageConfigError(f"peak_tflops must be positive, got {self.peak_tflops}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation while training (:class:`orchestrate.eval_callback.StageEval`): every ``every_steps`` steps,
    inference on the first ``max_samples`` samples of each val set, scored and logged to the run."""

    every_steps: int
    sets: tuple[str, ...]
    """``<source>/<split>`` names of built val sets."""
    max_samples: int = 16
    data_root: str = ""
    """The folder the build read (COCO sets read their original annotation files)."""
    batch_size: int = 2
    max_new_tokens: int = 128
    """Per generated answer (GCG captions are generated; X-SAM's 512 is the evaluate.py default)."""
    mode: str = "auto"
    """``auto`` (X-SAM: teacher-forced, GCG generated), ``teacher`` or ``generate``."""
    protocol: str = "paper"
    """``paper`` (X-SAM's evaluation code) or ``standard`` (docs/evaluation.md)."""

    def __post_init__(self):
        if self.protocol not in ("paper", "standard"):
            raise StageConfigError(f"evaluation protocol must be paper or standard, got {self.protocol!r}")
        if self.every_steps <= 0 or self.max_samples <= 0 or self.batch_size <= 0 or not self.sets:
            raise StageConfigError(
                f"evaluation needs every_steps, max_samples, batch_size > 0 and a set; got {self}"
            )
        if self.mode not in ("auto", "teacher", "generate"):
            raise StageConfigError(f"evaluation mode must be auto, teacher or generate, got {self.mode!r}")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Everything one stage needs; :func:`to_dict` is what lands in the export and in wandb."""

    stage: int
    name: str
    model: ModelConfig
    data: DataConfig
    batch: BatchConfig
    optim: OptimConfig
    schedule: StageSchedule
    checkpoint: CheckpointPolicy
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parents: tuple[ParentSpec, ...] = ()
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (X-SAM: 2 everywhere). 3 is refused: exports read whole parameters."""
    evaluation: EvalConfig | None = None
    """Evaluation while training (``--eval-every``); None = none."""

    def __post_init__(self):
        if self.stage not in STAGE_GROUPS:
            raise StageConfigError(f"stage must be one of {sorted(STAGE_GROUPS)}, got {self.stage}")
        if self.zero_stage not in (0, 1, 2):
            raise StageConfigError(
                f"zero_stage must be 0, 1 or 2 (ZeRO-3 shards parameters, which the export "
                f"does not gather), got {self.zero_stage}"
            )
        for p in self.parents:
            own = p.stage == self.stage and self.stage in SELF_PARENT_STAGES and len(self.parents) == 1
            if p.stage >= self.stage and not own:
                raise StageConfigError(f"stage {self.stage} cannot start from stage {p.stage}")
        if self.evaluation is not None and self.stage == 2:
            raise StageConfigError("stage 2 trains the projectors only: it has no masks to evaluate")

    @property
    def lr_mults(self) -> tuple[tuple[str, float], ...]:
        """(parameter-group prefix, lr multiplier) of this stage, in group order: the model's stage view."""
        return STAGE_GROUPS[self.stage]

    def to_dict(self) -> dict:
        """Every field, plus the stage view's lr multipliers under ``optim.lr_mults``."""
        d = dataclasses.asdict(self)
        d["optim"]["lr_mults"] = self.lr_mults
        return d

    def resume_key(self) -> dict:
        """Fields a resumed run must share with the run that wrote its checkpoint (anything else, e.g. a
        longer ``max_steps``, may change between submissions). The global batch, not how it is split: a
        stage resumes on another world size or micro-batch × accumulation split (elastic resume)."""
        return {
            "stage": self.stage,
            "flavor": self.model.flavor,
            "global_batch": self.batch.global_batch,
            "zero_stage": self.zero_stage,
            # a string, as in the checkpoints written before stages were keyed by int: they stay resumable
            "mixture_stage": str(self.data.mixture_stage),
            "seed": self.data.seed,
        }


SELF_PARENT_STAGES = (3,)
"""Stages that may start from an export of their own stage (:func:`with_self_parent`): stage 3 trains
everything, so a stage-3 export is a complete starting point."""


# ---------------------------------------------------------------------------------------------- the recipe
def stage1() -> StageConfig:
    """Segmentor fine-tune on COCO panoptic: SAM-L encoder (lr × 0.1) + connector + re-initialised Mask2Former
    decoder + linear 133-class head; lr 1e-4, wd 0.05, clip 0.01, 4/GPU × 16 GPUs, 36 epochs; warm-up then
    × 0.1 at epochs 24 and 30 (the paper's s1 config, ``AAAI26_Archive``; ``main`` uses a cosine)."""
    return StageConfig(
        stage=1,
        name="s1_segmentor_finetune",
        model=ModelConfig(checkpointing=stage_checkpointing(1)),
        data=DataConfig(mixture_stage=1, loader_workers=4, max_length=None),
        batch=BatchConfig(global_batch=64, micro_batch=4, grad_accum=1, world_size=16),
        optim=OptimConfig(lr=1e-4, weight_decay=0.05, grad_clip=0.01),
        schedule=StageSchedule(
            epochs=36, lr=ScheduleConfig(kind="multistep", milestones=(24, 30), gamma=0.1)
        ),
        checkpoint=CheckpointPolicy(every_steps=2000, keep=2),
    )


def stage2() -> StageConfig:
    """Alignment pre-train on LLaVA-Pretrain: only the visual and seg projectors train; lr 1e-3, wd 0,
    clip 1, 16/GPU × 16 GPUs, 1 epoch. SAM encoder from stage 1 (frozen)."""
    return StageConfig(
        stage=2,
        name="s2_alignment_pretrain",
        model=ModelConfig(checkpointing=stage_checkpointing(2)),
        data=DataConfig(mixture_stage=2, loader_workers=8, max_length=2319),
        batch=BatchConfig(global_batch=256, micro_batch=16, grad_accum=1, world_size=16),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1.0),
        # X-SAM: 4/GPU × accumulation 4, and mmengine steps the schedule every one of the 4 iterations
        schedule=StageSchedule(epochs=1, lr=ScheduleConfig(kind="cosine", iters_per_step=4)),
        checkpoint=CheckpointPolicy(every_steps=2000, keep=2),
        parents=(
            # stage 2 does not run the decoder: the connector and the decoder wait for stage 3
            ParentSpec(stage=1, take=("sam_encoder",), drop=("seg_connector", "mask_decoder")),
        ),
    )


def stage3() -> StageConfig:
    """Mixed fine-tune on the 11 datasets with balance resampling: everything trains, SigLIP and SAM lr × 0.1;
    lr 4e-5, wd 0.05, clip 1, 4/GPU × 16 GPUs, 1 epoch, checkpoints every 200 steps."""
    return StageConfig(
        stage=3,
        name="s3_mixed_finetune",
        model=ModelConfig(checkpointing=stage_checkpointing(3)),
        data=DataConfig(mixture_stage=3, loader_workers=4, max_length=2319),
        batch=BatchConfig(global_batch=64, micro_batch=4, grad_accum=1, world_size=16),
        optim=OptimConfig(lr=4e-5, weight_decay=0.05, grad_clip=1.0),
        schedule=StageSchedule(epochs=1, lr=ScheduleConfig(kind="cosine")),
        checkpoint=CheckpointPolicy(every_steps=200, keep=2),
        parents=(
            # segmentor (SAM encoder + decoder) and connector from stage 1; its linear 133-class head is
            # replaced by the phrase head here (X-SAM drops it silently)
            ParentSpec(
                stage=1,
                take=(
                    "sam_encoder",
                    "seg_connector",
                    "mask_decoder.pixel_decoder",
                    "mask_decoder.transformer",
                ),
                drop=("mask_decoder.linear_head",),
            ),
            ParentSpec(stage=2, take=("visual_projector", "seg_projector")),
        ),
    )


STAGES: dict[int, Callable[[], StageConfig]] = {1: stage1, 2: stage2, 3: stage3}


def with_self_parent(cfg: StageConfig) -> StageConfig:
    """``cfg`` starting from an export of its own stage instead of its usual parents: every module the stage
    trains is taken from that one export (e.g. X-SAM's released stage-3 weights imported by
    ``python -m orchestrate.convert import``, as the start of another stage-3 run). Only
    :data:`SELF_PARENT_STAGES`."""
    if cfg.stage not in SELF_PARENT_STAGES:
        raise StageConfigError(
            f"stage {cfg.stage} cannot start from an export of stage {cfg.stage} "
            f"(only stage {', '.join(map(str, SELF_PARENT_STAGES))} can)"
        )
    own = ParentSpec(stage=cfg.stage, take=tuple(p for p, _ in STAGE_GROUPS[cfg.stage]))
    return dataclasses.replace(cfg, parents=(own,))


# ---------------------------------------------------------------------------------------------- variants
def debug(cfg: StageConfig, *, steps: int = 6) -> StageConfig:
    """The tiny ``debug`` model on CPU: 2 workers × micro batch 2, a few steps, checkpoint every 2 steps. It
    keeps the stage's schedule and activation checkpointing, so those code paths run on CPU too."""
    return dataclasses.replace(
        cfg,
        name=cfg.name + "_debug",
        model=dataclasses.replace(cfg.model, flavor="debug", init_dir=None),
        data=dataclasses.replace(cfg.data, loader_workers=0, shuffle_buffer=16, max_length=None),
        batch=BatchConfig(global_batch=4, micro_batch=2, grad_accum=1, world_size=2),
        schedule=dataclasses.replace(cfg.schedule, max_steps=steps),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=2, keep=2),
        tracking=dataclasses.replace(
            cfg.tracking, mixture_every=2, predictions_every=steps, num_predictions=2, grad_norm_every=2
        ),
    )


def with_world_size(
    cfg: StageConfig, world_size: int, *, global_batch: int | None = None, micro_batch: int | None = None
) -> StageConfig:
    """``cfg`` on ``world_size`` workers keeping its global batch (accumulation absorbs the difference)."""
    return dataclasses.replace(
        cfg, batch=cfg.batch.resized(world_size, global_batch=global_batch, micro_batch=micro_batch)
    )


def get_stage(stage: int, *, flavor: str = "xsam-phi3") -> StageConfig:
    """``STAGES[stage]()``; the ``debug`` flavor also gets :func:`debug`'s small batch and few steps."""
    if stage not in STAGES:
        raise StageConfigError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    cfg = STAGES[stage]()
    if flavor == "debug":
        return debug(cfg)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, flavor=flavor))
