"""Tokenizers: the real Phi-3 one from a local folder, or a tiny BPE for ``debug`` — one code path.

:func:`load_tokenizer` reads any local HF tokenizer folder; :func:`prepare_tokenizer` adds X-SAM's special
tokens (``<SEG>``, ``<p>``, ``</p>``) exactly as X-SAM does (``add_tokens(..., special_tokens=True)``).
:func:`build_debug_tokenizer` trains a byte-level BPE in-process from a fixed text, with Phi-3's chat
control tokens, so tests and the ``debug`` flavor need no files; it is deterministic (same merges every time).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Heavy imports (tokenizers) are deferred into the debug-tokenizer builders: only tests train one.

# Phi-3's chat control tokens (added tokens in its tokenizer.json).
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>")

_DEBUG_CORPUS = """\
Can you segment the image based on the following categories? Please output the segmentation masks.
Please segment the object in this image. Where is it in this picture? Sure, it is the segmentation result.
It is a man in a red shirt riding a horse; a dog on the grass, a cat near the wall other, person, car, tree.
Can you segment the image based on the following regions? Please output the corresponding segmentation mask.
Please give a brief description of the image with interleaved segmentation masks. And the segmentation mask is.
What is the color of the bus? The bus is yellow. Describe the picture in detail. There are two people here.
Explain why and output the mask. Because the object that can hold water is the cup on the table.
0123456789 .,;:!?'"()[]{}<>-_=+*/\\@#$%^&~`|
"""


@functools.lru_cache(maxsize=1)
def _debug_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", *CHAT_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown text
        show_progress=False,
    )
    tok.train_from_iterator(_DEBUG_CORPUS.splitlines() * 4, trainer=trainer)
    return tok.to_str()


def build_debug_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with ``<s>`` as BOS and Phi-3's chat tokens; special tokens not yet added."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_debug_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    return tok


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder (never the hub); a missing folder is an error naming it."""
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder} (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def prepare_tokenizer(tok: PreTrainedTokenizerBase, special_tokens: Sequence[str]) -> PreTrainedTokenizerBase:
    """Add X-SAM's special tokens (idempotent) and make sure a pad token exists. Returns ``tok``."""
    missing = [t for t in special_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(list(missing), special_tokens=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok
