"""Plan a GPU run without a GPU: per-GPU memory and FLOPs of one training step of a stage, traced on fake
tensors.

    python orchestrate/train.py --stage 3 --plan --gpu-memory 80 --num-workers 16

The stage's model (its flavor at full depth, the stage's activation checkpointing, ``requires_grad`` as the
stage trains) is built on the meta device and its parameters become storage-less fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``) in the run's dtype. One training step on a batch of the
stage's real shape (SAM L×L, SigLIP S×S, the LLM sequence of the stage's longest samples) runs forward and
backward under ``torch.distributed._tools.mem_tracker.MemTracker`` (bytes per category and module) and
``torch.utils.flop_counter.FlopCounterMode``. Nothing is computed, downloaded or allocated beyond bookkeeping.

What is traced and what is arithmetic:

- **Activations** (everything autograd and the step hold beyond parameters and gradients, at the step's peak)
  are traced at micro batch 1 and 2, with the stage's checkpointing and without; activations grow linearly in
  the micro batch (every per-sample tensor does), so B's figure is ``a1 + (B-1)·(a2-a1)``.
- **Model states** follow DeepSpeed's ZeRO arithmetic (ZeRO paper, Rajbhandari et al. 2020, §5; DeepSpeed
  bf16 mixed precision): bf16 parameters (2 B each, all of them, trainable or not), bf16 gradients of the
  trainable ones (2 B), AdamW's fp32 master copy + m + v (12 B per trainable parameter). ZeRO-1 divides the
  optimizer states by the world size W, ZeRO-2 also the gradients, ZeRO-3 also the parameters. fp32: 4 B
  parameters and gradients, 8 B Adam states (no master copy). ZeRO-1/2 add the gradient-reduction buckets of
  the generated DeepSpeed config (:mod:`orchestrate.deepspeed_config`, two when communication overlaps).

The trace runs on the fake *CPU* device: this CPU-only torch cannot record autograd on a fake ``cuda`` tensor
(``AccumulateGrad`` asks for a CUDA device guard). Sizes are the same on every device; the CUDA allocator's
512-byte rounding is applied per category (:func:`_rounded`). The LLM's attention is ``sdpa``: on GPUs its
flash/efficient kernels (and ``flash_attention_2``) hold no T×T score matrix; where the CPU build's kernel
choice would hold one, the plan errs high, never low.

The step mirrors :meth:`xsam_model.modeling.xsam.XSam.forward` for the stage with its data-dependent
bookkeeping replaced by fixed shapes (fake tensors have no values): the ``<image>`` expansion becomes one
concatenation (image tokens first), phrase/``<SEG>`` span means a fixed one-hot product, and the Hungarian
matcher (no-grad, a Q×N cost matrix) a fixed assignment; the losses themselves run (class CE, point-sampled
mask BCE and Dice over every decoder layer), and the step's outputs (per-layer predictions, LM logits) stay
alive through backward as the trainer's ``XSamOutput`` does. Mask2Former's training-time ``isfinite`` check
takes the finite path (:class:`_FiniteChecks`). The CPU check
(``tests/orchestrate/test_memory_plan_check.py``) compares the plan of the full-width smoke model with a real
forward + backward of :meth:`XSam.forward`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from orchestrate.deepspeed_config import deepspeed_config
from orchestrate.plan import model_config
from orchestrate.run_errors import OrchestrateError
from orchestrate.stages import get_stage, stage3
from xsam_model import build_xsam
from xsam_model.config import CHECKPOINT_PARTS, XSamConfig, with_checkpointing
from xsam_model.trainable import stage_view

logger = logging.getLogger(__name__)

GiB = 1024**3
_CUDA_ROUND = 512
"""The CUDA caching allocator's smallest block: every tensor takes a multiple of it."""
_BYTES = {"bf16": 2, "fp32": 4}


class PlanTraceError(OrchestrateError):
    """The stage's model cannot be traced on fake tensors; the message names the module that failed."""


