"""``llava_pretrain`` and ``llava_instruct``: LLaVA conversations as chat Samples (task chat; recipe §1.3,
§2.9).

Inputs (docs/contracts.md#data-root, ``img_chat/llava/``): ``LLaVA-Pretrain/blip_laion_cc_sbu_558k.json`` with
images in ``LLaVA-Pretrain/images`` (stage 2) and ``LLaVA-Instruct-150K/llava_v1_5_mix665k.json`` with images
in ``llava_images`` (X-SAM's stage-3 config; ``LLaVA-Instruct-150K/llava_images`` is also looked at): JSON
lists of ``{id, image?, conversations: [{from: human|gpt, value}]}``.

The lists are streamed (never loaded whole) and keyed by their zero-padded position, so file order is key
order and nothing is sorted. A record becomes turns as X-SAM's ``img_chat_map_fn`` makes them: leading
assistant messages are dropped, ``<image>`` is removed from where it stands and put at the front of the first
user turn, consecutive messages of one role are joined by a newline, and an unanswered last user message is
dropped (counted). ``llava_pretrain`` always uses ``<image>\\n`` (X-SAM's stage-2 map function has no image
token argument on either branch); ``llava_instruct`` uses ``BuildOptions.image_token``.

Text-only records (about 40.7k in mix665k) are kept by default as Samples with ``image=None``, as the paper's
code trains them (the archive's ``ImgConvDataset`` never reads ``exclude_pure_text``; the processor gives them
zero encoder inputs and no image token); ``llava_keep_text_only=false`` leaves them out, each counted under
``text_only``, as X-SAM *main*'s stage 3 (``exclude_pure_text=True``). ``llava_instruct``'s train split leaves
out the RefCOCO/+/g eval images among its COCO train2017 images (``coco/train2017/<id>.jpg``), as the COCO
sources do. Bad records are skipped with a reason: an unknown role (``unknown_role``), an empty or non-text
message (``empty_turn``), more than one ``<image>`` (``multiple_image_tokens``), ``<image>`` in a record
without an image (``image_token_without_image``), or text holding a token the model reserves (``<SEG>``,
``<p>``, ``</p>``, ``<region>``: ``reserved_token_in_text``).

The image's size is not in the JSON; it is read from the file header at conversion time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pipelines.images import image_size
from pipelines.schema import IMAGE, P_CLOSE, P_OPEN, REGION, SEG, ImageRef, Sample, Turn
from pipelines.sources.base import (
    BuildOptions,
    ConvertContext,
    Shared,
    Skip,
    SkipRecord,
    SourceFiles,
    SourceNotFound,
)
from pipelines.sources.readers.jsonstream import iter_items

LLAVA_ROOT = "img_chat/llava"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
RESERVED = (SEG, P_OPEN, P_CLOSE, REGION)
STAGE2_IMAGE_TOKEN = "<image>\n"


def chat_turns(messages, has_image: bool, image_token: str) -> tuple[list[Turn], dict]:
    """LLaVA ``conversations`` -> Turns and a few counts for meta; :class:`SkipRecord` for a bad record."""
    if not isinstance(messages, list) or not messages:
        raise SkipRecord("no_conversation", "conversations is missing, empty or not a list")
    turns: list[Turn] = []
    for i, msg in enumerate(messages):
        role = ROLES.get(msg.get("from")) if isinstance(msg, dict) else None
        if role is None:
            who = msg.get("from") if isinstance(msg, dict) else type(msg).__name__
            raise SkipRecord("unknown_role", f"message {i} is from {who!r}; expected one of {sorted(ROLES)}")
        text = msg.get("value")
        if not isinstance(text, str):
            raise SkipRecord("empty_turn", f"message {i} ({msg.get('from')}) has no text")
        if not text.replace(IMAGE, "").strip() and not (role == "user" and IMAGE in text):
            raise SkipRecord(
                "empty_turn", f"message {i} ({msg.get('from')}) has no text"
            )  # "<image>" alone is fine
        for tok in RESERVED:
            if tok in text:
                raise SkipRecord("reserved_token_in_text", f"message {i} contains {tok!r}")
        turns.append(Turn(role, text))
    n_image = sum(t.text.count(IMAGE) for t in turns)
    if n_image > 1:
        raise SkipRecord("multiple_image_tokens", f"{n_image} <image> tokens in one record")
    if n_image and not has_image:
        raise SkipRecord("image_token_without_image", "<image> in the text but the record has no image")
    counts = {"leading_assistant_dropped": 0, "image_token_added": has_image and not n_image}
    while turns and turns[0].role == "assistant":
        turns.pop(0)
        counts["leading_assistant_dropped"] += 1
    merged: list[Turn] = []
    for t in turns:
        text = t.text.replace(IMAGE, "").strip() if IMAGE in t.text else t.text
        if merged and merged[-1].role == t.role:
            merged[-1] = Turn(t.role, f"{merged[-1].text}\n{text}".strip())
        else:
            merged.append(Turn(t.role, text))
    counts["unanswered_dropped"] = int(bool(merged) and merged[-1].role == "user")
    if counts["unanswered_dropped"]:
        merged.pop()
    if not merged:
        raise SkipRecord("no_turns", "no user turn followed by an answer")
    if has_image:  # X-SAM: token + text, then strip (so "<image>\n" + "" stays "<image>")
        merged[0] = Turn("user", (image_token + merged[0].text).strip())
    if any(not t.text.strip() for t in merged):
        raise SkipRecord("empty_turn", "a turn is empty once <image> is moved")
    return merged, counts


def coco_train2017_id(image: object) -> int | None:
    """The COCO image id of a ``coco/train2017/<digits>.jpg`` file name, else None."""
    if not isinstance(image, str) or not image.startswith("coco/train2017/"):
        return None
    stem = os.path.splitext(os.path.basename(image))[0]
    return int(stem) if stem.isdigit() else None


class _Llava:
    name: str
    json_rel: str
    image_dirs: tuple[str, ...]  # under img_chat/llava/, first existing wins
    task = "chat"
    path_roles = ("annotations", "images")
    splits = ("train",)
    version = 1

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        """Overrides: ``annotations`` (the JSON list), ``images`` (folder relative to the data root)."""
        overrides = overrides or {}
        ann = overrides.get("annotations") or os.path.join(data_root, LLAVA_ROOT, self.json_rel)
        candidates = [f"{LLAVA_ROOT}/{d}" for d in self.image_dirs]
        images = overrides.get("images") or next(
            (d for d in candidates if os.path.isdir(os.path.join(data_root, d))), candidates[0]
        )
        if not os.path.exists(ann) or not os.path.isdir(os.path.join(data_root, images)):
            raise SourceNotFound(self.name, [ann] + [os.path.join(data_root, d) for d in candidates])
        return SourceFiles(data_root=data_root, inputs={"annotations": ann}, dirs={"images": images})

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        keep_text = options.extra.llava_keep_text_only
        prefix = f"{self.name}/{split}"
        for i, rec in enumerate(iter_items(files.inputs["annotations"], "item")):
            key = f"{prefix}/{i:09d}"  # file position: streamed in key order, no sort
            if not isinstance(rec, dict):
                yield Skip(key, "bad_record", f"list item {i} is a {type(rec).__name__}")
                continue
            image = rec.get("image")
            if image is None and not keep_text:
                yield Skip(
                    key, "text_only", f"record {rec.get('id')!r} has no image (llava_keep_text_only=false)"
                )
                continue
            yield {
                "key": key,
                "id": rec.get("id"),
                # the eval-leakage guard reads record["image"]["id"]: a COCO train2017 id, else None
                "image": {"file_name": image, "id": coco_train2017_id(image)},
                "conversations": rec.get("conversations"),
            }

    def image_token(self, options: BuildOptions) -> str:
        return options.image_token

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        image = record["image"]["file_name"]
        if image is not None and (not isinstance(image, str) or not image):
            raise SkipRecord("bad_record", f"image is {image!r}, not a file name")
        turns, counts = chat_turns(
            record.get("conversations"), image is not None, self.image_token(ctx.options)
        )
        ref = None
        if image is not None:
            rel = f"{ctx.files.dirs['images']}/{image}"
            data = ctx.read_bytes(rel, missing_reason="missing_image", max_bytes=ctx.options.max_image_bytes)
            try:
                h, w = image_size(data)
            except (OSError, ValueError, SyntaxError) as e:
                raise SkipRecord("corrupt_image", f"{rel}: {e}") from None
            ref = ImageRef(path=rel, width=w, height=h)
        return Sample(
            key=record["key"],
            source=self.name,
            task="chat",
            split=ctx.split,
            image=ref,
            conversation=turns,
            meta={"id": record.get("id"), "image_file": image, **{k: v for k, v in counts.items() if v}},
        )


class LlavaPretrain(_Llava):
    """LLaVA-Pretrain 558k captions (stage 2)."""

    name = "llava_pretrain"
    json_rel = "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    image_dirs = ("LLaVA-Pretrain/images",)

    def image_token(self, options: BuildOptions) -> str:
        return STAGE2_IMAGE_TOKEN


class LlavaInstruct(_Llava):
    """LLaVA-1.5 mix665k instructions (stage 3)."""

    name = "llava_instruct"
    eval_image_guard_splits = ("train",)  # its COCO train2017 images: RefCOCO/+/g eval images left out
    json_rel = "LLaVA-Instruct-150K/llava_v1_5_mix665k.json"
    image_dirs = (
        "llava_images",
        "LLaVA-Instruct-150K/llava_images",
    )  # X-SAM's config; LLaVA-Instruct's folder
