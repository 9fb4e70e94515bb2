"""The mask-loss normaliser under two gloo ranks with different mask counts (X-SAM's ``get_num_masks``)."""

from __future__ import annotations

import json
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Mask2FormerConfig

from xsam_model.modeling.loss import SegLoss


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    # A forked child must not enter the OpenMP pool the parent's earlier tests started (libgomp is not
    # fork-safe: the matcher's first parallel op hangs); one intra-op thread keeps every op inline.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = Mask2FormerConfig(train_num_points=64)
        n_masks = (1, 3)[rank]
        torch.manual_seed(rank)
        preds = [
            {"masks_queries_logits": torch.randn(1, 4, 8, 8), "class_queries_logits": torch.randn(1, 4, 4)}
        ]
        masks = [(torch.rand(n_masks, 32, 32) > 0.5).to(torch.uint8)]
        labels = [torch.arange(n_masks)]
        result = {}
        for mode in ("global", "local"):
            crit = SegLoss(cfg, num_masks_reduce=mode)
            result[mode] = float(crit.num_masks(labels, "cpu"))
            torch.manual_seed(10 + rank)  # the same sampled points for both modes
            result[f"{mode}_dice"] = float(crit(preds, masks, labels)["dice"])
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_num_masks_is_the_global_mean(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children share the parent's imports (spawn would re-import transformers, ~15 s on 2 cores)
    mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["global"] for x in r] == [2.0, 2.0]  # (1 + 3) / 2 on both ranks
    assert [x["local"] for x in r] == [1.0, 3.0]
    for x, local in zip(r, (1, 3), strict=True):  # the dice sum is divided by 2 instead of the local count
        assert abs(x["global_dice"] * 2 - x["local_dice"] * local) < 1e-4 * max(1.0, x["local_dice"])


def test_the_step_normaliser_replaces_the_count_only_for_global_batch():
    """``global_batch``: the trainer's step value (the global batch's targets / (world × accumulation))
    divides the mask losses inside ``step_normaliser``; outside it, and for the other modes, the batch's own
    count."""
    cfg = Mask2FormerConfig(train_num_points=64)
    labels = [torch.arange(3)]
    step_mode, per_micro = (
        SegLoss(cfg, num_masks_reduce="global_batch"),
        SegLoss(cfg, num_masks_reduce="global"),
    )
    with step_mode.step_normaliser(0.5), per_micro.step_normaliser(7.0):
        assert float(step_mode.num_masks(labels, "cpu")) == 1.0  # clamped at 1, as X-SAM
        assert float(per_micro.num_masks(labels, "cpu")) == 3.0
    with step_mode.step_normaliser(7.0):
        assert float(step_mode.num_masks(labels, "cpu")) == 7.0
    assert float(step_mode.num_masks(labels, "cpu")) == 3.0
