"""The step-1 gradient of a randomly initialised stage 1 (the debug flavor), part by part.

Before: the SAM encoder was built with transformers' ``SamVisionConfig.initializer_range`` = 1e-10 (X-SAM's
``SamModel`` uses its ``SamConfig``'s 0.02), every encoder activation was ~1e-10, and the LayerNorms blew the
gradient up to 1.3e10 (SAM encoder) and 1.3e7 (connector) at step 1. The bounds below:

- every part but the SAM encoder sees O(1) activations and a loss of ~50 (≈ 10 O(1) terms): its norm is
  1e1-1e2 (measured 10-90), bound 1e3;
- the SAM encoder, at random init (X-SAM's too), has a zero patch-embedding bias and position embedding, so a
  padded patch enters the first LayerNorm as the zero vector and leaves with its gradient scaled by
  1/sqrt(eps) = 1e3: bound 1e3 × 1e3 = 1e6 (measured 2.8e5). Give the patches a non-zero bias (as pretrained
  weights do) and it falls under the other parts' 1e3 (measured 2.3e2).
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrate.grad_norms import parameter_parts, part_grad_norms
from orchestrate.plan import model_config
from orchestrate.stages import get_stage
from tests.support.model import image_bytes, make_samples
from xsam_model import build_xsam, stage_view
from xsam_model.builder import SAM_INIT_STD


def _step1_norms(model) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    proc = model.processor
    batch = proc.collate([proc(make_samples()["genseg"], image_bytes(i)) for i in range(2)])
    torch.manual_seed(1)
    model(batch, stage=1).loss.backward()
    return part_grad_norms(parameter_parts(model.named_parameters(), 1), lambda p: p.grad)


def test_random_sam_init_and_step1_gradient_norms():
    cfg = get_stage(1, flavor="debug")
    torch.manual_seed(cfg.data.seed)  # as the trainer builds it
    model = build_xsam(model_config(cfg))
    stage_view(model, 1)
    sam = model.sam_encoder.vision_encoder
    weights = [m.weight for m in sam.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    stds = torch.stack([w.detach().std() for w in weights])
    assert SAM_INIT_STD == 0.02 and ((stds > 0.015) & (stds < 0.025)).all(), stds  # X-SAM's SamModel init

    norms = _step1_norms(model)
    assert set(norms) == {
        "sam_encoder",
        "seg_connector",
        "mask_decoder.pixel_decoder",
        "mask_decoder.transformer",
        "mask_decoder.linear_head",
    }
    assert all(v < 1e3 for k, v in norms.items() if k != "sam_encoder"), norms
    assert 1e3 < norms["sam_encoder"] < 1e6, norms  # the padded-patch LayerNorm, X-SAM's at random init

    with torch.no_grad():  # what pretrained weights have: patches that are not the zero vector
        sam.patch_embed.projection.bias.normal_(0, SAM_INIT_STD, generator=torch.Generator().manual_seed(0))
    assert _step1_norms(model)["sam_encoder"] < 1e3
    model.zero_grad(set_to_none=True)
