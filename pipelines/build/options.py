"""How a build treats bad data: :class:`ErrorPolicy` and the deliberate filters it never stops on.

The build's options themselves are in :mod:`pipelines.build_options`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import Skip, StrictModeError, XsamError

__all__ = ["POLICY_REASONS", "ErrorPolicy"]

# Skips that are deliberate filters, not bad data: counted and listed like any skip, but ``--strict`` does
# not stop on them (RefCOCO eval images kept out of COCO training splits; LLaVA text-only records in stage 3;
# LVIS images that carry only negative labels; GCG phrases whose span overlaps a kept one, X-SAM's rule).
POLICY_REASONS = frozenset({"eval_image_leak", "text_only", "only_negative_labels", "overlapping_span"})


@dataclass(frozen=True)
class ErrorPolicy:
    """The one place that decides what a skip does (webdataset's ``handler=`` idea): by default every skip
    is recorded and counted by reason; ``strict`` turns the first one into an error, except the deliberate
    filters in ``filters``, which are always recorded.

    Every site that meets bad data builds a :class:`~pipelines.errors.Skip` and hands it to :meth:`check`.
    """

    strict: bool = False
    filters: frozenset[str] = POLICY_REASONS
    error: type[XsamError] = StrictModeError  # what strict mode raises (the loader raises LoaderError)

    def stops(self, reason: str) -> bool:
        """Whether a skip with ``reason`` ends the run under this policy."""
        return self.strict and reason not in self.filters

    def check(self, skip: Skip, cause: BaseException | None = None) -> Skip:
        """``skip`` itself, to be recorded; raises :attr:`error` (``<key>: <reason>: <detail>``) instead when
        the policy stops on it."""
        if self.stops(skip.reason):
            raise self.error(str(skip)) from cause
        return skip
