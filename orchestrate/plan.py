"""The resolved plan of one stage run: what the driver checked and every worker follows.

:class:`RunPlan` is made once on the driver (:func:`orchestrate.runner.prepare`), handed to each Ray Train
worker in ``train_loop_config`` and recorded in the export, so a worker never re-derives a path or a size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from orchestrate.run_layout import StageLayout
from orchestrate.stages import StageConfig
from xsam_model import build_xsam
from xsam_model.builder import resolve_config
from xsam_model.config import stage_processor, with_checkpointing
from xsam_model.trainable import unused_parameters


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    cfg: StageConfig
    run_root: str
    """Local folder or URI holding ``stage1/ stage2/ stage3/``
    (docs/contracts.md#runs-checkpoints-and-exports)."""
    run_name: str
    """wandb group; defaults to the run root's folder name."""
    shards: str
    mixture: str
    """``mixture.json`` path/URI (default ``<shards>/mixture.json``)."""
    init_from: dict[int, str] = field(default_factory=dict)
    """Parent stage → export folder (resolved and checked by the driver)."""
    total_steps: int
    steps_per_epoch: int
    use_gpu: bool = False
    resume: str = "auto"
    """``auto`` (latest checkpoint of this stage, if any), ``never``, or a checkpoint folder."""
    resume_from: str | None = None
    """The checkpoint folder the workers start from when Ray Train's ``get_checkpoint()`` has none:
    ``--resume PATH``, or the newest complete checkpoint where Ray's own list does not name it
    (:mod:`orchestrate.resume_point`)."""
    trace_data: bool = False
    """Write the keys of every micro-batch to ``<stage>/trace/rank<r>.jsonl`` (order checks)."""
    wandb_dir: str | None = None
    code: dict = field(default_factory=dict)

    @property
    def stage(self) -> int:
        return self.cfg.stage

    @property
    def layout(self) -> StageLayout:
        """This stage's folder under the run root and what it holds."""
        return StageLayout(self.run_root, self.stage)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cfg"] = self.cfg.to_dict()
        return d


def model_config(cfg: StageConfig):
    """The :class:`xsam_model.XSamConfig` the stage builds: its flavor with the stage's max length, activation
    checkpointing (``cfg.model.checkpointing``, :func:`xsam_model.config.with_checkpointing`) and attention
    kernel. ``attn_implementation="auto"`` stays ``auto`` here; the build resolves it for its device."""
    mc = with_checkpointing(resolve_config(cfg.model.flavor), cfg.model.checkpointing)
    if cfg.data.max_length is not None:
        mc.processor = dataclasses.replace(mc.processor, max_length=cfg.data.max_length)
    mc.llm = dataclasses.replace(mc.llm, attn_implementation=cfg.model.attn_implementation)
    vgd = {k: v for k in ("vgd_cross_image", "vgd_negatives") if (v := getattr(cfg.data, k)) is not None}
    if vgd:  # VGD prompts drawn at batch time: the stage config's switches over the flavor's
        mc.processor = dataclasses.replace(mc.processor, **vgd)
    # X-SAM's stage transforms: stage-1 large-scale jitter, stage-2 SigLIP image padded to a square
    mc.processor = stage_processor(mc.processor, cfg.stage)
    return mc


def param_shapes(cfg: StageConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Parameter shapes of the stage's model built on the meta device (no memory, a few seconds for the full
    flavor), and the names of parameters that never train. Used by the driver to check parent exports."""
    model = build_xsam(model_config(cfg), device="meta")
    return {n: tuple(p.shape) for n, p in model.named_parameters()}, set(unused_parameters(model))
