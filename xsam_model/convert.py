"""X-SAM's archive checkpoints ↔ this project's stage exports (DESIGN §4.9).

X-SAM's released ``pytorch_model.bin`` files hold the archive branch's ``XSamModel.state_dict()``: every module
trained in that stage, under X-SAM's module names. The mapping (reference/xsam_fidelity.md, "Checkpoint
compatibility") is a prefix-rename table (:data:`RENAMES`), one reshape (:data:`LEADING_AXIS`: X-SAM keeps a
leading axis of 1 on the phrase head's scale and background embedding) and a drop list (:data:`DROPS`: parts
we do not build). Our connector uses X-SAM's pixel shuffle (which settles fidelity D8), so its convs and the
pixel decoder's input projections load 1:1, with no channel permutation. ::

    python -m xsam_model.convert import --xsam-checkpoint inits/X-SAM/s3_mixed_finetune/<cfg>/pytorch_model.bin \\
        --stage 3 [--flavor xsam-phi3] [--init-dir inits] --out runs/xsam/stage3/export
    python -m xsam_model.convert export --export runs/r1/stage3/export --out wkdrs/.../pytorch_model.bin

``import`` reads with ``torch.load(weights_only=True)`` or safetensors (never a full unpickle), checks every
key and shape against the flavor's model built on the meta device (no memory), and writes a regular stage
export (:func:`orchestrate.exports.write_export`: ``model.safetensors``, ``config.json``, ``lineage.json``
naming the source file and its sha256). Every unmapped key, every missing trainable parameter and every shape
mismatch goes into one :class:`ConvertError`. ``export`` is the reverse; export → X-SAM → import gives a
byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines.errors import XsamError, run_cli
from xsam_model.stages import trainable_names, unused_parameters
from xsam_model.weight_fit import check_fit

logger = logging.getLogger(__name__)

IMPORT_STAGES = (1, 3)
"""The stages whose weights X-SAM releases (s1 segmentor fine-tune, s3 mixed fine-tune)."""


class ConvertError(XsamError, ValueError):
    """A checkpoint or export that cannot be converted; the message lists every offending key."""


# ---------------------------------------------------------------------------------------------- the mapping
# (X-SAM archive name, our name); ``{rest}`` is any suffix, ``{level}`` a number. First match wins.
RENAMES: tuple[tuple[str, str], ...] = (
    # transformers 4 (X-SAM) nests SiglipVisionModel under .vision_model; transformers 5 flattens it
    ("visual_encoder.vision_model.{rest}", "vision_encoder.{rest}"),
    ("segmentor.encoder.{rest}", "sam_encoder.vision_encoder.{rest}"),
    ("segmentor.pixel_decoder.{rest}", "mask_decoder.pixel_decoder.{rest}"),
    ("segmentor.decoder.{rest}", "mask_decoder.transformer.{rest}"),
    ("segmentor.class_predictor.{rest}", "mask_decoder.linear_head.{rest}"),
    ("segmentor.logit_scale", "mask_decoder.phrase_head.logit_scale"),
    ("bg_embeds.weight", "mask_decoder.phrase_head.bg_embed"),
    ("llm.{rest}", "llm.{rest}"),
    ("visual_projector.model.{rest}", "visual_projector.{rest}"),
    ("seg_projector.model.{rest}", "seg_projector.mlp.{rest}"),
    ("llm_projector.model.{rest}", "llm_projector.{rest}"),
    ("seg_connector.model.{level}.model.{rest}", "seg_connector.levels.{level}.convs.{rest}"),
)

# X-SAM keys with no counterpart here, on purpose (checked before RENAMES)
DROPS: tuple[tuple[str, str], ...] = (
    ("visual_encoder.vision_model.head.{rest}", "SigLIP's pooling head (built with vision_use_head=False)"),
    ("segmentor.encoder.neck.{rest}", "SAM's neck (an Identity here: X-SAM reads SAM's hidden states)"),
    ("segmentor.shared_image_embedding.{rest}", "SAM's prompt positional buffer (no prompt encoder here)"),
    ("segmentor.criterion.{rest}", "loss constants (a buffer, not a weight)"),
)
UNUSED_REASON = "never trained: SigLIP after the selected hidden state (the file keeps its initial value)"

LEADING_AXIS: frozenset[str] = frozenset(
    {"mask_decoder.phrase_head.logit_scale", "mask_decoder.phrase_head.bg_embed"}
)
"""Our parameters that X-SAM stores with a leading axis of 1: ``logit_scale`` [] ↔ [1], ``bg_embed`` [D] ↔
``bg_embeds.weight`` [1, D] (an ``nn.Embedding(1, D)``)."""

# XSamModel.state_dict() collects its modules in this order (archive model/xsam.py); exports follow it
XSAM_ORDER = (
    "visual_encoder.",
    "segmentor.encoder.",
    "segmentor.",
    "llm.",
    "visual_projector.",
    "seg_projector.",
    "llm_projector.",
    "seg_connector.",
    "bg_embeds.",
)


@dataclass(frozen=True)
class _Template:
    text: str
    regex: re.Pattern

    @classmethod
    def of(cls, text: str) -> _Template:
        parts = re.split(r"(\{rest\}|\{level\})", text)
        body = "".join(
            "(?P<rest>.+)" if p == "{rest}" else r"(?P<level>\d+)" if p == "{level}" else re.escape(p)
            for p in parts
        )
        return cls(text, re.compile(body + r"\Z"))

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.match(key)
        return m.groupdict() if m else None


@dataclass(frozen=True)
class KeyMap:
    """Names in both directions for one module layout (see :func:`keymap`)."""

    renames: tuple[tuple[_Template, _Template], ...]
    drops: tuple[tuple[_Template, str], ...]

    def to_ours(self, xsam_key: str) -> str | None:
        """Our name for an X-SAM key; None if no rule matches (dropped keys also give None)."""
        if self.dropped(xsam_key):
            return None
        for xs, ours in self.renames:
            if (groups := xs.match(xsam_key)) is not None:
                return ours.text.format(**groups)
        return None

    def to_xsam(self, our_key: str) -> str | None:
        """X-SAM's name for one of our parameter names; None if no rule covers it."""
        for xs, ours in self.renames:
            if (groups := ours.match(our_key)) is not None:
                return xs.text.format(**groups)
        return None

    def dropped(self, xsam_key: str) -> str | None:
        """Why an X-SAM key has no counterpart here, or None."""
        return next((why for t, why in self.drops if t.match(xsam_key) is not None), None)


