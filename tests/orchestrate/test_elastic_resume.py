"""Elastic resume under Ray Train (docs/scale.md#elastic-resume-another-world-size-the-same-data): stage 1 of
the debug flavor trained 6 steps on 2 workers, with checkpoints at steps 2 and 4, resumed from step 2 on 1
worker (DeepSpeed's universal checkpoint, converted once by the driver) and from step 4 on 2 workers with 2
DataLoader workers each: every resumed step trains on the uninterrupted run's global batch (per-step
fingerprints, ``summary --compare``), with its losses. And an elastic worker range (Ray Train v2
``ScalingConfig(num_workers=(min, max))``) that can start only 1 of 2
workers: the workers convert the checkpoint themselves and keep the data."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from orchestrate import universal
from orchestrate.fingerprint import read_fingerprints
from orchestrate.run_layout import RunLayout
from orchestrate.runner import RunArgs, default_callbacks, fit, prepare
from orchestrate.summary import compare_runs
from orchestrate.train_checkpoints import list_checkpoints

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 6
# Loss tolerance, relative. Both runs compute every micro-batch from the same samples and the same draws
# (the point-sampling seed is a function of the micro-batch's keys), in fp32. What a world-size change alters
# is only the order of float reductions: the gradient mean (all-reduce over 2 ranks vs accumulation of 2
# micro-batches on 1; ×1/2 is exact in binary), the global grad-norm for clipping (partial norms of 2 ZeRO
# partitions summed across ranks vs one sum), and the loss mean. Each is a sum of at most ~10^5 fp32 terms,
# relative error ≲ n·2^-24 in the worst case and ~sqrt(n)·2^-24 ≈ 2e-5 typically; Adam's update is scale-free
# and clipping rescales every weight by the same factor, so weight errors stay of that relative order over
# 4 steps, and so do the losses. 1e-4 covers that with margin; a different sample or lost optimizer state
# changes a stage-1 loss by percents. (On the dev box the resumed losses differed by <1e-6 relative.)
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def ray_module():
    import ray

    # "local": a cluster of our own, even when another session on this machine runs one
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _run(shards, run_root, *, keep: int | None = None, fit_kw: dict | None = None, **kw):
    plan = prepare(
        RunArgs(stage=1, flavor="debug", shards=str(shards), run_root=str(run_root), max_steps=STEPS, **kw)
    )
    if keep is not None:  # every checkpoint of the reference stays, to resume from
        cfg = plan.cfg
        plan = dataclasses.replace(
            plan, cfg=dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, keep=keep))
        )
    result = fit(plan, callbacks=default_callbacks(plan), **(fit_kw or {}))
    assert result.metrics["step"] == STEPS
    return plan


def _losses(run_root) -> dict[int, float]:
    rows = [json.loads(x) for x in open(RunLayout(str(run_root)).stage(1).metrics_jsonl).read().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(ray_module, train_shards, tmp_path_factory):
    """The uninterrupted run: 2 workers, no DataLoader workers, checkpoints at 2, 4, 6 (all kept)."""
    root = tmp_path_factory.mktemp("elastic") / "ref"
    _run(train_shards, root, num_workers=2, keep=3)
    checkpoints = dict(list_checkpoints(RunLayout(str(root)).stage(1)))
    assert sorted(checkpoints) == [2, 4, 6]
    return root, checkpoints


def _check_same_data(ref_root, root, first_step: int) -> None:
    """Every step the resumed run logged has the reference's source and fingerprint (and only its steps)."""
    same, report = compare_runs(str(ref_root), str(root), stage=1)
    common = STEPS - first_step + 1
    assert same and f"stage 1: same data ({common} common steps, 0 differ" in report, report
    ref_fp = read_fingerprints(RunLayout(str(ref_root)).stage(1).metrics_jsonl)
    got_fp = read_fingerprints(RunLayout(str(root)).stage(1).metrics_jsonl)
    assert sorted(got_fp) == list(range(first_step, STEPS + 1))  # a resumed run logs only its own steps
    assert all(got_fp[s] == ref_fp[s] for s in got_fp)
    # the command users run says the same, with exit code 0
    cli = [sys.executable, "-m", "orchestrate.summary", "--run-root", str(ref_root), "--compare", str(root)]
    proc = subprocess.run(cli + ["--stage", "1"], capture_output=True, text=True)
    assert proc.returncode == 0 and "result: same data" in proc.stdout, proc.stdout + proc.stderr


