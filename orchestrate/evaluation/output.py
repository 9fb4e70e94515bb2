"""``--out`` of ``evaluate.py`` replaced whole: a run writes its files into a staging folder beside ``--out``
and swaps it in at the end (:func:`pipelines.storage.replaced_folder`), so a killed run leaves the previous
complete output, and a finished one a complete new output, never a mixture (``inference.json`` of one export
beside ``results.json`` of another). See docs/evaluation.md.

``--out`` is the evaluation's own folder: one holding anything else is refused rather than replaced (nothing
of the user's is deleted); a ``--predictions`` file inside it is carried into the new version.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrate.evaluation.eval_errors import EvaluationError, listing
from pipelines import storage

OUTPUTS = ("results.json", "details.json", "predictions.jsonl", "inference.json", "wandb")
"""What an evaluation writes under ``--out``."""


@contextmanager
def staged_output(out: str, predictions: str | None = None) -> Iterator[tuple[str, str | None]]:
    """``(folder to write into, predictions path to read)``; on a clean exit the folder replaces ``out``."""
    if "://" in out and not out.startswith("file://"):
        raise EvaluationError(f"--out {out}: a local folder is needed (results.json, the wandb run)")
    out = os.path.abspath(out.removeprefix("file://"))
    _check_own(out)
    with storage.replaced_folder(out) as staged:
        inside = predictions is not None and _inside(predictions, out)
        if inside:
            carried = os.path.join(staged, os.path.relpath(os.path.abspath(predictions), out))
            os.makedirs(os.path.dirname(carried), exist_ok=True)
            shutil.copy2(predictions, carried)
            predictions = carried
        yield staged, predictions
        _final_paths(os.path.join(staged, "details.json"), staged, out)


def _check_own(out: str) -> None:
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise EvaluationError(f"--out {out}: exists and is not a folder")
    foreign = [e for e in sorted(os.listdir(out)) if not _ours(e)]
    if foreign:
        raise EvaluationError(
            f"--out {out}: holds {listing(foreign)}, which evaluate.py did not write; the folder is replaced "
            "whole, so give a new folder or an earlier evaluation's"
        )


def _ours(entry: str) -> bool:
    """An evaluation output, or the temporary name an earlier version wrote one under."""
    bare = entry.lstrip(".")
    return any(bare == o or bare.startswith(o + ".") for o in OUTPUTS)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def _final_paths(details: str, staged: str, out: str) -> None:
    """``details.json`` names the predictions file where it will be after the swap, not in the staging
    folder."""
    if not os.path.exists(details):
        return
    with open(details) as f:
        d = json.load(f)
    p = d.get("predictions")
    if isinstance(p, str) and _inside(p, staged):
        d["predictions"] = os.path.join(out, os.path.relpath(p, staged))
        tmp = details + ".tmp"
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, details)
