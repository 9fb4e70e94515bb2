"""The console: one verbosity for our loggers and the frameworks; framework warnings hidden by default."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from orchestrate import console


@pytest.fixture
def restore_logging():
    names = (
        "",
        *console.PACKAGES,
        "DeepSpeed",
        "ray.train",
        console._origin("ray.train.v2._internal.execution.context"),
    )
    saved = {
        n: (
            logging.getLogger(n).level,
            list(logging.getLogger(n).handlers),
            list(logging.getLogger(n).filters),
        )
        for n in names
    }
    yield
    for n, (level, handlers, filters) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.handlers[:], lg.filters[:] = handlers, filters


@pytest.mark.parametrize(
    ("verbosity", "ours", "frameworks"),
    [
        (-1, logging.WARNING, logging.WARNING),
        (0, logging.INFO, logging.WARNING),
        (1, logging.DEBUG, logging.INFO),
    ],
)
def test_levels_follow_the_verbosity(restore_logging, capsys, verbosity, ours, frameworks):
    with warnings.catch_warnings():
        console.configure_logging(verbosity)
    assert [logging.getLogger(n).level for n in console.PACKAGES] == [ours] * 3
    assert logging.getLogger("DeepSpeed").level == logging.getLogger("ray.train").level == frameworks
    context = logging.getLogger(console._origin("ray.train.v2._internal.execution.context"))
    assert (
        context.name.endswith("ray/train/v2/_internal/execution/context.py") and context.level == frameworks
    )
    assert console.ray_train_log_level(verbosity) == logging.getLevelName(frameworks)
    logging.getLogger("orchestrate.x").info("progress")
    logging.getLogger("orchestrate.x").warning("careful")
    logging.getLogger("some.library").info("chatter")  # other libraries: WARNING and above only
    lines = capsys.readouterr().err.splitlines()
    assert [x.removeprefix("[orchestrate.x] ") for x in lines] == ["progress"] * (verbosity >= 0) + [
        "warning: careful"
    ]


def test_framework_warnings_hidden_ours_kept(restore_logging):
    def warn(module: str, category=FutureWarning) -> int:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            console.quiet_frameworks(0)
            warnings.warn_explicit("x is deprecated", category, "f.py", 1, module=module)
        return len(seen)

    assert warn("torch.distributed.c10d_logger") == 0
    assert warn("deepspeed.runtime.engine", DeprecationWarning) == 0
    assert warn("orchestrate.trainer") == 1  # our own deprecations stay visible
    assert warn("torch.nn.modules.module", UserWarning) == 1  # only the two noisy categories


def test_deepspeeds_known_noise_dropped(restore_logging):
    stream = io.StringIO()
    console.quiet_frameworks(0)
    ds = logging.getLogger("DeepSpeed")
    ds.addHandler(logging.StreamHandler(stream))
    ds.warning("Attempting to get learning rate from scheduler before it has started")
    ds.warning("gradient overflow")
    ds.info("an INFO line")
    assert stream.getvalue() == "gradient overflow\n"
