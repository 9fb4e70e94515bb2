"""What a build is asked to do: :class:`BuildOptions`, the per-source :class:`SourceOptions` and the build
presets.

Read by the build driver and by every source (a source's :class:`~pipelines.sources.base.ConvertContext`
carries the build's options), so it lives in the core. How a build treats bad data is
:class:`pipelines.errors.ErrorPolicy`, which :attr:`BuildOptions.policy` makes. Options are validated when
they are made: a bad value is a :class:`~pipelines.errors.BuildConfigError` naming the option, before anything
is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pipelines.errors import BuildConfigError, ErrorPolicy

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "PRESETS",
    "BuildOptions",
    "SourceOptions",
    "manifest_preset",
    "parse_bool",
    "parse_choice",
    "parse_int",
]

DEFAULT_MAX_IMAGE_PIXELS = (
    100_000_000  # a 10k x 10k image; anything larger is treated as a decompression bomb
)
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
"""An image file larger than this (256 MiB) is skipped (``image_file_too_large``) from its size alone,
before it is read: an image within the pixel limit is far smaller in any real encoding, while a file padded
to gigabytes would be read whole into a worker and copied into a shard. ``--max-image-bytes`` raises it."""

# ---------------------------------------------------------------------------------------------- option
# parsing
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_NONE = frozenset({"none", "null"})


def parse_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: a bool, 0/1, or one of true/false/yes/no/on/off/1/0 (any case); else an error
    naming the option (``bool("False")`` is True, so strings are never passed to ``bool``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BuildConfigError(f"option {name}: {value!r} is not a boolean (true or false)")


def parse_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (an int, or a string of one); else an error naming the option."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise BuildConfigError(f"option {name}: {value!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BuildConfigError(f"option {name}: {value!r} is not an integer")
    if value < minimum:
        raise BuildConfigError(f"option {name}: {value} is below its minimum {minimum}")
    return value


def parse_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (any case, surrounding spaces ignored); else an error naming the
    option and the valid values."""
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise BuildConfigError(f"option {name}: {value!r} is not one of {list(choices)}")


@dataclass(frozen=True)
class SourceOptions:
    """Options that one source family reads (CLI ``--option KEY=VALUE``, or ``BuildOptions(extra={...})``).

    Defaults are the paper recipe's; each option names the source family that reads it. Values are checked
    when the object is made, so a typo or a bad value fails the build before anything is read.
    """

    refseg_chunk: int | None = None
    """refcoco/+/g/grefcoco train: split an image's objects into samples of at most N objects (None: one
    sample per image, the recipe)."""
    gcg_force_period: bool = False
    """GCG sources: end every caption with '.', as X-SAM main does (the archive code adds none)."""
    gcg_min_words: int = 3
    """GCG sources: captions with fewer words are skipped (GLaMM's rule)."""
    gcg_min_words_sources: str = "flickr"
    """Which GCG sources apply ``gcg_min_words``: ``flickr`` (the paper: X-SAM checks Flickr only) or
    ``all`` (this project's earlier behaviour)."""
    lvis_max_phrases: int = 100
    """lvis: at most this many positive categories per sample; an image with more becomes several."""
    llava_keep_text_only: bool = True
    """llava_*: keep text-only records (image None), as the paper's stage 3 trains them (the processor gives
    them zero encoder inputs and no image token); ``false`` skips them as ``text_only`` (X-SAM main's
    ``exclude_pure_text``)."""
    coco_category_names: str = "paper"
    """coco_panoptic/coco_instance phrases: ``paper`` (the archive's ``tag_categories``: '-other' dropped, so
    'wall', 'sky') or ``main`` (X-SAM main's cleaning: 'wall other', 'sky other')."""
    ade20k_category_names: str = "xsam"
    """ade20k_panoptic/_semantic phrases: ``xsam`` (the Mask2Former synonym lists X-SAM's evaluation prompts
    with, e.g. 'road, route') or ``lisa`` (LISA's single names, this project's earlier behaviour)."""
    refseg_combinations: str = "covering"
    """refcoco/+/g/grefcoco train: which sentence of each object each sample uses: ``covering`` (every
    sentence at least once, :func:`pipelines.sources.refer.combinations`) or ``archive`` (X-SAM's
    ``islice(product(...), sum n)``, the ``paper`` preset)."""
    lisa_unexplained: str = "keep"
    """lisa_reasonseg train: an image with no explanation entry while the explanatory file has some: ``keep``
    (plain answers) or ``skip`` (reason ``no_explanation``; X-SAM's archive loses them to a KeyError, the
    ``paper`` preset)."""

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _PARSERS[f.name](f.name, getattr(self, f.name)))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SourceOptions:
        """Options from ``{name: value}`` (values may be strings, as on the command line)."""
        known = cls.names()
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise BuildConfigError(f"unknown source option(s) {unknown}; valid: {known}")
        return cls(**values)

    @classmethod
    def from_args(cls, items: list[str]) -> SourceOptions:
        """Options from ``KEY=VALUE`` strings (the CLI's repeated ``--option``)."""
        values = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise BuildConfigError(f"--option {item!r}: expected KEY=VALUE")
            values[key.strip()] = value
        return cls.from_mapping(values)

    def to_dict(self) -> dict:
        """The options that differ from their defaults, sorted (what the manifest's ``options.extra`` holds:
        default options give ``{}``)."""
        default = SourceOptions()
        return {
            f.name: getattr(self, f.name)
            for f in sorted(fields(self), key=lambda f: f.name)
            if getattr(self, f.name) != getattr(default, f.name)
        }


