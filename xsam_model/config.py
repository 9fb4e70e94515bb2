"""Typed configs of the X-SAM model, one dataclass per component, plus :class:`XSamConfig`.

Defaults are the full ``xsam-phi3`` sizes and the paper's behaviour: X-SAM's ``AAAI26_Archive`` branch
(reference/xsam_fidelity.md Part 1). Where X-SAM's later ``main`` branch differs, its behaviour is a named
value of a field, documented on that field, and :func:`main_branch` sets all of them at once (the
``xsam-phi3-main`` flavor). The ``debug`` flavor in :mod:`xsam_model.flavors` edits a copy. Every relationship
between fields that would otherwise fail deep inside a forward pass is checked in ``__post_init__``;
:func:`config_dict` turns any resolved config into a plain dict of every field (``--print-config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# COCO panoptic category ids in contiguous order (80 things then 53 stuff): index = stage-1 linear class.
COCO_PANOPTIC_CATEGORY_IDS: tuple[int, ...] = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
    92,
    93,
    95,
    100,
    107,
    109,
    112,
    118,
    119,
    122,
    125,
    128,
    130,
    133,
    138,
    141,
    144,
    145,
    147,
    148,
    149,
    151,
    154,
    155,
    156,
    159,
    161,
    166,
    168,
    171,
    175,
    176,
    177,
    178,
    180,
    181,
    184,
    185,
    186,
    187,
    188,
    189,
    190,
    191,
    192,
    193,
    194,
    195,
    196,
    197,
    198,
    199,
    200,
)


def _check_positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int | float) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be > 0, got {v!r}")


def _check_choice(obj, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {choices}, got {getattr(obj, name)!r}")


ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
SEG_REDUCE = ("per_seg", "main", "last", "mean")


def _check_heads(obj, dim: str, heads: str) -> None:
    if getattr(obj, dim) % getattr(obj, heads):
        raise ValueError(
            f"{type(obj).__name__}.{dim}={getattr(obj, dim)} is not divisible by {heads}={getattr(obj, heads)}"
        )


@dataclass(kw_only=True)
class SiglipEncoderConfig:
    """The SigLIP(2) vision tower (transformers ``SiglipVisionModel``); features for the LLM."""

    folder: str = "siglip2-so400m-patch14-384"
    """Folder name under ``init_dir`` (X-SAM's ``inits/`` layout)."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 384
    """Square input side; tokens = (image_size // patch_size)²  (384/14 → 27² = 729)."""
    patch_size: int = 14
    select_layer: int = -2
    """Index into ``hidden_states`` whose tokens go to the visual projector (recipe: -2)."""
    gradient_checkpointing: bool = False
    """Recompute each SigLIP layer in backward (X-SAM: on in stages 2 and 3; see
    :func:`stage_checkpointing`)."""

    def __post_init__(self):
        _check_positive(
            self, "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size"
        )
        _check_heads(self, "hidden_size", "num_heads")
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"select_layer {self.select_layer} outside the {self.num_layers + 1} hidden states"
            )

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(kw_only=True)
class SamEncoderConfig:
    """The SAM ViT image encoder (transformers ``SamVisionModel``, neck dropped); features for seg and LLM."""

    folder: str = "sam-vit-large"
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    image_size: int = 1024
    """Square (padded) input side; the grid is image_size // patch_size (1024/16 → 64)."""
    patch_size: int = 16
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23)
    select_layer: int = -2
    """Index into ``hidden_states`` feeding the seg projector (recipe: -2)."""
    connector_layers: tuple[int, ...] = (12, 18, 24)
    """Indices into ``hidden_states`` (0 = patch embedding) feeding the segmentation connector."""
    gradient_checkpointing: bool = False
    """Recompute each SAM layer in backward (non-reentrant, as X-SAM in stages 2 and 3). At 1024² the four
    global-attention layers hold GB-sized attention and relative-position tensors for backward, so the stage
    configs turn it on wherever SAM trains (stage 1 too, which X-SAM runs without)."""

    def __post_init__(self):
        _check_positive(self, "hidden_size", "num_layers", "num_heads", "mlp_dim", "image_size", "patch_size")
        _check_heads(self, "hidden_size", "num_heads")
        self.global_attn_indexes = tuple(self.global_attn_indexes)
        self.connector_layers = tuple(self.connector_layers)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SAM image_size {self.image_size} not a multiple of patch_size {self.patch_size}"
            )
        if self.grid % 2:
            raise ValueError(f"SAM grid {self.grid} must be even (pixel shuffle 0.5 and stride-2x pyramid)")
        if len(self.connector_layers) != 3 or not all(
            0 < i <= self.num_layers for i in self.connector_layers
        ):
            raise ValueError(
                f"connector_layers {self.connector_layers} must be 3 indices in 1..{self.num_layers}"
            )
        if any(i >= self.num_layers for i in self.global_attn_indexes):
            raise ValueError(
                f"global_attn_indexes {self.global_attn_indexes} exceed num_layers {self.num_layers}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(kw_only=True)
class LLMConfig:
    """The causal LM (transformers ``Phi3ForCausalLM``) and its tokenizer, which live in the same folder."""

    folder: str = "Phi-3-mini-4k-instruct"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attn_implementation: str = "auto"
    """``auto`` | ``eager`` | ``sdpa`` | ``flash_attention_2``. ``auto`` (default) resolves at build time to
    ``flash_attention_2`` (X-SAM's kernel) when the ``flash_attn`` package is installed and the model is built
    for CUDA (``device`` cuda, or no device and CUDA available), else ``sdpa``; the resolved value is written
    back. Both honour Phi-3's sliding window, so the choice changes speed, not results."""
    gradient_checkpointing: bool = False
    """Recomputes each decoder layer in backward (X-SAM turns it on in stages 2 and 3)."""
    tokenizer_size: int | None = 32011
    """``len(tokenizer)`` of the LLM folder's tokenizer before the special tokens (Phi-3-mini: 32011). Builds
    without a tokenizer (meta, random) size the embeddings to ``tokenizer_size + len(special_tokens)``
    (32014), exactly as the tokenizer path's ``resize_token_embeddings(len(tok))`` does; None appends the
    special rows to ``vocab_size`` instead (32067, the old meta size)."""

    def __post_init__(self):
        _check_positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"
        )
        _check_heads(self, "hidden_size", "num_heads")
        _check_heads(self, "num_heads", "num_kv_heads")
        _check_choice(self, "attn_implementation", ATTN_IMPLEMENTATIONS)
        if self.tokenizer_size is not None and not 0 < self.tokenizer_size <= self.vocab_size:
            raise ValueError(
                f"LLMConfig.tokenizer_size {self.tokenizer_size} must be in 1..vocab_size ({self.vocab_size})"
            )