def keymap(our_names: Iterable[str]) -> KeyMap:
    """The key map for a model (or export) whose parameter names are ``our_names``: SigLIP's prefix follows
    the layout transformers gave it (flat in transformers 5, under ``.vision_model`` before)."""
    nested = any(n.startswith("vision_encoder.vision_model.") for n in our_names)
    renames = []
    for xs, ours in RENAMES:
        if nested and ours == "vision_encoder.{rest}":
            ours = "vision_encoder.vision_model.{rest}"
        renames.append((_Template.of(xs), _Template.of(ours)))
    return KeyMap(tuple(renames), tuple((_Template.of(t), why) for t, why in DROPS))


def xsam_shape(our_key: str, shape: Iterable[int]) -> tuple[int, ...]:
    """The shape X-SAM stores for our parameter ``our_key`` of ``shape``."""
    return (1, *shape) if our_key in LEADING_AXIS else tuple(shape)


def _xsam_rank(key: str) -> int:
    return next((i for i, p in enumerate(XSAM_ORDER) if key.startswith(p)), len(XSAM_ORDER))


# ---------------------------------------------------------------------------------------------- X-SAM → ours
@dataclass
class Mapped:
    """An X-SAM state dict in our names: the stage's trainable tensors, and what was left out and why."""

    state: dict[str, torch.Tensor]
    """Our parameter name → tensor (the file's dtype), in model order."""
    dropped: dict[str, list[str]] = field(default_factory=dict)
    """Reason → X-SAM keys not taken (:data:`DROPS`, and parameters that never train)."""


def _why_unexpected(ours: str | None, params: Mapping[str, tuple[int, ...]], stage: int) -> str:
    if ours is None:
        return "no rule maps it"
    if ours not in params:
        return f"→ {ours}: no such parameter"
    return f"→ {ours}: not trained in stage {stage}"


