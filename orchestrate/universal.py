"""DeepSpeed state across world sizes: when a checkpoint needs DeepSpeed's universal format, and the one
conversion into it (run by the driver before Ray Train starts).

A ZeRO-1/2 checkpoint holds each rank's partition of the optimizer (fp32 master weights, Adam moments) in
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, cut for the world size that wrote it; DeepSpeed refuses to
load it on another one ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size
is not currently supported"). Its universal format stores every parameter whole, one folder per parameter
(``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``), and every ZeRO-1/2 optimizer of DeepSpeed 0.19.8 (fp32 and
bf16) cuts it again for the world size that loads it (``"checkpoint": {"load_universal": true}``).

ZeRO-0 needs nothing: it keeps the whole optimizer state in ``mp_rank_00_model_states.pt`` (no partition),
which loads on any world size; DeepSpeed's converter also has nothing to convert there (no optimizer
partition files), so it is never called for stage 0.

Layout, next to the checkpoint it was made from (so Ray Train's ``num_to_keep`` removes both together)::

    checkpoint_<time>/deepspeed/…             as written by the ranks
    checkpoint_<time>/universal/latest_universal, universal/deepspeed/{zero/…, mp_rank_00_model_states.pt}

The folder is written under a temporary name and renamed when complete, so a second resume (or a resume
after a driver killed mid-conversion) finds either a finished conversion, reused as is, or none.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

from orchestrate.run_errors import ResumeError
from pipelines import storage

logger = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
"""Sub-folder of a checkpoint holding its universal conversion."""
DONE_FILE = "latest_universal"
"""Written by DeepSpeed's converter last (it names the tag folder); its presence marks a finished
conversion."""


def needs_universal(saved_world: int, world: int, zero_stage: int) -> bool:
    """True when a checkpoint written by ``saved_world`` ranks under ``zero_stage`` must be converted to load
    on ``world`` ranks: only ZeRO-1/2 partition the optimizer by world size."""
    return saved_world != world and zero_stage > 0


def universal_url(checkpoint_url: str) -> str:
    return storage.join(checkpoint_url, UNIVERSAL_DIR)


def is_converted(checkpoint_url: str) -> bool:
    fs, path = storage.fs_and_path(universal_url(checkpoint_url))
    return fs.exists(f"{path}/{DONE_FILE}")


def _converter_error(tag_dir: str, proc: subprocess.CompletedProcess) -> ResumeError:
    """One line: the converter's last meaningful output line says why (e.g. a missing partition file)."""
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    why = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    return ResumeError(
        f"{tag_dir}: DeepSpeed's universal-checkpoint conversion failed (exit {proc.returncode}): {why[:300]}"
    )


def _run_converter(tag_dir: str, out_tag_dir: str) -> None:
    """``python -m deepspeed.checkpoint.ds_to_universal`` on local folders, in a child process: the converter
    prints progress and forks extraction workers, none of which belongs in the driver."""
    workers = max(1, min(4, (os.cpu_count() or 1) // 2))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        tag_dir,
        "--output_folder",
        out_tag_dir,
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
        # our models carry no Megatron-style UNIVERSAL_CHECKPOINT_INFO (no tensor-parallel slices to merge)
        "--inject_missing_state",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # the conversion is torch.load/save on CPU, GPUs or not
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _converter_error(tag_dir, proc)


def convert(checkpoint_url: str, tag: str) -> str:
    """Convert ``<checkpoint>/<tag>`` into ``<checkpoint>/universal`` unless that is already done; returns the
    universal folder's URL. Remote checkpoints are converted in a local temporary folder and uploaded.
    Raises :class:`ResumeError` (one line) when DeepSpeed cannot convert the checkpoint."""
    out_url = universal_url(checkpoint_url)
    if is_converted(checkpoint_url):
        logger.info("reusing the universal checkpoint %s", out_url)
        return out_url
    fs, path = storage.fs_and_path(checkpoint_url)
    if not fs.isdir(f"{path}/{tag}"):
        raise ResumeError(f"{checkpoint_url}: no DeepSpeed folder {tag}/ to convert")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xsam-universal-") as scratch:
        local = isinstance(fs, LocalFileSystem)
        src = f"{path}/{tag}" if local else os.path.join(scratch, "src")
        if not local:
            fs.get(f"{path}/{tag}", src, recursive=True)
        # converted beside its final place (a rename, not a copy, on local storage), renamed when complete
        work = f"{path}/{storage.TMP_MARK}{UNIVERSAL_DIR}-{uuid.uuid4().hex[:8]}" if local else scratch + "/u"
        os.makedirs(work, exist_ok=True)
        try:
            _run_converter(src, os.path.join(work, tag))
            if local:
                os.replace(work, f"{path}/{UNIVERSAL_DIR}")
            else:
                fs.put(work, f"{path}/{storage.TMP_MARK}{UNIVERSAL_DIR}", recursive=True)
                fs.mv(f"{path}/{storage.TMP_MARK}{UNIVERSAL_DIR}", f"{path}/{UNIVERSAL_DIR}", recursive=True)
        finally:
            if local and os.path.isdir(work):  # a failed conversion (or one that lost a race) leaves nothing
                shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "converted %s/%s to DeepSpeed's universal format in %.1f s",
        checkpoint_url,
        tag,
        time.perf_counter() - t0,
    )
    return out_url
