"""Score a predictions file against built val sets: inline, or one Ray task per shard, merged exactly.

:func:`score_predictions` is what ``orchestrate/evaluate.py`` runs, and what inference calls once it has
written ``predictions.jsonl``. The driver keeps the predictions index (key -> byte span) and the merged metric
states; workers read one shard and only their own prediction lines.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from orchestrate.evaluation import captions
from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.eval_errors import EvaluationError, listing
from orchestrate.evaluation.predictions import PredRef, index_predictions
from orchestrate.evaluation.report import write_outputs
from orchestrate.evaluation.scoring import ScoreOptions, ShardResult, score_shard

# Heavy imports (ray) are deferred into the Ray path: scoring inline never loads it.

log = logging.getLogger(__name__)


def set_of_key(key: str) -> str:
    """``<source>/<split>`` of a sample key."""
    return "/".join(key.split("/")[:2])


def score_predictions(
    predictions_path: str,
    shards: str,
    data_root: str,
    sets: Sequence[str] | None = None,
    out_dir: str | None = None,
    num_workers: int = 0,
    text_sim_model: str | None = None,
    wandb_mode: str | None = "offline",
    compare_paper: bool = False,
    protocol: str = "paper",
) -> dict[str, dict[str, float]]:
    """Score ``predictions_path`` on ``sets`` (default: every set its keys belong to) and return
    ``{set: {metric: value in percent}}``. With ``out_dir``: ``results.json``, ``details.json`` and a wandb
    run there (with ``compare_paper``: the paper's table beside ours in it too). ``num_workers`` > 1 scores
    shards as Ray tasks (joining ``RAY_ADDRESS`` or a local Ray). ``protocol``: ``paper`` (X-SAM's code) or
    ``standard`` (:data:`scoring.PROTOCOLS`)."""
    options = ScoreOptions(text_sim_model=text_sim_model, protocol=protocol)  # a bad protocol fails first
    t0 = time.time()
    refs = index_predictions(predictions_path)
    names = list(sets) if sets else sorted({set_of_key(k) for k in refs})
    if not names:
        raise EvaluationError(f"{predictions_path}: no prediction, and no --sets named")
    evsets = [gt.open_set(shards, data_root, n) for n in names]
    if text_sim_model:
        captions.text_embedder(text_sim_model)  # a bad folder fails now, not in a worker
    by_set = _split_refs(refs, names, predictions_path)
    scorers, details = {}, {}
    for evs, parts in _score_all(evsets, by_set, predictions_path, options, num_workers):
        scorer = parts[0].scorer
        for p in parts[1:]:
            scorer.merge(p.scorer)
        _check_keys(evs, parts, by_set[evs.name], predictions_path)
        scorers[evs.name] = scorer
    results = {}
    try:
        for name, scorer in scorers.items():
            metrics, notes = scorer.result()
            results[name] = metrics
            details[name] = {"samples": scorer.samples, "notes": notes, "protocol": protocol}
            if scorer.counts():
                details[name]["counts"] = scorer.counts()
    finally:
        captions.close()
    log.info("scored %d sets in %.1f s", len(results), time.time() - t0)
    if out_dir:
        write_outputs(
            out_dir, results, details, predictions_path, shards, wandb_mode, compare_paper, protocol
        )
    return results


def _split_refs(refs: dict[str, PredRef], names: Sequence[str], path: str) -> dict[str, dict[str, PredRef]]:
    wanted = set(names)
    by_set: dict[str, dict[str, PredRef]] = {n: {} for n in names}
    other = 0
    for key, ref in refs.items():
        s = set_of_key(key)
        if s in wanted:
            by_set[s][key] = ref
        else:
            other += 1
    if other:
        log.info("%s: %d predictions of sets not scored here are ignored", path, other)
    return by_set


def _check_keys(evs: gt.EvalSet, parts: list[ShardResult], refs: dict[str, PredRef], path: str) -> None:
    missing = sorted(k for p in parts for k in p.missing)
    seen = {k for p in parts for k in p.keys}
    extra = sorted(set(refs) - seen)
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys of {evs.name} have no prediction: {listing(missing)}")
    if extra:
        lines = [f"{k} (line {refs[k].line})" for k in extra]
        problems.append(f"{len(extra)} keys are not samples of {evs.name}: {listing(lines)}")
    if problems:
        raise EvaluationError(f"{path}: " + "; ".join(problems))


def _score_all(
    evsets: list[gt.EvalSet], by_set: dict, path: str, options: ScoreOptions, num_workers: int
) -> Iterator[tuple[gt.EvalSet, list[ShardResult]]]:
    """``(set, shard results)`` per set, in the order given; progress logged per shard."""
    jobs = [(evs, shard) for evs in evsets for shard in evs.shards]
    total = {evs.name: len(evs.shards) for evs in evsets}
    done: dict[str, list[ShardResult]] = {evs.name: [] for evs in evsets}
    stream = (
        _inline(jobs, by_set, path, options)
        if num_workers <= 1
        else _ray(jobs, by_set, path, options, num_workers)
    )
    for n, result in enumerate(stream, start=1):
        done[result.set_name].append(result)
        log.info(
            "%s: %d/%d shards scored (%d/%d overall)",
            result.set_name,
            len(done[result.set_name]),
            total[result.set_name],
            n,
            len(jobs),
        )
    for evs in evsets:
        if not done[evs.name]:
            raise EvaluationError(f"{evs.name}: the manifest lists no shard")
        yield evs, done[evs.name]


def _inline(jobs, by_set, path, options) -> Iterator[ShardResult]:
    for evs, shard in jobs:
        yield score_shard(evs, shard, path, by_set[evs.name], options)


def _ray(jobs, by_set, path, options, num_workers: int) -> Iterator[ShardResult]:
    import ray

    if not ray.is_initialized():  # the caller's Ray, else the job's cluster (RAY_ADDRESS), else a local one
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else num_workers, log_to_driver=True)
    task = ray.remote(num_cpus=1)(_task)
    set_refs: dict[str, Any] = {}
    set_ids: dict[str, Any] = {}
    pending, queue = [], list(jobs)
    while queue or pending:
        while queue and len(pending) < 2 * num_workers:
            evs, shard = queue.pop(0)
            if evs.name not in set_refs:  # big per-set data goes to the object store once
                set_refs[evs.name] = ray.put(by_set[evs.name])
                set_ids[evs.name] = ray.put(evs)
            pending.append(task.remote(set_ids[evs.name], shard, path, set_refs[evs.name], options))
        ready, pending = ray.wait(pending, num_returns=1)
        yield _unwrap(ray, ready[0])


def _task(evs, shard, path, refs, options) -> ShardResult:
    return score_shard(evs, shard, path, refs, options)


def _unwrap(ray, ref) -> ShardResult:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, EvaluationError):
            raise EvaluationError(str(e.cause)) from None
        raise