@dataclass(kw_only=True)
class ProjectorConfig:
    """The visual projector (SigLIP → LLM), seg projector (SAM → LLM) and LLM projector (LLM → decoder)."""

    depth: int = 2
    """Linear layers per MLP (2 = Linear → GELU → Linear)."""
    seg_downsample: float = 0.5
    """Pixel-shuffle ratio before the seg projector: 64×64×1024 → 32×32×4096 (1024 LLM tokens)."""
    gradient_checkpointing: bool = False
    """Recompute the visual, seg and LLM projectors in backward (X-SAM: on in stages 2 and 3)."""

    def __post_init__(self):
        _check_positive(self, "depth")
        if self.seg_downsample not in (0.5, 0.25, 1.0):
            raise ValueError(f"seg_downsample must be 1, 0.5 or 0.25, got {self.seg_downsample}")


@dataclass(kw_only=True)
class ConnectorConfig:
    """The segmentation connector: SAM layers → a 3-level conv pyramid at strides ½·p, p, 2·p (p = patch)."""

    hidden_dim: int = 512
    scale_factors: tuple[float, ...] = (2.0, 1.0, 0.5)
    """Per level: > 1 upsamples, < 1 downsamples, with X-SAM's (InternVL) pixel shuffle, so the convs' weights
    map 1:1 onto X-SAM's ``seg_connector``; channels become sam_hidden / scale."""
    gradient_checkpointing: bool = False
    """Recompute each connector level in backward (X-SAM: on in stages 2 and 3)."""

    def __post_init__(self):
        _check_positive(self, "hidden_dim")
        self.scale_factors = tuple(float(s) for s in self.scale_factors)
        if (
            self.scale_factors != tuple(sorted(self.scale_factors, reverse=True))
            or len(self.scale_factors) != 3
        ):
            raise ValueError(f"scale_factors {self.scale_factors} must be 3 values, high resolution first")


