"""Stage exports and the checks that chain stages (DESIGN §4.7).

An export folder (``<run-root>/stage<N>/export``, :mod:`orchestrate.run_layout`) holds::

    model.safetensors       the stage's trainable weights
    config.json             the resolved stage config and model config
    lineage.json            shards, mixture, parent exports, code version, steps (written last)

A stage starts from its parents' exports (:class:`~orchestrate.stages.ParentSpec`). :func:`check_parents`
reads only the safetensors headers, so the driver can refuse a bad chain before any worker starts: every
parameter under ``take`` must be in the export with its shape, and every key of the export must be taken or
deliberately dropped (:func:`xsam_model.weight_fit.check_fit`, the check ``load_exported`` makes too).
X-SAM loads with ``strict=False`` after dropping mismatches, so errors pass silently.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrate.errors import ParentExportError
from orchestrate.run_layout import RunLayout
from orchestrate.stages import ParentSpec
from pipelines import storage
from xsam_model.weight_fit import check_fit

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LINEAGE_FILE = "lineage.json"


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


# ---------------------------------------------------------------------------------------------- reading
def safetensors_header(url: str) -> dict[str, dict]:
    """``{key: {"dtype", "shape"}}`` from a safetensors file's JSON header, without reading the tensors.

    The file must be complete: its size is 8 + the header's length + the end of the last tensor the header
    describes, so a truncated copy (an interrupted upload or export) is refused here, on the driver, and not
    by a worker after Ray's retries."""
    fs, path = storage.fs_and_path(url)
    with fs.open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ParentExportError(f"{url}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ParentExportError(f"{url}: not a safetensors file (header length {n})")
        text = f.read(n)
    try:
        header = json.loads(text)
        meta = {k: v for k, v in header.items() if k != "__metadata__"}
        data_end = max((int(v["data_offsets"][1]) for v in meta.values()), default=0)
        keys = {k: {"dtype": v["dtype"], "shape": tuple(v["shape"])} for k, v in meta.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ParentExportError(
            f"{url}: truncated or damaged safetensors header ({type(e).__name__}: {e}); re-export it"
        ) from None
    size, expected = fs.size(path), 8 + n + data_end
    if size != expected:
        raise ParentExportError(
            f"{url}: truncated or damaged safetensors file: {size} bytes, its header describes {expected} "
            f"(re-export it, or copy it again)"
        )
    return keys


@dataclass
class ExportInfo:
    """A stage export found on storage (tensors not loaded)."""

    stage: int
    url: str
    keys: dict[str, dict] = field(default_factory=dict)
    """``{key: {"dtype", "shape"}}`` of model.safetensors."""
    lineage: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def model_url(self) -> str:
        return storage.join(self.url, MODEL_FILE)


def find_export(url: str, stage: int, *, needed_by: int | None = None) -> ExportInfo:
    """The export at ``url`` (its folder); a missing or incomplete one is a :class:`ParentExportError`."""
    fs, path = storage.fs_and_path(url)
    who = f"stage {needed_by} starts from stage {stage}'s export, " if needed_by else ""
    missing = [n for n in (MODEL_FILE, LINEAGE_FILE, CONFIG_FILE) if not fs.exists(f"{path}/{n}")]
    if missing:
        raise ParentExportError(
            f"{who}expected {', '.join(missing)} in {url} (run stage {stage} first, or point --init-from "
            f"at its export folder)"
        )
    lineage = storage.read_json(fs, f"{path}/{LINEAGE_FILE}")
    if lineage.get("stage") != stage:
        raise ParentExportError(
            f"{url} is the export of stage {lineage.get('stage')}, expected stage {stage}"
        )
    return ExportInfo(
        stage=stage,
        url=url,
        keys=safetensors_header(storage.join(url, MODEL_FILE)),
        lineage=lineage,
        config=storage.read_json(fs, f"{path}/{CONFIG_FILE}"),
    )


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
    exports: Mapping[int, ExportInfo],
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
    run_root: str, stage: int, parents: Iterable[ParentSpec], init_from: Mapping[int, str] | None = None
) -> dict[int, ExportInfo]:
    """Each parent's export: ``init_from[stage]`` if given, else ``<run-root>/stage<k>/export``."""
    init_from = dict(init_from or {})
    return {
        p.stage: find_export(
            init_from.get(p.stage) or RunLayout(run_root).stage(p.stage).export_dir, p.stage, needed_by=stage
        )
        for p in parents
    }


def load_parent_weights(model, plan: LoadPlan, exports: Mapping[int, ExportInfo]) -> dict[int, int]:
    """Copy the planned tensors into ``model`` (strict: :func:`xsam_model.load_exported` re-checks every key).
    Returns the number of tensors loaded per parent stage."""
    from safetensors.torch import load as load_bytes

    from xsam_model import load_exported

    counts = {}
    for stage, keys in plan.take.items():
        fs, path = storage.fs_and_path(exports[stage].model_url)
        with fs.open(path, "rb") as f:
            state = load_bytes(f.read())
        state = {k: state[k] for k in keys}
        load_exported(model, state, strict=True)
        counts[stage] = len(state)
    return counts


def sha256_of(url: str, chunk: int = 1 << 22) -> str:
    fs, path = storage.fs_and_path(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- writing
def write_export(url: str, state: Mapping[str, Any], config: dict, lineage: dict) -> str:
    """Write ``state`` (name → tensor), the resolved config and the lineage under ``url``, all or nothing:
    into a temporary sibling folder first, then moved into place (a re-run replaces the previous export)."""
    from safetensors.torch import save as save_bytes

    fs, path = storage.fs_and_path(url)
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/{storage.TMP_MARK}export-{uuid.uuid4().hex[:8]}"
    fs.makedirs(tmp, exist_ok=True)
    try:
        blob = save_bytes(
            {k: v.contiguous() for k, v in state.items()}, metadata={"stage": str(lineage.get("stage"))}
        )
        with fs.open(f"{tmp}/{MODEL_FILE}", "wb") as f:
            f.write(blob)
        lineage = {
            **lineage,
            "model_sha256": hashlib.sha256(blob).hexdigest(),
            "tensors": len(state),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        storage.write_json(fs, f"{tmp}/{CONFIG_FILE}", config)
        storage.write_json(fs, f"{tmp}/{LINEAGE_FILE}", lineage)
        _move_into_place(fs, tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise
    return url


def _move_into_place(fs, tmp: str, path: str) -> None:
    """Replace the export folder ``path`` by ``tmp``: one rename on a local file system; file by file on an
    object store, which has no folders to rename (a recursive move copies the folder's own key, which does
    not exist there), lineage.json last, so a reader that finds the lineage finds a complete export."""
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if "file" in fs.protocol:
        fs.mv(tmp, path, recursive=True)
        return
    for name in (MODEL_FILE, CONFIG_FILE, LINEAGE_FILE):
        fs.mv(f"{tmp}/{name}", f"{path}/{name}")
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)


def read_export_state(url: str):
    """The tensors of an export folder (for tests and tools)."""
    from safetensors.torch import load as load_bytes

    fs, path = storage.fs_and_path(storage.join(url, MODEL_FILE))
    with fs.open(path, "rb") as f:
        return load_bytes(f.read())


# ---------------------------------------------------------------------------------------------- lineage
def _parent_lineage(init_from: Mapping[int, str], loaded: Mapping[int, int]) -> list[dict]:
    out = []
    for stage, url in sorted(init_from.items()):
        info = find_export(url, stage)
        out.append(
            {
                "stage": stage,
                "export": url,
                "model_sha256": info.lineage.get("model_sha256"),
                "tensors_loaded": loaded.get(stage, 0),
                "code": info.lineage.get("code"),
            }
        )
    return out


def stage_lineage(
    plan, stage_mixture, state, *, loaded: Mapping[int, int], final_losses: dict, loader_stats: dict
) -> dict:
    """What ``lineage.json`` records: the shards and mixture read, the parent exports, the code, and what
    the run did (``plan``: :class:`~orchestrate.plan.RunPlan`, ``state``: the final
    :class:`~orchestrate.checkpointing.TrainState`)."""
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
        "parents": _parent_lineage(plan.init_from, loaded),
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
