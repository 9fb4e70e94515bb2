"""What a user sees on the console: logging set up once per command, third-party warning noise off, progress.

Modules log through ``logging.getLogger(__name__)`` and never print (result tables a command was asked for
go to stdout from its ``main``). A command line adds ``-v``/``-q`` with :func:`add_verbosity_flags` and calls
:func:`configure_logging` once; library use (tests, notebooks, Ray tasks) configures nothing, so our INFO
lines stay silent there unless the caller sets up logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from tqdm import tqdm

# Our packages: their loggers follow -v/-q; everyone else's stay at WARNING.
PACKAGES = ("pipelines", "orchestrate", "xsam_model")
# Packages whose FutureWarning/DeprecationWarning speak about their own internals, which a user of ours can
# do nothing about (e.g. pycocotools' numpy-2 ``__array__`` notice, torch/webdataset deprecations).
NOISY_PACKAGES = (
    "torch",
    "webdataset",
    "pycocotools",
    "ray",
    "deepspeed",
    "transformers",
    "datasets",
    "numpy",
)

_HANDLER_TAG = "_xsam_console"


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (each repeatable); read them back with :func:`verbosity`."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: all)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output (-qq: errors only)")


def verbosity(args: argparse.Namespace) -> int:
    return args.verbose - args.quiet


def configure_logging(verbosity: int = 0) -> None:
    """Console logging for a command: 0 = INFO (progress and results), 1 = DEBUG for our packages, 2 = DEBUG
    for everything, -1 = warnings only, -2 = errors only. Safe to call again (the level changes)."""
    level = {1: logging.DEBUG, 0: logging.INFO, -1: logging.WARNING}.get(
        max(-2, min(verbosity, 1)), logging.ERROR
    )
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, _HANDLER_TAG, False)), None)
    if handler is None:
        handler = _StderrHandler()
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    handler.setFormatter(_ConsoleFormatter(with_names=verbosity > 0))
    root.setLevel(logging.DEBUG if verbosity >= 2 else max(level, logging.WARNING))
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    quiet_third_party_warnings()


def quiet_third_party_warnings() -> None:
    """Hide FutureWarning/DeprecationWarning raised inside :data:`NOISY_PACKAGES` (this process only; Ray
    tasks call it themselves)."""
    pattern = rf"({'|'.join(NOISY_PACKAGES)})(\.|$)"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=pattern)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _ConsoleFormatter(logging.Formatter):
    """``message`` for INFO, ``warning: message`` / ``error: message`` above it; ``-v`` adds the logger
    name."""

    def __init__(self, with_names: bool):
        super().__init__()
        self.with_names = with_names

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if self.with_names:
            text = f"[{record.name}] {text}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


class Progress:
    """Progress of one counted job (a split's chunks): done/total, samples and samples/s.

    On a terminal with INFO on, a ``tqdm`` bar on stderr; elsewhere (a Ray job's log, a file, CI) an INFO line
    through ``logger`` at most every ``every`` seconds, and always one at the end.
    """

    def __init__(
        self,
        logger: logging.Logger,
        name: str,
        total: int,
        *,
        done: int = 0,
        unit: str = "chunks",
        every: float = 10.0,
    ):
        """``done``: units already complete before this run (a resumed build); they count towards ``total``
        but not towards samples/s."""
        self.logger, self.name, self.total, self.unit, self.every = logger, name, total, unit, every
        self.done, self.samples = done, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty() and logger.isEnabledFor(logging.INFO) and total > 0:
            self.bar = tqdm(total=total, initial=done, desc=name, unit=unit.rstrip("s"), leave=True)

    def update(self, n: int = 1, samples: int = 0) -> None:
        self.done += n
        self.samples += samples
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.samples} samples, {self.rate(now):.1f} samples/s", refresh=False)
            self.bar.update(n)
        elif now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.logger.info("%s", self.line(now))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self.logger.info("%s", self.line(time.perf_counter()))

    def rate(self, now: float) -> float:
        return self.samples / max(now - self.t0, 1e-9)

    def line(self, now: float) -> str:
        return (
            f"{self.name}: {self.done}/{self.total} {self.unit}, {self.samples} samples, "
            f"{self.rate(now):.1f} samples/s"
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self.bar is not None:  # failed: leave the bar where it stopped, no final line
            self.bar.close()
