"""The error family, the CLI wrapper that turns it into exit code 2, and the console set-up
(pipelines.logs)."""

from __future__ import annotations

import argparse
import logging
import pickle
import warnings

import pytest

from pipelines import errors
from pipelines.errors import (
    BuildConfigError,
    LoaderError,
    MaskFormatError,
    PromptTooSmall,
    SampleError,
    SkipRecord,
    SourceNotFound,
    UnsafePickleError,
    XsamError,
    run_cli,
)
from pipelines.logs import Progress, add_verbosity_flags, configure_logging, verbosity


def test_every_pipelines_error_is_an_xsam_error_and_keeps_its_old_builtin_base():
    assert issubclass(BuildConfigError, ValueError) and issubclass(SampleError, ValueError)
    assert issubclass(SourceNotFound, FileNotFoundError) and issubclass(LoaderError, RuntimeError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)
    for cls in (MaskFormatError, PromptTooSmall):  # both are skips with a reason, and still ValueErrors
        assert issubclass(cls, SkipRecord) and issubclass(cls, ValueError)
    mine = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, Exception) and c is not XsamError
    ]
    assert mine and all(issubclass(c, XsamError) for c in mine)


def test_skip_record_is_the_one_reason_detail_carrier():
    e = MaskFormatError("bad_polygon", "3 numbers")
    assert str(e) == "bad_polygon: 3 numbers"
    skip = e.at("coco/train/1/ann_2", level="annotation")
    assert skip.to_dict() == {
        "key": "coco/train/1/ann_2",
        "reason": "bad_polygon",
        "detail": "3 numbers",
        "level": "annotation",
    }
    assert PromptTooSmall("4 px").at("k").reason == PromptTooSmall.reason == "mask_too_small_for_prompt"


@pytest.mark.parametrize(
    "error",
    [
        SourceNotFound("coco_panoptic", ["/a/x.json", "/a/imgs"]),
        UnsafePickleError("refs(unc).p", "global os.system"),
        PromptTooSmall("4 px"),
        MaskFormatError("rle_size_mismatch", "[4, 4] vs [5, 5]"),
        LoaderError("k: corrupt_json: bad"),
    ],
)
def test_errors_cross_process_boundaries_intact(error):
    """Ray tasks and DataLoader workers pickle errors: custom constructors must not break that."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)


def _main_raising(exc: BaseException):
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (BuildConfigError("unknown source(s) ['x']"), "error: unknown source(s) ['x']"),
        (FileNotFoundError(2, "No such file or directory", "/nope.json"), "/nope.json"),
        (SampleError("2 <p> spans\nbut 1 phrase"), "error: 2 <p> spans but 1 phrase"),
    ],
)
def test_run_cli_turns_bad_input_into_exit_2_and_one_line(exc, line, capsys):
    assert run_cli(_main_raising(exc), []) == 2
    err = capsys.readouterr().err
    assert line in err and err.count("\n") == 1 and "Traceback" not in err


def test_run_cli_passes_results_and_bugs_through(capsys):
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(_main_raising(KeyError("k")), [])


def test_run_cli_unwraps_a_ray_task_error(capsys):
    class RayTaskErrorLike(XsamError):  # Ray's wrapper: the task's exception in ``.cause``, a long str
        def __init__(self, cause):
            super().__init__("ray::_convert_task() (pid=1)\n  File ...\ntraceback text")
            self.cause = cause

    assert run_cli(_main_raising(RayTaskErrorLike(errors.StrictModeError("k: bad_polygon: x"))), []) == 2
    assert capsys.readouterr().err == "error: k: bad_polygon: x\n"


def test_verbosity_flags_set_our_levels_only():
    p = argparse.ArgumentParser()
    add_verbosity_flags(p)
    assert verbosity(p.parse_args(["-vv"])) == 2 and verbosity(p.parse_args(["-q"])) == -1
    try:
        configure_logging(-1)
        assert logging.getLogger("pipelines.build.driver").getEffectiveLevel() == logging.WARNING
        configure_logging(1)
        assert logging.getLogger("pipelines.build.driver").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("urllib3").getEffectiveLevel() == logging.WARNING
        configure_logging(0)
        ours = [h for h in logging.getLogger().handlers if getattr(h, "_xsam_console", False)]
        assert len(ours) == 1  # configuring again does not stack handlers
    finally:
        for h in [h for h in logging.getLogger().handlers if getattr(h, "_xsam_console", False)]:
            logging.getLogger().removeHandler(h)
        for name in ("pipelines", "orchestrate", "xsam_model"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger().setLevel(logging.WARNING)


def test_third_party_deprecations_are_quiet_ours_are_not():
    from pipelines.logs import quiet_third_party_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="webdataset.writer")
        warnings.warn_explicit("copy keyword", DeprecationWarning, "m.py", 1, module="pycocotools.mask")
        warnings.warn_explicit("ours", FutureWarning, "d.py", 1, module="pipelines.build.driver")
    assert [str(w.message) for w in seen] == ["ours"]


def test_progress_logs_a_line_per_interval_and_one_at_the_end(caplog):
    log = logging.getLogger("pipelines.test_progress")
    with caplog.at_level(logging.INFO, logger="pipelines.test_progress"):
        with Progress(log, "coco_panoptic/train", 4, done=1, every=0.0) as p:
            p.update(1, samples=10)
            p.update(2, samples=5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("coco_panoptic/train: 2/4 chunks, 10 samples, ")
    assert lines[-1].startswith("coco_panoptic/train: 4/4 chunks, 15 samples, ") and "samples/s" in lines[-1]
