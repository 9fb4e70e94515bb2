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
    results = score_predictions(str(path), str(shards), str(datas))
    assert sorted(results) == sorted(gcg)
    for name, r in results.items():
        assert r["METEOR"] == pytest.approx(100.0) and r["AP50"] == 100.0 and r["mIoU"] == 100.0, name
        assert r["CIDEr"] >= 0.0  # CIDEr's weights come from the set: a perfect caption is not a fixed value
