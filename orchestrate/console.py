"""What a person running a stage sees: our progress and results, not the frameworks' chatter.

Command lines set up logging with :func:`configure_logging` (:func:`pipelines.logs.configure_logging` plus
the training frameworks below). One verbosity, from ``-v`` / ``-q``, drives every process of a run: the
driver, and through ``train_loop_config`` each Ray Train worker, which calls :func:`quiet_frameworks`
(Ray Train owns the workers' root handler, so they get levels and filters, not another handler).

=========  ========================  ========================================================================
verbosity  our loggers               the training frameworks
=========  ========================  ========================================================================
≤ -1 (-q)  WARNING (-qq: ERROR)      as at 0
0          INFO (progress, results)  Ray Train (and its per-report lines) and DeepSpeed at WARNING,
                                     ``ray.init`` quiet, FutureWarning/DeprecationWarning raised inside
                                     them hidden
≥ 1 (-v)   DEBUG                     INFO
=========  ========================  ========================================================================

Ray's own errors and warnings (a failed worker, a lost node) are WARNING or above and always reach the
console.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from pipelines import logs

PACKAGES = logs.PACKAGES

# DeepSpeed's WarmupCosineLR warns at construction, before its first step, on every run
_DEEPSPEED_NOISE = ("Attempting to get learning rate from scheduler before it has started",)

# Ray Train modules whose logger is named by their file path (``logging.getLogger(__file__)``), so neither
# the "ray.train" level nor LoggingConfig reaches them: "Reporting training result N: TrainingReport(...)"
_RAY_FILE_LOGGERS = ("ray.train.v2._internal.execution.context",)


def package_level(verbosity: int) -> int:
    """The level of our loggers (the mapping of :func:`pipelines.logs.configure_logging`)."""
    return {1: logging.DEBUG, 0: logging.INFO, -1: logging.WARNING}.get(
        max(-2, min(verbosity, 1)), logging.ERROR
    )


def framework_level(verbosity: int) -> int:
    return logging.INFO if verbosity > 0 else logging.WARNING


def configure_logging(verbosity: int = 0) -> None:
    """For a command line: the project's console logging, and the training frameworks quiet."""
    logs.configure_logging(verbosity)
    quiet_frameworks(verbosity)


def _origin(module: str) -> str:
    """The file of ``module``, found from its top-level package's location (nothing is imported)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.origin:
        return module
    return str(Path(spec.origin).parent.joinpath(*rest).with_suffix(".py"))


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_frameworks(verbosity: int = 0) -> None:
    """Log levels and warning filters of this process (the driver or a training worker). Call it before
    DeepSpeed is imported: its logger exists from the import on, and some warnings fire then."""
    for name in PACKAGES:
        logging.getLogger(name).setLevel(package_level(verbosity))
    level = framework_level(verbosity)
    ds = logging.getLogger("DeepSpeed")
    ds.setLevel(level)
    if verbosity <= 0 and not any(isinstance(f, _DropMessages) for f in ds.filters):
        ds.addFilter(_DropMessages(_DEEPSPEED_NOISE))
    logging.getLogger("ray.train").setLevel(level)
    for module in _RAY_FILE_LOGGERS:
        logging.getLogger(_origin(module)).setLevel(level)
    logs.quiet_third_party_warnings()


def ray_train_log_level(verbosity: int) -> str:
    """``ray.train.LoggingConfig(log_level=...)``: hides Ray Train's INFO lines ("Checkpoint successfully
    created", worker-group start-up) on the workers and the controller."""
    return logging.getLevelName(framework_level(verbosity))
