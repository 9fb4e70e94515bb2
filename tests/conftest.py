"""Shared test set-up: offline everything, Ray without auth, demo data written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports ray / transformers / wandb / deepspeed.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The full demo ``datas/`` tree (every registered family), written once and shared read-only."""
    from pipelines.demo_data import write_demo

    return write_demo(tmp_path_factory.mktemp("demo") / "datas")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/real_data`` when ``XSAM_REAL_DATA`` points at it; the test is skipped otherwise."""
    path = os.environ.get("XSAM_REAL_DATA")
    if not path or not Path(path).is_dir():
        pytest.skip("XSAM_REAL_DATA is not set to the real_data folder")
    return Path(path)


@pytest.fixture
def ray_local():
    """An in-process Ray cluster of 2 CPUs for one test (no dashboard, so parallel sessions don't collide)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
