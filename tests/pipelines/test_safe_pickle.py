"""The restricted unpickler: Python-2 refs pickles load; anything naming a global is refused and never
runs."""

from __future__ import annotations

import copyreg
import os
import pickle

import pytest

from pipelines.demo.refer import dumps_py2
from pipelines.sources.readers import safe_pickle
from pipelines.sources.readers.safe_pickle import MalformedPickle, UnsafePickleError

REF = {
    "sent_ids": [0, 1],
    "file_name": "COCO_train2014_000000581857_16.jpg",
    "ann_id": 1719310,
    "ref_id": 0,
    "image_id": 581857,
    "split": "train",
    "category_id": 1,
    "big": 2**40,
    "neg": -5,
    "score": 0.25,
    "ok": True,
    "none": None,
    "sentences": [
        {"tokens": ["the", "lady"], "raw": "THE LADY", "sent_id": 0, "sent": "the lady"},
        {"tokens": ["café"], "raw": "Café", "sent_id": 1, "sent": "café"},
    ],
}

# What Python 2 ``cPickle.dumps(refs, 0)`` writes for a small refs list (8-bit strings, a long, a tuple)
PY2_PROTOCOL0 = (
    b"(lp0\n(dp1\nS'split'\np2\nS'train'\np3\nsS'ann_id'\np4\nL1719310L\nsS'ok'\np5\nI01\n"
    b"sS'score'\np6\nF0.5\nsS'none'\np7\nNsS'sentences'\np8\n(lp9\n(dp10\nS'sent'\np11\n"
    b"S'the lady'\np12\nsasS'box'\np13\n(I1\nI2\ntp14\nsa."
)


class _OpenFile:
    """Unpickling this with plain ``pickle`` creates ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _System:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def test_python2_protocol_2_refs_load(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(dumps_py2([REF, REF]))
    assert path.read_bytes()[:3] == b"\x80\x02]"  # protocol 2, a list, as cPickle wrote the real files
    assert safe_pickle.load_file(path) == [REF, REF]


def test_python2_protocol_0_loads():
    assert safe_pickle.loads(PY2_PROTOCOL0) == [
        {
            "split": "train",
            "ann_id": 1719310,
            "ok": True,
            "score": 0.5,
            "none": None,
            "sentences": [{"sent": "the lady"}],
            "box": (1, 2),
        }
    ]


def test_non_utf8_byte_strings_fall_back_to_latin1():
    assert safe_pickle.loads(b"\x80\x02U\x04caf\xe9q\x00.") == "café"


def test_builtin_containers_spelled_as_calls_load():
    obj = [{1, 2}, frozenset([3]), b"ab\xff", b"", complex(1, 2), (1, "a")]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert safe_pickle.loads(pickle.dumps(obj, protocol=protocol)) == obj


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("payload", [_OpenFile, _System])
def test_a_pickle_carrying_a_callable_is_refused_and_nothing_runs(tmp_path, protocol, payload):
    victim = tmp_path / "created-by-pickle"
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps([{"ref_id": 0, "x": payload(str(victim))}], protocol=protocol))
    with pytest.raises(UnsafePickleError) as e:
        safe_pickle.load_file(bad)
    assert str(bad) in str(e.value)
    assert ("open" if payload is _OpenFile else "system") in e.value.what
    assert not victim.exists()
    # control: the same payload is live under plain pickle, so the assertion above can fail
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(str(control)), protocol=protocol))
    assert control.exists()


def test_instances_persistent_ids_and_extension_codes_are_refused():
    with pytest.raises(UnsafePickleError, match=r"x\.p: refused to load global __main__\.Evil"):
        safe_pickle.loads(b"(i__main__\nEvil\n(dp0\nb.", "x.p")
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_pickle.loads(b"\x80\x02P1\n.", "x.p")
    copyreg.add_extension("os", "system", 240)
    try:
        with pytest.raises(UnsafePickleError, match=r"global os\.system"):
            safe_pickle.loads(b"\x80\x02\x82\xf0.", "x.p")
    finally:
        copyreg.remove_extension("os", "system", 240)


def test_allowed_builtins_cannot_be_abused():
    with pytest.raises(MalformedPickle, match="bytes"):  # bytes(2**30) would allocate a GiB
        safe_pickle.loads(b"c__builtin__\nbytes\n(J\x00\x00\x00\x40tR.")
    with pytest.raises(MalformedPickle, match="latin1"):
        safe_pickle.loads(b"c_codecs\nencode\n(X\x01\x00\x00\x00aX\x04\x00\x00\x00zlibtR.")


def test_truncated_pickle_names_the_file(tmp_path):
    bad = tmp_path / "refs(umd).p"
    bad.write_bytes(dumps_py2([REF])[:-40])
    with pytest.raises(MalformedPickle, match=r"refs\(umd\)\.p: not a well-formed pickle"):
        safe_pickle.load_file(bad)
