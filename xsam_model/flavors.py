"""Model flavors: one plain dict of named configs (torchtitan's ``debugmodel`` idea). Derive variants with
``dataclasses.replace`` on a copy; :func:`xsam_model.build_xsam` deep-copies what it is given."""

from __future__ import annotations

from xsam_model.config import (
    ConnectorConfig,
    DecoderConfig,
    LLMConfig,
    LossConfig,
    ProcessorConfig,
    RegionSamplerConfig,
    SamEncoderConfig,
    SiglipEncoderConfig,
    XSamConfig,
)

# Tiny and random: CPU forward+backward in well under a second. Sizes keep every code path of the full
# model alive: 3 SAM levels at strides 4/8/16, pixel shuffle 0.5, FPN lateral, aux losses, region tokens.
DEBUG = XSamConfig(
    name="debug",
    siglip=SiglipEncoderConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32, patch_size=8
    ),
    sam=SamEncoderConfig(
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        mlp_dim=64,
        image_size=64,
        patch_size=8,
        window_size=4,
        global_attn_indexes=(1, 3),
        connector_layers=(2, 3, 4),
    ),
    llm=LLMConfig(
        folder="debug-llm",
        vocab_size=387,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=1024,
    ),
    connector=ConnectorConfig(hidden_dim=32),
    decoder=DecoderConfig(
        hidden_dim=32,
        num_queries=8,
        decoder_layers=3,
        encoder_layers=1,
        num_heads=4,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        feature_size=32,
        mask_feature_size=32,
    ),
    loss=LossConfig(train_num_points=256),
    region=RegionSamplerConfig(num_points=16, pool=4),
    processor=ProcessorConfig(siglip_size=32, sam_size=64, max_length=512),
)
"""Its tokenizer is the in-process BPE of :func:`xsam_model.tokenizer.build_debug_tokenizer` unless an
``init_dir`` holds ``debug-llm/`` (then model and tokenizer load from there, like the full flavor)."""

# SigLIP2-so400m-patch14-384 + SAM ViT-L + Phi-3-mini-4k-instruct + Mask2Former (recipe §5): the defaults.
XSAM_PHI3 = XSamConfig(name="xsam-phi3")

XSAM_FLAVORS: dict[str, XSamConfig] = {"debug": DEBUG, "xsam-phi3": XSAM_PHI3}
