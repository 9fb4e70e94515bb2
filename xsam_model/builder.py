"""``build_xsam``: the one place where X-SAM's parts are built and wired (segment-anything's builder style).

Weights come only from local Hugging Face folders under ``init_dir`` (X-SAM's ``inits/`` names, taken from
each component config's ``folder``); nothing is fetched. Without ``init_dir`` every part is built from its
config with random weights — on ``device="meta"`` without allocating memory, to inspect the full flavor.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn
from transformers import (
    Mask2FormerConfig,
    Phi3Config,
    Phi3ForCausalLM,
    SamVisionConfig,
    SamVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder
from transformers.utils import is_flash_attn_2_available

from xsam_model.config import XSamConfig
from xsam_model.flavors import XSAM_FLAVORS
from xsam_model.modeling import (
    ConditionedTransformerModule,
    MaskDecoder,
    MLPProjector,
    PhraseClassifier,
    RegionSampler,
    SegConnector,
    SegLoss,
    SegProjector,
    XSam,
)
from xsam_model.modeling.activation_checkpointing import enable_hf_checkpointing, enable_layer_checkpointing
from xsam_model.modeling.connector import init_connector_weights
from xsam_model.modeling.decoder import init_mask2former_weights, init_xsam_decoder_weights
from xsam_model.processor import XSamProcessor
from xsam_model.tokenizer import build_debug_tokenizer, load_tokenizer, prepare_tokenizer


def _folder(init_dir: str | Path, name: str, what: str) -> Path:
    path = Path(init_dir) / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: expected a Hugging Face folder with config.json at {path}")
    return path


def resolve_attn_implementation(requested: str, device: str | torch.device | None) -> str:
    """``auto`` → ``flash_attention_2`` when the ``flash_attn`` package is installed and the model is built
    for CUDA (``device`` cuda, or no device and CUDA available), else ``sdpa``; any other value is kept."""
    if requested != "auto":
        return requested

    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return "flash_attention_2" if on_cuda and is_flash_attn_2_available() else "sdpa"


def resolve_config(flavor_or_config: str | XSamConfig) -> XSamConfig:
    if isinstance(flavor_or_config, XSamConfig):
        return copy.deepcopy(flavor_or_config)
    if flavor_or_config not in XSAM_FLAVORS:
        raise ValueError(f"unknown flavor {flavor_or_config!r}; known: {sorted(XSAM_FLAVORS)}")
    return copy.deepcopy(XSAM_FLAVORS[flavor_or_config])


# ---------------------------------------------------------------------- HF configs from our dataclasses
def siglip_hf_config(cfg: XSamConfig) -> SiglipVisionConfig:
    c = cfg.siglip
    return SiglipVisionConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
        vision_use_head=False,
    )


SAM_INIT_STD = 0.02
"""Std of a randomly built SAM encoder's linear and conv weights. X-SAM's vendored ``SamModel`` initialises
its vision encoder with the top-level ``SamConfig.initializer_range`` (0.02); transformers'
``SamVisionConfig`` defaults to 1e-10 (a value meant only to be overwritten by pretrained weights). At 1e-10
every activation of the encoder is ~1e-10 and each LayerNorm (eps 1e-6) scales its gradient up: the step-1
gradient norm of a random stage 1 was 1.3e10 (debug) and 1.7e11 (full width).