def from_xsam(
    xsam_state: Mapping[str, object], model: nn.Module, stage: int, *, source: str = "checkpoint"
) -> Mapped:
    """Rename, reshape and check X-SAM's ``xsam_state`` against ``model`` (any device, meta included).

    Every key must map to a parameter trained in ``stage``, with X-SAM's shape of it, or be dropped on
    purpose; every parameter trained in ``stage`` must be there. The fit is checked in X-SAM's names and
    shapes (:func:`xsam_model.weight_fit.check_fit`, the project's one weight-fit check), so one
    :class:`ConvertError` lists the file's missing, unexpected (with why) and mismatched keys and any value
    that is not a tensor.
    """
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    kmap, unused = keymap(params), unused_parameters(model)
    expected = {kmap.to_xsam(n) or n: (n, xsam_shape(n, params[n])) for n in trainable_names(model, stage)}
    provided: dict[str, torch.Tensor] = {}
    notes: dict[str, str] = {}
    non_tensor: list[str] = []
    dropped: dict[str, list[str]] = {}
    for key, value in xsam_state.items():
        ours = kmap.to_ours(key)
        why = kmap.dropped(key) or (UNUSED_REASON if ours in unused else None)
        if not isinstance(value, torch.Tensor):
            non_tensor.append(f"    non-tensor  {key} ({type(value).__name__})")
            continue
        if why:
            dropped.setdefault(why, []).append(key)
            continue
        provided[key] = value
        if key not in expected:
            notes[key] = _why_unexpected(ours, params, stage)
    report = check_fit(
        {k: shape for k, (_, shape) in expected.items()}, {k: v.shape for k, v in provided.items()}
    )
    if not report.ok or non_tensor:
        name = getattr(getattr(model, "config", None), "name", "?")
        msg = report.message(f"{source}: does not fit stage {stage} of the {name} model", notes=notes)
        raise ConvertError("\n".join([msg, *non_tensor]))
    state = {}
    for key, (ours, _) in expected.items():
        state[ours] = provided[key].reshape(params[ours]) if ours in LEADING_AXIS else provided[key]
    return Mapped(state=state, dropped=dropped)


# ---------------------------------------------------------------------------------------------- ours → X-SAM
def to_xsam(state: Mapping[str, torch.Tensor], *, source: str = "export") -> dict[str, torch.Tensor]:
    """Our state dict (e.g. a stage export) in X-SAM's archive names and shapes, in the order of
    ``XSamModel.state_dict()``. A key no rule covers is a :class:`ConvertError` (all of them listed)."""
    kmap = keymap(state)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        name = kmap.to_xsam(key)
        if name is None:
            unmapped.append(key)
        else:
            out[name] = value.reshape(xsam_shape(key, value.shape))
    if unmapped:
        lines = [
            f"{source}: {len(unmapped)} keys with no X-SAM name",
            *(f"    unmapped    {k}" for k in unmapped),
        ]
        raise ConvertError("\n".join(lines))
    return {k: out[k] for k in sorted(out, key=_xsam_rank)}


# ---------------------------------------------------------------------------------------------- files
def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_checkpoint(path: str | Path) -> dict[str, object]:
    """The state dict in an X-SAM checkpoint: ``.bin``/``.pth``/``.pt`` through ``torch.load(weights_only=True)``
    (a pickle that carries anything but tensors and plain containers is refused), or ``.safetensors``. An
    mmengine-style ``{"state_dict": ...}`` wrapper is unwrapped. Values are checked later (:func:`from_xsam`)."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(p)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{p}: not a readable safetensors file ({_first_line(e)})") from None
    elif p.suffix in (".bin", ".pth", ".pt"):
        try:
            # mmap: tensors stay in the page cache, not in this process (zip format only)
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
        except pickle.UnpicklingError as e:
            raise ConvertError(
                f"{p}: refused: not plain weights (torch.load weights_only: {_first_line(e)})"
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
            raise ConvertError(f"{p}: not a readable torch checkpoint ({_first_line(e)})") from None
    else:
        raise ConvertError(f"{p}: expected a .bin, .pth or .pt (torch.save) or a .safetensors file")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{p}: holds a {type(obj).__name__}, expected a state dict (name → tensor)")
    return dict(obj)


def write_checkpoint(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` for X-SAM: ``.bin``/``.pth``/``.pt`` with ``torch.save`` (what X-SAM's
    ``guess_load_checkpoint`` reads) or ``.safetensors``; through a temporary sibling, so a failed write
    leaves nothing behind."""
    p = Path(path)
    if p.suffix not in (".bin", ".pth", ".pt", ".safetensors"):
        raise ConvertError(f"{p}: expected an output name ending in .bin, .pth, .pt or .safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
        else:
            torch.save(dict(state), tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


# ---------------------------------------------------------------------------------------------- commands
def _check_init_dir(init_dir: str, cfg) -> None:
    folders = (cfg.siglip.folder, cfg.sam.folder, cfg.llm.folder, cfg.decoder.folder)
    absent = [f for f in folders if not (Path(init_dir) / f / "config.json").is_file()]
    if absent:
        raise ConvertError(
            f"--init-dir {init_dir}: expected Hugging Face folders with config.json for {', '.join(absent)} "
            f"(X-SAM's inits/ layout; the export records this folder for training and evaluation)"
        )


def _export_config(model: nn.Module, stage: int, flavor: str, init_dir: str | None, source: dict) -> dict:
    """``config.json`` of an imported export, shaped like a trained one: the stage recipe (read by tools for
    its flavor and init folder), the resolved model config, and where the weights came from."""
    from orchestrate.stages import get_stage

    cfg = get_stage(stage, flavor=flavor)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_dir=init_dir))
    return {"stage": cfg.to_dict(), "model": model.config.to_dict(), "source": source}


