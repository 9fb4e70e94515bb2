"""Run a stage-3 export on one image and one prompt: an overlay PNG and the prediction JSON.

    python orchestrate/predict.py --export RUN/stage3/export --image dog.jpg \
        --prompt "Please segment <p>the dog on the left</p>." --out pred/
    python orchestrate/predict.py --export RUN/stage3/export --image street.jpg --out pred/ \
        --prompt "Can you segment the image based on the following categories: <p>car</p>, <p>person</p>?"
    python orchestrate/predict.py --export RUN/stage3/export --image a.jpg --out pred/ --task intseg \
        --prompt "What is the object shown by the region <p><region></p>?" --box 10,20,120,200

Writes ``<out>/<image name>.png`` (masks coloured by phrase over the image, the generated answer and a legend
beside it) and ``<out>/<image name>.json`` (the prediction line in the predictions format, the prompt, the
task, the export, a name per mask). Phrases go in ``<p>…</p>``; ``--task`` defaults to what the prompt implies
(:mod:`orchestrate.evaluation.one_image`). Bad input (an image that cannot be decoded, a prompt whose task
makes no mask, an export that is not stage 3) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from PIL import Image

from orchestrate.evaluation.eval_errors import EvaluationError  # noqa: E402
from orchestrate.evaluation.export_inference import load_export, open_export  # noqa: E402
from orchestrate.evaluation.one_image import infer_task, predict  # noqa: E402
from orchestrate.evaluation.overlay import draw, labelled_masks  # noqa: E402
from pipelines.build.image_check import checked_header  # noqa: E402
from pipelines.build_options import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS  # noqa: E402
from pipelines.errors import ImageDecodeError, SkipRecord, run_cli  # noqa: E402
from pipelines.loader.decode import decode_image  # noqa: E402
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a stage-3 export folder (RUN/stage3/export)")
    p.add_argument("--image", required=True, help="a JPEG or PNG file")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="refuse a larger image from its header, before decoding (default: the build's, 100 Mpx)",
    )
    p.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="refuse a larger image file unread (default: the build's, 256 MiB)",
    )
    p.add_argument(
        "--prompt", required=True, help="the question; phrases in <p>…</p>, visual prompts as <region>"
    )
    p.add_argument(
        "--task", help="genseg, ovseg, refseg, reaseg, gcgseg, vgdseg or intseg (default: from the prompt)"
    )
    p.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 of the next <region> (repeat)")
    p.add_argument("--out", required=True, help="folder for the PNG and the JSON")
    p.add_argument("--use-gpu", action="store_true", help="CUDA, bf16 (default: CPU, fp32)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    add_verbosity_flags(p)
    return p.parse_args(argv)


def _boxes(values: list[str]) -> list[tuple[float, ...]]:
    out = []
    for v in values:
        try:
            box = tuple(float(x) for x in v.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise EvaluationError(f"--box {v!r}: expected x0,y0,x1,y1")
        out.append(box)
    return out


def read_image(path: str, max_bytes: int, max_pixels: int) -> bytes:
    """The bytes of ``--image`` under the build's limits: a regular file of at most ``max_bytes`` (checked
    before reading), whose header claims at most ``max_pixels`` (checked before decoding); else
    :class:`EvaluationError` in one line."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise EvaluationError(f"--image {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise EvaluationError(f"--image {path}: not a regular file")
    if st.st_size > max_bytes:
        raise EvaluationError(f"--image {path}: {st.st_size} bytes > {max_bytes} (--max-image-bytes)")
    with open(path, "rb") as f:
        data = f.read(st.st_size)
    try:
        checked_header(data, path, max_pixels)
    except SkipRecord as e:
        hint = " (--max-image-pixels)" if e.reason == "image_too_large" else ""
        raise EvaluationError(f"--image {e.detail}{hint}") from None
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(verbosity(args))
    image = read_image(args.image, args.max_image_bytes, args.max_image_pixels)
    try:
        pixels = decode_image(image)  # bad input fails here, before the model loads
    except ImageDecodeError as e:
        raise EvaluationError(f"--image {args.image}: not a decodable JPEG or PNG ({e})") from None
    boxes = _boxes(args.box)
    infer_task(args.prompt, args.task)
    info = open_export(args.export)
    if info.stage != 3:
        raise EvaluationError(
            f"--export {args.export} is a stage-{info.stage} export; predict.py needs stage 3"
        )
    model, info = load_export(args.export, "cuda" if args.use_gpu else "cpu")
    pred = predict(model, image, args.prompt, task=args.task, boxes=boxes, max_new_tokens=args.max_new_tokens)
    names = iter(pred.labels)
    masks = labelled_masks(pred.line, lambda field, entry: next(names))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem

    Image.fromarray(draw(pixels, masks, pred.line.get("text"))).save(out / f"{stem}.png")
    record = {
        "image": str(Path(args.image).resolve()),
        "prompt": args.prompt,
        "task": pred.task,
        "export": args.export,
        "prediction": pred.line,
        "labels": pred.labels,
    }
    (out / f"{stem}.json").write_text(json.dumps(record) + "\n")
    print(f"{pred.task}: {len(pred.labels)} masks; answer: {pred.line.get('text')!r}")
    print(f"wrote {out / (stem + '.png')} and {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
