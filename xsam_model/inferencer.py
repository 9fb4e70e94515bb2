"""Inference: Samples (or a user's prompt) in, each ``<SEG>``'s decoder output out, with the model's own
parts.

Two modes (:class:`InferenceConfig`):

- ``teacher`` — the reference answers are given (X-SAM's evaluation protocol for every segmentation benchmark
  but GCG: ``output_ids_with_output=True``): one LLM forward over the whole conversation, exactly the training
  forward without losses;
- ``generate`` — greedy decoding from the prompt's embeddings with the LLM's KV cache (or without it, for
  checks), turn by turn for multi-turn samples (a turn's prompt holds the model's own earlier answers). The
  hidden states of the generated tokens are kept as they are produced, so the ``<SEG>`` tokens and the
  ``<p>…</p>`` spans of a generated answer (GCG) condition the decoder exactly as a teacher-forced pass over
  the same tokens would (the LLM is causal).

Either way the states then go through the stage-3 decoding of training (``llm_projector`` →
:func:`~xsam_model.modeling.seg_plan.plan_decoding` with the task's ``seg_reduce`` mode → connector → mask
decoder). Every run's classes are restricted to its own sample's phrases (plus "no object"), which is what
X-SAM's batch-size-1 evaluation sees, so a sample's result does not depend on what it was batched with.
Stage-1 exports decode with the linear head (no LLM). Results are :class:`Decoded` (final decoder layer of
each run); :mod:`xsam_model.postprocess` turns them into masks. Everything runs under
``torch.inference_mode``; on GPU the model is typically bf16 (inputs follow the model's dtype).

Random draws: the region sampler's point draws are seeded per batch from ``(seed, first key)``, so the same
batch gives the same region tokens in any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from pipelines.errors import XsamError
from pipelines.schema import Sample
from xsam_model.config import eval_processor
from xsam_model.postprocess import Geometry
from xsam_model.processor import XSamProcessor

MODES = ("teacher", "generate")
STOP_TOKENS = ("<|end|>",)
"""Phi-3's end of turn (X-SAM's ``STOP_WORDS``); the tokenizer's EOS stops generation too."""

LogitsHook = Callable[[int, torch.Tensor], torch.Tensor]
"""``(step, B×V logits) -> B×V logits`` applied before the greedy pick (constrained decoding, tests)."""


class InferenceError(XsamError, ValueError):
    """Inputs inference cannot run on (a stage without a decoder, a prompt without a user turn, …)."""


@dataclass(frozen=True)
class InferenceConfig:
    mode: str = "teacher"
    """``teacher`` (answers given; X-SAM's protocol except GCG) or ``generate`` (greedy)."""
    max_new_tokens: int = 512
    """Per generated answer (X-SAM's ``GenerationConfig``: 512, greedy, one beam)."""
    use_cache: bool = True
    """Generation with the LLM's KV cache; False recomputes the whole sequence each step (for checks)."""
    seed: int = 0
    """Seeds the region sampler's point draws (with the batch's first key)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise InferenceError(f"inference mode must be one of {MODES}, got {self.mode!r}")
        if self.max_new_tokens <= 0:
            raise InferenceError(f"max_new_tokens must be positive, got {self.max_new_tokens}")


@dataclass
class Decoded:
    """One sample's decoder output (final layer), its answer text and its phrases' class columns."""

    key: str
    task: str
    text: str | None
    """The answer(s): generated, or the reference in teacher mode; turns joined by a newline."""
    class_logits: torch.Tensor | None
    """RxQx(K+1): the sample's own K class columns (phrases in token order, or the linear head's classes),
    then "no object"; None when nothing was decoded (no ``<SEG>``)."""
    mask_logits: torch.Tensor | None
    """RxQxhxw on the decoder's grid of the padded SAM frame."""
    run_seg: list[int]
    """Per run: the ``<SEG>`` index it is conditioned on (-1: one run for the whole image)."""
    num_seg: int
    """``<SEG>`` tokens in the answer(s)."""
    prompt_spans: int
    """Class columns that come from the prompt; those after them are ``<p>`` spans of the answer (GCG)."""
    geometry: Geometry
    generated: list[list[int]] = field(default_factory=list)
    """Generated token ids per turn (generate mode)."""
    turn_seg: list[int | None] = field(default_factory=list)
    """Per answered turn: the index of its first ``<SEG>`` (None: the answer has none)."""

    @property
    def num_columns(self) -> int:
        return 0 if self.class_logits is None else self.class_logits.shape[-1] - 1


