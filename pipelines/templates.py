"""Conversation wordings per task (paraphrases of X-SAM's templates; recipe §2).

Only the token layout is fixed by the recipe (where ``<p>…</p>``, ``<region>`` and ``<SEG>`` go); the wording
is ours. Every template is picked with the sample's seeded RNG (``pipelines.sources.base.record_rng``) so a
rebuild renders identical text, and the structured fields of the Sample allow re-rendering at load time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

SEG_ANSWERS = (
    "<SEG>.",
    "It is <SEG>.",
    "Sure, <SEG>.",
    "Sure, it is <SEG>.",
    "Sure, the segmentation result is <SEG>.",
)

GENSEG_QUESTIONS = (
    "Can you segment the image based on the following categories: {cats}? Please output the segmentation masks.",
    "Please segment the image into the following categories: {cats}, and output the segmentation masks.",
    "Segment this image for the categories {cats}. Please output the segmentation masks.",
    "Could you produce segmentation masks for these categories: {cats}?",
    "What are the segmentation masks of the following categories in this image: {cats}?",
    "Identify and segment every region of the following categories: {cats}. Please output the masks.",
)

REFSEG_QUESTIONS = (
    "Please segment {phrase} in this image.",
    "Can you segment {phrase} in this image?",
    "What is {phrase} in this image? Please output the segmentation mask.",
    "Where is {phrase} in this picture? Please output the segmentation mask.",
    "Please output the segmentation mask of {phrase}.",
    "Could you find {phrase} in the image and segment it?",
    "Segment {phrase} for me, please.",
    "Show me the mask of {phrase}.",
    "Which part of the image is {phrase}? Please respond with a segmentation mask.",
    "Highlight {phrase} in this image with a segmentation mask.",
)
REFSEG_ANSWERS = (
    "<SEG>.",
    "It is <SEG>.",
    "Sure, <SEG>.",
    "Sure, it is <SEG>.",
    "Sure, the segmentation mask is <SEG>.",
)

REASEG_LONG_QUESTIONS = (
    "{sent} Please output the segmentation mask.",
    "{sent} Please respond with the segmentation mask.",
    "{sent} Please generate the segmentation mask.",
    "{sent} Please extract the segmentation mask.",
    "{sent} Answer with a segmentation mask.",
)
REASEG_SHORT_QUESTIONS = (
    "Can you segment {sent} in this image?",
    "Please segment {sent} in this image.",
    "What is {sent} in this image? Please respond with the segmentation mask.",
    "What is {sent} in this image? Please output the segmentation mask.",
    "Could you find {sent} in this image and output its mask?",
)
REASEG_EXPLAIN_QUESTIONS = (
    "{sent} Please output the segmentation mask and explain why.",
    "{sent} Please output the segmentation mask and explain the reason.",
    "{sent} Please give some explanation, and output the segmentation mask.",
    "{sent} Please explain why, and respond with the segmentation mask.",
    "{sent} Output the segmentation mask and give the reason for it.",
)
REASEG_EXPLAIN_SUFFIXES = (
    "<SEG>.",
    "It is <SEG>.",
    "And <SEG>.",
    "And it is <SEG>.",
    "And the segmentation mask is <SEG>.",
)

GCG_QUESTIONS = (
    "Could you please give me a brief description of the image? Please respond with interleaved segmentation masks for the corresponding parts of the answer.",
    "Can you provide a brief description of this image? Please output with interleaved segmentation masks for the corresponding phrases.",
    "Please briefly describe the contents of the image. Please respond with interleaved segmentation masks for the corresponding parts of the answer.",
    "Could you give a brief explanation of what can be found within this picture? Please output with interleaved segmentation masks for the corresponding phrases.",
    "Could you give me a brief explanation of this picture? Please respond with interleaved segmentation masks for the corresponding phrases.",
    "Could you provide me with a brief analysis of this photo? Please output with interleaved segmentation masks for the corresponding parts of the answer.",
)
GCG_ANSWER_SUFFIXES = (
    "<SEG>.",
    "And <SEG>.",
    "The segmentation mask is <SEG>.",
    "And the segmentation mask is <SEG>.",
)

VGD_QUESTIONS = (
    "Can you segment the image based on the following regions: {regions}? Please output the corresponding segmentation mask.",
    "Please segment the image according to the following regions: {regions}, and output the segmentation masks.",
    "Segment everything in this image that matches the regions {regions}. Please output the segmentation masks.",
    "Could you output segmentation masks of the objects like these regions: {regions}?",
    "What are the segmentation masks of the objects shown by the regions {regions}?",
    "Find and segment all objects of the same kind as the regions {regions}.",
)


def tag(phrase: str) -> str:
    """``<p>phrase</p>``."""
    return f"<p>{phrase}</p>"


def join_tags(items: Sequence[str]) -> str:
    return ", ".join(tag(x) for x in items)


def pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def with_image(question: str, image_token: str) -> str:
    """The first user turn: the image placeholder, then the question."""
    return image_token + question
