"""The full flavor's real widths fit together: forward + backward on CPU of ``full_width_smoke`` (every width
of ``xsam-phi3``, 2 LLM layers, 3 SigLIP layers, SAM and SigLIP at 224²; random weights, fp32) for stage 1 and
for stage 3 on genseg, refseg (per-``<SEG>``) and vgdseg, with finite losses and gradients. Meta-device builds
cannot run ``forward`` (data-dependent ops), so this is the only check of the full shapes. The LLM's token
embedding and LM head (0.2 B parameters) stay frozen: their gradients are plain weight-shaped tensors whose
0.8 GB would only raise the peak memory. bench/model_step.py prints the time and peak RSS."""

from __future__ import annotations

import pytest
import torch

from tests.support.model import image_bytes, refseg_sample
from xsam_model import build_xsam
from xsam_model.flavors import full_width_smoke
from xsam_model.processor import XSamProcessor
from xsam_model.tokenizer import build_debug_tokenizer, prepare_tokenizer
from xsam_model.trainable import stage_view

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke():
    torch.manual_seed(0)
    model = build_xsam(full_width_smoke())
    # the debug BPE's ids (< 400) index the real 32014-row embedding; the forward reads <SEG>/<p> positions
    # from seg_ids/cond_ids, never from the token ids
    tok = prepare_tokenizer(build_debug_tokenizer(), model.config.special_tokens)
    return model, XSamProcessor(model.config.processor, tok, model.config.special_tokens)


@pytest.mark.parametrize("stage,task", [(1, "genseg"), (3, "genseg"), (3, "refseg"), (3, "vgdseg")])
def test_full_width_forward_backward(smoke, samples, stage, task):
    model, proc = smoke
    cfg = model.config
    assert cfg.sam.hidden_size == 1024 and cfg.llm.hidden_size == 3072 and cfg.llm.vocab_size == 32014
    sample = refseg_sample(7, 3) if task == "refseg" else samples[task]
    batch = proc.collate([proc(sample, image_bytes(0))])
    stage_view(model, stage)
    model.llm.get_input_embeddings().weight.requires_grad_(False)
    model.llm.lm_head.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    out = model(batch, stage=stage)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["dice"] > 0 and (stage == 1 or out.losses["lm"] > 0)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad == []
    final = out.predictions[-1]
    assert final["masks_queries_logits"].shape[-1] == cfg.sam.image_size // 8  # stride-8 mask features
    if task == "refseg":  # 3 turns: 3 decoder runs, each over the 3 phrases + background
        assert final["class_queries_logits"].shape == (3, 200, 4) and out.runs.tolist() == [
            [0, 0],
            [0, 1],
            [0, 2],
        ]
    model.zero_grad(set_to_none=True)
