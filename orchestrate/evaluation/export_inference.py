"""Inference over built val sets: a stage export → ``predictions.jsonl`` → the metrics (``evaluate.py
--export``).

    run = run_inference(export, shards, data_root, ["coco_panoptic/val"], out_dir, InferenceOptions())
    results = evaluate_export(export, shards, data_root, sets, out_dir, options, num_workers=2)

Work is split by shard: a job is one shard of one set (only the first shards of a set when ``max_samples``
cuts it short). Inline, one :class:`ShardPredictor` runs the jobs in order; with ``num_workers`` > 1 that many
Ray actors each load the model once and take jobs as they free up (``ray.util.ActorPool``), and the driver
writes their lines to ``predictions.jsonl`` in job order as they come back, so the file is the same either
way. Batches never cross a shard, so a sample always has the same batch neighbours.

Per set, X-SAM's protocol (``AAAI26_Archive`` stage-3 ``val_datasets``): genseg and ovseg sets are prompted
with the set's whole vocabulary in category-id order (:func:`ground_truth.prompt_vocabulary`); every benchmark
is teacher-forced (the reference answer given, ``output_ids_with_output=True``) except GCG, whose caption is
generated (``mode="auto"``; ``teacher`` or ``generate`` force one mode for every set). A stage-1 export (the
segmentor with its linear head over COCO's 133 categories) evaluates panoptic, semantic and instance sets
whose categories its head has; a stage-3 export evaluates every scored set; a stage-2 export has no masks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrate.evaluation import captions
from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.eval_errors import EvaluationError, listing
from orchestrate.evaluation.inference_report import log_eval_run
from orchestrate.evaluation.predictions import PredictionReader, index_predictions
from orchestrate.evaluation.report import details_document, write_outputs
from orchestrate.evaluation.run import score_predictions
from orchestrate.evaluation.scoring import SCORERS, ScoreOptions, check_protocol
from pipelines import shard_store, templates
from pipelines.schema import IMAGE, Sample, Turn

if TYPE_CHECKING:
    from xsam_model.export import Export

# Heavy imports (torch, transformers, ray, wandb) are deferred into the functions that load or run the model,
# the Ray actors and the wandb run: `evaluate.py --help`, `predict.py` and the scorers stay light (the
# xsam_model package imports the model builder, so even xsam_model.export loads torch).

log = logging.getLogger(__name__)

OUTPUT_KIND = {
    "panoptic": "panoptic",
    "semantic": "semantic",
    "instance": "instances",
    "vgd": "instances",
    "refer": "per_turn",
    "grefer": "per_turn",
    "reason": "per_turn",
    "interactive": "interactive",
    "gcg": "phrases",
}
"""Scorer kind of a set (``ground_truth.SOURCE_KINDS``) → what inference writes for it
(:data:`xsam_model.postprocess.OUTPUT_KINDS`)."""
VOCAB_KINDS = ("panoptic", "semantic", "instance")
"""Sets prompted with their whole vocabulary."""


@dataclass(frozen=True)
class InferenceOptions:
    """How an export is run over val sets."""

    mode: str = "auto"
    """``auto`` (teacher-forced, GCG generated: X-SAM's protocol), ``teacher`` or ``generate``."""
    batch_size: int = 4
    max_new_tokens: int = 512
    use_cache: bool = True
    device: str = "cpu"
    precision: str = "auto"
    """``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16`` or ``fp32``."""
    max_samples: int | None = None
    """Per set: only its first N samples (shard order); the set is then scored on those samples only."""
    seed: int = 0
    overlays: int = 2
    """Prediction overlays per set in the wandb run."""
    protocol: str = "paper"
    """``paper`` (X-SAM's evaluation code) or ``standard`` (:data:`scoring.PROTOCOLS`, docs/evaluation.md)."""

    def __post_init__(self):
        check_protocol(self.protocol)
        if self.mode not in ("auto", "teacher", "generate"):
            raise EvaluationError(f"--mode must be auto, teacher or generate, got {self.mode!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise EvaluationError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.batch_size <= 0 or self.max_new_tokens <= 0 or (self.max_samples or 1) <= 0:
            raise EvaluationError("--batch-size, --max-new-tokens and --max-samples must be positive")

    def dtype(self):
        import torch

        bf16 = self.precision == "bf16" or (self.precision == "auto" and self.device.startswith("cuda"))
        return torch.bfloat16 if bf16 else torch.float32


# ------------------------------------------------------------------------------------------ the export
def open_export(url: str) -> Export:
    """The export at ``url``, its model.safetensors verified against its lineage; a missing, incomplete or
    damaged export is an :class:`EvaluationError` naming what was expected."""
    from xsam_model.export import Export, ExportError

    try:
        return Export.read(url)
    except ExportError as e:
        raise EvaluationError(f"--export {e}") from None


def load_export(url: str, device: str = "cpu", precision: str = "auto", flavor: str | None = None):
    """``(model, Export)``: the export's flavor built (its ``init_dir`` for the tokenizer and the frozen
    parts), the export's weights loaded strictly, in eval mode on ``device``."""
    from xsam_model.export import Export, ExportError

    try:
        info = Export.read(url, verify=False)  # build_model checks the bytes it loads against the lineage
    except ExportError as e:
        raise EvaluationError(f"--export {e}") from None
    opts = InferenceOptions(device=device, precision=precision)
    try:
        return info.build_model(device, opts.dtype(), flavor=flavor), info
    except ExportError as e:
        raise EvaluationError(f"--export {e}") from None


# ------------------------------------------------------------------------------------------ sets
@dataclass(frozen=True)
class SetJob:
    """One set as a worker runs it (picklable)."""

    evs: gt.EvalSet
    output: str
    mode: str
    """``teacher`` or ``generate``."""
    stage: int
    vocabulary: tuple[tuple[int, str], ...] = ()
    """(category id, phrase) of the vocabulary prompt (genseg/ovseg sets)."""
    columns: tuple[int, ...] | None = None
    """Stage 1: the linear head's column of each vocabulary category."""


def plan_sets(shards: str, data_root: str, names: Sequence[str], info: Export, mode: str) -> list[SetJob]:
    """Open every set and check that the export can evaluate it (errors name the set and what it needs)."""
    if info.stage == 2:
        raise EvaluationError(
            f"--export {info.url} is a stage-2 export (projectors only): no segmentation output to evaluate; "
            "give a stage-1 or stage-3 export"
        )
    jobs = []
    for name in names:
        evs = gt.open_set(shards, data_root, name)
        vocab, columns = (), None
        if evs.kind in VOCAB_KINDS:
            vocab = tuple(gt.prompt_vocabulary(evs))
        if info.stage == 1:
            columns = _linear_columns(evs, vocab, info)
        set_mode = ("generate" if evs.kind == "gcg" else "teacher") if mode == "auto" else mode
        jobs.append(SetJob(evs, OUTPUT_KIND[evs.kind], set_mode, info.stage, vocab, columns))
    return jobs


def _linear_columns(evs: gt.EvalSet, vocab, info: Export) -> tuple[int, ...]:
    if evs.kind not in VOCAB_KINDS:
        raise EvaluationError(
            f"--sets: {evs.name} is a {evs.task} set, but {info.url} is a stage-1 export (segmentor + linear "
            "head) that evaluates only panoptic, semantic and instance sets; give a stage-3 export"
        )
    where = {c: i for i, c in enumerate(info.category_ids)}
    missing = [str(c) for c, _ in vocab if c not in where]
    if missing:
        raise EvaluationError(
            f"--sets: {evs.name} has categories {listing(missing)} that the stage-1 linear head of {info.url} "
            "does not have; give a stage-3 export"
        )
    return tuple(where[c] for c, _ in vocab)


def vocabulary_prompt(sample: Sample, vocab: Sequence[tuple[int, str]]) -> Sample:
    """X-SAM's evaluation prompt for a genseg/ovseg sample: every category of the set, in id order, with the
    sample's own answer (``<SEG>``). The first wording of our genseg templates."""
    names = [n for _, n in vocab]
    question = templates.GENSEG_QUESTIONS[0].format(cats=templates.join_tags(names))
    answers = [t.text for t in sample.conversation if t.role == "assistant"]
    answer = answers[-1] if answers else templates.SEG_ANSWERS[2]
    conv = [Turn("user", templates.with_image(question, IMAGE + "\n")), Turn("assistant", answer)]
    return dataclasses.replace(sample, conversation=conv, phrases=names)


def prepare(job: SetJob, sample: Sample):
    """``(the Sample inference runs on, its OutputSpec)``."""
    from xsam_model.postprocess import OutputSpec

    evs = job.evs
    if job.vocabulary:
        cats = tuple(c for c, _ in job.vocabulary)
        stuff = frozenset(i for i, c in enumerate(cats) if not (evs.categories or {}).get(c, True))
        if job.stage == 3:
            sample = vocabulary_prompt(sample, job.vocabulary)
        dense = evs.source in gt.DENSE_SEMANTIC_SOURCES  # X-SAM's semantic pass of the same output
        return sample, OutputSpec(
            job.output, categories=cats, stuff=stuff, columns=job.columns, semantic_too=dense
        )
    if evs.kind == "vgd":
        return sample, OutputSpec("instances", categories=slot_categories(sample))
    if job.output == "interactive":
        if not sample.regions:
            raise EvaluationError(f"{sample.key}: an interactive sample without its visual prompt")
        return sample, OutputSpec("interactive", prompt=sample.regions[0].rle)
    return sample, OutputSpec(job.output)


def slot_categories(sample: Sample) -> tuple[int, ...]:
    """VGD: the category of each ``<region>`` slot (the build's ``slot_category_ids``, else its masks')."""
    slots = sample.meta.get("slot_category_ids")
    if isinstance(slots, list) and len(slots) == len(sample.phrases):
        return tuple(int(c) for c in slots)
    by_label = {m.label: m.category_id for m in sample.masks if m.category_id is not None}
    if set(range(len(sample.phrases))) - set(by_label):
        raise EvaluationError(f"{sample.key}: a VGD slot without a category (meta.slot_category_ids)")
    return tuple(int(by_label[k]) for k in range(len(sample.phrases)))


def asked(sample: Sample) -> dict:
    """``{"key", "questions"}``: the user turns of the Sample inference runs on, as the model is asked
    them."""
    return {"key": sample.key, "questions": [t.text for t in sample.conversation if t.role == "user"]}


# ------------------------------------------------------------------------------------------ one worker
@dataclass
class ShardLines:
    """What one job returns: the shard's prediction lines in order and its counters."""

    set_name: str
    shard: str
    lines: list[dict]
    no_seg: int = 0
    seconds: float = 0.0
    first: dict | None = None
    """The first sample's key and the user turns it was asked (``inference.json`` shows the prompt)."""


class ShardPredictor:
    """Holds one model (loaded once) and predicts whole shards: inline, or as a Ray actor."""

    def __init__(self, export: str, options: InferenceOptions, model=None, info: Export | None = None):
        from xsam_model.inferencer import MODES, InferenceConfig, Inferencer

        if model is None:
            model, info = load_export(export, options.device, options.precision)
        self.options, self.info = options, info
        self.inferencers = {
            m: Inferencer(
                model,
                InferenceConfig(m, options.max_new_tokens, options.use_cache, options.seed),
                stage=info.stage,
            )
            for m in MODES
        }

    def predict(self, job: SetJob, shard: str, limit: int | None = None) -> ShardLines:
        t0 = time.perf_counter()
        out = ShardLines(job.evs.name, shard, [])
        batch: list = []
        for n, (sample, image) in enumerate(gt.read_shard(job.evs, shard)):
            if limit is not None and n >= limit:
                break
            if image is None:
                raise EvaluationError(f"{sample.key}: the shard holds no image for it")
            batch.append((*prepare(job, sample), image))
            if out.first is None:
                out.first = asked(batch[-1][0])
            if len(batch) == self.options.batch_size:
                self._flush(job, batch, out)
        self._flush(job, batch, out)
        out.seconds = time.perf_counter() - t0
        return out

    def predict_samples(self, job: SetJob, pairs: Sequence[tuple[Sample, bytes]]) -> ShardLines:
        """The same for Samples in hand (the training-time evaluation's subset)."""
        out = ShardLines(job.evs.name, "", [])
        batch = [(*prepare(job, s), image) for s, image in pairs]
        for i in range(0, len(batch), self.options.batch_size):
            self._flush(job, batch[i : i + self.options.batch_size], out)
        return out

    def _flush(self, job: SetJob, batch: list, out: ShardLines) -> None:
        from xsam_model.postprocess import prediction_line

        if not batch:
            return
        decoded = self.inferencers[job.mode]([(s, image) for s, _, image in batch])
        for d, (_, spec, _) in zip(decoded, batch, strict=True):
            out.lines.append(prediction_line(d, spec))
            out.no_seg += int(job.stage == 3 and d.num_seg == 0)
        batch.clear()


# ------------------------------------------------------------------------------------------ the driver
@dataclass
class InferenceRun:
    """What :func:`run_inference` wrote and counted."""

    predictions: str
    info: Export
    jobs: list[SetJob]
    samples: dict[str, int] = field(default_factory=dict)
    no_seg: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    protocol: str = "paper"
    first: dict[str, dict] = field(default_factory=dict)
    """Per set, its first sample's key and questions (:func:`asked`)."""

    def summary(self) -> dict[str, Any]:
        return {
            "export": self.info.url,
            "stage": self.info.stage,
            "flavor": self.info.flavor,
            "protocol": self.protocol,
            "sets": {
                j.evs.name: {
                    "mode": j.mode,
                    "samples": self.samples.get(j.evs.name, 0),
                    "no_seg": self.no_seg.get(j.evs.name, 0),
                    "first_sample": self.first.get(j.evs.name),
                }
                for j in self.jobs
            },
            "seconds": round(self.seconds, 3),
        }


def shard_jobs(jobs: Sequence[SetJob], max_samples: int | None) -> list[tuple[SetJob, str, int | None]]:
    """``(set, shard, limit)`` per shard to run, in set and shard order; with ``max_samples`` a set's
    shards stop once they hold that many samples (counts from the manifest)."""
    out = []
    for job in jobs:
        if max_samples is None:
            out += [(job, s, None) for s in job.evs.shards]
            continue
        left = max_samples
        manifest = shard_store.Manifest.read(_shards_root(job.evs), job.evs.source, job.evs.split)
        for entry in manifest.shards:
            if left <= 0:
                break
            out.append((job, entry.file, min(left, entry.samples)))
            left -= entry.samples
    return out


def _shards_root(evs: gt.EvalSet) -> str:
    return evs.folder.rstrip("/").rsplit("/", 2)[0]


def run_inference(
    export: str,
    shards: str,
    data_root: str,
    sets: Sequence[str],
    out_dir: str,
    options: InferenceOptions = InferenceOptions(),
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
) -> InferenceRun:
    """Predict every sample of ``sets`` (or each set's first ``options.max_samples``) with the export and
    write ``<out_dir>/predictions.jsonl``. Progress is logged per shard."""
    t0 = time.time()
    info = open_export(export)
    jobs = plan_sets(shards, data_root, sets, info, options.mode)
    work = shard_jobs(jobs, options.max_samples)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(out_dir, "predictions.jsonl")
    run = InferenceRun(path, info, jobs, protocol=options.protocol)
    stream = (
        _inline(export, options, work)
        if num_workers <= 1
        else _ray(export, options, work, num_workers, use_gpu)
    )
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        for n, part in enumerate(stream, start=1):
            f.writelines(json.dumps(line) + "\n" for line in part.lines)
            f.flush()
            run.samples[part.set_name] = run.samples.get(part.set_name, 0) + len(part.lines)
            run.no_seg[part.set_name] = run.no_seg.get(part.set_name, 0) + part.no_seg
            if part.first is not None:
                run.first.setdefault(part.set_name, part.first)
            log.info(
                "%s: %s predicted (%d samples, %.1f s); %d/%d shards",
                part.set_name,
                part.shard,
                len(part.lines),
                part.seconds,
                n,
                len(work),
            )
    os.replace(tmp, path)
    run.seconds = time.time() - t0
    _write_json(os.path.join(out_dir, "inference.json"), run.summary())
    return run


def _inline(export: str, options: InferenceOptions, work) -> Iterator[ShardLines]:
    predictor = ShardPredictor(export, options)
    for job, shard, limit in work:
        yield predictor.predict(job, shard, limit)


def _ray(
    export: str, options: InferenceOptions, work, num_workers: int, use_gpu: bool
) -> Iterator[ShardLines]:
    """``num_workers`` Ray actors, each with the model loaded once and two jobs queued (so it never waits for
    the driver between shards); results in job order."""
    import ray

    if not ray.is_initialized():  # the caller's Ray, else the job's cluster (RAY_ADDRESS), else a local one
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else num_workers, log_to_driver=True)
    actor = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(ShardPredictor)
    actors = [actor.remote(export, options) for _ in range(max(1, min(num_workers, len(work))))]
    try:
        yield from _in_order(ray, actors, work, depth=2)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, EvaluationError):
            raise EvaluationError(str(e.cause)) from None
        raise
    except ray.exceptions.RayActorError as e:
        cause = getattr(e, "cause", None) or getattr(e, "error_msg", "")
        raise EvaluationError(f"an inference worker failed to start: {cause}") from None
    finally:
        for a in actors:
            ray.kill(a)


