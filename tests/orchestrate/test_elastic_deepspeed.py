"""DeepSpeed state across world sizes on a tiny engine (gloo, forked processes, no Ray): a ZeRO-1/2
checkpoint of 2 ranks goes through the universal conversion (:mod:`orchestrate.universal`) and continues on
1 rank, a ZeRO-0 one loads directly; fp32 and bf16; the continued step equals the 2-rank run's next step up
to float reduction order. A conversion DeepSpeed cannot do is one ResumeError line."""

from __future__ import annotations

import dataclasses
import io
import multiprocessing as mp
import os
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch

from orchestrate import universal
from orchestrate.run_errors import ResumeError
from orchestrate.stages import debug, stage1, with_world_size
from orchestrate.train_checkpoints import DS_TAG

pytestmark = pytest.mark.timeout(300)

GLOBAL_BATCH, MICRO = 4, 2
# fp32 throughout. One continued AdamW step after a world-size change differs from the uninterrupted one
# only in how the gradient's mean is summed (all-reduce of two micro-batch means vs accumulation of two on
# one rank): a few ulps of the gradient (relative ~1e-7). Adam's update m/(sqrt(v)+eps) is scale-free, so a
# relative gradient error e changes a weight by about lr × e (≤ 1e-3 × 1e-6 here); 1e-6 absolute leaves
# two orders of magnitude of margin, while the step itself moves weights by ~lr = 1e-3 (asserted below, so
# the comparison is not vacuous). bf16 (weights rounded to 8 bits after each step) has the same bound here:
# the fp32 master copy takes the step, and equal masters round to equal bf16 weights. On the dev box the
# gap was exactly 0 for ZeRO-0/1/2 in fp32 and bf16.
ATOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: ``(x [4, 8], y [4, 4])``, the same whatever the world size."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


def _engine(world: int, zero: int, load_universal: bool, bf16: bool = False):
    """Our generated DeepSpeed config and scheduler on a tiny model; ``bf16``: the same config with bf16
    on (DeepSpeed runs it on CPU; our stage configs keep CPU runs fp32), initialised directly."""
    import deepspeed

    from orchestrate.deepspeed_compat import patch_deepspeed
    from orchestrate.deepspeed_config import deepspeed_config, initialize, lr_scheduler

    cfg = with_world_size(dataclasses.replace(debug(stage1()), zero_stage=zero), world, micro_batch=MICRO)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3, grad_clip=100.0))
    model = _model()
    groups = [{"params": list(model.parameters()), "name": "all", "lr": 1e-3, "weight_decay": 0.05}]
    if not bf16:
        engine, _, _ = initialize(
            model,
            groups,
            cfg,
            total_steps=10,
            steps_per_epoch=10,
            use_gpu=False,
            load_universal=load_universal,
        )
        return engine
    ds = deepspeed_config(cfg, use_gpu=False, load_universal=load_universal)
    ds["bf16"] = {"enabled": True}
    patch_deepspeed()
    sched = lr_scheduler(cfg, total_steps=10, steps_per_epoch=10)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds, lr_scheduler=sched)
    return engine


def _train_step(engine, step: int, rank: int, world: int) -> None:
    """Rank ``rank``'s micro-batches of the global batch (rank-major: the same samples in each micro-batch
    whatever the world size), forward/backward/step each."""
    x, y = _batch(step)
    dtype = next(engine.module.parameters()).dtype
    accum = GLOBAL_BATCH // (MICRO * world)
    for k in range(accum):
        lo = (rank * accum + k) * MICRO
        out = engine(x[lo : lo + MICRO].to(dtype)).float()
        loss = torch.nn.functional.mse_loss(out, y[lo : lo + MICRO])
        engine.backward(loss)
        engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _save_run(rank: int, world: int, zero: int, ckpt: str, bf16: bool = False) -> dict:
    """2 steps, checkpoint, a 3rd step: the weights after step 2 and after step 3."""
    engine = _engine(world, zero, False, bf16)
    for step in range(2):
        _train_step(engine, step, rank, world)
    engine.save_checkpoint(ckpt, tag=DS_TAG)
    saved = _weights(engine)
    _train_step(engine, 2, rank, world)
    return {"saved": saved, "final": _weights(engine)}


def _resume_run(rank: int, world: int, zero: int, ckpt: str, use_universal: bool, bf16: bool = False) -> dict:
    """Load the checkpoint (its universal folder when asked), then step 3: the weights at both points."""
    engine = _engine(world, zero, use_universal, bf16)
    load_dir = str(Path(ckpt) / universal.UNIVERSAL_DIR) if use_universal else ckpt
    path, _ = engine.load_checkpoint(load_dir, tag=DS_TAG, load_module_strict=True)
    assert path is not None
    loaded = _weights(engine)
    _train_step(engine, 2, rank, world)
    return {"loaded": loaded, "final": _weights(engine), "global_steps": engine.global_steps}


