"""Build options and the error policy: typed, validated source options; one policy deciding what a skip
does."""

from __future__ import annotations

import pytest

from pipelines.build_options import BuildOptions, SourceOptions, parse_bool
from pipelines.errors import BuildConfigError, ErrorPolicy, LoaderError, Skip, StrictModeError

# BuildOptions().to_dict() at d76ba1d, written out: it feeds every manifest and resume fingerprint, so the
# default options must keep giving exactly this (or every existing build would rebuild).
D76BA1D_DEFAULT_OPTIONS = {
    "seed": 0,
    "samples_per_shard": 1000,
    "strict": False,
    "max_image_pixels": 100_000_000,
    "image_token": "<image>\n",
    "genseg_num_class": None,
    "keep_eval_images": False,
    "extra": {},
}


def test_default_options_serialise_as_before():
    assert BuildOptions().to_dict() == D76BA1D_DEFAULT_OPTIONS
    assert list(BuildOptions().to_dict()) == list(D76BA1D_DEFAULT_OPTIONS)


def test_set_source_options_serialise_like_the_old_extra_dict():
    """Only options that differ from their defaults, sorted, as the free dict held them."""
    options = BuildOptions(extra={"refseg_chunk": 8, "gcg_force_period": True})
    assert options.to_dict()["extra"] == {"gcg_force_period": True, "refseg_chunk": 8}
    assert list(options.to_dict()["extra"]) == ["gcg_force_period", "refseg_chunk"]
    assert BuildOptions(extra={"gcg_min_words": 3}).to_dict()["extra"] == {}  # the default, said explicitly


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
    ],
)
def test_booleans_parse_strictly(text, value):
    assert SourceOptions.from_args([f"gcg_force_period={text}"]).gcg_force_period is value
    assert SourceOptions.from_mapping({"llava_keep_text_only": text}).llava_keep_text_only is value


@pytest.mark.parametrize("bad", ["maybe", "", "2", 2, 0.5, None])
def test_a_non_boolean_is_an_error_naming_the_option(bad):
    with pytest.raises(BuildConfigError, match=r"option gcg_force_period: .* is not a boolean"):
        SourceOptions(gcg_force_period=bad)
    with pytest.raises(BuildConfigError, match="option llava_keep_text_only"):
        parse_bool("llava_keep_text_only", bad)


def test_integers_parse_and_are_range_checked():
    o = SourceOptions.from_args(["refseg_chunk=8", "gcg_min_words=0", "lvis_max_phrases=50"])
    assert (o.refseg_chunk, o.gcg_min_words, o.lvis_max_phrases) == (8, 0, 50)
    assert SourceOptions.from_args(["refseg_chunk=none"]).refseg_chunk is None
    with pytest.raises(BuildConfigError, match=r"option refseg_chunk: 'eight' is not an integer"):
        SourceOptions.from_args(["refseg_chunk=eight"])
    with pytest.raises(BuildConfigError, match=r"option refseg_chunk: 0 is below its minimum 1"):
        SourceOptions(refseg_chunk=0)
    with pytest.raises(BuildConfigError, match=r"option lvis_max_phrases: True is not an integer"):
        SourceOptions(lvis_max_phrases=True)
    with pytest.raises(BuildConfigError, match=r"option gcg_min_words: 2.5 is not an integer"):
        BuildOptions(extra={"gcg_min_words": 2.5})


def test_an_unknown_option_is_an_error_naming_the_valid_ones():
    with pytest.raises(BuildConfigError) as e:
        BuildOptions(extra={"lvis_max_phrase": 3})
    msg = str(e.value)
    assert "lvis_max_phrase" in msg and all(name in msg for name in SourceOptions.names())
    with pytest.raises(BuildConfigError, match=r"--option 'refseg_chunk': expected KEY=VALUE"):
        SourceOptions.from_args(["refseg_chunk"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples_per_shard": 0}, "samples_per_shard: 0 is below its minimum 1"),
        ({"max_image_pixels": -1}, "max_image_pixels: -1 is below its minimum 1"),
        ({"genseg_num_class": 0}, "genseg_num_class: 0 is below its minimum 1"),
        ({"seed": "0"}, "seed: '0' is not an integer"),
        ({"extra": ["refseg_chunk=8"]}, "extra: expected SourceOptions or a mapping"),
        ({"strict": "maybe"}, "strict: 'maybe' is not a boolean"),
    ],
)
def test_bad_build_options_fail_when_made(kwargs, match):
    with pytest.raises(BuildConfigError, match=match):
        BuildOptions(**kwargs)


def test_boolean_build_options_parse_strictly():
    assert BuildOptions(strict="False").strict is False and BuildOptions(strict="true").policy.strict is True
    assert BuildOptions(keep_eval_images="0").to_dict()["keep_eval_images"] is False


def test_policy_skips_by_default_and_strict_stops_except_on_filters():
    bad, leak = Skip("k/train/1", "missing_image", "x.jpg"), Skip("k/train/2", "eval_image_leak", "id 7")
    assert ErrorPolicy().check(bad) is bad
    strict = BuildOptions(strict=True).policy
    assert strict.check(leak) is leak  # a deliberate filter: recorded, never fatal
    with pytest.raises(StrictModeError, match=r"^k/train/1: missing_image: x\.jpg$") as e:
        strict.check(bad, cause=KeyError("why"))
    assert isinstance(e.value.__cause__, KeyError)
    assert strict.stops("bad_polygon") and not strict.stops("overlapping_span")
    assert not BuildOptions().policy.stops("bad_polygon")


def test_policy_error_type_and_filters_are_the_callers():
    loader = ErrorPolicy(strict=True, filters=frozenset(), error=LoaderError)
    with pytest.raises(LoaderError, match="text_only"):  # no filter at load time
        loader.check(Skip("k", "text_only"))