def _in_order(ray, actors: list, work: list, depth: int) -> Iterator[ShardLines]:
    """Job i runs on actor ``i % n``; each actor holds up to ``depth`` queued jobs; results come back in job
    order as soon as every earlier one is in."""
    n, submitted, nxt = len(actors), 0, 0
    pending: dict = {}
    done: dict[int, ShardLines] = {}
    while nxt < len(work):
        while submitted < len(work) and submitted < nxt + depth * n:
            ref = actors[submitted % n].predict.remote(*work[submitted])
            pending[ref] = submitted
            submitted += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        done[i] = ray.get(ready[0])
        while nxt in done:
            yield done.pop(nxt)
            nxt += 1


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ scoring
def score_subset(
    predictions: str,
    shards: str,
    data_root: str,
    sets: Sequence[str],
    text_sim_model: str | None = None,
    protocol: str = "paper",
) -> tuple[dict[str, dict[str, float]], dict[str, dict]]:
    """Score only the samples ``predictions`` has (a set's first N) with the evaluation's own scorers:
    ``(results, details)`` as :func:`score_predictions` computes them for whole sets, under ``protocol``."""
    refs = index_predictions(predictions)
    options = ScoreOptions(text_sim_model=text_sim_model, protocol=protocol)
    results, details = {}, {}
    try:
        for name in sets:
            evs = gt.open_set(shards, data_root, name)
            wanted = {k for k in refs if k.startswith(name + "/")}
            scorer = SCORERS[evs.kind](evs, options)
            with PredictionReader(predictions) as reader:
                for sample in _set_samples(evs, wanted):
                    scorer.add(evs, sample, reader.read(refs[sample.key]), predictions)
            if scorer.samples != len(wanted):
                raise EvaluationError(
                    f"{predictions}: {len(wanted) - scorer.samples} keys are not samples of {name}"
                )
            metrics, notes = scorer.result()
            results[name] = metrics
            details[name] = {
                "samples": scorer.samples,
                "notes": [*notes, "scored on a subset (--max-samples)"],
                "protocol": protocol,
            }
            if scorer.counts():
                details[name]["counts"] = scorer.counts()
    finally:
        captions.close()
    return results, details


