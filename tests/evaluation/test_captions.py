"""GCG text metrics: METEOR/CIDEr through pycocoevalcap, recall with a tiny random text model."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

from orchestrate.evaluation import captions, score_predictions
from orchestrate.evaluation.captions import caption_scores, clean_caption, text_embedder
from tests.evaluation.helpers import write_jsonl

WORDS = ["a", "red", "yellow", "blue", "car", "cat", "person", "bicycle", "dog", "the", "sky", "road", "wall"]


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> str:
    """A random 2-layer BERT and a word-level tokenizer saved to a folder (nothing downloaded)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("text_model")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).eval().save_pretrained(folder)
    return str(folder)


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