What remains is X-SAM's own: at random init the patch-embedding bias and the position embedding are 0, so a
padded (zero) pixel patch enters the first LayerNorm as a zero vector, whose gradient the norm scales by
1/sqrt(eps) = 1e3. A random SAM's step-1 gradient is still ~1e3 × the other parts' (2.8e5 debug, 3.6e4 full
width, against 1e1-1e2); pretrained SAM weights (every real run) have neither (docs/training.md, *The step-1
gradient*)."""


def sam_hf_config(cfg: XSamConfig) -> SamVisionConfig:
    c = cfg.sam
    return SamVisionConfig(
        initializer_range=SAM_INIT_STD,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        mlp_dim=c.mlp_dim,
        image_size=c.image_size,
        patch_size=c.patch_size,
        window_size=c.window_size,
        global_attn_indexes=list(c.global_attn_indexes),
    )


def llm_hf_config(cfg: XSamConfig) -> Phi3Config:
    c = cfg.llm
    return Phi3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        original_max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=32000 if c.vocab_size > 32000 else 2,
        pad_token_id=32000 if c.vocab_size > 32000 else 0,
        **({"attn_implementation": c.attn_implementation} if c.attn_implementation != "auto" else {}),
    )


def m2f_hf_config(cfg: XSamConfig, base: Mask2FormerConfig | None = None) -> Mask2FormerConfig:
    """Decoder sizes from ``cfg.decoder`` (or the folder's config), loss settings from ``cfg.loss``, strides
    from the connector; ``common_stride`` = half the finest stride, i.e. one FPN level (stride 8 → 4)."""
    d, lo = cfg.decoder, cfg.loss
    strides = list(cfg.feature_strides)
    kw = dict(
        hidden_dim=d.hidden_dim,
        num_queries=d.num_queries,
        decoder_layers=d.decoder_layers,
        encoder_layers=d.encoder_layers,
        num_attention_heads=d.num_heads,
        dim_feedforward=d.dim_feedforward,
        encoder_feedforward_dim=d.encoder_feedforward_dim,
        feature_size=d.feature_size,
        mask_feature_size=d.mask_feature_size,
    )
    common = dict(
        feature_strides=strides,
        common_stride=strides[0] // 2,
        num_labels=d.num_linear_classes,
        no_object_weight=lo.no_object_weight,
        class_weight=lo.class_weight,
        mask_weight=lo.mask_weight,
        dice_weight=lo.dice_weight,
        train_num_points=lo.train_num_points,
        oversample_ratio=lo.oversample_ratio,
        importance_sample_ratio=lo.importance_sample_ratio,
        use_auxiliary_loss=lo.use_auxiliary_loss,
    )
    if base is None:
        return Mask2FormerConfig(**kw, **common)
    for k, v in common.items():
        setattr(base, k, v)
    return base


# ---------------------------------------------------------------------- folders → parts (+ resolved config)
def _load_parts(cfg: XSamConfig, init_dir: str | Path, dtype):
    kw = {"dtype": dtype} if dtype is not None else {}
    siglip = SiglipVisionModel.from_pretrained(
        _folder(init_dir, cfg.siglip.folder, "SigLIP vision"),
        vision_use_head=False,
        local_files_only=True,
        **kw,
    )
    sam = SamVisionModel.from_pretrained(
        _folder(init_dir, cfg.sam.folder, "SAM encoder"), local_files_only=True, **kw
    )
    llm_dir = _folder(init_dir, cfg.llm.folder, "LLM")
    llm = Phi3ForCausalLM.from_pretrained(
        llm_dir, attn_implementation=cfg.llm.attn_implementation, local_files_only=True, **kw
    )
    m2f = Mask2FormerConfig.from_pretrained(_folder(init_dir, cfg.decoder.folder, "Mask2Former config"))
    tok = load_tokenizer(llm_dir)
    _sizes_from_folders(cfg, siglip.config, sam.config, llm.config, m2f)
    return siglip, sam, llm, m2f_hf_config(cfg, m2f), tok


def _sizes_from_folders(cfg: XSamConfig, sc, vc, lc, m2f) -> None:
    """The folders are the truth for sizes: write them back into ``cfg`` so the resolved config describes
    the model (``sc``/``vc``/``lc``: the SigLIP, SAM and LLM HF configs; ``m2f``: the Mask2Former config)."""
    cfg.siglip = dataclasses.replace(
        cfg.siglip,
        hidden_size=sc.hidden_size,
        intermediate_size=sc.intermediate_size,
        num_layers=sc.num_hidden_layers,
        num_heads=sc.num_attention_heads,
        image_size=sc.image_size,
        patch_size=sc.patch_size,
    )
    cfg.sam = dataclasses.replace(
        cfg.sam,
        hidden_size=vc.hidden_size,
        num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        mlp_dim=vc.mlp_dim,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        window_size=vc.window_size,
        global_attn_indexes=tuple(vc.global_attn_indexes),
    )
    cfg.llm = dataclasses.replace(
        cfg.llm,
        vocab_size=lc.vocab_size,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        num_layers=lc.num_hidden_layers,
        num_heads=lc.num_attention_heads,
        num_kv_heads=lc.num_key_value_heads,
    )
    cfg.decoder = dataclasses.replace(
        cfg.decoder,
        hidden_dim=m2f.hidden_dim,
        num_queries=m2f.num_queries,
        decoder_layers=m2f.decoder_layers,
        encoder_layers=m2f.encoder_layers,
        num_heads=m2f.num_attention_heads,
        dim_feedforward=m2f.dim_feedforward,
        encoder_feedforward_dim=m2f.encoder_feedforward_dim,
        feature_size=m2f.feature_size,
        mask_feature_size=m2f.mask_feature_size,
    )
    cfg.processor = dataclasses.replace(
        cfg.processor, siglip_size=cfg.siglip.image_size, sam_size=cfg.sam.image_size
    )
    XSamConfig.__post_init__(cfg)  # re-check cross-component relations after the update


def _random_parts(cfg: XSamConfig):
    siglip = SiglipVisionModel(siglip_hf_config(cfg))
    sam = SamVisionModel(sam_hf_config(cfg))
    llm = Phi3ForCausalLM(llm_hf_config(cfg))
    tok = build_debug_tokenizer() if cfg.name == "debug" else None
    return siglip, sam, llm, m2f_hf_config(cfg), tok


def _special_tokens(cfg: XSamConfig, llm, tok, ctx: torch.device, meta: bool):
    """Add the special tokens and size the embeddings as X-SAM (``resize_token_embeddings(len(tok))``).
    Without a tokenizer (meta, random full flavor) the rows are ``llm.tokenizer_size + len(special_tokens)``:
    the same shapes and ids as the tokenizer path (D14). Returns (tokenizer or None, token ids)."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if tok is not None:
        cfg.llm = dataclasses.replace(cfg.llm, tokenizer_size=len(tok))
        tok = prepare_tokenizer(tok, cfg.special_tokens)
        ids = {t: tok.convert_tokens_to_ids(t) for t in cfg.special_tokens}
        new_vocab = len(tok)
    else:
        base = cfg.llm.tokenizer_size if cfg.llm.tokenizer_size is not None else rows
        ids = {t: base + i for i, t in enumerate(cfg.special_tokens)}
        new_vocab = base + len(cfg.special_tokens)
    if new_vocab != rows:
        with ctx:
            llm.resize_token_embeddings(new_vocab, mean_resizing=not meta)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=new_vocab)
    return tok, ids


def _decoder_and_connector(cfg: XSamConfig, m2f: Mask2FormerConfig) -> tuple[SegConnector, MaskDecoder]:
    d = cfg.decoder
    connector = SegConnector(
        in_dim=cfg.sam.hidden_size,
        hidden_dim=cfg.connector.hidden_dim,
        scale_factors=cfg.connector.scale_factors,
    )
    decoder = MaskDecoder(
        pixel_decoder=Mask2FormerPixelDecoder(m2f, feature_channels=connector.out_channels),
        transformer=ConditionedTransformerModule(in_features=m2f.feature_size, config=m2f),
        phrase_head=PhraseClassifier(
            dim=m2f.hidden_dim,
            logit_scale_init=d.logit_scale_init,
            clamp=d.logit_clamp,
            bg_init_std=d.bg_init_std,
        ),
        linear_head=nn.Linear(m2f.hidden_dim, d.num_linear_classes + 1),
    )
    if d.init == "xsam":
        init_xsam_decoder_weights(decoder.pixel_decoder, m2f)
        init_xsam_decoder_weights(decoder.transformer, m2f)
        init_connector_weights(connector, std=getattr(m2f, "init_std", 0.02))
    else:
        init_mask2former_weights(decoder.pixel_decoder, m2f)
        init_mask2former_weights(decoder.transformer, m2f)
    return connector, decoder


def apply_checkpointing(model: XSam) -> None:
    """Switch activation checkpointing of each part on or off as its sub-config says
    (``gradient_checkpointing``); call again after editing ``model.config`` (e.g. with
    :func:`xsam_model.config.with_checkpointing`)."""
    c = model.config
    for sub, part in ((c.siglip, model.vision_encoder), (c.sam, model.sam_encoder), (c.llm, model.llm)):
        if sub.gradient_checkpointing:
            enable_hf_checkpointing(part)
        elif part.is_activation_checkpointing:
            part.activation_checkpointing_disable()
    for proj in (model.visual_projector, model.seg_projector.mlp, model.llm_projector):
        proj.gradient_checkpointing = c.projector.gradient_checkpointing
    model.seg_connector.gradient_checkpointing = c.connector.gradient_checkpointing
    enable_layer_checkpointing(model.mask_decoder, c.decoder.gradient_checkpointing)