# ------------------------------------------------------------------------------------------ token spans
@dataclass(frozen=True)
class SpecialIds:
    seg: int
    p_open: int
    p_close: int


def span_ids(ids: Sequence[int], special: SpecialIds) -> tuple[list[int], list[int], int]:
    """Lenient ``<p>…</p>`` / ``<SEG>`` numbering of any token list (a generated one may be malformed).

    Returns ``(cond_ids, seg_ids, spans)``: span k's tokens (both tags included) get k, the n-th ``<SEG>``
    gets n, everything else -1. A span opens at a ``<p>`` outside a span and closes at the next ``</p>`` (a
    ``<p>`` inside a span is content; a stray ``</p>`` is ignored; a span still open at the end is dropped):
    the same spans the regex ``<p>(.*?)</p>`` finds in the decoded text, so span k is the k-th span of
    ``text``.
    """
    cond, seg = [-1] * len(ids), [-1] * len(ids)
    k, start, n_seg = 0, None, 0
    for t, tok in enumerate(ids):
        if start is None and tok == special.p_open:
            start = t
        elif start is not None and tok == special.p_close:
            cond[start : t + 1] = [k] * (t + 1 - start)
            k, start = k + 1, None
        if tok == special.seg:
            seg[t], n_seg = n_seg, n_seg + 1
    return cond, seg, k


def _batch_seed(seed: int, keys: Sequence[str]) -> int:
    digest = hashlib.sha256(f"{seed}\0{keys[0] if keys else ''}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------ generation
@dataclass
class Generation:
    """What :func:`greedy_generate` returns for B rows."""

    tokens: list[list[int]]
    """Per row: the generated ids, up to and including the stop token (if one came)."""
    prompt_hidden: torch.Tensor
    """BxTxD final LLM states of the (right-padded) prompt."""
    hidden: list[torch.Tensor]
    """Per row: NbxD states of its generated tokens that were fed back (a final stop token may have none)."""


def _step(llm: nn.Module, embeds, attention, positions, cache):
    """One LLM call → (final states BxTxD, cache)."""
    out = llm.model(
        inputs_embeds=embeds,
        attention_mask=attention,
        position_ids=positions,
        cache=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state, cache


@torch.inference_mode()
def greedy_generate(
    llm: nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    use_cache: bool = True,
    logits_hook: LogitsHook | None = None,
) -> Generation:
    """Greedy decoding of B right-padded prompts (``embeds`` BxTxD, ``attention_mask`` BxT).

    The generated tokens follow the padding (row b's token j sits at position T+j with RoPE position n_b+j;
    the gap is masked), so the prompt pass is exactly the teacher-forced one. With ``use_cache`` each step
    feeds one token and reuses the keys and values; without, the whole sequence is recomputed every step (the
    same function, for checking the cache).
    """
    b, t = attention_mask.shape
    lengths = attention_mask.sum(1)
    positions = torch.arange(t, device=embeds.device).expand(b, t)
    prompt_hidden, cache = _step(
        llm, embeds, attention_mask, positions, _new_cache(llm) if use_cache else None
    )
    last = prompt_hidden[torch.arange(b, device=embeds.device), lengths - 1]  # each row's last prompt token
    logits = llm.lm_head(last).float()
    stop = torch.tensor(list(stop_ids), device=embeds.device)
    done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
    tokens, states = [], []
    seq, att, pos = embeds, attention_mask, positions
    embed = llm.get_input_embeddings()
    for step in range(max_new_tokens):
        if logits_hook is not None:
            logits = logits_hook(step, logits)
        tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, -1), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, stop)
        if bool(done.all()):
            break
        new = embed(tok.clamp(min=0)).unsqueeze(1)  # Bx1xD (finished rows feed a token nobody reads)
        att = torch.cat([att, att.new_ones(b, 1)], 1)
        nxt = (lengths + step).unsqueeze(1)  # Bx1 RoPE positions
        if use_cache:
            h, cache = _step(llm, new, att, nxt, cache)
        else:
            seq, pos = torch.cat([seq, new], 1), torch.cat([pos, nxt], 1)
            h, _ = _step(llm, seq, att, pos, None)
        states.append(h[:, -1])
        logits = llm.lm_head(h[:, -1]).float()
    return _collect(tokens, states, prompt_hidden, b)


