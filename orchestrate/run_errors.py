"""The errors of the training orchestrator: bad input or configuration, said in one message naming the file,
option or keys at fault. They belong to the project's family (:class:`pipelines.errors.XsamError`), so
``orchestrate/train.py`` and ``orchestrate/summary.py`` (through :func:`pipelines.errors.run_cli`) turn
them into exit code 2 and one line on stderr, never a traceback.

They also subclass ``ValueError``, as the per-module errors they replace did, for callers that catch that.
"""

from __future__ import annotations

from pipelines.errors import XsamError


class OrchestrateError(XsamError, ValueError):
    """Base of every orchestrate error: the message says what was expected and where."""


class StageConfigError(OrchestrateError):
    """A stage config whose fields contradict each other; the message gives the arithmetic or the choices."""


class RunSetupError(OrchestrateError):
    """Bad input found before the run started (shards, mixture, parent exports, checkpoints, run root)."""


class ParentExportError(OrchestrateError):
    """A parent export is missing or does not fit the model; the message lists every key and path involved."""


class ResumeError(OrchestrateError):
    """A checkpoint that this run cannot continue from (different batch, world size, stage …)."""