@dataclass(kw_only=True)
class DecoderConfig:
    """The Mask2Former pixel decoder + masked-attention transformer decoder and the two class heads."""

    folder: str = "mask2former-swin-large-coco-panoptic"
    """Only its ``config.json`` is read (sizes); the decoder is re-initialised, as in X-SAM."""
    hidden_dim: int = 256
    num_queries: int = 200
    decoder_layers: int = 10
    encoder_layers: int = 6
    num_heads: int = 8
    dim_feedforward: int = 2048
    encoder_feedforward_dim: int = 1024
    feature_size: int = 256
    """Pixel-decoder width (GroupNorm(32) inside, so a multiple of 32)."""
    mask_feature_size: int = 256
    num_linear_classes: int = 133
    """Stage-1 linear head classes (COCO panoptic); one no-object logit is added."""
    logit_scale_init: float = 2.659260036932778
    """Phrase-head temperature, log(1/0.07)."""
    logit_clamp: float = 500.0
    """Phrase logits are clamped to ±this: 500 (paper); ``main`` clamps at 50, which bites once
    exp(scale) > 50. Padding phrase columns are masked with -1e9 in both (main: -1e6; either is zero
    probability)."""
    bg_init_std: float = 1.0
    """Std of the background ("no-object") phrase embedding's normal init: 1.0 = X-SAM's ``nn.Embedding``
    default (both branches); 0.02 was this project's earlier choice."""
    seg_reduce: str = "per_seg"
    """How a batch of a task in ``seg_reduce_tasks`` (several ``<SEG>``, one per phrase) is decoded:

    - ``per_seg`` (paper): the pixel decoder runs once per image; the transformer decoder runs once per
      ``<SEG>`` (one batched call) with that ``<SEG>`` added to the queries and one target, the masks of its
      phrase; classes are the concatenated phrases of the whole per-rank batch plus the background, labels
      offset by the cumulative phrase counts (the other samples' phrases are negatives).
    - ``main`` (X-SAM ``main``, ``use_repeat_cond=False``): one decoder run per image conditioned on the
      sample's last ``<SEG>``, all its masks as targets, classes over the batch's concatenated phrases (main
      picks ``seg_embeds[cond_len - 1]`` of the flattened batch, another sample's ``<SEG>`` for b > 0; that
      indexing bug is not reproduced).
    - ``last`` / ``mean`` (this project before): one run per image conditioned on the last ``<SEG>`` / the
      mean of its ``<SEG>`` embeddings, classes over the sample's own phrases only.
    """
    seg_reduce_tasks: tuple[str, ...] = ("refseg", "reaseg")
    """Tasks decoded with ``seg_reduce``; every other task has one ``<SEG>`` per sample and runs one decoder
    pass per image over its own (padded) phrases, as in both X-SAM branches."""
    init: str = "xsam"
    """Initialisation of the re-initialised pixel and transformer decoders: ``xsam`` (X-SAM's
    ``XSegmentor._init_weights`` applied module by module: xavier on the pixel decoder and the
    masked-attention layers, N(0, 0.02) on embeddings and linears, level embeddings 0; and the connector's
    convs N(0, 0.02), as X-SAM's ``ConnectorModel``) or ``transformers`` (transformers'
    ``Mask2FormerPreTrainedModel._init_weights`` and PyTorch's default connector init, this project's earlier
    choice)."""
    gradient_checkpointing: bool = False
    """Recompute each deformable-encoder and masked-attention layer in backward (X-SAM checkpoints its whole
    segmentor, decoder included, in stages 2 and 3)."""

    def __post_init__(self):
        _check_positive(
            self,
            "hidden_dim",
            "num_queries",
            "decoder_layers",
            "encoder_layers",
            "num_heads",
            "dim_feedforward",
            "feature_size",
            "mask_feature_size",
            "num_linear_classes",
        )
        _check_heads(self, "hidden_dim", "num_heads")
        if self.feature_size % 32:
            raise ValueError(f"feature_size {self.feature_size} must be a multiple of 32 (GroupNorm(32))")
        _check_choice(self, "seg_reduce", SEG_REDUCE)
        _check_choice(self, "init", ("xsam", "transformers"))
        self.seg_reduce_tasks = tuple(self.seg_reduce_tasks)
        if not self.logit_clamp > 0 or self.bg_init_std < 0:
            raise ValueError("DecoderConfig needs logit_clamp > 0 and bg_init_std >= 0")


