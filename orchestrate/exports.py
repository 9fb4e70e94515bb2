"""The checks that chain stages, and what a trained stage's lineage records (docs/checkpoints.md).

An export folder (``<run-root>/stage<N>/export``, :mod:`orchestrate.run_layout`) is read and written by
:mod:`xsam_model.export` (:class:`~xsam_model.export.Export`, :func:`~xsam_model.export.write_export`); here
its ``lineage.json`` gets the shards, mixture, parent exports, code version and steps of the run.

A stage starts from its parents' exports (:class:`~orchestrate.stages.ParentSpec`), each verified against
the ``model_sha256`` its lineage records. :func:`check_parents` reads only the safetensors headers, so the
driver can refuse a bad chain before any worker starts: every parameter under ``take`` must be in the export
with its shape, and every key of the export must be taken or deliberately dropped
(:func:`xsam_model.weight_fit.check_fit`, the check ``load_exported`` makes too). X-SAM loads with
``strict=False`` after dropping mismatches, so errors pass silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrate.run_errors import ParentExportError
from orchestrate.run_layout import RunLayout
from orchestrate.stages import ParentSpec
from xsam_model import load_exported
from xsam_model.export import Export, ExportError
from xsam_model.weight_fit import check_fit

# Heavy imports (ray) are deferred into code_version: the build driver imports Ray, which the stage
# chaining never needs.

# ---------------------------------------------------------------------------------------------- code version
_PACKAGES = ("pipelines", "xsam_model", "orchestrate")


def code_version() -> dict[str, Any]:
    """Package version, git commit when a checkout is at hand, and a digest of the package sources (which
    identifies the code even inside a ``ray job submit --working-dir`` copy that has no ``.git``)."""
    from pipelines.build.driver import code_version as build_code_version

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return {**build_code_version(), "source_sha256": h.hexdigest()[:16]}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# ---------------------------------------------------------------------------------------------- checks
@dataclass
class LoadPlan:
    """Which keys come from which parent export (checked; nothing left over)."""

    take: dict[int, list[str]] = field(default_factory=dict)
    dropped: dict[int, list[str]] = field(default_factory=dict)


def check_parents(
    param_shapes: Mapping[str, tuple[int, ...]],
    parents: Iterable[ParentSpec],
    exports: Mapping[int, Export],
    *,
    skip: Iterable[str] = (),
) -> LoadPlan:
    """Check every parent export against the model's parameter shapes.

    Missing: a model parameter under a ``take`` prefix (and not in ``skip``, the parameters that never train)
    absent from the export. Mismatched: shape differs. Unexpected: an export key under neither ``take`` nor
    ``drop``, or taken but unknown to the model. All problems of all parents go into one error.
    """
    skip = set(skip)
    plan, problems = LoadPlan(), []
    for spec in parents:
        info = exports[spec.stage]
        dropped = sorted(k for k in info.keys if any(_under(k, p) for p in spec.drop))
        provided = {k: meta["shape"] for k, meta in info.keys.items() if k not in set(dropped)}
        expected = {n: s for n, s in param_shapes.items() if any(_under(n, p) for p in spec.take)}
        report = check_fit(expected, provided, optional=skip | set(dropped))
        if not report.ok:
            why = f"not under {list(spec.take)} nor dropped {list(spec.drop)}"
            notes = {
                k: "no such parameter in the model" if any(_under(k, p) for p in spec.take) else why
                for k in report.unexpected
            }
            header = f"stage {spec.stage} export {info.model_url}"
            problems.append(report.message(header, provided_as="export", notes=notes))
        plan.take[spec.stage] = sorted(k for k in provided if k in expected)
        plan.dropped[spec.stage] = dropped
    if problems:
        raise ParentExportError("parent exports do not fit the model:\n" + "\n".join(problems))
    return plan


def resolve_parents(
    run_root: str,
    stage: int,
    parents: Iterable[ParentSpec],
    init_from: Mapping[int, str] | None = None,
    *,
    verify: bool = True,
) -> dict[int, Export]:
    """Each parent's export: ``init_from[stage]`` if given, else ``<run-root>/stage<k>/export``. ``verify``:
    hash each model.safetensors now (the driver); a worker that loads them next skips it, as the load checks
    the bytes it reads. A missing, damaged or unverified export is a :class:`ParentExportError`."""
    init_from = dict(init_from or {})
    found = {}
    for p in parents:
        url = init_from.get(p.stage) or RunLayout(run_root).stage(p.stage).export_dir
        try:
            found[p.stage] = Export.find(url, p.stage, needed_by=stage, verify=verify)
        except ExportError as e:
            raise ParentExportError(str(e)) from None
    return found


def load_parent_weights(model, plan: LoadPlan, exports: Mapping[int, Export]) -> dict[int, int]:
    """Copy the planned tensors into ``model`` (strict: :func:`xsam_model.load_exported` re-checks every key).
    Each file is checked against its lineage's hash as it is read (the export's ``verified_sha256`` is set).
    Returns the number of tensors loaded per parent stage."""
    counts = {}
    for stage, keys in plan.take.items():
        try:
            state = exports[stage].state(keys)
        except ExportError as e:
            raise ParentExportError(str(e)) from None
        load_exported(model, state, strict=True)
        counts[stage] = len(state)
    return counts


# ---------------------------------------------------------------------------------------------- lineage
def _parent_lineage(parents: Mapping[int, Export], loaded: Mapping[int, int]) -> list[dict]:
    """Each parent as loaded: ``model_sha256`` is the hash of the bytes this run read (checked against the
    parent's lineage when they were read), not what the parent's folder says now."""
    out = []
    for stage, info in sorted(parents.items()):
        out.append(
            {
                "stage": stage,
                "export": info.url,
                "model_sha256": info.verified_sha256 or info.verify(),
                "tensors_loaded": loaded.get(stage, 0),
                "code": info.lineage.get("code"),
            }
        )
    return out


def stage_lineage(
    plan,
    stage_mixture,
    state,
    *,
    parents: Mapping[int, Export],
    loaded: Mapping[int, int],
    final_losses: dict,
    loader_stats: dict,
) -> dict:
    """What ``lineage.json`` records: the shards and mixture read, the parent exports (``parents``, as
    loaded), the code, and what the run did (``plan``: :class:`~orchestrate.plan.RunPlan`, ``state``: the
    final
    :class:`~orchestrate.train_checkpoints.TrainState`)."""
    datasets = [
        {
            "name": d.name,
            "samples": d.samples,
            "probability": d.probability,
            "fingerprint": d.fingerprint,
            "shards": [{"file": s.file, "sha256": s.sha256} for s in d.shards],
        }
        for d in stage_mixture.datasets
    ]
    return {
        "stage": plan.stage,
        "name": plan.cfg.name,
        "run_root": plan.run_root,
        "run_name": plan.run_name,
        "shards": {"root": plan.shards, "datasets": datasets},
        "mixture": {
            "path": plan.mixture,
            "stage": stage_mixture.stage,
            "digest": stage_mixture.digest(),
            "t": stage_mixture.t,
        },
        "parents": _parent_lineage(parents, loaded),
        "code": plan.code,
        "steps": state.step,
        "samples": state.samples,
        "tokens": state.tokens,
        "source_steps": state.source_steps,
        "restarts": state.attempt,
        "final_losses": final_losses,
        "loader_skipped": loader_stats.get("skipped", {}),
        "world_size": plan.cfg.batch.world_size,
    }
