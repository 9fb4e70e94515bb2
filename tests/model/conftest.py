"""Fixtures for the model tests: one debug model per session, Samples for every task built by hand.

The offline environment and the ``gpu`` marker skip come from ``tests/conftest.py``.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.schema import Sample
from tests.support.model import make_samples


@pytest.fixture(scope="session")
def samples() -> dict[str, Sample]:
    return make_samples()


@pytest.fixture(scope="session")
def debug_model():
    from xsam_model import build_xsam

    torch.manual_seed(0)
    return build_xsam("debug")


@pytest.fixture(scope="session")
def processor(debug_model):
    return debug_model.processor