@dataclass(kw_only=True)
class LossConfig:
    """Loss weights (Mask2Former defaults, recipe §5)."""

    lm_weight: float = 1.0
    seg_weight: float = 1.0
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    use_auxiliary_loss: bool = True
    ignore_pixels: str = "background"
    """Pixels in a sample's ``ignore_mask`` (LISA "ignore" shapes, COCO/VGD crowd regions): ``background``
    (paper: they are plain background in the target, the mask is unused) or ``exclude`` (no BCE/Dice there;
    this project's earlier choice)."""
    num_masks_reduce: str = "global_batch"
    """Normaliser of the mask losses: ``global_batch`` (the target-mask count of the whole global batch /
    (world size × accumulation), at least 1, counted by the trainer before the step's first forward: X-SAM's
    ``global`` at the paper's layout, accumulation 1, and the same whatever split of the global batch runs it
    — a resume on another world size computes the same losses), ``global`` (paper, Mask2Former/DETR: the count
    summed over the data-parallel ranks of one micro-step / world size; every rank must compute the
    segmentation loss in the same steps, which the loader's one-task-per-step batches guarantee) or ``local``
    (this rank's count)."""

    def __post_init__(self):
        _check_positive(self, "train_num_points", "oversample_ratio")
        _check_choice(self, "ignore_pixels", ("background", "exclude"))
        _check_choice(self, "num_masks_reduce", ("global_batch", "global", "local"))
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio {self.importance_sample_ratio} outside [0, 1]")
        for n in (
            "lm_weight",
            "seg_weight",
            "class_weight",
            "mask_weight",
            "dice_weight",
            "no_object_weight",
        ):
            if getattr(self, n) < 0:
                raise ValueError(f"LossConfig.{n} must be >= 0")


@dataclass(kw_only=True)
class RegionSamplerConfig:
    """Turns each ``<region>`` prompt mask into ``num_tokens`` LLM tokens: ``num_points`` points sampled in
    the mask (without replacement when it has that many pixels), read from the seg-projector grid, then
    pooled.

    Paper: ``pool="max", num_tokens=1`` (X-SAM's naive sampler, ``AdaptiveMaxPool1d(1)``). ``main``:
    ``pool="mean", num_tokens=64`` (mean over groups of 4 consecutive points), which adds 63 tokens per
    region.
    """

    num_points: int = 256
    pool: str = "max"
    """``max`` (adaptive max pooling to ``num_tokens``) or ``mean`` (means of ``num_points / num_tokens``
    consecutive points)."""
    num_tokens: int = 1

    def __post_init__(self):
        _check_positive(self, "num_points", "num_tokens")
        _check_choice(self, "pool", ("max", "mean"))
        if self.num_points % self.num_tokens:
            raise ValueError(f"num_points {self.num_points} not divisible by num_tokens {self.num_tokens}")


