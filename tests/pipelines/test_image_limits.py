"""Hostile image files meet the build's limits, in the build and in ``predict.py``, in bounded memory.

``predict.py`` applies the build's pixel limit from the header before decoding (a 631-byte JPEG claiming
30000x30000 pixels used to allocate 2.6 GB) and the build's file-size limit before reading. The build skips
an image file over ``--max-image-bytes`` from its size alone (``image_file_too_large``, counted): a sparse
4 GiB JPEG-plus-zeros used to be read whole and copied into a shard. Each hostile case runs in a child whose
address space is capped (``RLIMIT_AS``) below what reading or decoding it would take.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipelines.build_options import DEFAULT_MAX_IMAGE_BYTES, BuildOptions
from pipelines.demo_data import write_demo

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def _jpeg(h: int, w: int) -> bytes:
    """A valid 8x8 JPEG whose frame header then claims ``h`` x ``w`` pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _png(h: int, w: int) -> bytes:
    """A valid 8x8 PNG whose IHDR then claims ``h`` x ``w`` pixels (its CRC fixed)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _bounded(code: str, *args: str, headroom: int = GiB) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose address space is capped at what its imports took plus ``headroom``."""
    prologue = (
        "import resource, sys\n"
        "def cap():\n"
        "    size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        f"    resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, size + {headroom}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", prologue + code, *args], capture_output=True, text=True, env=env, timeout=300
    )


PREDICT = """
from orchestrate import predict
from pipelines.errors import run_cli
cap()
sys.exit(run_cli(predict.main, ["--export", "no-export", "--prompt", "<p>x</p>", "--out", sys.argv[2],
                                "--image", sys.argv[1]]))
"""


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("bomb.jpg", _jpeg(30000, 30000), "30000x30000 > 100000000 pixels (--max-image-pixels)"),
        ("bomb.png", _png(30000, 30000), "30000x30000 > 100000000 pixels (--max-image-pixels)"),
        ("121mpx.jpg", _jpeg(11000, 11000), "11000x11000 > 100000000 pixels (--max-image-pixels)"),
        ("not-an-image.jpg", b"GIF89a" + bytes(600), "neither JPEG nor PNG data"),
    ],
)
def test_predict_refuses_an_image_over_the_pixel_limit_from_its_header(name, data, message, tmp_path):
    image = tmp_path / name
    image.write_bytes(data)
    done = _bounded(PREDICT, str(image), str(tmp_path / "pred"))
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert err[0] == f"error: --image {image}: {message}"
    assert not (tmp_path / "pred").exists()  # nothing written


def test_predict_refuses_a_file_over_the_size_limit_unread(tmp_path):
    image = tmp_path / "padded.jpg"
    image.write_bytes(_jpeg(8, 8))
    os.truncate(image, 4 * GiB)  # sparse: a valid JPEG and zeros, 4 GiB on paper
    done = _bounded(PREDICT, str(image), str(tmp_path / "pred"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        done.stderr.strip()
        == f"error: --image {image}: {4 * GiB} bytes > {DEFAULT_MAX_IMAGE_BYTES} (--max-image-bytes)"
    )


BUILD = """
from pipelines.build.driver import build
from pipelines.build_options import BuildOptions
cap()
build(sys.argv[1], sys.argv[2], sources=["coco_instance"], options=BuildOptions(max_image_bytes=int(sys.argv[3])))
"""


def test_the_build_skips_an_image_file_over_the_size_limit_unread(tmp_path):
    """A sparse 4 GiB JPEG-plus-zeros (valid image, within the pixel limit) in a child capped at 1 GiB above
    its imports: skipped from its size, counted, and the other images are built."""
    root = write_demo(tmp_path / "datas", families=["coco"])
    ann = json.loads((root / "img_genseg/coco2017/annotations/instances_train2017.json").read_text())
    first = root / "img_genseg/coco2017/train2017" / ann["images"][0]["file_name"]
    os.truncate(first, 4 * GiB)
    out = tmp_path / "out"
    done = _bounded(BUILD, str(root), str(out), str(DEFAULT_MAX_IMAGE_BYTES))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "coco_instance/train/manifest.json").read_text())
    assert manifest["skipped"] == {"image_file_too_large": 1}
    assert manifest["counts"]["samples"] == len(ann["images"]) - 1
    assert sum(f.stat().st_size for f in out.rglob("*.tar")) < 16 << 20  # nothing of it in a shard
    rows = [json.loads(x) for x in (out / "coco_instance/train/skipped.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rows] == ["image_file_too_large"] and "--max-image-bytes" in rows[0][
        "detail"
    ]


def test_the_file_size_limit_is_an_option_that_keeps_default_fingerprints():
    assert "max_image_bytes" not in BuildOptions().to_dict()  # default builds keep their fingerprint
    assert BuildOptions(max_image_bytes=1 << 20).to_dict()["max_image_bytes"] == 1 << 20
    from orchestrate.build_shards import options_from, parse_args

    args = parse_args(["--data-root", "d", "--out", "o", "--max-image-bytes", "1000"])
    assert options_from(args).max_image_bytes == 1000
