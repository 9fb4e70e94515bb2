"""Typed configs of the X-SAM model, one dataclass per component, plus :class:`XSamConfig`.

Defaults are the full ``xsam-phi3`` sizes of the paper recipe (reference/xsam_recipe.md §5); the ``debug``
flavor in :mod:`xsam_model.flavors` edits a copy. Every relationship between fields that would otherwise fail
deep inside a forward pass is checked in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
    attn_implementation: str = "sdpa"
    """``eager`` | ``sdpa`` | ``flash_attention_2`` (GPU only)."""
    gradient_checkpointing: bool = False
    """Recomputes each decoder layer in backward (X-SAM turns it on in stages 2 and 3)."""

    def __post_init__(self):
        _check_positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"
        )
        _check_heads(self, "hidden_size", "num_heads")
        _check_heads(self, "num_heads", "num_kv_heads")


@dataclass(kw_only=True)
class ProjectorConfig:
    """The visual projector (SigLIP → LLM), seg projector (SAM → LLM) and LLM projector (LLM → decoder)."""

    depth: int = 2
    """Linear layers per MLP (2 = Linear → GELU → Linear)."""
    seg_downsample: float = 0.5
    """Pixel-shuffle ratio before the seg projector: 64×64×1024 → 32×32×4096 (1024 LLM tokens)."""

    def __post_init__(self):
        _check_positive(self, "depth")
        if self.seg_downsample not in (0.5, 0.25, 1.0):
            raise ValueError(f"seg_downsample must be 1, 0.5 or 0.25, got {self.seg_downsample}")


@dataclass(kw_only=True)
class ConnectorConfig:
    """The segmentation connector: SAM layers → a 3-level conv pyramid at strides ½·p, p, 2·p (p = patch)."""

    hidden_dim: int = 512
    scale_factors: tuple[float, ...] = (2.0, 1.0, 0.5)
    """Per level: > 1 upsamples (pixel shuffle), < 1 downsamples; channels become sam_hidden / scale."""

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
    logit_clamp: float = 50.0
    seg_reduce: str = "last"
    """How a sample with several ``<SEG>`` (refseg/reaseg) conditions the queries: ``last`` (X-SAM) or ``mean``."""

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
        if self.seg_reduce not in ("last", "mean"):
            raise ValueError(f"seg_reduce must be 'last' or 'mean', got {self.seg_reduce!r}")


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

    def __post_init__(self):
        _check_positive(self, "train_num_points", "oversample_ratio")
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
    """Turns each ``<region>`` prompt mask into tokens: ``num_points`` points pooled by ``pool``."""

    num_points: int = 256
    pool: int = 4

    def __post_init__(self):
        _check_positive(self, "num_points", "pool")
        if self.num_points % self.pool:
            raise ValueError(f"num_points {self.num_points} not divisible by pool {self.pool}")

    @property
    def num_tokens(self) -> int:
        return self.num_points // self.pool


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

    def __post_init__(self):
        _check_positive(self, "siglip_size", "sam_size")
        self.category_ids = tuple(self.category_ids)
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError("max_length must be positive or None")
        if self.image_token_index >= 0 or self.region_token_index >= 0:
            raise ValueError("placeholder indices must be negative (they are never vocabulary ids)")


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
    """Added to the tokenizer (special) and to the LLM embeddings; ``<image>``/``<region>`` are placeholders."""

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
        return asdict(self)