@dataclass(kw_only=True)
class ProcessorConfig:
    """Sample → tensors. The image sizes must agree with the encoders (checked in :class:`XSamConfig`)."""

    siglip_size: int = 384
    sam_size: int = 1024
    siglip_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    siglip_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    sam_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    sam_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_length: int | None = 2319
    """Hard cut on text tokens: 4096 − 729 − 1024 − 1 − 1023 (X-SAM's Phi-3 figure); None = no cut."""
    image_token_index: int = -200
    region_token_index: int = -300
    category_ids: tuple[int, ...] = COCO_PANOPTIC_CATEGORY_IDS
    """Dataset category ids in the order of the stage-1 linear head."""
    sam_scale_jitter: tuple[float, float] | None = None
    """Large-scale jitter of the SAM image and its masks: scale ~ U(lo, hi), fit into (L·scale)², centre crop
    to L, pad (X-SAM stage 1: (0.1, 2.0), see :func:`stage_processor`); None = longest side L."""
    siglip_pad_square: bool = False
    """Centre the image on a square of the SigLIP mean colour before the SigLIP resize (X-SAM stage 2)."""
    vgd_cross_image: bool = True
    """vgdseg train batches: each ``<region>`` slot's prompt is drawn among all instances of its category in
    the micro-batch, any image (X-SAM, both branches); False = the sample's stored same-image prompt."""
    vgd_negatives: bool = True
    """vgdseg train batches: X-SAM archive's negatives (p=0.5, ``randint(0, 5)`` absent categories, prompts
    from other images, no target); False = none (X-SAM ``main``)."""

    def __post_init__(self):
        _check_positive(self, "siglip_size", "sam_size")
        self.category_ids = tuple(self.category_ids)
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError("max_length must be positive or None")
        if self.image_token_index >= 0 or self.region_token_index >= 0:
            raise ValueError("placeholder indices must be negative (they are never vocabulary ids)")
        if self.sam_scale_jitter is not None:
            lo, hi = self.sam_scale_jitter
            if not 0 < lo <= hi:
                raise ValueError(
                    f"sam_scale_jitter must be (lo, hi) with 0 < lo <= hi, got {self.sam_scale_jitter!r}"
                )
            self.sam_scale_jitter = (float(lo), float(hi))