def _set_samples(evs: gt.EvalSet, wanted: set[str]) -> Iterator[Sample]:
    found = 0
    for shard in evs.shards:
        for sample in gt.iter_shard_samples(evs, shard):
            if sample.key in wanted:
                found += 1
                yield sample
        if found == len(wanted):
            return


def default_sets(shards: str) -> list[str]:
    """Every built set that has a metric, training splits left out."""
    return [
        n for n in gt.built_sets(shards) if n.split("/")[0] in gt.SOURCE_KINDS and n.split("/")[1] != "train"
    ]


def evaluate_export(
    export: str,
    shards: str,
    data_root: str,
    sets: Sequence[str] | None,
    out_dir: str,
    options: InferenceOptions = InferenceOptions(),
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    text_sim_model: str | None = None,
    wandb_mode: str | None = "offline",
    compare_paper: bool = False,
) -> dict[str, dict[str, float]]:
    """Inference, then scoring: ``{set: {metric: percent}}``; ``results.json``, ``details.json``,
    ``inference.json``, ``predictions.jsonl`` and a wandb eval run under ``out_dir``. ``sets`` None: every
    built eval split that has a metric (:func:`default_sets`)."""
    names = list(sets) if sets else default_sets(shards)
    run = run_inference(
        export, shards, data_root, names, out_dir, options, num_workers=num_workers, use_gpu=use_gpu
    )
    if options.max_samples is None:
        results = score_predictions(
            run.predictions,
            shards,
            data_root,
            names,
            out_dir,
            num_workers,
            text_sim_model,
            "disabled",
            protocol=options.protocol,
        )
        details = json.loads(Path(out_dir, "details.json").read_text())["sets"]
    else:
        results, details = score_subset(
            run.predictions, shards, data_root, names, text_sim_model, options.protocol
        )
        write_outputs(out_dir, results, details, run.predictions, shards, None, protocol=options.protocol)
    for name, d in details.items():
        if run.no_seg.get(name):
            d.setdefault("notes", []).append(
                f"{run.no_seg[name]} samples generated no <SEG> (empty predictions)"
            )
    _write_json(
        os.path.join(out_dir, "details.json"),
        details_document(run.predictions, shards, details, options.protocol),
    )
    if wandb_mode and wandb_mode != "disabled":
        log_eval_run(
            out_dir, results, details, run, wandb_mode, overlays=options.overlays, compare_paper=compare_paper
        )
    return results
