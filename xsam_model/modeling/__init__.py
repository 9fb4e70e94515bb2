"""nn.Modules of X-SAM; each takes built sub-modules. Wiring happens only in :mod:`xsam_model.builder`."""

from xsam_model.modeling.connector import SegConnector
from xsam_model.modeling.decoder import ConditionedTransformerModule, MaskDecoder, PhraseClassifier
from xsam_model.modeling.loss import SegLoss
from xsam_model.modeling.projector import MLPProjector, SegProjector
from xsam_model.modeling.region_sampler import RegionSampler
from xsam_model.modeling.xsam import XSam, XSamOutput

__all__ = [
    "ConditionedTransformerModule",
    "MLPProjector",
    "MaskDecoder",
    "PhraseClassifier",
    "RegionSampler",
    "SegConnector",
    "SegLoss",
    "SegProjector",
    "XSam",
    "XSamOutput",
]