# field -> its parser (the annotations above say the type; these do the checking)
_PARSERS = {
    "refseg_chunk": lambda n, v: None if v is None or _is_none(v) else parse_int(n, v, 1),
    "gcg_force_period": parse_bool,
    "gcg_min_words": lambda n, v: parse_int(n, v, 0),
    "gcg_min_words_sources": lambda n, v: parse_choice(n, v, ("flickr", "all")),
    "lvis_max_phrases": lambda n, v: parse_int(n, v, 1),
    "llava_keep_text_only": parse_bool,
    "coco_category_names": lambda n, v: parse_choice(n, v, ("paper", "main")),
    "ade20k_category_names": lambda n, v: parse_choice(n, v, ("xsam", "lisa")),
    "refseg_combinations": lambda n, v: parse_choice(n, v, ("covering", "archive")),
    "lisa_unexplained": lambda n, v: parse_choice(n, v, ("keep", "skip")),
}

# Build presets: ``default`` = this project's deliberate data choices (the eval-image guard, covering refseg
# sentence combinations, LISA images without an explanation kept); ``paper`` = X-SAM's archive data exactly
# (docs/fidelity.md#build-presets-default-and-paper). A preset sets the options below and wins over them.
PRESETS = ("default", "paper")
_PAPER_SOURCE_OPTIONS = {"refseg_combinations": "archive", "lisa_unexplained": "skip"}


def _is_none(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() in _NONE


@dataclass(frozen=True)
class BuildOptions:
    """Options that change what a build writes (all are in the manifest and, but ``strict``, the resume
    fingerprint). ``extra`` may be given as a mapping; it is parsed into :class:`SourceOptions`."""

    seed: int = 0
    samples_per_shard: int = 1000
    strict: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_token: str = "<image>\n"  # paper (AAAI26_Archive) default; X-SAM main uses "<image>"
    genseg_num_class: int | None = None  # None: every category in the prompt (paper); 128: X-SAM main
    keep_eval_images: bool = False
    extra: SourceOptions = field(default_factory=SourceOptions)  # source-specific options
    preset: str = "default"  # one of PRESETS; ``paper`` keeps eval images and sets _PAPER_SOURCE_OPTIONS

    def __post_init__(self):
        if isinstance(self.extra, Mapping):
            object.__setattr__(self, "extra", SourceOptions.from_mapping(self.extra))
        elif not isinstance(self.extra, SourceOptions):
            raise BuildConfigError(
                f"extra: expected SourceOptions or a mapping, got {type(self.extra).__name__}"
            )
        object.__setattr__(self, "preset", parse_choice("preset", self.preset, PRESETS))
        if self.preset == "paper":
            object.__setattr__(self, "keep_eval_images", True)
            object.__setattr__(self, "extra", replace(self.extra, **_PAPER_SOURCE_OPTIONS))
        for name in ("strict", "keep_eval_images"):  # "False" must not be true
            object.__setattr__(self, name, parse_bool(name, getattr(self, name)))
        parse_int("samples_per_shard", self.samples_per_shard, 1)
        parse_int("max_image_pixels", self.max_image_pixels, 1)
        parse_int("max_image_bytes", self.max_image_bytes, 1)
        if self.genseg_num_class is not None:
            parse_int("genseg_num_class", self.genseg_num_class, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BuildConfigError(f"option seed: {self.seed!r} is not an integer")

    @property
    def policy(self) -> ErrorPolicy:
        """How this build treats a skip (see :class:`~pipelines.errors.ErrorPolicy`)."""
        return ErrorPolicy(strict=self.strict)

    def to_dict(self) -> dict:
        # max_image_bytes only when set: builds with the default keep their fingerprint (and shards)
        size = (
            {}
            if self.max_image_bytes == DEFAULT_MAX_IMAGE_BYTES
            else {"max_image_bytes": self.max_image_bytes}
        )
        return {
            "seed": self.seed,
            "samples_per_shard": self.samples_per_shard,
            "strict": self.strict,
            "max_image_pixels": self.max_image_pixels,
            **size,
            "image_token": self.image_token,
            "genseg_num_class": self.genseg_num_class,
            "keep_eval_images": self.keep_eval_images,
            "extra": self.extra.to_dict(),
            # only when not the default: default manifests and resume fingerprints stay as they were, and a
            # manifest without it (older ones too) reads as the default preset (manifest_preset)
            **({"preset": self.preset} if self.preset != "default" else {}),
        }


def manifest_preset(manifest: Mapping[str, Any]) -> str:
    """The build preset a split's ``manifest.json`` (a dict) was built with; ``default`` when it names
    none."""
    return str((manifest.get("options") or {}).get("preset", "default"))
