"""Does a set of weights fit a model? One check for every place that loads weights by name.

    report = check_fit(expected={"a.weight": (4, 2)}, provided={"a.weight": (4, 3), "b": (1,)})
    report.missing, report.unexpected, report.mismatched   # (), ("b",), (("a.weight", (4, 3), (4, 2)),)
    report.raise_if_bad("stage 1 export /runs/a/stage1/export/model.safetensors")

Used by :func:`xsam_model.trainable.load_exported` (tensors in hand) and by the training driver's
parent-export check (:func:`orchestrate.exports.check_parents`, safetensors headers only, before any worker
starts), so both report a bad fit with the same words: every missing, unexpected and shape-mismatched key, in
one error. X-SAM loads with ``strict=False`` after dropping mismatched keys, which lets a wrong export pass
silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipelines.errors import XsamError

Shape = tuple[int, ...]


class WeightFitError(XsamError, ValueError):
    """Weights that do not fit a model; the message lists every missing, unexpected and mismatched key."""


@dataclass(frozen=True)
class FitReport:
    """What :func:`check_fit` found; every tuple is sorted by key."""

    missing: tuple[str, ...] = ()
    """Expected (and not optional) but not provided."""
    unexpected: tuple[str, ...] = ()
    """Provided but not expected."""
    mismatched: tuple[tuple[str, Shape, Shape], ...] = ()
    """``(key, provided shape, expected shape)`` for keys on both sides whose shapes differ."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def counts(self) -> str:
        """``"2 missing, 1 unexpected, 1 shape-mismatched keys"``."""
        return (
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched keys"
        )

    def mismatch_lines(self, provided_as: str = "file") -> list[str]:
        """``"key: file (3, 3) vs model (4, 3)"`` per mismatched key."""
        return [f"{k}: {provided_as} {got} vs model {want}" for k, got, want in self.mismatched]

    def message(
        self, header: str = "", *, provided_as: str = "file", notes: Mapping[str, str] | None = None
    ) -> str:
        """The counts (after ``header``) and one indented line per offending key; ``notes`` adds a reason
        after an unexpected key."""
        notes = notes or {}
        lines = [f"{header}: {self.counts()}" if header else self.counts()]
        lines += [f"    missing     {k}" for k in self.missing]
        lines += [f"    unexpected  {k}" + (f" ({notes[k]})" if k in notes else "") for k in self.unexpected]
        lines += [f"    mismatched  {m}" for m in self.mismatch_lines(provided_as)]
        return "\n".join(lines)

    def raise_if_bad(
        self,
        header: str = "",
        *,
        provided_as: str = "file",
        error: type[Exception] = WeightFitError,
    ) -> None:
        if not self.ok:
            raise error(self.message(header, provided_as=provided_as))


def check_fit(
    expected: Mapping[str, Iterable[int]],
    provided: Mapping[str, Iterable[int]],
    *,
    optional: Iterable[str] = (),
) -> FitReport:
    """Compare two ``{name: shape}`` maps: what a model takes (``expected``) and what a file holds
    (``provided``). Names in ``optional`` may be absent from ``provided`` without being missing."""
    want = {k: tuple(int(d) for d in v) for k, v in expected.items()}
    got = {k: tuple(int(d) for d in v) for k, v in provided.items()}
    skip = set(optional)
    return FitReport(
        missing=tuple(sorted(k for k in want if k not in got and k not in skip)),
        unexpected=tuple(sorted(k for k in got if k not in want)),
        mismatched=tuple(sorted((k, got[k], want[k]) for k in got if k in want and got[k] != want[k])),
    )
