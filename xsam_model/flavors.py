"""Model flavors: one plain dict of named configs (torchtitan's ``debugmodel`` idea). Derive variants with
``dataclasses.replace`` on a copy; :func:`xsam_model.build_xsam` deep-copies what it is given.

``xsam-phi3`` is the paper (X-SAM ``AAAI26_Archive``); ``xsam-phi3-main`` the same network with every choice
where X-SAM's ``main`` differs (:func:`xsam_model.config.main_branch`). :func:`full_width_smoke` is the full
flavor with every width real but few layers and a small SAM input, for CPU tests of the real shapes."""

from __future__ import annotations

import dataclasses

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
    main_branch,
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
        tokenizer_size=384,
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
    region=RegionSamplerConfig(num_points=16),
    processor=ProcessorConfig(siglip_size=32, sam_size=64, max_length=512),
)
"""Its tokenizer is the in-process BPE of :func:`xsam_model.tokenizer.build_debug_tokenizer` unless an
``init_dir`` holds ``debug-llm/`` (then model and tokenizer load from there, like the full flavor)."""

# SigLIP2-so400m-patch14-384 + SAM ViT-L + Phi-3-mini-4k-instruct + Mask2Former (recipe §5): the defaults.
XSAM_PHI3 = XSamConfig(name="xsam-phi3")

XSAM_FLAVORS: dict[str, XSamConfig] = {
    "debug": DEBUG,
    "xsam-phi3": XSAM_PHI3,
    "xsam-phi3-main": main_branch(XSAM_PHI3),
}


def full_width_smoke(
    sam_size: int = 224, siglip_size: int = 224, llm_layers: int = 2, siglip_layers: int = 3
) -> XSamConfig:
    """``xsam-phi3`` with every width real (SigLIP 1152, SAM 1024, Phi-3 3072 and its 32014-row vocabulary,
    projectors, connector 512 → 512/1024/2048, Mask2Former 256 with 200 queries and 10 + 6 layers) but
    ``llm_layers`` LLM and ``siglip_layers`` SigLIP layers and small inputs. SAM keeps its 24 layers, its
    global-attention layers and the connector's layer indices 12/18/24, so the real wiring runs; at 224² its
    grid is 14 (one 14² attention window, a 7² stride-32 level); SigLIP at 224² gives 256 tokens, so the LLM
    sequence is about 256 + 49 + text. Random weights: a CPU forward + backward of one image in fp32 takes
    tens of seconds and a few GB."""
    cfg = XSamConfig(name="xsam-phi3-smoke")
    cfg.llm = dataclasses.replace(cfg.llm, num_layers=llm_layers)
    cfg.siglip = dataclasses.replace(cfg.siglip, num_layers=siglip_layers, image_size=siglip_size)
    cfg.sam = dataclasses.replace(cfg.sam, image_size=sam_size)
    cfg.processor = dataclasses.replace(cfg.processor, sam_size=sam_size, siglip_size=siglip_size)
    XSamConfig.__post_init__(cfg)
    return cfg