def import_checkpoint(
    path: str | Path,
    *,
    stage: int,
    out: str,
    flavor: str = "xsam-phi3",
    init_dir: str | None = None,
) -> dict:
    """Convert X-SAM's stage-``stage`` checkpoint at ``path`` into a stage export at ``out`` (folder or URI).
    The model is built from ``flavor`` on the meta device for the checks. Returns the export's lineage."""
    from orchestrate import exports
    from xsam_model.builder import build_xsam
    from xsam_model.flavors import XSAM_FLAVORS

    if stage not in IMPORT_STAGES:
        raise ConvertError(f"--stage must be one of {IMPORT_STAGES} (X-SAM releases those), got {stage}")
    if flavor not in XSAM_FLAVORS:
        raise ConvertError(f"unknown flavor {flavor!r}; known: {sorted(XSAM_FLAVORS)}")
    if init_dir is not None:
        _check_init_dir(init_dir, XSAM_FLAVORS[flavor])
    xsam_state = read_checkpoint(path)
    model = build_xsam(flavor, device="meta")
    mapped = from_xsam(xsam_state, model, stage, source=str(path))
    source = {
        "kind": "xsam-archive",
        "file": str(Path(path).resolve()),
        "sha256": exports.sha256_of(str(Path(path).resolve())),
        "bytes": Path(path).stat().st_size,
        "tensors": len(xsam_state),
    }
    lineage = {
        "stage": stage,
        "name": f"xsam_s{stage}_import",
        "source": source,
        "flavor": flavor,
        "init_dir": init_dir,
        "dropped": mapped.dropped,
        "parents": [],
        "code": exports.code_version(),
    }
    config = _export_config(model, stage, flavor, init_dir, source)
    exports.write_export(str(out), mapped.state, config, lineage)
    logger.info("stage-%d export %s: %d tensors from %s", stage, out, len(mapped.state), path)
    return {**lineage, "tensors": len(mapped.state)}


def export_checkpoint(export: str, out: str | Path) -> Path:
    """Write the stage export at ``export`` (folder or URI) as an X-SAM checkpoint at ``out``."""
    from orchestrate import exports
    from pipelines import storage

    fs, path = storage.fs_and_path(export)
    if not fs.exists(f"{path}/{exports.LINEAGE_FILE}"):
        raise ConvertError(f"{export}: not a stage export (no {exports.LINEAGE_FILE})")
    stage = storage.read_json(fs, f"{path}/{exports.LINEAGE_FILE}").get("stage")
    try:
        exports.find_export(export, stage)  # all three files present
    except exports.ParentExportError as e:
        raise ConvertError(str(e)) from None
    state = exports.read_export_state(export)
    written = write_checkpoint(to_xsam(state, source=export), out)
    logger.info("stage-%s export %s → %s (%d tensors)", stage, export, written, len(state))
    return written


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    from xsam_model.flavors import XSAM_FLAVORS

    p = argparse.ArgumentParser(prog="python -m xsam_model.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="X-SAM checkpoint → stage export")
    imp.add_argument("--xsam-checkpoint", required=True, help="pytorch_model.bin (or .pth/.safetensors)")
    imp.add_argument("--stage", type=int, required=True, choices=IMPORT_STAGES)
    imp.add_argument("--flavor", default="xsam-phi3", choices=sorted(XSAM_FLAVORS))
    imp.add_argument("--init-dir", default=None, help="X-SAM's inits/ folder, recorded in the export")
    imp.add_argument("--out", required=True, help="export folder (or URI) to write")
    exp = sub.add_parser("export", help="stage export → X-SAM checkpoint")
    exp.add_argument("--export", required=True, help="stage export folder (or URI)")
    exp.add_argument("--out", required=True, help="file to write: .bin/.pth (torch.save) or .safetensors")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI; run through :func:`pipelines.errors.run_cli`, a :class:`ConvertError` is one line on stderr and
    exit code 2."""
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.command == "import":
        lin = import_checkpoint(
            a.xsam_checkpoint, stage=a.stage, out=a.out, flavor=a.flavor, init_dir=a.init_dir
        )
        dropped = sum(len(v) for v in lin["dropped"].values())
        print(f"wrote stage-{a.stage} export {a.out}: {lin['tensors']} tensors, {dropped} X-SAM keys dropped")
    else:
        print(f"wrote {export_checkpoint(a.export, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
