"""The checkpoint command: X-SAM's released checkpoints → stage exports, and back (docs/checkpoints.md). ::

    python -m orchestrate.convert import \\
        --xsam-checkpoint inits/X-SAM/s3_mixed_finetune/<cfg>/pytorch_model.bin \\
        --stage 3 [--flavor xsam-phi3] [--init-dir inits] --out runs/xsam/stage3/export
    python -m orchestrate.convert export --export runs/r1/stage3/export --out wkdrs/.../pytorch_model.bin

``import`` reads with ``torch.load(weights_only=True, mmap=False)`` or safetensors (never a full unpickle,
never a memory map: a zip record shorter than its tensor is refused, not read from the bytes after it), checks
every key, shape, dtype and value against the flavor's model built on the meta device
(:func:`xsam_model.xsam_keys.from_xsam`), and writes a regular stage export
(:func:`xsam_model.export.write_export`, ``lineage.json`` naming the source file and its sha256). ``export``
is the reverse, from a verified export, in a fixed tensor order: the same export gives the same bytes, and
export → X-SAM → import gives a byte-identical ``model.safetensors``. Every bad input is one line and exit 2
(:func:`pipelines.errors.run_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import stat
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from orchestrate.exports import code_version
from orchestrate.stages import get_stage
from pipelines.errors import run_cli
from xsam_model.builder import build_xsam
from xsam_model.export import Export, ExportError, sha256_of, write_export
from xsam_model.flavors import XSAM_FLAVORS
from xsam_model.xsam_keys import IMPORT_STAGES, ConvertError, from_xsam, to_xsam

logger = logging.getLogger(__name__)

_SNIFF = 512
_LFS = b"version https://git-lfs.github.com/spec/"


# ---------------------------------------------------------------------------------------------- files
def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_checkpoint_file(p: Path) -> None:
    """Refuse, naming the file, what is not a checkpoint: a folder, a FIFO or device (reading it could block
    or never end), an empty file, a Git LFS pointer, an HTML page (a failed download), any other text."""
    try:
        mode = p.stat().st_mode
    except OSError:
        raise ConvertError(f"{p}: no such file") from None
    if stat.S_ISDIR(mode):
        raise ConvertError(f"{p}: a folder; give the checkpoint file in it (pytorch_model.bin, …)")
    if not stat.S_ISREG(mode):
        raise ConvertError(f"{p}: not a regular file (a FIFO, socket or device); give the checkpoint file")
    with open(p, "rb") as f:
        head = f.read(_SNIFF)
    if not head:
        raise ConvertError(f"{p}: an empty file, not a checkpoint")
    if head.startswith(_LFS):
        raise ConvertError(f"{p}: a Git LFS pointer, not the weights (run `git lfs pull` in its repository)")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise ConvertError(f"{p}: an HTML page (a failed or redirected download?), not a checkpoint")
    if p.suffix != ".safetensors" and not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        shown = head[:40].decode("utf-8", "replace").splitlines()[0] if head[:1].isascii() else repr(head[:8])
        raise ConvertError(f"{p}: neither a torch zip checkpoint nor a pickle (it starts with {shown!r})")


def read_checkpoint(path: str | Path) -> dict[str, object]:
    """The state dict in an X-SAM checkpoint: ``.bin``/``.pth``/``.pt`` through
    ``torch.load(weights_only=True)`` (a pickle that carries anything but tensors and plain containers is
    refused), or ``.safetensors``. An mmengine-style ``{"state_dict": ...}`` wrapper is unwrapped. Values are
    checked later (:func:`from_xsam`)."""
    p = Path(path)
    if p.suffix not in (".bin", ".pth", ".pt", ".safetensors"):
        raise ConvertError(f"{p}: expected a .bin, .pth or .pt (torch.save) or a .safetensors file")
    check_checkpoint_file(p)
    if p.suffix == ".safetensors":
        try:
            obj: object = load(p.read_bytes())
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{p}: not a readable safetensors file ({_first_line(e)})") from None
    else:
        try:
            # no mmap: torch then checks every record's size against its tensor (a memory map reads past it)
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as e:
            raise ConvertError(
                f"{p}: refused: not plain weights (torch.load weights_only: {_first_line(e)})"
            ) from None
        except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise ConvertError(f"{p}: not a readable torch checkpoint ({_first_line(e)})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{p}: holds a {type(obj).__name__}, expected a state dict (name → tensor)")
    return dict(obj)


def write_checkpoint(state: Mapping, path: str | Path) -> Path:
    """Write ``state`` for X-SAM: ``.bin``/``.pth``/``.pt`` with ``torch.save`` (what X-SAM's
    ``guess_load_checkpoint`` reads) or ``.safetensors``; through a temporary sibling, so a failed write
    leaves nothing behind."""
    p = Path(path)
    if p.suffix not in (".bin", ".pth", ".pt", ".safetensors"):
        raise ConvertError(f"{p}: expected an output name ending in .bin, .pth, .pt or .safetensors")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConvertError(
            f"--out {p}: its folder {p.parent} cannot be made (a file is in the way)"
        ) from None
    if p.is_dir():
        raise ConvertError(f"--out {p}: a folder; give a file name")
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if p.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
        else:
            # through a file object: torch names the zip's folder "archive", not after the (random) temporary
            # file name, so the same weights give the same bytes
            with open(tmp, "wb") as f:
                torch.save({k: v.contiguous() for k, v in state.items()}, f)
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


def _export_config(model, stage: int, flavor: str, init_dir: str | None, source: dict) -> dict:
    """``config.json`` of an imported export, shaped like a trained one: the stage recipe (read by tools for
    its flavor and init folder), the resolved model config, and where the weights came from."""
    cfg = get_stage(stage, flavor=flavor)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_dir=init_dir))
    return {"stage": cfg.to_dict(), "model": model.config.to_dict(), "source": source}


def import_checkpoint(
    path: str | Path, *, stage: int, out: str, flavor: str = "xsam-phi3", init_dir: str | None = None
) -> dict:
    """Convert X-SAM's stage-``stage`` checkpoint at ``path`` into a stage export at ``out`` (folder or URI).
    The model is built from ``flavor`` on the meta device for the checks. Returns the export's lineage."""
    if stage not in IMPORT_STAGES:
        raise ConvertError(f"--stage must be one of {IMPORT_STAGES} (X-SAM releases those), got {stage}")
    if flavor not in XSAM_FLAVORS:
        raise ConvertError(f"unknown flavor {flavor!r}; known: {sorted(XSAM_FLAVORS)}")
    if init_dir is not None:
        _check_init_dir(init_dir, XSAM_FLAVORS[flavor])
    xsam_state = read_checkpoint(path)
    model = build_xsam(flavor, device="meta")
    mapped = from_xsam(xsam_state, model, stage, source=str(path))
    resolved = Path(path).resolve()
    source = {
        "kind": "xsam-archive",
        "file": str(resolved),
        "sha256": sha256_of(str(resolved)),
        "bytes": resolved.stat().st_size,
        "tensors": len(xsam_state),
    }
    lineage = {
        "name": f"xsam_s{stage}_import",
        "source": source,
        "flavor": flavor,
        "init_dir": init_dir,
        "dropped": mapped.dropped,
        "parents": [],
        "code": code_version(),
    }
    config = _export_config(model, stage, flavor, init_dir, source)
    write_export(str(out), mapped.state, stage=stage, config=config, lineage=lineage)
    logger.info("stage-%d export %s: %d tensors from %s", stage, out, len(mapped.state), path)
    return {**lineage, "stage": stage, "tensors": len(mapped.state)}


def export_checkpoint(export: str, out: str | Path) -> Path:
    """Write the stage export at ``export`` (folder or URI; verified against its lineage) as an X-SAM
    checkpoint at ``out``."""
    try:
        found = Export.read(export, verify=False)  # state() checks the bytes it reads
        state = found.state()
    except ExportError as e:
        raise ConvertError(str(e)) from None
    written = write_checkpoint(to_xsam(state, source=export), out)
    logger.info("stage-%s export %s → %s (%d tensors)", found.stage, export, written, len(state))
    return written


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrate.convert", description=__doc__.split("\n\n")[0])
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
    """The CLI; run through :func:`pipelines.errors.run_cli`, a :class:`ConvertError` is one line on stderr
    and exit code 2."""
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
