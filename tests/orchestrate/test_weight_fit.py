"""xsam_model.weight_fit: the one weight-fit check behind load_exported and the parent-export checks."""

from __future__ import annotations

import pytest

from xsam_model.weight_fit import FitReport, WeightFitError, check_fit


def test_every_kind_of_misfit_is_listed_once():
    expected = {"a.weight": (4, 2), "a.bias": (4,), "b.weight": (3, 3), "frozen": (1,)}
    provided = {"a.weight": [4, 3], "b.weight": (3, 3), "old.head": (7,)}
    report = check_fit(expected, provided, optional=["frozen"])
    assert report.missing == ("a.bias",)  # "frozen" may be absent
    assert report.unexpected == ("old.head",)
    assert report.mismatched == (("a.weight", (4, 3), (4, 2)),)  # shapes compared as int tuples
    assert not report.ok and report.counts() == "1 missing, 1 unexpected, 1 shape-mismatched keys"
    msg = report.message("stage 1 export x", provided_as="export", notes={"old.head": "not taken"})
    assert msg.splitlines() == [
        "stage 1 export x: 1 missing, 1 unexpected, 1 shape-mismatched keys",
        "    missing     a.bias",
        "    unexpected  old.head (not taken)",
        "    mismatched  a.weight: export (4, 3) vs model (4, 2)",
    ]


def test_a_fit_is_ok_and_raises_nothing():
    report = check_fit({"w": (2, 2)}, {"w": (2, 2)})
    assert report == FitReport() and report.ok
    report.raise_if_bad("anything")


def test_raise_if_bad_uses_the_callers_error():
    class Mine(ValueError):
        pass

    report = check_fit({"w": (2,)}, {})
    with pytest.raises(WeightFitError, match="1 missing, 0 unexpected"):
        report.raise_if_bad()
    with pytest.raises(Mine, match=r"(?s)^here: 1 missing.*missing     w$"):
        report.raise_if_bad("here", error=Mine)
