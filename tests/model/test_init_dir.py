"""Weights from local HF folders: tiny sub-models saved in X-SAM's ``inits/`` layout load through the same
code path as the full flavor (``build_xsam(config, init_dir=...)``)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import Mask2FormerConfig, Phi3ForCausalLM, SamConfig, SamModel, SiglipConfig, SiglipModel

from tests.support.model import image_bytes
from xsam_model import XSAM_FLAVORS, build_xsam
from xsam_model.builder import llm_hf_config
from xsam_model.tokenizer import build_debug_tokenizer


def _write_inits(root, cfg):
    """Full-layout folders like the real downloads: SigLIP with its text tower, SAM with prompt encoder and
    mask decoder, Phi-3 with its tokenizer, Mask2Former's config only."""
    torch.manual_seed(3)
    v = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    t = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    SiglipModel(SiglipConfig(vision_config=v, text_config=t)).save_pretrained(root / cfg.siglip.folder)
    sam_v = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_dim=64,
        image_size=64,
        patch_size=8,
        window_size=4,
        global_attn_indexes=[1, 3],
        output_channels=32,
    )
    SamModel(
        SamConfig(
            vision_config=sam_v,
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8),
            mask_decoder_config=dict(
                hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
            ),
        )
    ).save_pretrained(root / cfg.sam.folder)
    tok = build_debug_tokenizer()
    llm_cfg = llm_hf_config(dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=len(tok))))
    Phi3ForCausalLM(llm_cfg).save_pretrained(root / cfg.llm.folder)
    tok.save_pretrained(root / cfg.llm.folder)
    Mask2FormerConfig(
        hidden_dim=32,
        num_queries=6,
        decoder_layers=2,
        encoder_layers=1,
        num_attention_heads=4,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        feature_size=32,
        mask_feature_size=32,
    ).save_pretrained(root / cfg.decoder.folder)


def test_sub_models_load_from_local_folders(tmp_path, samples):
    cfg = copy.deepcopy(XSAM_FLAVORS["debug"])
    _write_inits(tmp_path, cfg)
    model = build_xsam(cfg, init_dir=tmp_path)
    # weights are the saved ones, not fresh random ones
    sam = SamModel.from_pretrained(tmp_path / cfg.sam.folder)
    assert torch.equal(
        model.sam_encoder.vision_encoder.layers[2].mlp.lin1.weight,
        sam.vision_encoder.layers[2].mlp.lin1.weight,
    )
    sig = SiglipModel.from_pretrained(tmp_path / cfg.siglip.folder).vision_model
    ours = dict(model.vision_encoder.named_parameters())
    key = next(k for k in ours if k.endswith("encoder.layers.1.self_attn.q_proj.weight"))
    assert torch.equal(ours[key], sig.encoder.layers[1].self_attn.q_proj.weight)
    llm = Phi3ForCausalLM.from_pretrained(tmp_path / cfg.llm.folder)
    assert torch.equal(
        model.llm.model.layers[1].mlp.down_proj.weight, llm.model.layers[1].mlp.down_proj.weight
    )
    # sizes resolved from the folders (3 SigLIP layers, 6 queries), special tokens added and embeddings
    # resized
    assert model.config.siglip.num_layers == 3 and model.config.decoder.num_queries == 6
    assert model.mask_decoder.transformer.queries_features.weight.shape[0] == 6
    tok = model.processor.tokenizer
    assert model.llm.get_input_embeddings().weight.shape[0] == len(tok) == model.config.llm.vocab_size
    assert model.special_token_ids["<SEG>"] == tok.convert_tokens_to_ids("<SEG>")
    # and it trains
    proc = model.processor
    batch = proc.collate([proc(samples["refseg"], image_bytes(i)) for i in range(2)])
    out = model(batch, stage=3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.losses["dice"] > 0


def test_missing_folder_names_the_path(tmp_path):
    cfg = XSAM_FLAVORS["debug"]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / cfg.siglip.folder)):
        build_xsam(cfg, init_dir=tmp_path)
    with pytest.raises(ValueError, match="meta"):
        build_xsam("xsam-phi3", init_dir=tmp_path, device="meta")