def _new_cache(llm: nn.Module):
    return DynamicCache(config=llm.config)


def _collect(tokens: list, states: list, prompt_hidden: torch.Tensor, b: int) -> Generation:
    tok = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(b)]
    hid = torch.stack(states, 1) if states else prompt_hidden.new_zeros(b, 0, prompt_hidden.shape[-1])
    rows, hidden = [], []
    for i in range(b):
        ids = [x for x in tok[i] if x >= 0]
        rows.append(ids)
        hidden.append(hid[i, : min(len(ids), hid.shape[1])])
    return Generation(tokens=rows, prompt_hidden=prompt_hidden, hidden=hidden)


# ------------------------------------------------------------------------------------------ the runner
@dataclass
class _Sequences:
    """Per row, the LLM states of the whole (expanded) sequence and its span / ``<SEG>`` numbering."""

    hidden: list[torch.Tensor]  # TbxD
    cond: list[torch.Tensor]  # Tb long
    seg: list[torch.Tensor]  # Tb long
    texts: list[str | None]
    prompt_spans: list[int]
    turn_seg: list[list[int | None]]  # per answered turn: its first <SEG>'s index
    generated: list[list[list[int]]]


def _inputs_only(sample: Sample) -> Sample:
    """The Sample without its targets (inference needs the image, the conversation and the regions)."""
    return dataclasses.replace(sample, masks=[], ignore=None)


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype=dtype if x.is_floating_point() else None)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [move(t) for t in x]
        return x

    return {k: move(v) for k, v in batch.items()}


def _answer_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """T labels → ``[(start, end)]`` of each assistant answer (maximal runs of labels != -100)."""
    on = (labels != -100).tolist() + [False]
    runs, start = [], None
    for t, v in enumerate(on):
        if v and start is None:
            start = t
        elif not v and start is not None:
            runs.append((start, t))
            start = None
    return runs


