"""GCG text metrics: METEOR/CIDEr through pycocoevalcap, recall with a tiny text model of known
similarities."""

from __future__ import annotations

import copy
import re
import shutil

import numpy as np
import pytest

from orchestrate.evaluation import captions
from orchestrate.evaluation.captions import caption_scores, clean_caption, text_embedder
from orchestrate.evaluation.run import score_predictions
from pipelines.demo import gcg as demo_gcg
from tests.support.evaluation import write_jsonl

# the words of the demo's GCG phrases ("a red car", "the sky"), each its own direction of the embedding space
WORDS = ["a", "the", *demo_gcg.COLOURS, *demo_gcg.THINGS, *demo_gcg.STUFF]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DIM = 32


def word_piece_tokenizer():
    """A BERT-style WordPiece tokenizer with an explicit vocabulary (``[CLS] … [SEP]``, lower case).

    Built from a ``tokenizers`` model and wrapped, because transformers 5's
    ``BertTokenizerFast(vocab_file=…)`` ignores the file: every word became ``[UNK]``, every phrase the same
    embedding, and recall never met the 0.5 text-similarity threshold from below."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> str:
    """A BERT without encoder layers whose phrase embedding is known in closed form (nothing downloaded).

    Position and token-type embeddings are zero and LayerNorm is the identity on the word rows (orthogonal
    ±1 rows of a Hadamard matrix; special tokens and ``[UNK]`` are zero rows), so the mean of the last hidden
    states is the sum of the phrase's word rows / (words + 2) and the cosine of two phrases of n words sharing
    k is k / n: "a red car" vs "a blue car" 2/3 (≥ 0.5), vs "the blue dog" 0."""
    import torch
    from scipy.linalg import hadamard
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("text_model")
    word_piece_tokenizer().save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=DIM,
        num_hidden_layers=0,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(cfg).eval()
    rows = torch.zeros(cfg.vocab_size, DIM)
    rows[len(SPECIAL) :] = torch.tensor(hadamard(DIM)[1 : len(WORDS) + 1], dtype=torch.float32)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.copy_(rows)
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
        model.embeddings.LayerNorm.weight.fill_(1.0)
        model.embeddings.LayerNorm.bias.zero_()
    model.save_pretrained(folder)
    return str(folder)


def test_the_fixture_tokenizer_reads_its_vocabulary(tiny_text_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_model)  # as the text embedder loads it
    ids = tok("A red car")["input_ids"]
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    assert ids == [vocab["[CLS]"], vocab["a"], vocab["red"], vocab["car"], vocab["[SEP]"]]
    assert tok("a zebra")["input_ids"][2] == vocab["[UNK]"]


def test_fixture_similarities_fall_on_both_sides_of_the_threshold(tiny_text_model):
    from orchestrate.evaluation.metrics import GCG_TEXT, cosine_matrix

    embed = text_embedder(tiny_text_model)
    sims = cosine_matrix(
        embed(["a red car"]), embed(["a red car", "a blue car", "the blue dog", "a blue dog"])
    )
    np.testing.assert_allclose(sims[0], [1.0, 2 / 3, 0.0, 1 / 3], atol=1e-6)
    assert sims[0, 1] >= GCG_TEXT > sims[0, 2]


def test_clean_caption_follows_xsam():
    text = "<p>a red car</p>  and <p>a cat</p>  beside <p>the sky</p> . <SEG>."
    assert clean_caption(text) == "a red car and a cat beside the sky."
    assert clean_caption("'two dogs'") == "two dogs"


def test_text_embedder_is_the_mean_of_last_hidden_states(tiny_text_model):
    import torch
    from transformers import AutoModel, AutoTokenizer

    embed = text_embedder(tiny_text_model)
    tok, model = AutoTokenizer.from_pretrained(tiny_text_model), AutoModel.from_pretrained(tiny_text_model)
    with torch.no_grad():
        ref = model(**tok("a red car", return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(embed(["a red car", "the sky"])[0], ref, rtol=1e-5, atol=1e-6)


def test_gcg_recall_with_a_local_text_model(demo_val, perfect, tiny_text_model, monkeypatch):
    monkeypatch.setattr("orchestrate.evaluation.captions.shutil.which", lambda name: None)
    datas, shards, names = demo_val
    name = next(n for n in names if n.startswith("grandf_gcg/"))
    path = write_jsonl(shards.parent / "gcg.jsonl", perfect[name])
    result = score_predictions(
        str(path), str(shards), str(datas), sets=[name], text_sim_model=tiny_text_model
    )
    assert result[name]["recall"] == 100.0
    dropped = copy.deepcopy(perfect[name])
    for line in dropped:
        line["masks"] = line["masks"][:-1]  # one phrase of each caption has no mask any more
    path = write_jsonl(shards.parent / "gcg2.jsonl", dropped)
    result = score_predictions(
        str(path), str(shards), str(datas), sets=[name], text_sim_model=tiny_text_model
    )
    total = sum(len(x["masks"]) for x in perfect[name])
    assert result[name]["recall"] == pytest.approx(100 * (total - len(perfect[name])) / total)


def _rename_phrases(lines: list[dict], rename) -> list[dict]:
    """The predictions with every ``<p>phrase</p>`` of the text replaced by ``rename(phrase)`` (masks
    kept)."""
    out = copy.deepcopy(lines)
    for line in out:
        line["text"] = re.sub(r"<p>(.*?)</p>", lambda m: f"<p>{rename(m.group(1))}</p>", line["text"])
    return out


def _near(phrase: str) -> str:
    """Another colour in "a <colour> <thing>" (cosine 2/3); two-word phrases kept."""
    words = phrase.split()
    if len(words) == 3:
        c = demo_gcg.COLOURS
        words[1] = c[(c.index(words[1]) + 1) % len(c)]
    return " ".join(words)


def _far(phrase: str) -> str:
    """No word in common (cosine 0): "a red car" -> "the yellow dog", "the sky" -> "a grass"."""
    swap = {"a": "the", "the": "a"}
    out = []
    for w in phrase.split():
        for group in (demo_gcg.COLOURS, demo_gcg.THINGS, demo_gcg.STUFF):
            if w in group:
                w = group[(group.index(w) + 1) % len(group)]
                break
        out.append(swap.get(w, w))
    return " ".join(out)


def test_gcg_recall_counts_a_pair_only_at_text_similarity_0_5_or_more(
    demo_val, perfect, tiny_text_model, no_java
):
    datas, shards, names = demo_val
    name = next(n for n in names if n.startswith("grandf_gcg/"))
    results = {}
    for label, rename in (("near", _near), ("far", _far)):
        lines = _rename_phrases(perfect[name], rename)
        assert lines != perfect[name]
        path = write_jsonl(shards.parent / f"gcg_{label}.jsonl", lines)
        results[label] = score_predictions(
            str(path), str(shards), str(datas), sets=[name], text_sim_model=tiny_text_model
        )[name]
    for r in results.values():  # the masks are perfect either way
        assert r["mIoU"] == 100.0 and r["AP50"] == 100.0
    assert results["near"]["recall"] == 100.0  # every pair at cosine 2/3 or 1
    assert results["far"]["recall"] == 0.0  # every pair at cosine 0: below 0.5


def test_missing_text_model_folder_is_an_error(demo_val, perfect, tmp_path):
    from orchestrate.evaluation import EvaluationError

    datas, shards, names = demo_val
    name = next(n for n in names if n.startswith("grandf_gcg/"))
    path = write_jsonl(tmp_path / "gcg.jsonl", perfect[name])
    with pytest.raises(EvaluationError, match="--text-sim-model: .* is not a folder"):
        score_predictions(str(path), str(shards), str(datas), text_sim_model=str(tmp_path / "nope"))


def test_no_java_leaves_meteor_and_cider_out_with_the_reason(monkeypatch):
    monkeypatch.setattr("orchestrate.evaluation.captions.shutil.which", lambda name: None)
    scores, why = caption_scores(["a cat"], ["a cat"])
    assert scores == {} and "java not found" in why


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_meteor_and_cider_equal_pycocoevalcap_run_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = ["a man rides a horse on the beach.", "two dogs play in the grass", "a red car beside the road."]
    hyps = ["a man riding a horse", "dogs playing on grass", ""]  # an empty caption keeps its place
    got, why = caption_scores(refs, hyps)
    same, _ = caption_scores(refs, refs)  # the same METEOR process
    captions.close()
    assert why is None and same["METEOR"] == pytest.approx(100.0)
    tok = PTBTokenizer()
    r = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(refs)})
    h = tok.tokenize({i: [{"caption": c or "."}] for i, c in enumerate(hyps)})
    assert h[2] == [""]
    meteor = Meteor()
    m, _ = meteor.compute_score(r, h)
    del meteor
    c, _ = Cider().compute_score(r, h)
    assert got == {"METEOR": pytest.approx(100 * m, abs=1e-9), "CIDEr": pytest.approx(100 * c, abs=1e-9)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_every_demo_gcg_set_scores_meteor_100_on_its_ground_truth(demo_val, perfect, tmp_path):
    datas, shards, names = demo_val
    gcg = [n for n in names if n.split("/")[0].endswith("_gcg")]
    path = write_jsonl(tmp_path / "gcg.jsonl", [x for n in gcg for x in perfect[n]])
    # standard: under paper refcocog_gcg's overlapping phrase masks are painted over each other (X-SAM)
    results = score_predictions(str(path), str(shards), str(datas), protocol="standard")
    assert sorted(results) == sorted(gcg)
    for name, r in results.items():
        assert r["METEOR"] == pytest.approx(100.0) and r["AP50"] == 100.0 and r["mIoU"] == 100.0, name
        assert r["CIDEr"] >= 0.0  # CIDEr's weights come from the set: a perfect caption is not a fixed value


def _without_write_access():
    """``preexec_fn`` of a child that must not write where the file modes forbid it: root overrides modes
    (CAP_DAC_OVERRIDE), so the child drops that and its kin from its capability bounding set before exec."""
    import ctypes
    import os

    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_meteor_and_cider_run_from_a_read_only_install(tmp_path):
    """pycocoevalcap copied into a read-only folder (its jars and data linked), first on ``sys.path`` of a
    child that cannot write there: caption_scores still gives METEOR and CIDEr (the PTB tokenizer used to
    write its input file into the package folder)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pycocoevalcap

    src = Path(list(pycocoevalcap.__path__)[0])  # a namespace package: no __init__.py
    site = tmp_path / "site"
    pkg = site / "pycocoevalcap"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.jar", "*.gz"))
    for big in [*src.rglob("*.jar"), *src.rglob("*.gz")]:
        os.symlink(big, pkg / big.relative_to(src))
    for d in [site, *(p for p in site.rglob("*") if p.is_dir())]:
        d.chmod(0o555)
    root = Path(__file__).resolve().parents[2]
    code = (
        "import os, sys\n"
        "from pycocoevalcap.meteor import meteor\n"
        "from pycocoevalcap.tokenizer import ptbtokenizer as ptb\n"
        f"assert ptb.__file__.startswith({str(site)!r}) and meteor.__file__.startswith({str(site)!r})\n"
        "try:\n"
        "    open(os.path.join(os.path.dirname(ptb.__file__), 'probe'), 'w')\n"
        "    sys.exit('the copy is writable: the test would prove nothing')\n"
        "except PermissionError:\n"
        "    pass\n"
        "from orchestrate.evaluation.captions import caption_scores, close\n"
        "scores, why = caption_scores(['a man rides a horse.'], ['a man rides a horse.'])\n"
        "close()\n"
        "print(why, round(scores['METEOR'], 6))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{root}", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=_without_write_access,
        )
    finally:
        for d in [site, *(p for p in site.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["None", "100.0"]