@dataclass(kw_only=True)
class XSamConfig:
    """The whole model. Sub-configs are independent; cross-component checks live here."""

    name: str = "xsam-phi3"
    siglip: SiglipEncoderConfig = field(default_factory=SiglipEncoderConfig)
    sam: SamEncoderConfig = field(default_factory=SamEncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    region: RegionSamplerConfig = field(default_factory=RegionSamplerConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    special_tokens: tuple[str, ...] = ("<SEG>", "<p>", "</p>")
    """Added to the tokenizer (special) and to the LLM embeddings; ``<image>``/``<region>`` are
    placeholders."""

    def __post_init__(self):
        if self.processor.siglip_size != self.siglip.image_size:
            raise ValueError(
                f"processor.siglip_size {self.processor.siglip_size} != siglip.image_size {self.siglip.image_size}"
            )
        if self.processor.sam_size != self.sam.image_size:
            raise ValueError(
                f"processor.sam_size {self.processor.sam_size} != sam.image_size {self.sam.image_size}"
            )
        shuffled = self.sam.grid * self.projector.seg_downsample
        if shuffled != int(shuffled):
            raise ValueError(
                f"SAM grid {self.sam.grid} × seg_downsample {self.projector.seg_downsample} is not whole"
            )
        self.special_tokens = tuple(self.special_tokens)
        if self.special_tokens[:1] != ("<SEG>",):
            raise ValueError("special_tokens must start with '<SEG>'")

    @property
    def feature_strides(self) -> tuple[int, int, int]:
        """Strides of the connector's pyramid in SAM-input pixels (8, 16, 32 for ViT-L/16)."""
        p = self.sam.patch_size
        return tuple(int(round(p / s)) for s in self.connector.scale_factors)  # type: ignore[return-value]

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens one ``<image>`` expands to: SigLIP tokens + pixel-shuffled SAM tokens (729 + 1024)."""
        return self.siglip.num_tokens + int(self.sam.grid * self.projector.seg_downsample) ** 2

    def to_dict(self) -> dict:
        """Every field, nested, as plain Python values (see :func:`config_dict`)."""
        return config_dict(self)


def config_dict(obj: Any) -> Any:
    """A config (any dataclass, nested) as plain Python values: dicts of every field, tuples as lists. For
    ``--print-config`` and run records; :func:`json.dumps` takes the result as is."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [config_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): config_dict(v) for k, v in obj.items()}
    return obj


# The sub-configs with a ``gradient_checkpointing`` switch, by the names used in stage recipes.
CHECKPOINT_PARTS: dict[str, str] = {
    "siglip": "siglip",
    "sam": "sam",
    "llm": "llm",
    "projectors": "projector",
    "connector": "connector",
    "decoder": "decoder",
}


def with_checkpointing(cfg: XSamConfig, parts: tuple[str, ...] | list[str]) -> XSamConfig:
    """A copy of ``cfg`` with activation checkpointing on for exactly ``parts`` (keys of
    :data:`CHECKPOINT_PARTS`) and off for the others."""
    unknown = sorted(set(parts) - set(CHECKPOINT_PARTS))
    if unknown:
        raise ValueError(f"unknown checkpointing parts {unknown}; known: {sorted(CHECKPOINT_PARTS)}")
    out = dataclasses.replace(cfg)
    for part, attr in CHECKPOINT_PARTS.items():
        setattr(out, attr, dataclasses.replace(getattr(cfg, attr), gradient_checkpointing=part in parts))
    return out


def stage_checkpointing(stage: int) -> tuple[str, ...]:
    """Parts to checkpoint in ``stage``: stages 2 and 3 everything, as X-SAM (``use_activation_checkpointing``
    on: LLM, SigLIP, SAM, projectors, connector and the Mask2Former layers); stage 1 the SAM encoder only,
    which X-SAM does not do (its 16 GPUs have room) but which bounds SAM's 1024² global-attention memory."""
    if stage == 1:
        return ("sam",)
    if stage in (2, 3):
        return tuple(CHECKPOINT_PARTS)
    raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")


def stage_processor(cfg: ProcessorConfig, stage: int) -> ProcessorConfig:
    """``cfg`` with the stage transforms of X-SAM's paper configs: stage 1 large-scale jitter (0.1, 2.0) of
    the SAM image and masks, stage 2 the SigLIP image padded to a square, stage 3 neither."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    jitter = (0.1, 2.0) if stage == 1 else None
    return dataclasses.replace(cfg, sam_scale_jitter=jitter, siglip_pad_square=stage == 2)


def eval_processor(cfg: ProcessorConfig) -> ProcessorConfig:
    """``cfg`` (the stage's processor) as X-SAM's stage-3 ``val_datasets`` pre-process an evaluation image:
    the SigLIP image padded to a square of its mean colour (``pad_image_to_square=True`` in every val set of
    the paper config), the SAM image resized to longest side L without jitter, the same normalisation; no
    text cut (``max_length`` None: a long vocabulary prompt reaches the LLM whole; X-SAM's 2319 cut never
    binds on its eval prompts)."""
    return dataclasses.replace(cfg, sam_scale_jitter=None, siglip_pad_square=True, max_length=None)


def main_branch(cfg: XSamConfig) -> XSamConfig:
    """A copy of ``cfg`` with every model choice where X-SAM's ``main`` differs from the paper set to main's:
    ``main`` decoding of refseg/reaseg, 64 mean-pooled region tokens, phrase logits clamped at ±50, no VGD
    negatives. (Its stage-1 cosine schedule is :class:`xsam_model.schedule.ScheduleConfig`
    ``kind="cosine"``.)"""
    out = dataclasses.replace(cfg, name=f"{cfg.name}-main")
    out.decoder = dataclasses.replace(cfg.decoder, seg_reduce="main", logit_clamp=50.0)
    out.region = dataclasses.replace(cfg.region, pool="mean", num_tokens=cfg.region.num_points // 4)
    out.processor = dataclasses.replace(cfg.processor, vgd_negatives=False)
    return out