def _entry(fn, rank, world, port, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    torch.set_num_threads(1)  # a forked child must not share the parent's OpenMP pool
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        buf = (
            io.BytesIO()
        )  # bytes, not tensors: a queued tensor is a shared-memory handle of an exiting child
        torch.save(result, buf)
        queue.put((rank, buf.getvalue()))
    except BaseException:  # the parent reports it; a child's traceback would be lost otherwise
        queue.put((rank, traceback.format_exc()))


def _spawn(fn, world: int, *args) -> dict:
    """Rank 0's result of ``fn(rank, world, *args)`` run on ``world`` forked gloo processes."""
    ctx, port = mp.get_context("fork"), _free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = [v for v in results.values() if isinstance(v, str)]
    assert not errors, errors[0]
    return torch.load(io.BytesIO(results[0]), weights_only=True)


BF16 = pytest.param(
    True, marks=pytest.mark.slow, id="bf16"
)  # the same paths in bf16: DeepSpeed's other optimizers


@pytest.mark.parametrize("bf16", [pytest.param(False, id="fp32"), BF16])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_zero_state_continues_on_another_world_size(zero, bf16, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    ref = _spawn(_save_run, 2, zero, ckpt, bf16)
    needed = universal.needs_universal(2, 1, zero)
    assert needed == (zero > 0)  # ZeRO-0 keeps the optimizer whole in mp_rank_00_model_states.pt
    if needed:
        universal.convert(ckpt, DS_TAG)
        done = Path(ckpt, universal.UNIVERSAL_DIR, universal.DONE_FILE)
        stamp = done.stat().st_mtime_ns
        universal.convert(ckpt, DS_TAG)  # idempotent: a second resume reuses the first conversion
        assert done.stat().st_mtime_ns == stamp and done.read_text().strip() == DS_TAG
    got = _spawn(_resume_run, 1, zero, ckpt, needed, bf16)
    assert got["global_steps"] == 3
    for name, want in ref["saved"].items():
        assert torch.equal(got["loaded"][name], want), name  # weights restored exactly
    gap = max((got["final"][k] - ref["final"][k]).abs().max().item() for k in ref["final"])
    assert gap <= ATOL, f"continued step differs from the 2-rank run's by {gap:.3g}"
    # the tolerance is far below what one step moves (a wrong or missing state would show)
    moved = max((ref["final"][k] - ref["saved"][k]).abs().max().item() for k in ref["final"])
    assert moved > 100 * ATOL


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory) -> Path:
    """A ZeRO-2 fp32 checkpoint written by 2 ranks (read-only for the tests: copy before changing it)."""
    ckpt = tmp_path_factory.mktemp("zero2") / "ckpt"
    _spawn(_save_run, 2, 2, str(ckpt))
    return ckpt


def test_unconvertible_checkpoint_is_one_resume_error(zero2_checkpoint, tmp_path):
    """A ZeRO-2 checkpoint missing one rank's optimizer partition cannot be converted: one line, no file."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero2_checkpoint, ckpt)
    (part,) = (ckpt / DS_TAG).glob("zero_pp_rank_1_*optim_states.pt")
    part.unlink()
    with pytest.raises(ResumeError, match=r"universal-checkpoint conversion failed \(exit \d+\): .+") as e:
        universal.convert(str(ckpt), DS_TAG)
    assert "\n" not in str(e.value)
    assert not (ckpt / universal.UNIVERSAL_DIR).exists() and not list(ckpt.glob(".tmp-*"))


def test_remote_checkpoint_is_converted_locally_and_uploaded(zero2_checkpoint, tmp_path):
    """A checkpoint on an fsspec URI (memory:// standing in for s3:// or gs://): downloaded, converted,
    uploaded under a temporary name and renamed; the same files as a local conversion."""
    import fsspec

    fs = fsspec.filesystem("memory")
    url = f"memory://elastic-{os.getpid()}/ckpt"
    fs.put(str(zero2_checkpoint / DS_TAG), f"{url}/{DS_TAG}", recursive=True)
    assert universal.is_converted(url) is False
    try:
        assert universal.convert(url, DS_TAG) == f"{url}/{universal.UNIVERSAL_DIR}"
        assert universal.is_converted(url)
        local = tmp_path / "ckpt"
        shutil.copytree(zero2_checkpoint, local)
        universal.convert(str(local), DS_TAG)
        out = local / universal.UNIVERSAL_DIR
        want = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        root = f"/elastic-{os.getpid()}/ckpt/{universal.UNIVERSAL_DIR}/"
        got = sorted(p.removeprefix(root) for p in fs.find(f"{url}/{universal.UNIVERSAL_DIR}"))
        assert got == want and any(p.endswith("exp_avg.pt") for p in got), (got, want)
        assert not [p for p in fs.find(url) if "/.tmp-" in p]
    finally:
        fs.rm(f"memory://elastic-{os.getpid()}", recursive=True)
