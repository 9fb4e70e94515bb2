"""GCG caption text from generated ids: one decode of the whole sequence, as X-SAM's ``batch_decode``.

The tokenizer is a SentencePiece/Llama-style one built here with the ``tokenizers`` library, shaped as
Phi-3's ``tokenizer.json``: a Unigram model with byte fallback, ``▁`` word starts (normaliser Prepend▁ +
Replace space→▁), decoder Replace▁ + ByteFallback + Fuse + Strip(1). Its decoder strips the leading space of
every separate decode, which the debug tokenizer does not, so only this one shows the space after ``</p>``.
"""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from orchestrate.evaluation.captions import clean_caption
from xsam_model.inferencer import SpecialIds, decode_generated

WORDS = ["a", "man", "in", "red", "shirt", "rides", "horse", "the", "on", "grass", "SEG", "p"]


@pytest.fixture(scope="module")
def llama_style():
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    pieces += [("▁", -5.0), (".", -3.0), ("<", -4.0), (">", -4.0), ("/", -4.0)]
    pieces += [(f"▁{w}", -2.0) for w in WORDS] + [(w, -3.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<p>", "</p>", "<SEG>", "<|end|>"]})
    return fast


def _xsam_gcg_caption(output: str) -> str:
    """Port of X-SAM's ``get_gcg_caption`` (``[A] xsam/xsam/tools/eval.py:78-87``)."""
    if "<SEG>" not in output:
        return ""
    sents = [part.strip() for part in output.split(".") if "<SEG>" not in part]
    caption = re.sub(r"<.*?>", "", ". ".join(sents))
    return " ".join(caption.split()).strip("'").strip()


def _ids(tok, *parts: str) -> list[int]:
    """Token ids of ``parts``: a tag is its special token, anything else encoded as plain text."""
    out: list[int] = []
    for part in parts:
        if part in ("<p>", "</p>", "<SEG>", "<|end|>"):
            out.append(tok.convert_tokens_to_ids(part))
        else:
            out += tok(part, add_special_tokens=False)["input_ids"]
    return out


def _special(tok) -> SpecialIds:
    c = tok.convert_tokens_to_ids
    return SpecialIds(seg=c("<SEG>"), p_open=c("<p>"), p_close=c("</p>"))


def test_tokenizer_is_sentencepiece_like(llama_style):
    ids = llama_style("a man", add_special_tokens=False)["input_ids"]
    assert llama_style.convert_ids_to_tokens(ids) == ["▁a", "▁man"]
    assert llama_style.decode(ids) == "a man"  # the leading ▁ of every separate decode is stripped
    byte_ids = llama_style("é", add_special_tokens=False)["input_ids"]
    assert llama_style.convert_ids_to_tokens(byte_ids)[1:] == ["<0xC3>", "<0xA9>"]
    assert llama_style.decode(byte_ids) == "é"


def test_the_space_after_a_closing_tag_survives(llama_style):
    """``<p> a man</p> in a red shirt`` keeps ``</p> in``: the caption equals X-SAM's (batch_decode of the
    whole sequence, then get_gcg_caption); decoding the runs apart gave 'a manin a red shirt'."""
    tok = llama_style
    end = tok.convert_tokens_to_ids("<|end|>")
    # each text part encodes with its ▁ word start (the normaliser prepends it), as a generated word has
    parts = ("<p>", "a man", "</p>", "<SEG>", "rides", "<p>", "the horse", "</p>", "<SEG>", "on the grass.")
    ids = [*_ids(tok, *parts), end]
    text = decode_generated(tok, ids, _special(tok), [end, tok.eos_token_id])
    assert text == "<p> a man</p><SEG> rides<p> the horse</p><SEG> on the grass."
    xsam = tok.batch_decode([ids])[0]
    assert text == xsam.replace("<|end|>", "")
    caption_ids = _ids(tok, "<p>", "a man", "</p>", "in a red shirt.", "<SEG>")
    text = decode_generated(tok, caption_ids, _special(tok), [end])
    assert "</p> in a red shirt" in text and "manin" not in clean_caption(text)
    assert clean_caption(text.replace("<SEG>", "")) == "a man in a red shirt."
    assert clean_caption(text) == _xsam_gcg_caption(tok.batch_decode([caption_ids])[0])


def test_tags_spelled_by_ordinary_tokens_are_broken_up(llama_style):
    """Only emitted tag tokens are tags: ``<SEG>`` spelled as '<', 'SEG', '>' becomes ``< SEG>``."""
    tok = llama_style
    literal = [tok.convert_tokens_to_ids(t) for t in ("<", "SEG", ">")]
    ids = [*_ids(tok, "<p>", "a man", "</p>", "<SEG>"), *literal, *_ids(tok, "on the grass")]
    text = decode_generated(tok, ids, _special(tok), [])
    assert text.count("<SEG>") == 1 and "< SEG>" in text and text.startswith("<p> a man</p><SEG>")
