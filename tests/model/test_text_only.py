"""Text-only LLaVA samples (docs/fidelity.md#data-recipe-fidelity: the paper trained on LLaVA-665k's text-only
conversations): the processor gives zero encoder inputs and no image token, and they train through the debug
model, alone or next to a sample with an image."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipelines.schema import Turn, validate
from tests.support.model import image_bytes
from xsam_model.processor import ProcessorError


def text_only(samples):
    chat = samples["chat"]
    conv = [Turn("user", "Write a haiku about rain."), Turn("assistant", "Soft rain on the roof.")]
    s = replace(chat, key="src_chat/train/text", image=None, conversation=conv)
    validate(s)
    return s


def test_processor_gives_zero_inputs_and_no_image_token(processor, samples):
    item = processor(text_only(samples), None)
    c = processor.config
    assert (item["input_ids"] != c.image_token_index).all()
    assert item["pixel_values"].shape == (3, c.siglip_size, c.siglip_size) and not item["pixel_values"].any()
    assert (
        item["extra_pixel_values"].shape == (3, c.sam_size, c.sam_size)
        and not item["extra_pixel_values"].any()
    )
    assert item["mask_labels"].shape == (0, c.sam_size, c.sam_size) and len(item["region_masks"]) == 0
    with pytest.raises(ProcessorError, match="no image bytes"):
        processor(samples["chat"], None)  # a sample that has an image still needs its bytes


def test_text_only_llava_samples_train_through_the_debug_model(debug_model, samples):
    model, proc = debug_model, debug_model.processor
    alone = text_only(samples)
    for items in (
        [proc(alone, None), proc(alone, None)],
        [proc(alone, None), proc(samples["chat"], image_bytes(0))],
    ):
        model.zero_grad(set_to_none=True)
        batch = proc.collate(items)
        out = model(batch, stage=3)
        assert torch.isfinite(out.loss) and out.losses["lm"] > 0
        out.loss.backward()
        grads = [p.grad for p in model.llm.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        assert math.isclose(out.loss.item(), sum(v.item() for v in out.losses.values()), rel_tol=1e-5)
        # the text-only row's LM sequence is just its tokens: no image features were inserted
        n_text = int(batch["attention_mask"][0].sum())
        if not (batch["input_ids"] == proc.config.image_token_index).any():
            assert out.lm_logits.shape[1] == n_text
        else:
            assert (
                out.lm_logits.shape[1]
                == int(batch["attention_mask"][1].sum()) + model.config.num_image_tokens - 1
            )
