"""Every exception class the packages define is an :class:`~pipelines.errors.XsamError` (keeping its builtin
base too), so ``run_cli`` turns each into the one-line exit 2 at an entry point."""

from __future__ import annotations

import importlib
import inspect

import pytest

from pipelines.errors import XsamError
from tests.test_layers import project_modules

# Private control-flow exceptions: raised and caught inside their own module, never seen by a caller.
NOT_ERRORS = {
    "pipelines.build.shards._EmptyShard",  # aborts the atomic write of a chunk whose records were all skipped
}


def _exception_classes() -> dict[str, type[BaseException]]:
    out = {}
    for name in project_modules():
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                out[f"{name}.{attr}"] = obj
    return out


@pytest.fixture(scope="module")
def classes() -> dict[str, type[BaseException]]:
    return _exception_classes()


def test_every_exception_class_is_an_xsam_error(classes):
    outside = sorted(n for n, c in classes.items() if not issubclass(c, XsamError) and n not in NOT_ERRORS)
    assert not outside, f"exception classes outside XsamError: {outside}"


def test_the_walk_sees_the_classes_and_the_allowlist_is_current(classes):
    assert {"xsam_model.trainable.WeightMismatchError", "pipelines.build.chunks.IndexOrderError"} <= set(
        classes
    )
    assert NOT_ERRORS <= set(classes), f"allowlisted classes that are gone: {NOT_ERRORS - set(classes)}"
    assert all(name.rsplit(".", 1)[1].startswith("_") for name in NOT_ERRORS), (
        "only private ones may stay out"
    )


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("pipelines.build.chunks.IndexOrderError", RuntimeError),
        ("xsam_model.trainable.WeightMismatchError", ValueError),
        ("xsam_model.weight_fit.WeightFitError", ValueError),
        ("xsam_model.processor.ProcessorError", ValueError),
        ("xsam_model.modeling.xsam.TargetLabelError", ValueError),
    ],
)
def test_moved_classes_keep_their_builtin_base(classes, name, builtin):
    assert issubclass(classes[name], XsamError) and issubclass(classes[name], builtin)
