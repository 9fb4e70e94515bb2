"""One user image and one prompt through a stage-3 export: what ``orchestrate/predict.py`` runs.

The prompt is a user turn in the training layout: ``<p>…</p>`` around each phrase, ``<region>`` inside a span
for a visual prompt (``--box`` gives each one, in order). The task decides what the answer's ``<SEG>`` becomes
(:data:`TASK_OUTPUT`); without ``--task`` it follows from the prompt: regions → ``intseg`` (one) or ``vgdseg``
(several), several phrases → ``genseg``, one phrase → ``refseg``, none → ``gcgseg`` (a caption with grounded
phrases). The model generates the answer (greedy, KV cache) and its ``<SEG>`` becomes masks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from orchestrate.evaluation.eval_errors import EvaluationError
from orchestrate.evaluation.predictions import phrase_spans
from pipelines import masks as mask_ops
from pipelines.loader.decode import decode_image
from pipelines.schema import IMAGE, REGION, ImageRef, Region, Sample, Turn

# Heavy imports (torch, transformers) are deferred into predict: `predict.py --help` and argument errors
# stay light.

TASK_OUTPUT = {
    "genseg": "panoptic",
    "ovseg": "panoptic",
    "refseg": "per_turn",
    "reaseg": "per_turn",
    "gcgseg": "phrases",
    "vgdseg": "instances",
    "intseg": "interactive",
}
"""Every task whose answer has a ``<SEG>`` (chat has none)."""


@dataclass
class Prediction:
    """The prediction line (docs/contracts.md#predictions-and-results fields) and, per mask entry, the name it
    is drawn with."""

    task: str
    line: dict
    labels: list[str] = field(default_factory=list)


def infer_task(prompt: str, task: str | None) -> str:
    """``task`` checked, or the task the prompt implies (see the module docstring)."""
    if task is not None:
        if task not in TASK_OUTPUT:
            raise EvaluationError(
                f"--task {task}: no <SEG>-producing task; choose one of {', '.join(sorted(TASK_OUTPUT))}"
            )
        return task
    regions = prompt.count(REGION)
    if regions:
        return "intseg" if regions == 1 else "vgdseg"
    spans = len(phrase_spans(prompt))
    return "genseg" if spans > 1 else "refseg" if spans == 1 else "gcgseg"


def _check_spans(prompt: str) -> list[str]:
    """The phrases of a well-formed prompt (``<p>`` and ``</p>`` alternate, nothing nested)."""
    tags = re.findall(r"</?p>", prompt)
    if any(t != ("<p>" if i % 2 == 0 else "</p>") for i, t in enumerate(tags)) or len(tags) % 2:
        raise EvaluationError(f"--prompt: <p> and </p> must alternate without nesting, got {tags}")
    return phrase_spans(prompt)


def box_mask(box: Sequence[float], hw: tuple[int, int]) -> np.ndarray:
    """``(x0, y0, x1, y1)`` in pixels → HxW bool, clipped to the image (an empty box is an error)."""
    h, w = hw
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    m = np.zeros((h, w), bool)
    m[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = True
    if not m.any():
        raise EvaluationError(f"--box {list(box)}: outside the {w}x{h} image or empty")
    return m


def user_sample(image: bytes, prompt: str, task: str, boxes: Sequence[Sequence[float]]) -> Sample:
    """A one-turn Sample of the image and prompt (``<image>`` added first when missing)."""
    hw = decode_image(image).shape[:2]
    phrases = _check_spans(prompt)
    slots = prompt.count(REGION)
    if slots != len(boxes):
        raise EvaluationError(f"--prompt has {slots} <region> slots but {len(boxes)} --box were given")
    text = prompt if IMAGE in prompt else f"{IMAGE}\n{prompt}"
    slot_spans = [k for k, p in enumerate(phrases) for _ in range(p.count(REGION))]
    regions = [
        Region(label=k, type="box", rle=mask_ops.encode(box_mask(b, hw).astype(np.uint8))[0])
        for k, b in zip(slot_spans, boxes, strict=True)
    ]
    return Sample(
        key="predict/image/input",
        source="predict",
        task=task,
        split="image",
        image=ImageRef(path="input", width=int(hw[1]), height=int(hw[0])),
        conversation=[Turn("user", text)],
        phrases=phrases,
        regions=regions,
    )


def predict(
    model, image: bytes, prompt: str, *, task: str | None = None, boxes=(), max_new_tokens: int = 512
):
    """Generate the answer to ``prompt`` about ``image`` and post-process it for the task →
    :class:`Prediction`. ``model``: a stage-3 export's model
    (:func:`~orchestrate.evaluation.export_inference.load_export`)."""
    from xsam_model.inferencer import InferenceConfig, Inferencer
    from xsam_model.postprocess import OutputSpec, prediction_line

    if not prompt.strip():
        raise EvaluationError("--prompt is empty")
    task = infer_task(prompt, task)
    sample = user_sample(image, prompt, task, boxes)
    kind = TASK_OUTPUT[task]
    k = len(sample.phrases)
    spec = {
        "panoptic": OutputSpec("panoptic", categories=tuple(range(k))),
        "instances": OutputSpec("instances", categories=tuple(range(k))),
        "interactive": OutputSpec("interactive", prompt=sample.regions[0].rle if sample.regions else None),
    }.get(kind, OutputSpec(kind))
    if kind == "interactive" and not sample.regions:
        raise EvaluationError("--task intseg needs a <region> in the prompt and its --box")
    dec = Inferencer(model, InferenceConfig("generate", max_new_tokens=max_new_tokens), stage=3)(
        [(sample, image)]
    )[0]
    line = prediction_line(dec, spec)
    return Prediction(task, line, _names(line, sample, kind))


def _names(line: dict, sample: Sample, kind: str) -> list[str]:
    spans = phrase_spans(line.get("text") or "")
    names = []
    for e in line.get("panoptic", []) + line.get("instances", []):
        names.append(sample.phrases[e["category_id"]])
    for e in line.get("masks", []):
        lab = e["label"]
        pool = spans if kind == "phrases" else sample.phrases
        names.append(pool[lab] if lab < len(pool) else f"mask {lab}")
    return names
