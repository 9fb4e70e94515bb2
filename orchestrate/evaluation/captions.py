"""The text side of GCG scoring: caption cleaning, METEOR and CIDEr (pycocoevalcap), phrase embeddings.

METEOR and CIDEr are what X-SAM's ``COCOEvalCap`` subclass keeps of pycocoevalcap (SPICE downloads Stanford
models on first use, so it cannot run offline): both captions go through pycocoevalcap's PTB tokenizer, then
``Meteor`` (``meteor-1.5.jar``) and ``Cider`` score the whole set at once (CIDEr's n-gram weights are
document frequencies over the set, so it is computed once, after every shard is in). The tokenizer and METEOR
are Java programs; without ``java`` these two metrics are reported as not computed, with the reason. The
tokenizer runs from a temporary folder (:func:`_ptb_tokenize`): pycocoevalcap's own wrapper writes its input
file into the package's folder, which a read-only install (a container image, a shared site-packages) refuses.

GCG recall compares phrases with a sentence embedding: the mean of a BERT-style model's last hidden states
(GLaMM's ``bert-base-uncased`` recipe), loaded only from a local folder.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from orchestrate.evaluation.eval_errors import EvaluationError

# Heavy imports (pycocoevalcap, torch, transformers) are deferred into the scorers that need them: scoring
# masks alone never loads a caption metric or a text model.

_TAG = re.compile(r"<[^<>]*>")


def clean_caption(text: str) -> str:
    """The plain caption of a GCG answer, as X-SAM's ``get_gcg_caption`` makes it: sentences holding
    ``<SEG>`` dropped, the rest joined with ``". "``, tags removed, whitespace collapsed, quotes stripped.

    An answer without ``<SEG>`` keeps its text here; X-SAM drops such a sample from every metric, which the
    ``paper`` protocol does before its caption is cleaned
    (:class:`orchestrate.evaluation.scoring.GcgScorer`)."""
    sents = [part.strip() for part in text.split(".") if "<SEG>" not in part]
    caption = _TAG.sub("", ". ".join(sents))
    return " ".join(caption.split()).strip("'").strip()


def caption_scores(
    references: Sequence[str], generated: Sequence[str]
) -> tuple[dict[str, float], str | None]:
    """``({"METEOR": %, "CIDEr": %}, None)``, or ``({}, why)`` when they cannot be computed here."""
    if not references:
        return {}, "no caption to score"
    if shutil.which("java") is None:
        return {}, "java not found on PATH (pycocoevalcap's PTB tokenizer and METEOR are Java programs)"
    from pycocoevalcap.cider.cider import Cider

    # one tokenizer line per caption: an empty caption would be an empty line, which the tokenizer's
    # output does not keep apart from its neighbours
    refs = dict(enumerate([t] for t in _ptb_tokenize([_one_line(r) for r in references])))
    hyps = dict(enumerate([t] for t in _ptb_tokenize([_one_line(h) for h in generated])))
    m, _ = _meteor().compute_score(refs, hyps)
    c, _ = Cider().compute_score(refs, hyps)
    return {"METEOR": 100 * float(m), "CIDEr": 100 * float(c)}, None


def _ptb_tokenize(lines: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTB tokenization of one caption per line (its Stanford CoreNLP jar, lower-cased, its
    punctuation list removed), with the input file in a temporary folder rather than the package's."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="xsam-ptb-") as tmp:
        src = os.path.join(tmp, "captions.txt")
        with open(src, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        cmd = [
            "java",
            "-cp",
            jar,
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            src,
        ]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, check=False)
    out = proc.stdout.decode("utf-8").split("\n")
    if proc.returncode != 0 or len(out) < len(lines):
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise EvaluationError(
            f"pycocoevalcap's PTB tokenizer failed ({why[0]}): {len(out)} of {len(lines)} lines"
        )
    drop = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in out[: len(lines)]]


@functools.cache
def _meteor():
    """One METEOR Java process for every set of the run (its start-up, loading paraphrase tables, takes
    seconds); stopped by :func:`close`."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def close() -> None:
    """Stop the METEOR process if one was started."""
    if _meteor.cache_info().currsize:
        meteor = _meteor()
        _meteor.cache_clear()
        del meteor


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if text else "."  # tokenised to nothing (punctuation is dropped): an empty caption


@functools.cache
def text_embedder(folder: str) -> Callable[[Sequence[str]], np.ndarray]:
    """``texts -> N x D`` embeddings (mean of the last hidden states) of the model in ``folder``; loaded once
    per process, never downloaded."""
    if not os.path.isdir(folder):
        raise EvaluationError(
            f"--text-sim-model: {folder} is not a folder (a local sentence-embedding model)"
        )
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise EvaluationError(f"--text-sim-model: cannot load {folder}: {str(e).splitlines()[0]}") from None

    @functools.lru_cache(maxsize=65536)
    def one(text: str) -> np.ndarray:
        with torch.no_grad():
            inputs = tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
            return model(**inputs).last_hidden_state[0].mean(0).float().numpy()

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.stack([one(t) for t in texts]) if texts else np.zeros((0, 0))

    return embed