@dataclass(frozen=True, kw_only=True)
class StepShape:
    """One sample of the traced step. Images are square; the LLM sequence holds the image tokens first."""

    sam_size: int
    siglip_size: int
    seq_len: int = 0
    """LLM tokens per sample (image tokens + text); 0 in stage 1 (no LLM)."""
    phrases: int = 133
    """Phrase classes of a stage-3 decoder run (COCO panoptic's 133 category names)."""
    targets: int = 30
    """Target masks per decoder run."""


@dataclass(kw_only=True)
class Trace:
    """What one fake step measured (bytes; FLOPs of the whole micro batch)."""

    micro_batch: int
    checkpointing: tuple[str, ...]
    peak: dict[str, int]
    """The tracker's categories at the step's peak: Parameter, Buffer, Gradient, Activation, Temp, ...,
    Total."""
    owners: list[str] = field(default_factory=list)
    """Modules active at the peak (outermost first), ``(backward)`` when the peak is in backward."""
    flops_fwd: int = 0
    flops_bwd: int = 0

    @property
    def activations(self) -> int:
        """Bytes at the peak that are neither parameters, buffers nor gradients."""
        p = self.peak
        return p.get("Total", 0) - p.get("Parameter", 0) - p.get("Buffer", 0) - p.get("Gradient", 0)


# ---------------------------------------------------------------------------------------------- model states
def model_states(
    total_params: int, trainable: int, *, zero_stage: int, world: int, precision: str = "bf16"
) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and optimizer states under ZeRO-``zero_stage`` over ``world``
    ranks (see the module docstring for the arithmetic)."""
    if zero_stage not in (0, 1, 2, 3) or world < 1:
        raise OrchestrateError(f"need ZeRO stage 0..3 and world >= 1, got {zero_stage}, {world}")
    w = _BYTES[precision]
    optim = (12 if precision == "bf16" else 8) * trainable
    return {
        "parameters": w * total_params / (world if zero_stage >= 3 else 1),
        "gradients": w * trainable / (world if zero_stage >= 2 else 1),
        "optimizer": optim / (world if zero_stage >= 1 else 1),
    }


def zero_buffers(zero_stage: int, precision: str = "bf16") -> float:
    """Bytes of DeepSpeed's gradient-reduction buckets on a GPU as :func:`deepspeed_config` sets them:
    ``reduce_bucket_size`` elements, two buffers with ``overlap_comm``, bf16 for ZeRO-2 and the fp32
    accumulator for ZeRO-1 (DeepSpeed's ``setup_buckets``); none for ZeRO-0 and ZeRO-3 (its own buckets)."""
    if zero_stage not in (1, 2):
        return 0.0

    ds = deepspeed_config(dataclasses.replace(stage3(), zero_stage=zero_stage), use_gpu=True)[
        "zero_optimization"
    ]
    elem = 4 if zero_stage == 1 or precision == "fp32" else 2
    return float(ds["reduce_bucket_size"] * elem * (2 if ds.get("overlap_comm") else 1))


# ---------------------------------------------------------------------------------------------- fake model
def fake_model(cfg: XSamConfig, stage: int, dtype: torch.dtype, mode: FakeTensorMode) -> nn.Module:
    """The model of ``cfg`` with fake parameters and buffers (floating ones in ``dtype``) and
    ``requires_grad`` as ``stage`` trains (:func:`xsam_model.trainable.stage_view`). Built on meta (no
    memory), then each tensor is replaced by an empty fake one; shared parameters stay shared."""

    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, attn_implementation="sdpa"))
    model = build_xsam(cfg, device="meta")
    stage_view(model, stage)
    memo: dict[int, nn.Parameter] = {}
    with mode:
        for mod in model.modules():
            for n, p in list(mod._parameters.items()):
                if p is not None:
                    if id(p) not in memo:
                        memo[id(p)] = nn.Parameter(_empty(p, dtype), requires_grad=p.requires_grad)
                    mod._parameters[n] = memo[id(p)]
            for n, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[n] = _empty(b, dtype)
    return model


def _empty(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="cpu")


def stage_shape(cfg: XSamConfig, stage: int, seq_len: int | None = None) -> StepShape:
    """The stage's longest sample: SAM and SigLIP at the flavor's sizes and, with an LLM (stages 2, 3), the
    image tokens plus ``max_length`` text tokens (the processor's cut), capped at the LLM's context; or
    ``seq_len``."""
    p = cfg.processor
    if stage == 1:
        return StepShape(sam_size=p.sam_size, siglip_size=p.siglip_size)
    if seq_len is None:
        text = p.max_length if p.max_length is not None else cfg.llm.max_position_embeddings
        seq_len = min(cfg.num_image_tokens + text - 1, cfg.llm.max_position_embeddings)  # <image> → tokens
    if seq_len <= cfg.num_image_tokens:
        raise OrchestrateError(f"--seq-len {seq_len} does not hold the {cfg.num_image_tokens} image tokens")
    return StepShape(sam_size=p.sam_size, siglip_size=p.siglip_size, seq_len=seq_len)


# ---------------------------------------------------------------------------------------------- the step
def fake_batch(shape: StepShape, b: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs of one micro batch of ``b`` samples (call under the fake mode): images Bx3xLxL / Bx3xSxS and
    text ids Bx(T - image tokens) (the image tokens come from the encoders)."""
    return {
        "extra_pixel_values": torch.empty(b, 3, shape.sam_size, shape.sam_size, dtype=dtype),
        "pixel_values": torch.empty(b, 3, shape.siglip_size, shape.siglip_size, dtype=dtype),
        "masks": torch.empty(b, shape.targets, shape.sam_size, shape.sam_size, dtype=torch.bool),
    }


def train_step(
    model: nn.Module, batch: dict[str, torch.Tensor], stage: int, shape: StepShape
) -> torch.Tensor:
    """The loss of one step as :meth:`XSam.forward` computes it for ``stage``, on fixed shapes (module
    docstring): SAM → (stage 1) connector → decoder with the linear head; (stages 2, 3) SigLIP + projectors →
    LLM over T tokens → LM loss; (stage 3) LLM projector → decoder conditioned on the last token with
    ``phrases`` phrase classes → segmentation losses."""
    sam_feats, pyramid = model.encode_sam(batch["extra_pixel_values"])
    b = sam_feats.shape[0]
    if stage == 1:
        preds = model.mask_decoder(model.seg_connector(pyramid))
        return _seg_loss(model, preds, batch["masks"]), preds
    image_tokens, _ = model.encode_images(batch["pixel_values"], sam_feats)
    text = shape.seq_len - image_tokens.shape[1]
    ids = torch.zeros(b, text, dtype=torch.long)
    embeds = torch.cat([image_tokens.to(model.llm.dtype), model.llm.get_input_embeddings()(ids)], 1)
    hidden = model.llm.model(
        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), use_cache=False
    ).last_hidden_state
    logits = model.llm.lm_head(hidden)
    labels = torch.zeros(b, shape.seq_len - 1, dtype=torch.long)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten())
    if stage == 2:
        return loss, [logits]
    proj = model.llm_projector(hidden)  # BxTxC
    onehot = torch.zeros(b, shape.phrases, shape.seq_len, dtype=proj.dtype)  # phrase spans → span means
    cond = torch.bmm(onehot, proj)
    preds = model.mask_decoder(
        model.seg_connector(pyramid),
        seg_embeds=proj[:, -1],
        cond=cond,
        cond_valid=torch.ones(b, shape.phrases, dtype=torch.bool),
    )
    return loss + _seg_loss(model, preds, batch["masks"]), [logits, preds]


def _seg_loss(model: nn.Module, preds: list[dict], masks: torch.Tensor) -> torch.Tensor:
    """The criterion's class CE and point-sampled mask losses over every decoder layer (with auxiliary loss),
    target j matched to query j (the matcher's assignment is a permutation: same shapes)."""
    crit = model.criterion
    layers = preds if model.config.loss.use_auxiliary_loss else preds[-1:]
    n = masks.shape[1]
    with unset_fake_temporarily():  # the assignment is read with .tolist(): real index tensors
        idx = [(torch.arange(n), torch.arange(n)) for _ in range(masks.shape[0])]
        labels = [torch.zeros(n, dtype=torch.long) for _ in range(masks.shape[0])]
    total = 0.0
    for p in layers:
        bce, dice = crit.loss_masks_ignore(p["masks_queries_logits"], list(masks), idx, float(n), None)
        total = total + bce + dice + crit.loss_labels(p["class_queries_logits"], labels, idx)
    return total


# ---------------------------------------------------------------------------------------------- tracing
def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the CPU flash-attention kernel that
    ``scaled_dot_product_attention`` runs on (fake) CPU tensors, with the formulas torch registers for the
    CUDA kernels (4·B·H·S²·D forward, 2.5× that backward, which recomputes QKᵀ; the full S², causal or not).
    Without it the LLM's attention would count 0."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)


class _PeakTracker(MemTracker):
    """MemTracker that also remembers what ran when the step's peak was reached: the innermost module whose
    forward was running (``where``, kept by forward hooks, so also a recomputation in backward), else the
    module whose backward was running, and the aten op that allocated."""

    def __init__(self, where: list[str]) -> None:
        super().__init__()
        self.where = where
        self.peak_owners: list[str] = []
        self._op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _update_peak_stats(self, peak_state) -> None:
        # MemTracker's own version also updates every module's local peak on every op (O(modules) per op,
        # minutes for the full model); the plan needs the global peak and what ran then
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
                bw = self._mod_tracker.is_bw
                if self.where:
                    owner = _layer(self.where[-1]) + (" (backward, recomputed)" if bw else " (forward)")
                else:
                    running = sorted(p for p in self._mod_tracker.parents if p != "Global")
                    owner = (running[-1] if running else "the loss") + (" (backward)" if bw else "")
                self.peak_owners = [owner, self._op]

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        # MemTracker hooks every parameter's gradient, which torch refuses on frozen ones (stages 1, 2)
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        def on_grad(q: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(q.grad, _MemRefType.GRAD)

        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    hook = p.register_post_accumulate_grad_hook(on_grad)
                    self._param_to_grad_hook_handles[p] = (hook, hook)
        return sizes


def trace_step(
    cfg: XSamConfig, stage: int, shape: StepShape, micro_batch: int, *, dtype=torch.bfloat16, flops=False
) -> Trace:
    """Forward + backward of one micro batch of ``micro_batch`` samples on fake tensors: the memory at the
    peak (CUDA allocator rounding) or, with ``flops``, the forward and backward FLOPs (counted in a trace of
    their own: ``FlopCounterMode``'s module hooks keep tensors alive longer, which would inflate the peak).
    Raises :class:`PlanTraceError` naming the innermost module that failed."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(cfg, stage, dtype, mode)
    where: list[str] = []
    tracker = _PeakTracker(where)
    counter = flop_counter() if flops else nullcontext()
    fwd = bwd = 0
    with mode:
        batch = fake_batch(shape, micro_batch, dtype)
        if not flops:
            tracker.track_external(model)
        try:
            with nullcontext() if flops else tracker, _failing_module(model, where), _FiniteChecks():
                with counter:
                    loss, held = train_step(model, batch, stage, shape)  # held through backward
                fwd = counter.get_total_flops() if flops else 0
                with counter:  # entering resets the count: backward alone
                    loss.backward()
                bwd = counter.get_total_flops() if flops else 0
                del held
        except Exception as e:  # fake tensors refuse data-dependent ops: name where
            name = where[-1] if where else "model"
            raise PlanTraceError(
                f"cannot trace stage {stage} of {cfg.name} on fake tensors: module {name} failed: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
    return Trace(
        micro_batch=micro_batch,
        checkpointing=_checkpointed(cfg),
        peak={} if flops else _rounded(tracker),
        owners=[] if flops else tracker.peak_owners,
        flops_fwd=fwd,
        flops_bwd=bwd,
    )


class _FiniteChecks(TorchDispatchMode):
    """Answers a Python ``bool()`` of a fake bool tensor with True: Mask2Former's encoder layers check
    ``torch.isfinite(x).all()`` in training, which fake tensors (no values) cannot answer; a healthy step
    takes the finite path. Any other value read still fails (a data-dependent shape is not plannable)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype == torch.bool:
            return True
        return func(*args, **(kwargs or {}))


def _layer(name: str) -> str:
    """``a.layers.5.mlp.lin2`` → ``a.layers.5``: checkpointing stops a layer's recomputation as soon as
    backward has what it needs, so the forward hooks of the modules inside a layer do not close; the layer is
    right."""
    m = re.match(r"^(.*?\.layers\.\d+)(\.|$)", name)
    return m.group(1) if m else name


def _failing_module(model: nn.Module, where: list[str]):
    """Forward pre/post hooks keeping a stack of the modules running, so a failure names the innermost."""
    names = {m: n or "model" for n, m in model.named_modules()}

    def pre(mod, _args):
        where.append(names.get(mod, type(mod).__name__))

    def post(mod, _args, _out):
        if where and where[-1] == names.get(mod, type(mod).__name__):
            where.pop()

    return _Hooks(model, pre, post)


class _Hooks:
    def __init__(self, model: nn.Module, pre, post):
        self.model, self.pre, self.post, self.handles = model, pre, post, []

    def __enter__(self):
        for m in self.model.modules():
            self.handles += [m.register_forward_pre_hook(self.pre), m.register_forward_hook(self.post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _rounded(tracker: MemTracker) -> dict[str, int]:
    """The tracker's peak snapshot by category name, each rounded up to the CUDA allocator's 512-byte block.
    MemTracker rounds every tensor on a cuda device; on the fake CPU device it does not, so this per-category
    rounding is short by at most 512 B per live tensor (kilobytes against GB-sized activations)."""
    snap = tracker.get_tracker_snapshot("peak")
    out: dict[str, int] = {}
    for dev_snap in snap.values():
        for k, v in dev_snap.items():
            key = k.value if isinstance(k, _MemRefType) else str(k)
            out[key] = out.get(key, 0) + math.ceil(v / _CUDA_ROUND) * _CUDA_ROUND
    return out


def _checkpointed(cfg: XSamConfig) -> tuple[str, ...]:

    return tuple(p for p, attr in CHECKPOINT_PARTS.items() if getattr(cfg, attr).gradient_checkpointing)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What ``train.py --plan`` asks: the stage's model and layout, and the card."""

    stage: int
    flavor: str = "xsam-phi3"
    world: int | None = None
    """None = the stage config's (16)."""
    micro_batch: int | None = None
    """None = the stage config's."""
    zero_stage: int = 2
    precision: str = "bf16"
    gpu_memory_gib: tuple[float, ...] = (80.0,)
    """Cards to fit (GiB each): the fit and the largest micro batch are given for each."""
    seq_len: int | None = None
    global_batch: int | None = None


def activation_at(b1: int, b2: int, micro_batch: int) -> float:
    """Activation bytes at ``micro_batch`` from the traces at 1 and 2: ``b1 + (B-1)·(b2-b1)`` (linear)."""
    return b1 + (micro_batch - 1) * (b2 - b1)


def largest_micro_batch(fixed: float, b1: int, b2: int, budget: float, limit: int = 4096) -> int:
    """The largest B with ``fixed + activation_at(b1, b2, B) <= budget`` (0 when B=1 does not fit)."""
    per = max(b2 - b1, 1)
    if fixed + b1 > budget:
        return 0
    return int(min(limit, 1 + (budget - fixed - b1) // per))


def plan_stage(req: PlanRequest) -> dict[str, Any]:
    """The plan of ``req`` as a JSON-able dict (sizes in GiB, FLOPs per sample): see :func:`format_plan`."""
    cfg = get_stage(req.stage, flavor=req.flavor)
    g = req.global_batch or cfg.batch.global_batch
    micro = req.micro_batch or cfg.batch.micro_batch
    req = dataclasses.replace(req, world=req.world or cfg.batch.world_size)
    if not micro > 0 or not req.world > 0:
        raise OrchestrateError(f"need micro batch and world size > 0, got {micro}, {req.world}")
    if req.precision not in _BYTES:
        raise OrchestrateError(f"--precision {req.precision}: the plan takes bf16 or fp32")
    mc = model_config(cfg)
    shape = stage_shape(mc, req.stage, req.seq_len)
    t = _traces(mc, req.stage, shape, torch.bfloat16 if req.precision == "bf16" else torch.float32)
    total, trainable = _param_counts(mc, req.stage)
    states = model_states(
        total, trainable, zero_stage=req.zero_stage, world=req.world, precision=req.precision
    )
    states["zero_buffers"] = zero_buffers(req.zero_stage, req.precision)
    fixed, acts = sum(states.values()), t["activations"]
    act = activation_at(*acts[t["run"]], micro)
    rows = {**states, "activations": act, "total": fixed + act}
    layout = {
        "gpus": req.world,
        "global_batch": g,
        "micro_batch": micro,
        "grad_accum": g / (micro * req.world),
    }
    layout |= {
        "zero_stage": req.zero_stage,
        "precision": req.precision,
        "gpu_memory_gib": list(req.gpu_memory_gib),
    }
    return {
        "stage": req.stage,
        "flavor": req.flavor,
        "layout": layout,
        "shape": dataclasses.asdict(shape),
        "checkpointing": list(_checkpointed(mc)),
        "parameters": {"total": total, "trainable": trainable},
        "per_gpu_gib": {k: v / GiB for k, v in rows.items()},
        "fits": {f"{m:g}": fixed + act <= m * GiB for m in req.gpu_memory_gib},
        "largest_consumer": max(states | {"activations": act}, key=lambda k: rows[k]),
        "peak": t["peak"],
        "activations_gib": {
            k: {"b1": a / GiB, "b2": c / GiB, "per_sample": (c - a) / GiB} for k, (a, c) in acts.items()
        },
        "flops_per_sample": t["flops"],
        "max_micro_batch": {
            f"{m:g}": {k: largest_micro_batch(fixed, a, c, m * GiB) for k, (a, c) in acts.items()}
            for m in req.gpu_memory_gib
        },
    }


def _traces(mc: XSamConfig, stage: int, shape: StepShape, dtype: torch.dtype) -> dict[str, Any]:
    """Memory at micro batch 1 and 2 with the stage's checkpointing (``checkpointed``) and without (``none``),
    model FLOPs per sample (no recomputation) and the FLOPs executed with the stage's checkpointing."""
    ac = _checkpointed(mc)
    variants = {"checkpointed": mc, "none": with_checkpointing(mc, ())} if ac else {"none": mc}
    traces = {k: [trace_step(c, stage, shape, n, dtype=dtype) for n in (1, 2)] for k, c in variants.items()}
    model_flops = trace_step(variants["none"], stage, shape, 1, dtype=dtype, flops=True)
    run_flops = trace_step(mc, stage, shape, 1, dtype=dtype, flops=True) if ac else model_flops
    run = "checkpointed" if ac else "none"
    first = traces[run][0]
    return {
        "run": run,
        "activations": {k: (t[0].activations, t[1].activations) for k, t in traces.items()},
        "peak": {"owner": first.owners, "micro_batch_1_gib": {k: v / GiB for k, v in first.peak.items()}},
        "flops": {
            "forward": model_flops.flops_fwd,
            "backward": model_flops.flops_bwd,
            "total": model_flops.flops_fwd + model_flops.flops_bwd,
            "executed": run_flops.flops_fwd + run_flops.flops_bwd,
        },
    }


def _param_counts(cfg: XSamConfig, stage: int) -> tuple[int, int]:
    """(all parameters, those ``stage`` trains) of the model, from a meta build."""

    model = build_xsam(cfg, device="meta")
    stage_view(model, stage)
    ps = list(model.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


_AC_NAMES = {"checkpointed": "with the stage's checkpointing", "none": "without checkpointing"}
_ROW_NAMES = {"zero_buffers": "the ZeRO reduce buckets"}


def _fits(plan: dict[str, Any]) -> str:
    """``fits 40 / 80 GiB``, or which card does not hold micro batch … and the largest consumer."""
    ok = [c for c, f in plan["fits"].items() if f]
    bad = [c for c, f in plan["fits"].items() if not f]
    out = f"fits {' / '.join(ok)} GiB" if ok else ""
    if bad:
        who = _ROW_NAMES.get(plan["largest_consumer"], plan["largest_consumer"])
        out += ("; " if out else "") + f"DOES NOT FIT {' / '.join(bad)} GiB (largest consumer: {who})"
    return out


def _row(label: str, gib: float) -> str:
    return f"  {label}".ljust(44) + f"{gib:8.2f}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the table ``--plan`` prints."""
    lay, sh, g = plan["layout"], plan["shape"], plan["per_gpu_gib"]
    w, z = lay["gpus"], lay["zero_stage"]
    llm = f", LLM {sh['seq_len']} tokens" if sh["seq_len"] else ""
    p = plan["parameters"]
    lines = [
        f"stage {plan['stage']} ({plan['flavor']}): {w} GPUs × micro batch {lay['micro_batch']} × accumulation "
        f"{lay['grad_accum']:g} = global batch {lay['global_batch']}; ZeRO-{z}, {lay['precision']}, "
        f"cards of {' / '.join(f'{m:g}' for m in lay['gpu_memory_gib'])} GiB",
        f"step: SAM {sh['sam_size']}², SigLIP {sh['siglip_size']}²{llm}; activation checkpointing: "
        f"{', '.join(plan['checkpointing']) or 'none'}",
        f"parameters {p['total'] / 1e6:,.1f} M, trainable {p['trainable'] / 1e6:,.1f} M",
        "",
        f"per GPU, micro batch {lay['micro_batch']}".ljust(48) + "GiB",
        _row(f"parameters ({lay['precision']}{f', / {w}' if z >= 3 else ''})", g["parameters"]),
        _row(f"gradients{f' (/ {w})' if z >= 2 else ''}", g["gradients"]),
        _row(f"optimizer (fp32 master + Adam m, v{f', / {w}' if z >= 1 else ''})", g["optimizer"]),
        _row("ZeRO reduce buckets", g["zero_buffers"]),
        _row("activations at the peak", g["activations"]),
        _row("total", g["total"]) + "  " + _fits(plan),
        f"peak in {' / '.join(plan['peak']['owner'])}",
    ]
    acts = plan["activations_gib"]
    lines.append(
        "activations: "
        + "; ".join(
            f"{_AC_NAMES[k]} {v['b1']:.2f} GiB at micro batch 1 + {v['per_sample']:.2f} per sample"
            for k, v in acts.items()
        )
    )
    f = plan["flops_per_sample"]
    lines.append(
        f"FLOPs per sample: forward {f['forward'] / 1e12:.2f} T, backward {f['backward'] / 1e12:.2f} T, "
        f"total {f['total'] / 1e12:.2f} T (executed with recomputation {f['executed'] / 1e12:.2f} T)"
    )
    for card, mb in plan["max_micro_batch"].items():
        fit = ", ".join(
            f"{_AC_NAMES[k]} {v if v else 'none (micro batch 1 does not fit)'}" for k, v in mb.items()
        )
        lines.append(f"largest micro batch on {card} GiB: {fit}")
    lines.append("(activations traced at micro batch 1 and 2 and extrapolated linearly)")
    return "\n".join(lines)