class Inferencer:
    """Runs one stage's model over batches of ``(Sample, image bytes)`` of one task → :class:`Decoded`.

    ``model``: a built :class:`~xsam_model.modeling.xsam.XSam` with its processor (weights loaded, any device
    and dtype); ``stage``: 3 (LLM + phrase head) or 1 (segmentor + linear head). A Sample's conversation gives
    the prompt: in ``teacher`` mode its answers are used as they are; in ``generate`` mode every assistant
    turn is generated (and a trailing user turn is answered).
    """

    def __init__(self, model: nn.Module, cfg: InferenceConfig = InferenceConfig(), *, stage: int = 3):
        if stage not in (1, 3):
            raise InferenceError(
                f"stage {stage} has no segmentation output to infer (stage 2 trains only the projectors); "
                "use a stage-1 or stage-3 export"
            )
        proc = getattr(model, "processor", None)
        if proc is None:
            raise InferenceError(f"model {model.config.name!r} has no tokenizer (build it with its init_dir)")
        self.model, self.cfg, self.stage = model, cfg, stage
        # X-SAM's evaluation pre-processing of the model's own processor: SigLIP padded to a square, no
        # jitter, no text cut (a long vocabulary list must reach the LLM whole)
        self.processor = XSamProcessor(
            eval_processor(proc.config), proc.tokenizer, model.config.special_tokens
        )
        self.special = SpecialIds(seg=proc.seg_id, p_open=proc.p_open_id, p_close=proc.p_close_id)
        tok = proc.tokenizer
        vocab = tok.get_vocab()
        stops = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if tok.eos_token_id is not None:
            stops.add(int(tok.eos_token_id))
        self.stop_ids = sorted(stops)
        self.end_id = vocab.get(STOP_TOKENS[0], tok.eos_token_id)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    # -------------------------------------------------------------------------------------- entry
    @torch.inference_mode()
    def __call__(
        self, pairs: Sequence[tuple[Sample, bytes]], logits_hook: LogitsHook | None = None
    ) -> list[Decoded]:
        """One batch (one task; X-SAM batches one task at a time) → one :class:`Decoded` per sample."""
        was_training = self.model.training
        self.model.eval()  # no dropout; the training loop's model goes back to train mode after
        try:
            return self._run(pairs, logits_hook)
        finally:
            self.model.train(was_training)

    def _run(self, pairs: Sequence[tuple[Sample, bytes]], logits_hook: LogitsHook | None) -> list[Decoded]:
        samples = [s for s, _ in pairs]
        if len({s.task for s in samples}) > 1:
            raise InferenceError(f"a batch must hold one task, got {sorted({s.task for s in samples})}")
        items = [self.processor(_inputs_only(s), image) for s, image in pairs]
        batch = _to_device(self.processor.collate(items), self.device, self.dtype)
        frame = self.processor.config.sam_size
        geos = [
            Geometry(frame, tuple(int(v) for v in batch["scaled_size"][i]), (s.image.height, s.image.width))
            for i, s in enumerate(samples)
        ]
        model = self.model
        sam_feats, pyramid = model.encode_sam(batch["extra_pixel_values"])
        if self.stage == 1:
            return self._stage1(samples, pyramid, geos)
        image_tokens, grid = model.encode_images(batch["pixel_values"], sam_feats)
        if self.cfg.mode == "teacher":
            seqs = self._teacher(batch, image_tokens, grid, samples)
        else:
            seqs = self._generate(batch, image_tokens, grid, samples, logits_hook)
        return self._decode(seqs, pyramid, samples, geos)

    def _expand(self, batch: dict, image_tokens: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's token expansion (image and region tokens), its region draws seeded by the batch."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_batch_seed(self.cfg.seed, batch["keys"]))
            return self.model._expand(batch, image_tokens, grid)

    def _stage1(self, samples: Sequence[Sample], pyramid, geos: list[Geometry]) -> list[Decoded]:
        final = self.model.mask_decoder(self.model.seg_connector(pyramid))[-1]
        return [
            Decoded(
                key=s.key,
                task=s.task,
                text=None,
                class_logits=final["class_queries_logits"][i : i + 1],
                mask_logits=final["masks_queries_logits"][i : i + 1],
                run_seg=[-1],
                num_seg=1,
                prompt_spans=0,
                geometry=geos[i],
            )
            for i, s in enumerate(samples)
        ]

    # -------------------------------------------------------------------------------------- teacher
    def _teacher(self, batch: dict, image_tokens, grid, samples: Sequence[Sample]) -> _Sequences:
        x = self._expand(batch, image_tokens, grid)
        h = self.model.llm.model(
            inputs_embeds=x["embeds"], attention_mask=x["attention_mask"], use_cache=False
        ).last_hidden_state
        seqs = _Sequences([], [], [], [], [], [], [])
        for b, sample in enumerate(samples):
            n = int(x["attention_mask"][b].sum())
            cond, seg = x["cond_ids"][b, :n], x["seg_ids"][b, :n]
            runs = _answer_runs(x["labels"][b, :n])
            seqs.hidden.append(h[b, :n])
            seqs.cond.append(cond)
            seqs.seg.append(seg)
            seqs.texts.append("\n".join(t.text for t in sample.conversation if t.role == "assistant") or None)
            first = runs[0][0] if runs else n
            seqs.prompt_spans.append(int(cond[:first].max()) + 1 if first else 0)
            seqs.turn_seg.append([_first_seg(seg[s:e]) for s, e in runs])
            seqs.generated.append([])
        return seqs

    # -------------------------------------------------------------------------------------- generate
    def _generate(self, batch: dict, image_tokens, grid, samples, hook: LogitsHook | None) -> _Sequences:
        """Answer every user turn in order; each round's context holds the earlier generated answers."""
        gaps, rounds = [], []
        for b, sample in enumerate(samples):
            n = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b, :n].tolist()
            cuts = [0, *(p for r in _answer_runs(batch["labels"][b, :n]) for p in r), n]
            gaps.append([ids[cuts[2 * i] : cuts[2 * i + 1]] for i in range(len(cuts) // 2)])
            rounds.append(sum(t.role == "user" for t in sample.conversation))
            if rounds[-1] == 0 or rounds[-1] > len(gaps[-1]):
                raise InferenceError(f"{sample.key}: no user turn to answer, or two user turns in a row")
        contexts = [g[0] for g in gaps]
        answers: list[list[list[int]]] = [[] for _ in samples]
        turn_seg: list[list[int | None]] = [[] for _ in samples]
        last: dict[int, tuple] = {}
        for r in range(max(rounds)):
            rows = [b for b in range(len(samples)) if rounds[b] > r]
            for b in rows[: len(rows) if r else 0]:  # round 0 asks the first question as it is
                prev = answers[b][-1]
                end = [] if prev and prev[-1] in self.stop_ids else [self.end_id]
                contexts[b] = contexts[b] + prev + end + gaps[b][r]
            x, scans = self._expand_ids(contexts, batch, image_tokens, grid)
            pick = torch.tensor(rows, device=self.device)
            gen = greedy_generate(
                self.model.llm,
                x["embeds"][pick],
                x["attention_mask"][pick],
                stop_ids=self.stop_ids,
                max_new_tokens=self.cfg.max_new_tokens,
                use_cache=self.cfg.use_cache,
                logits_hook=hook,
            )
            for i, b in enumerate(rows):
                answers[b].append(gen.tokens[i])
                first = _first_seg(torch.tensor(span_ids(gen.tokens[i], self.special)[1]))
                n_ctx = sum(v >= 0 for v in scans[b][1])
                turn_seg[b].append(None if first is None else n_ctx + first)
                last[b] = (x, gen, i, scans[b])
        return self._assemble(samples, last, answers, turn_seg)

    def _expand_ids(self, contexts: list[list[int]], batch: dict, image_tokens, grid):
        """Token id lists (with image/region placeholders) → the model's expanded inputs for every row of the
        batch (all rows each round, so the region draws are the same in every round), and their scans."""
        scans = [span_ids(c, self.special) for c in contexts]
        b, t = len(contexts), max(len(c) for c in contexts)
        sub = {
            "input_ids": torch.full((b, t), self.processor.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((b, t), dtype=torch.long),
            "labels": torch.full((b, t), -100, dtype=torch.long),
            "cond_ids": torch.full((b, t), -1, dtype=torch.long),
            "seg_ids": torch.full((b, t), -1, dtype=torch.long),
        }
        for i, (c, (cond, seg, _)) in enumerate(zip(contexts, scans, strict=True)):
            n = len(c)
            sub["input_ids"][i, :n] = torch.tensor(c)
            sub["attention_mask"][i, :n] = 1
            sub["cond_ids"][i, :n] = torch.tensor(cond)
            sub["seg_ids"][i, :n] = torch.tensor(seg)
        sub = {k: v.to(self.device) for k, v in sub.items()}
        sub.update(region_masks=batch["region_masks"], keys=batch["keys"])
        return self._expand(sub, image_tokens, grid), scans

    def _assemble(self, samples, last: dict, answers, turn_seg) -> _Sequences:
        """Each row's final round: prompt states + generated states, with the answer's spans and ``<SEG>``
        numbered after the context's."""
        seqs = _Sequences([], [], [], [], [], [], [])
        for b in range(len(samples)):
            x, gen, i, (_, ctx_seg, ctx_spans) = last[b]
            n = int(x["attention_mask"][b].sum())
            states = gen.hidden[i]
            cond, seg, _ = span_ids(gen.tokens[i][: len(states)], self.special)
            n_seg = sum(v >= 0 for v in ctx_seg)
            cond = torch.tensor([v + ctx_spans if v >= 0 else -1 for v in cond], dtype=torch.long)
            seg = torch.tensor([v + n_seg if v >= 0 else -1 for v in seg], dtype=torch.long)
            seqs.hidden.append(torch.cat([gen.prompt_hidden[i, :n], states]))
            seqs.cond.append(torch.cat([x["cond_ids"][b, :n], cond.to(self.device)]))
            seqs.seg.append(torch.cat([x["seg_ids"][b, :n], seg.to(self.device)]))
            seqs.texts.append("\n".join(self.text(a) for a in answers[b]))
            seqs.prompt_spans.append(ctx_spans)
            seqs.turn_seg.append(turn_seg[b])
            seqs.generated.append(answers[b])
        return seqs

    def text(self, ids: Sequence[int]) -> str:
        """Generated ids → text, decoded in one pass over the whole sequence as X-SAM's ``batch_decode`` does
        (a SentencePiece decoder strips the leading space of each separate decode, so decoding the runs
        between tags apart would glue the word after ``</p>`` to the phrase). Stop tokens are dropped;
        ``<p>``, ``</p>`` and ``<SEG>`` stay only where the model emitted those tokens: the same characters
        spelled by ordinary tokens are broken up (``< SEG>``), so the spans a regex finds in the text are the
        token spans."""
        return decode_generated(self.processor.tokenizer, ids, self.special, self.stop_ids)

    # -------------------------------------------------------------------------------------- decoding
    def _decode(self, seqs: _Sequences, pyramid, samples, geos: list[Geometry]) -> list[Decoded]:
        """The stage-3 decoding of training on the collected states; runs restricted to own columns."""
        model = self.model
        d = model.config.decoder
        task = samples[0].task
        mode = d.seg_reduce if task in d.seg_reduce_tasks else "last"
        pad = nn.utils.rnn.pad_sequence
        hidden = pad(seqs.hidden, batch_first=True)
        cond = pad(seqs.cond, batch_first=True, padding_value=-1)
        seg = pad(seqs.seg, batch_first=True, padding_value=-1)
        spans = [int(c.max()) + 1 if len(c) else 0 for c in seqs.cond]
        num_seg = [int((s >= 0).sum()) for s in seqs.seg]
        out = [
            Decoded(
                key=s.key,
                task=s.task,
                text=seqs.texts[b],
                class_logits=None,
                mask_logits=None,
                run_seg=[],
                num_seg=num_seg[b],
                prompt_spans=seqs.prompt_spans[b],
                geometry=geos[b],
                generated=seqs.generated[b],
                turn_seg=seqs.turn_seg[b],
            )
            for b, s in enumerate(samples)
        ]
        if not any(num_seg):
            return out
        preds, plan = model.decode_states(pyramid, hidden, cond, seg, task)
        final = preds[-1]
        shared = mode in ("main", "per_seg")  # classes = the batch's phrases concatenated
        offsets = [sum(spans[:b]) for b in range(len(spans))]
        per_sample: dict[int, list[int]] = {}
        for r, (b, _) in enumerate(plan.runs.tolist()):
            per_sample.setdefault(b, []).append(r)
        width = final["class_queries_logits"].shape[-1]
        for b, runs in per_sample.items():
            if not num_seg[b]:
                continue  # no <SEG>: nothing conditions the decoder (an empty prediction)
            start = offsets[b] if shared else 0
            cols = [*range(start, start + spans[b]), width - 1]
            out[b].class_logits = final["class_queries_logits"][runs][:, :, cols]
            out[b].mask_logits = final["masks_queries_logits"][runs]
            out[b].run_seg = [int(plan.runs[r, 1]) for r in runs]
        return out


_TAG_LITERAL = re.compile(r"<SEG>|<p>|</p>")


def decode_generated(tok, ids: Sequence[int], special: SpecialIds, stop_ids: Sequence[int]) -> str:
    """:meth:`Inferencer.text` for a tokenizer ``tok``, the tag ids ``special`` and the ``stop_ids``."""
    tags = {special.seg: "<SEG>", special.p_open: "<p>", special.p_close: "</p>"}
    ids = [int(t) for t in ids if t not in stop_ids]
    full = tok.decode(ids, skip_special_tokens=False)
    emitted: set[int] = set()  # character offsets in ``full`` where an emitted tag token starts
    for k, t in enumerate(ids):
        if t in tags:
            before = len(tok.decode(ids[:k], skip_special_tokens=False)) if k else 0
            at = full.find(tags[t], max(0, before - 1))
            if at >= 0:
                emitted.add(at)
    return _break_literal_tags(full, emitted)


def _break_literal_tags(text: str, emitted: set[int]) -> str:
    """``text`` with every ``<p>``, ``</p>`` or ``<SEG>`` that does not start at an ``emitted`` offset broken
    up by a space after its ``<``."""
    return _TAG_LITERAL.sub(lambda m: m[0] if m.start() in emitted else m[0][0] + " " + m[0][1:], text)


def _first_seg(seg: torch.Tensor) -> int | None:
    idx = seg[seg >= 0]
    return int(idx[0]) if len(idx) else None
