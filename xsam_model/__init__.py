"""X-SAM model package: configs, flavors, builder, processor, stage views. Small public surface:

from xsam_model import build_xsam, XSAM_FLAVORS, build_processor, collate, stage_view, export_trainable,
load_exported
"""

from xsam_model.builder import build_processor, build_xsam
from xsam_model.config import XSamConfig
from xsam_model.flavors import XSAM_FLAVORS
from xsam_model.processor import ProcessorError, XSamProcessor, collate
from xsam_model.trainable import (
    WeightMismatchError,
    export_trainable,
    load_exported,
    param_groups,
    stage_view,
)

__all__ = [
    "XSAM_FLAVORS",
    "ProcessorError",
    "WeightMismatchError",
    "XSamConfig",
    "XSamProcessor",
    "build_processor",
    "build_xsam",
    "collate",
    "export_trainable",
    "load_exported",
    "param_groups",
    "stage_view",
]