def _check_losses(ref_root, root, first_step: int) -> None:
    ref_loss, got_loss = _losses(ref_root), _losses(root)
    assert sorted(got_loss) == list(range(first_step, STEPS + 1))
    for s in got_loss:
        assert math.isclose(got_loss[s], ref_loss[s], rel_tol=LOSS_RTOL), (s, got_loss[s], ref_loss[s])


@pytest.fixture(scope="module")
def one_worker(reference, train_shards, tmp_path_factory):
    """The reference resumed from its step-2 checkpoint on 1 worker (accumulation 2 keeps the batch of 4)."""
    _, checkpoints = reference
    root = tmp_path_factory.mktemp("elastic") / "one"
    plan = _run(train_shards, root, num_workers=1, resume=checkpoints[2])
    assert plan.cfg.batch.world_size == 1 and plan.cfg.batch.grad_accum == 2
    return root


def test_resume_from_step_2_on_one_worker_sees_the_same_data(reference, one_worker, train_shards, tmp_path):
    ref_root, checkpoints = reference
    _check_same_data(ref_root, one_worker, 3)
    lineage = json.loads(open(f"{RunLayout(str(one_worker)).stage(1).export_dir}/lineage.json").read())
    assert lineage["steps"] == STEPS and lineage["samples"] == 4 * STEPS
    # the driver converted the checkpoint next to itself (ZeRO-2 partitions of 2 ranks, read by 1) ...
    marker = f"{checkpoints[2]}/{universal.UNIVERSAL_DIR}/{universal.DONE_FILE}"
    stamp = os.stat(marker).st_mtime_ns
    # ... and a second resume from the same checkpoint reuses it
    prepare(
        RunArgs(
            stage=1, flavor="debug", shards=str(train_shards), run_root=str(tmp_path / "again"),
            max_steps=STEPS, num_workers=1, resume=checkpoints[2],
        )
    )  # fmt: skip
    assert os.stat(marker).st_mtime_ns == stamp


def test_resume_from_step_2_on_one_worker_has_the_same_losses(reference, one_worker):
    """1 worker × accumulation 2 computes the losses of 2 workers × 1: the mask losses are normalised by the
    global batch's target count (``num_masks_reduce = global_batch``), not per micro-step."""
    _check_losses(reference[0], one_worker, 3)


def test_resume_from_step_4_on_two_workers_with_two_loader_workers(reference, train_shards, tmp_path):
    ref_root, checkpoints = reference
    _run(train_shards, tmp_path / "run", num_workers=2, loader_workers=2, resume=checkpoints[4])
    assert not os.path.exists(f"{checkpoints[4]}/{universal.UNIVERSAL_DIR}")  # same world size: no conversion
    _check_same_data(ref_root, tmp_path / "run", 5)
    _check_losses(ref_root, tmp_path / "run", 5)


def test_elastic_range_starts_with_the_workers_that_fit(reference, train_shards, tmp_path):
    """``fit(min_workers=1)`` on a plan of 2 workers, each asking for both CPUs of the cluster: Ray Train v2's
    elastic policy starts 1 worker; it keeps the global batch (accumulation 2) and, since the driver could not
    know the count, converts the 2-worker checkpoint itself. The data stays the reference's."""
    ref_root, checkpoints = reference
    ckpt = tmp_path / "ckpt4"  # a copy: the conversion is written next to it
    shutil.copytree(checkpoints[4], ckpt)
    root = tmp_path / "run"
    plan = _run(
        train_shards, root, num_workers=2, resume=str(ckpt), fit_kw={"min_workers": 1, "cpus_per_worker": 2}
    )
    assert plan.cfg.batch.world_size == 2  # the driver's plan; the workers ran on what Ray gave them
    config = json.loads(open(f"{RunLayout(str(root)).stage(1).export_dir}/config.json").read())
    assert config["stage"]["batch"] == {"global_batch": 4, "micro_batch": 2, "grad_accum": 2, "world_size": 1}
    assert (ckpt / universal.UNIVERSAL_DIR / universal.DONE_FILE).is_file()  # converted by rank 0
    _check_same_data(ref_root, root, 5)