def build_xsam(
    flavor_or_config: str | XSamConfig = "debug",
    init_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> XSam:
    """Build X-SAM from a flavor name (see ``XSAM_FLAVORS``) or an :class:`XSamConfig`.

    ``init_dir``: a folder with the HF sub-folders named by the configs (``siglip2-so400m-patch14-384``,
    ``sam-vit-large``, ``Phi-3-mini-4k-instruct`` with its tokenizer, ``mask2former-swin-large-coco-panoptic``
    for the decoder config only); the decoder, connector and projectors always start random.
    ``device="meta"``: structure only, no memory (and no ``init_dir``). ``dtype``: e.g. ``torch.bfloat16``.
    The model's ``processor`` is set when a tokenizer is known (``init_dir``, or the debug flavor's BPE).
    ``model.config`` is the resolved config (sizes from the folders, attention kernel, vocabulary).
    """
    cfg = resolve_config(flavor_or_config)
    meta = device is not None and torch.device(device).type == "meta"
    if meta and init_dir is not None:
        raise ValueError("device='meta' builds from configs only; drop init_dir")
    cfg.llm = dataclasses.replace(
        cfg.llm, attn_implementation=resolve_attn_implementation(cfg.llm.attn_implementation, device)
    )
    ctx = torch.device(device) if device is not None else torch.device("cpu")
    if init_dir is not None:
        siglip, sam, llm, m2f, tok = _load_parts(cfg, init_dir, dtype)
    else:
        with ctx:
            siglip, sam, llm, m2f, tok = _random_parts(cfg)
    sam.vision_encoder.neck = nn.Identity()  # X-SAM reads SAM's hidden states; the 256-ch neck is unused
    tok, ids = _special_tokens(cfg, llm, tok, ctx, meta)
    d_llm, d_dec, depth = cfg.llm.hidden_size, m2f.hidden_dim, cfg.projector.depth
    with ctx:
        connector, decoder = _decoder_and_connector(cfg, m2f)
        r = cfg.region
        model = XSam(
            config=cfg,
            vision_encoder=siglip,
            sam_encoder=sam,
            llm=llm,
            visual_projector=MLPProjector(in_dim=cfg.siglip.hidden_size, out_dim=d_llm, depth=depth),
            seg_projector=SegProjector(
                in_dim=cfg.sam.hidden_size, out_dim=d_llm, ratio=cfg.projector.seg_downsample, depth=depth
            ),
            llm_projector=MLPProjector(in_dim=d_llm, out_dim=d_dec, depth=depth),
            seg_connector=connector,
            mask_decoder=decoder,
            region_sampler=RegionSampler(num_points=r.num_points, pool=r.pool, num_tokens=r.num_tokens),
            criterion=SegLoss(m2f, num_masks_reduce=cfg.loss.num_masks_reduce),
            special_token_ids=ids,
        )
    apply_checkpointing(model)
    if device is not None:
        model.to(
            device
        )  # also moves the few tensors HF creates with torch.Tensor(), which ignore the context
    if dtype is not None:
        model.to(dtype)
    if tok is not None:
        model.processor = XSamProcessor(cfg.processor, tok, cfg.special_tokens)
    return model


def build_processor(
    flavor_or_config: str | XSamConfig = "debug", init_dir: str | Path | None = None
) -> XSamProcessor:
    """The processor alone (for DataLoader workers): tokenizer from ``init_dir``'s LLM folder, or the debug
    BPE."""
    cfg = resolve_config(flavor_or_config)
    if init_dir is not None:
        tok = load_tokenizer(Path(init_dir) / cfg.llm.folder)
    elif cfg.name == "debug":
        tok = build_debug_tokenizer()
    else:
        raise ValueError(f"flavor {cfg.name!r} needs init_dir for its tokenizer ({cfg.llm.folder})")
    return XSamProcessor(cfg.processor, prepare_tokenizer(tok, cfg.special_tokens), cfg.special_tokens)
